"""Infrastructure that knows no model or KG: config, Ray, MLflow, manifests, text."""
