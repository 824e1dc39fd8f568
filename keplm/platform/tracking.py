"""MLflow tracking: the one place keplm talks to MLflow (jobs call :func:`log_run`).

``tracking.uri`` unset and no ``MLFLOW_TRACKING_URI`` in the environment: nothing is logged (a job on a
laptop needs no server). Nested dicts are flattened to dotted keys (``pepr.alpha``).
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field

from keplm.platform.config import Section, flatten
from keplm.platform.errors import KeplmError


class TrackingConfig(Section):
    uri: str | None = Field(None, description="MLflow tracking URI; unset: $MLFLOW_TRACKING_URI or off")
    experiment: str = Field("keplm", description="MLflow experiment the runs are logged to")


def tracking_uri(cfg: TrackingConfig) -> str | None:
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def log_run(cfg: TrackingConfig, run_name: str, params: dict[str, Any], metrics: dict[str, float],
            tags: dict[str, str] | None = None, artifacts: list[str] = ()) -> str | None:
    """Log one finished run; returns its run id, or None when tracking is off."""
    uri = tracking_uri(cfg)
    if not uri:
        return None
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(cfg.experiment)
    with mlflow.start_run(run_name=run_name, tags=tags or {}) as run:
        flat = {k: ("" if v is None else str(v))[:6000] for k, v in flatten(params).items()}
        for i in range(0, len(flat), 100):  # MLflow caps a batch at 100 params
            mlflow.log_params(dict(list(flat.items())[i:i + 100]))
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        for path in artifacts:
            mlflow.log_artifact(path)
        return run.info.run_id


def mlflow_ui_command(uri: str) -> str:
    """How to look at the runs of a tracking store: its address for a server, else ``mlflow ui`` on it."""
    import shlex

    if uri.startswith(("http://", "https://", "databricks")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)}"


def check_tracking(uri: str) -> None:
    """Fail now, with one line, when the tracking server cannot be reached."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure here means "no usable tracking server"
        raise KeplmError(f"cannot reach the MLflow tracking store at {uri} "
                         f"({exc.__class__.__name__}); start it or set tracking.uri") from None
