"""Like users do: a real local Ray head, `ray job submit` of the pretrain job, a real `mlflow server`.

Named to run last: `ray stop` ends every Ray process on the machine, so the session's in-process Ray
is shut down first."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import free_port, wait_http

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_ray_job_submit_pretrain_logs_to_mlflow_server(tmp_path):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    import secrets
    import urllib.error
    import urllib.request

    # token auth, as docs/cluster.md says: the Jobs API refuses a request without the cluster's token
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    gcs, dash, mlf = free_port(), free_port(), free_port()
    mlflow = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                               "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1",
                               "--port", str(mlf), "--workers", "1"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}", "--num-cpus=2",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--disable-usage-stats"], env=env,
                   check=True, capture_output=True)
    try:
        wait_http(f"http://127.0.0.1:{mlf}/health")
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/jobs/", timeout=10)
        out = tmp_path / "run"
        r = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}",
                            "--working-dir", str(ROOT), "--", "python", "-m", "keplm.jobs.pretrain",
                            "--config", "configs/demo.yaml", "--output", str(out),
                            f"tracking.uri=http://127.0.0.1:{mlf}", "train.max_steps=4", "train.batch_size=4",
                            "train.cpus_per_worker=0.5"],
                           env=env, capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        run_id = json.loads((out / "train" / "mlflow_run.json").read_text())["run_id"]
        run = MlflowClient(f"http://127.0.0.1:{mlf}").get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.metrics["step"] == 4
        assert {"mlm_loss", "mnem_loss", "mmem_loss", "tokens_per_s", "mfu"} <= set(run.data.metrics)
        # every step's loss reached the server through the asynchronous queue, once
        history = MlflowClient(f"http://127.0.0.1:{mlf}").get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == [1, 2, 3, 4]
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True)
        mlflow.terminate()
        mlflow.wait(timeout=30)
