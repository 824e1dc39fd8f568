"""Knowledge-graph layer: reading, ids, entity linking, PEPR, KG embeddings."""
