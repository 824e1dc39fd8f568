"""MLflow tracking: the one place keplm talks to MLflow (jobs call :func:`log_run`).

``tracking.uri`` unset and no ``MLFLOW_TRACKING_URI`` in the environment: nothing is logged (a job on a
laptop needs no server). Nested dicts are flattened to dotted keys (``pepr.alpha``).

Credentials in a tracking URI (``https://user:token@host``, ``?token=…``) are never written or printed:
:func:`redact_uri` replaces them with ``***``, and :func:`redact` applies it to every string of a manifest, of the
params logged to MLflow, of a run marker and of the job's console output. Only the live connection uses the URI
as given.
"""

from __future__ import annotations

import os
import re
from typing import Any

from pydantic import Field

from keplm.platform.config import Section, flatten
from keplm.platform.errors import KeplmError


class TrackingConfig(Section):
    uri: str | None = Field(None, description="MLflow tracking URI; unset: $MLFLOW_TRACKING_URI or off")
    experiment: str = Field("keplm", description="MLflow experiment the runs are logged to")


# user:password@ (or user@) after a scheme, and secret-looking query parameters
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s?#]+)@")
_SECRET_QUERY = re.compile(r"(?P<key>[?&](?:[A-Za-z_-]*(?:token|secret|password|passwd|pwd|key|sig|signature|"
                           r"credential|auth)[A-Za-z_-]*))=(?P<value>[^&#\s]+)", re.I)


def redact_uri(text: str) -> str:
    """``text`` with the credentials of every URI in it replaced by ``***``: ``https://u:tok@h`` ->
    ``https://***@h``; ``?access_token=x`` -> ``?access_token=***``."""
    if not isinstance(text, str) or ("@" not in text and "=" not in text):
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}***@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}=***", text)


def redact(obj: Any) -> Any:
    """``obj`` (dicts, lists, strings, other values) with :func:`redact_uri` applied to every string."""
    if isinstance(obj, str):
        return redact_uri(obj)
    if isinstance(obj, dict):
        return {redact(k): redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    return obj


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
        flat = {k: redact_uri("" if v is None else str(v))[:6000] for k, v in flatten(params).items()}
        for i in range(0, len(flat), 100):  # MLflow caps a batch at 100 params
            mlflow.log_params(dict(list(flat.items())[i:i + 100]))
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        for path in artifacts:
            mlflow.log_artifact(path)
        return run.info.run_id


def mlflow_ui_command(uri: str) -> str:
    """How to look at the runs of a tracking store: its address for a server, else ``mlflow ui`` on it."""
    import shlex

    uri = redact_uri(uri)
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
        raise KeplmError(f"cannot reach the MLflow tracking store at {redact_uri(uri)} "
                         f"({exc.__class__.__name__}); start it or set tracking.uri") from None
