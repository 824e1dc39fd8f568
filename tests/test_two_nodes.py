"""A sweep on a real two-node Ray cluster on this host (``ray.cluster_utils.Cluster``: a head and one more node,
each its own raylet and object store): its trials run on both nodes."""

import json
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, free_port

MB = 1024 * 1024


@pytest.mark.slow
def test_a_sweep_runs_its_trials_on_both_nodes(tmp_path):
    """2 trials at once, 1 worker of 0.9 CPU each, on two nodes of 1 CPU: one trial's worker per node. Both
    finish, and each trial's MLflow run names the node its worker ran on."""
    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster

    out = tmp_path / "sweep"
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump({"extends": str(REPO / "configs" / "sweep-demo.yaml"),
                                   "train": {"max_steps": 6, "checkpoint_every": 3},
                                   "sweep": {"num_samples": 2, "scheduler": "fifo"}}))
    # the dashboard (its State API) on a port of its own: sweeps free stopped trials' workers through it
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 1, "object_store_memory": 80 * MB, "include_dashboard": True,
                                      "dashboard_port": free_port()})
    try:
        node = cluster.add_node(num_cpus=1, object_store_memory=80 * MB)
        nodes = sorted([cluster.head_node.node_id, node.node_id])
        r = subprocess.run([sys.executable, "-m", "keplm.jobs.cli", "sweep", "--config", str(cfg), "--output", str(out),
                            "--address", cluster.address], cwd=REPO, capture_output=True, text=True, timeout=900)
    finally:
        cluster.shutdown()
        # Cluster.shutdown resets this process's module-wide internal-KV client, which the session's Ray (when an
        # earlier test started it) and the tests after this one use
        import ray
        import ray._private.worker
        from ray.experimental import internal_kv

        if ray.is_initialized():
            internal_kv._initialize_internal_kv(ray._private.worker.global_worker.gcs_client)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["trials"] == 2 and res["failed"] == 0
    client = MlflowClient(res["tracking_uri"])
    children = client.search_runs([client.get_experiment_by_name("keplm").experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{res['parent_run']}'")
    assert len(children) == 2 and all(c.info.status == "FINISHED" and c.data.metrics["step"] == 6 for c in children)
    placed = sorted(n for c in children for n in json.loads(c.data.tags["keplm.worker_nodes"]))
    assert placed == nodes
