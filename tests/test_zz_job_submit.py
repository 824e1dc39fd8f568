"""Like users do: a real 2-node Ray cluster on this host (`ray start --head`, then `ray start --address`), the
chain submitted with `ray job submit`, a real `mlflow server`; its outputs equal the single-node demo run's.

Named to run last: `ray stop` ends every Ray process on the machine, so the session's in-process Ray
is shut down first."""

import json
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from conftest import DEMO_TINY, free_port, wait_http

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MB = 1024 * 1024


def _tables(d: Path) -> dict[str, object]:
    return {str(f.relative_to(d)): pq.read_table(f) for f in sorted(d.rglob("*.parquet"))}


@pytest.mark.slow
def test_ray_job_submit_on_two_nodes_places_work_on_both_and_matches_the_single_node_run(tmp_path, demo_run):
    """keplm pretrain (its stages prepare, kg build and kg neighbours, then 2 workers) as one job on a head and one
    more node of 1 CPU each: 2 CPUs in all, as the single-node demo run had. PACK would put both 0.5-CPU workers on
    one node; SPREAD puts one on each, and the PEPR actors spread too. Shards, neighbours and every step's loss
    equal the single-node demo run of the same config."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    demo_out, demo = demo_run
    # token auth, as docs/cluster.md says: the Jobs API refuses a request without the cluster's token
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    gcs, dash, mlf = free_port(), free_port(), free_port()
    mlflow = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                               "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1",
                               "--port", str(mlf), "--workers", "1"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    node = ["--num-cpus=1", f"--object-store-memory={150 * MB}", "--disable-usage-stats"]
    try:
        subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}", *node,
                        "--include-dashboard=true", "--dashboard-host=127.0.0.1"], env=env, check=True,
                       capture_output=True)
        # the second node: its own raylet and object store; its agents need ports of their own on this host
        subprocess.run([str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}", *node,
                        f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"],
                       env=env, check=True, capture_output=True)
        wait_http(f"http://127.0.0.1:{mlf}/health")
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/jobs/", timeout=10)
        out = tmp_path / "job"
        # one job, one driver: keplm pretrain runs prepare, kg build and kg neighbours as its stages
        # (the TransR stage is the demo run's, so both trainings start from the same embeddings)
        job = ["python", "-m", "keplm.jobs.pretrain", "--config", str(ROOT / "configs" / "demo.yaml"), "--output",
               str(out), "--embeddings", str(demo_out / "embed-transr"), f"tracking.uri=http://127.0.0.1:{mlf}",
               "train.placement_strategy=SPREAD", "train.cpus_per_worker=0.5", *DEMO_TINY]
        # no --working-dir: the two nodes share this host's Ray session directory, and one node's runtime-env
        # cleanup removes the unpacked copy the other's processes run in (keplm is installed on every "node")
        r = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}",
                            "--", *job],
                           env=env, capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        # the work ran on both nodes: the PEPR actors and the training workers, one per node
        assert "neighbours: 2 actors on 2 nodes" in r.stdout, r.stdout[-3000:]
        assert "train: 2 workers on 2 nodes" in r.stdout, r.stdout[-3000:]
        client = MlflowClient(f"http://127.0.0.1:{mlf}")
        run_id = json.loads((out / "train" / "mlflow_run.json").read_text())["run_id"]
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.params["train.placement_strategy"] == "SPREAD"
        assert len(set(json.loads(run.data.tags["keplm.worker_nodes"]))) == 2
        # the same outputs as the single-node run: shards, neighbours, and each step's loss (same seed, same rows)
        assert _tables(out / "prepare") == _tables(demo_out / "prepare")
        assert _tables(out / "neighbours") == _tables(demo_out / "neighbours")
        demo_client = MlflowClient(f"sqlite:///{demo_out / 'mlflow.db'}")
        demo_run_id = json.loads(demo.stdout.strip().splitlines()[-1])["mlflow_run_id"]

        def losses(c, rid):
            return [m.value for m in sorted(c.get_metric_history(rid, "loss"), key=lambda m: m.step)]

        single = losses(demo_client, demo_run_id)
        # every step's loss reached the server through the asynchronous queue, once
        assert len(single) == 12 and losses(client, run_id) == pytest.approx(single, rel=1e-6)
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True)
        mlflow.terminate()
        mlflow.wait(timeout=30)
