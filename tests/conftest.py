import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "keplm" / "data" / "demo"

# Ray Train's controller polls its workers every 2 s and starts a preemption-watcher actor (one more process)
# for each run; on a 2-core host those waits and that process are a fifth of a 12-step demo run. Every job
# the tests start (their subprocesses inherit this environment) polls at 0.25 s and runs without the watcher,
# which no test exercises. Users keep Ray's defaults.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

# The demo pretraining the pretrain and console tests share: 2 workers x batch 4, 12 steps, a checkpoint and a
# progress line every 4.
DEMO_TINY = ["train.max_steps=12", "train.checkpoint_every=4", "train.log_every=4", "train.batch_size=4",
             "train.lr=0.002", "train.warmup_ratio=0.0"]


def need_shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def ray_local():
    """One small local Ray for the whole session (500 MB object store, no dashboard)."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, object_store_memory=500 * 1024 * 1024, include_dashboard=False,
                 log_to_driver=False)
        from keplm.platform.ray_session import mark_no_state_api

        mark_no_state_api()   # as keplm's own local Ray: no dashboard, so no placement-group cleaner
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_prepared(ray_local, tmp_path_factory):
    """The demo corpus prepared once (configs/demo.yaml) for the stages after prepare."""
    from keplm import config
    from keplm.kg.prepare import run_prepare

    out = tmp_path_factory.mktemp("demo_prepared")
    cfg = config.load(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    run_prepare(cfg.prepare, out, {"prepare": config.dump(cfg)["prepare"]})
    return out


@pytest.fixture(scope="session")
def demo_stages(demo_prepared, tmp_path_factory):
    """The KG stages on the demo, once: ``g`` (kg build), ``nb`` (PEPR neighbours), ``transr`` (1 epoch, dim 16)."""
    from keplm import config
    from keplm.kg.embed import run_embed
    from keplm.kg.graph import GraphConfig, build_graph
    from keplm.kg.pepr import PEPRConfig, run_neighbours

    root = tmp_path_factory.mktemp("demo_stages")
    build_graph(DEMO / "kg", root / "g", GraphConfig(), {}, corpus_dir=demo_prepared)
    run_neighbours(root / "g", root / "nb", PEPRConfig(num_actors=1, actor_num_cpus=0.5), {})
    c = config.load(None, ["embed.dim=16", "embed.relation_dim=8", "embed.epochs=1", "embed.batch_size=512"])
    run_embed(root / "g", root / "transr", c.embed, {})
    return root


def job_in_process(module: str, argv: list, capsys) -> tuple[int, str]:
    """``python -m keplm.jobs.<module> argv`` run in this process (its ``main``, what the command line runs)
    -> (exit code, stderr). For the jobs' argument and input checks, where a subprocess adds only start-up."""
    import importlib

    capsys.readouterr()
    rc = importlib.import_module(f"keplm.jobs.{module}").main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def run_pretrain(out: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``keplm pretrain --config configs/demo.yaml --output OUT`` with :data:`DEMO_TINY` and ``args`` (flags and
    overrides), as a user runs it: a subprocess, stdout and stderr into one pipe. Both ``.stdout`` and ``.stderr``
    hold the interleaved lines; the JSON result is the last line of a run that succeeded."""
    flags = [a for a in args if a.startswith("-")]
    rest = [a for a in args if not a.startswith("-")]
    r = subprocess.run([sys.executable, "-m", "keplm.jobs.pretrain", "--config", "configs/demo.yaml", "--output",
                        str(out), *flags, *DEMO_TINY, *rest], cwd=REPO, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=900)
    r.stderr = r.stdout
    if check:
        assert r.returncode == 0, r.stdout[-3000:]
    return r


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """One demo pretraining (every stage, then training) for the whole session: the tests that inspect its
    console, outputs, MLflow run and checkpoints read it, and the resume tests reuse its stages. Only
    ``test_pretrain``'s rerun test runs the same command on it again."""
    out = tmp_path_factory.mktemp("demo_run") / "demo"
    return out, run_pretrain(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(1)
    raise AssertionError(f"{url} did not come up")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a sqlite backend; yields its URI."""
    d = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                             f"sqlite:///{d / 'mlflow.db'}", "--artifacts-destination", str(d / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
