import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEMO = Path(__file__).resolve().parents[1] / "keplm" / "data" / "demo"


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
        ray.init(num_cpus=2, object_store_memory=500 * 1024 * 1024, include_dashboard=False,
                 log_to_driver=False)
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
