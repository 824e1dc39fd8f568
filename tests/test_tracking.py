"""The one MLflow helper: off without a URI, flattened params and metrics with one."""

from mlflow.tracking import MlflowClient

from keplm.platform.tracking import TrackingConfig, log_run


def test_off_without_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert log_run(TrackingConfig(), "r", {"a": 1}, {"m": 1.0}) is None


def test_logs_flattened_params_and_metrics(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = TrackingConfig(uri=uri, experiment="kg-test")
    params = {"embed": {"model": "transe", "dim": 100}, **{f"p{i}": i for i in range(150)}}
    run_id = log_run(cfg, "kg-embed-transe", params, {"kg_embed.mrr": 0.5}, tags={"keplm.job": "kg_embed"})
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.params["embed.model"] == "transe" and run.data.params["embed.dim"] == "100"
    assert len(run.data.params) == 152  # more than one MLflow batch of 100
    assert run.data.metrics == {"kg_embed.mrr": 0.5}
    assert run.data.tags["keplm.job"] == "kg_embed" and run.info.run_name == "kg-embed-transe"
