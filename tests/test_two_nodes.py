"""A sweep on a real two-node Ray cluster on this host (``ray.cluster_utils.Cluster``: a head and one more node,
each its own raylet and object store): its trials run on both nodes."""

import json
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, free_port

MB = 1024 * 1024


def restore_session_kv() -> None:
    """Cluster.shutdown resets this process's module-wide internal-KV client, which the session's Ray (when an
    earlier test started it) and the tests after this one use."""
    import ray
    import ray._private.worker
    from ray.experimental import internal_kv

    if ray.is_initialized():
        internal_kv._initialize_internal_kv(ray._private.worker.global_worker.gcs_client)


def two_node_cluster():
    """A head and one more node, 1 CPU each; the dashboard (its State API) on a port of its own: sweeps free
    stopped trials' resources through it."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 1, "object_store_memory": 80 * MB, "include_dashboard": True,
                                      "dashboard_port": free_port()})
    return cluster, cluster.add_node(num_cpus=1, object_store_memory=80 * MB)


def sweep_config(tmp_path, **sweep) -> str:
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump({"extends": str(REPO / "configs" / "sweep-demo.yaml"),
                                   "train": {"max_steps": sweep.pop("max_steps", 6), "checkpoint_every": 3},
                                   "sweep": {"num_samples": 2, "scheduler": "fifo", **sweep}}))
    return str(cfg)


def trial_runs(res: dict):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(res["tracking_uri"])
    return client, client.search_runs([client.get_experiment_by_name("keplm").experiment_id],
                                      f"tags.`mlflow.parentRunId` = '{res['parent_run']}'")


@pytest.mark.slow
def test_a_sweep_runs_its_trials_on_both_nodes(tmp_path):
    """2 trials at once, 1 worker of 0.9 CPU each, on two nodes of 1 CPU: one trial per node. Both finish, and
    each trial's MLflow run names the node it trained on. The trials run Ray Train (sweep.train_in_trial: false),
    its reports reaching Tune through TuneReportCallback: the path of multi-worker trials."""
    out = tmp_path / "sweep"
    cluster, node = two_node_cluster()
    try:
        nodes = sorted([cluster.head_node.node_id, node.node_id])
        r = subprocess.run([sys.executable, "-m", "keplm.jobs.cli", "sweep", "--config", sweep_config(tmp_path),
                            "--output", str(out), "--address", cluster.address, "sweep.train_in_trial=false"],
                           cwd=REPO, capture_output=True,
                           text=True, timeout=900)
    finally:
        cluster.shutdown()
        restore_session_kv()
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["trials"] == 2 and res["failed"] == 0
    _, children = trial_runs(res)
    assert len(children) == 2 and all(c.info.status == "FINISHED" and c.data.metrics["step"] == 6 for c in children)
    placed = sorted(n for c in children for n in json.loads(c.data.tags["keplm.worker_nodes"]))
    assert placed == nodes
