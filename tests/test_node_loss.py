"""A fixed-size pretraining run that loses a node: one keplm line naming the node and what the run waits for, a
wait bounded by train.resources_timeout_s, then exit code 3, a FAILED MLflow run and no half-written output
(keplm.platform.train_resources)."""

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO

MB = 1024 * 1024


def _node(node_id, alive=True, cpus=1.0, ip="10.0.0.1"):
    return {"NodeID": node_id, "Alive": alive, "NodeManagerAddress": ip, "Resources": {"CPU": cpus}}


def test_the_notice_names_the_lost_node_and_what_the_group_waits_for():
    from keplm.platform.train_resources import ResourceWaitNotice, describe_group

    assert describe_group(2, {"CPU": 0.9}) == "2 workers x 0.9 CPU"
    assert describe_group(1, {"CPU": 8.0, "GPU": 1.0}) == "1 worker x 1 GPU + 8 CPU"
    notice = ResourceWaitNotice(15)
    # a first start on a cluster that holds the group: nothing to say
    assert notice.notice(2, {"CPU": 0.9}, [_node("a"), _node("b", ip="10.0.0.2")]) is None
    # a first start on a cluster too small for it (0.9 CPU fits once per 1-CPU node)
    assert notice.notice(2, {"CPU": 0.9}, [_node("a")]) == (
        "train: waiting up to 15 s (train.resources_timeout_s) for 2 workers x 0.9 CPU: the live nodes hold 1")
    # a restart after worker rank 1's node died
    notice._worker_nodes = {0: ("a", "10.0.0.1"), 1: ("b", "10.0.0.2")}
    line = notice.notice(2, {"CPU": 0.9}, [_node("a"), _node("b", alive=False, ip="10.0.0.2")])
    assert line == ("train: node b (10.0.0.2) is gone, with worker rank 1; waiting up to 15 s "
                    "(train.resources_timeout_s) for 2 workers x 0.9 CPU (the live nodes hold 1)")
    # ... while a spare node can take its worker: said, and no shortfall
    line = notice.notice(2, {"CPU": 0.9}, [_node("a"), _node("b", alive=False), _node("c")])
    assert line.endswith("for 2 workers x 0.9 CPU") and "node b (10.0.0.2) is gone" in line
    # a restart with every node alive (a worker's process died): nothing to say
    assert notice.notice(2, {"CPU": 0.9}, [_node("a"), _node("b")]) is None


def test_a_group_that_could_not_start_is_one_line_and_exit_code_3(monkeypatch):
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError

    from keplm.platform import train_resources as tr

    monkeypatch.setattr(tr, "cluster_nodes", lambda: [_node("a"), _node("old", alive=False),
                                                      _node("b", alive=False, ip="10.0.0.2")])
    err = tr.explain_start_failure(ControllerError(WorkerGroupStartupTimeoutError(2)), 2, {"CPU": 0.9}, 15, {"old"})
    assert isinstance(err, tr.ClusterResourcesError) and err.exit_code == 3
    assert str(err) == ("training stopped: 2 workers x 0.9 CPU could not be placed within train.resources_timeout_s "
                        "(15 s); lost during the run: node b (10.0.0.2). Rerun the same command to resume from the "
                        "latest checkpoint once the cluster has the resources")
    err = tr.explain_start_failure(ControllerError(WorkerGroupStartupFailedError("x")), 2, {"CPU": 0.9}, 15,
                                   {"old", "b"})
    assert str(err).startswith("training stopped: the workers of 2 workers x 0.9 CPU died while starting. Rerun")
    # any other failure is not this one
    assert tr.explain_start_failure(ControllerError(ValueError("x")), 2, {"CPU": 1}, 15, set()) is None
    assert tr.explain_start_failure(RuntimeError("x"), 2, {"CPU": 1}, 15, set()) is None
    # the start timeout is the run's only while it runs
    monkeypatch.delenv(tr.START_TIMEOUT_ENV, raising=False)
    with tr.bounded_start_wait(15):
        assert os.environ[tr.START_TIMEOUT_ENV] == "15"
    assert tr.START_TIMEOUT_ENV not in os.environ


@pytest.mark.slow
def test_a_fixed_size_run_that_loses_a_node_says_so_and_fails_within_the_wait(demo_prepared, tmp_path):
    """2 workers (0.9 CPU each) on a head and one more node of 1 CPU each: the extra node is killed outright after
    step 4 (its checkpoint). The run cannot place 2 workers on the head alone: one keplm line names the node and
    what the run waits for, and train.resources_timeout_s (10 s) later the job ends with exit code 3."""
    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster

    timeout_s = 10
    out = tmp_path / "run"
    console = tmp_path / "console.txt"
    # the GCS checks each node every second and calls it dead after 3 failed checks (Ray's default: 3 s and 5)
    health = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 1, "object_store_memory": 80 * MB, "include_dashboard": False,
                                      "_system_config": health})
    proc = None
    try:
        node = cluster.add_node(num_cpus=1, object_store_memory=80 * MB)
        with open(console, "w") as sink:
            proc = subprocess.Popen(
                [sys.executable, "-m", "keplm.jobs.pretrain", "--config", "configs/demo.yaml", "--output", str(out),
                 f"--prepared={demo_prepared}", "--address", cluster.address, "model.kind=mlm", "train.batch_size=4",
                 "train.max_steps=400", "train.checkpoint_every=4", "train.log_every=4",
                 f"train.resources_timeout_s={timeout_s}"],
                cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, text=True)
        end = time.monotonic() + 240
        while "train: step 4/" not in console.read_text() and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.2)
        assert proc.poll() is None and "train: step 4/" in console.read_text(), console.read_text()[-3000:]
        cluster.remove_node(node, allow_graceful=False)   # as a node that vanishes: no goodbye to the GCS
        removed = time.monotonic()
        # the wait, the GCS's few seconds to see the node dead, and the shutdown; never Ray's retry every minute
        rc = proc.wait(timeout=timeout_s + 60)
        took = time.monotonic() - removed
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        cluster.shutdown()
        # Cluster.shutdown resets this process's module-wide internal-KV client, which the session's Ray (still
        # connected) and the tests after this one use
        import ray._private.worker
        from ray.experimental import internal_kv

        internal_kv._initialize_internal_kv(ray._private.worker.global_worker.gcs_client)
    text = console.read_text()
    lines = text.strip().splitlines()
    assert rc == 3 and took < timeout_s + 30, (rc, took, text[-3000:])
    gone = [line for line in lines if "is gone" in line]
    assert len(gone) == 1, text[-3000:]
    assert f"node {node.node_id} (" in gone[0] and "with worker rank" in gone[0]
    assert f"waiting up to {timeout_s} s (train.resources_timeout_s) for 2 workers x 0.9 CPU" in gone[0]
    assert lines[-1] == (f"keplm pretrain: error: training stopped: 2 workers x 0.9 CPU could not be placed within "
                         f"train.resources_timeout_s ({timeout_s} s); lost during the run: node {node.node_id} "
                         f"({node.node_ip_address}). Rerun the same command to resume from the latest checkpoint once "
                         f"the cluster has the resources")
    assert "Traceback" not in text and not lines[-1].startswith("{")
    # no retry loop: the exit within the wait above is the proof; Ray Train's own lines reach the log file only
    # while the driver lives (log_to_driver), so a line the controller logs as the job ends may be missing there
    log = (out / "logs" / "keplm.log").read_text(encoding="utf-8")
    assert log.count("Attempting to start training worker group") <= 2 and "max allowed: inf" not in log
    # the MLflow run FAILED; nothing half-written: no model, no manifest, and the step-4 checkpoint to resume from
    run_id = json.loads((out / "train" / "mlflow_run.json").read_text())["run_id"]
    assert MlflowClient(f"sqlite:///{out / 'mlflow.db'}").get_run(run_id).info.status == "FAILED"
    assert not (out / "model").exists() and not (out / "manifest.json").exists()
    assert list((out / "train" / "ray_train").glob("*/checkpoint_*/state.pt"))
