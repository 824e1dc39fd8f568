"""cluster.yaml against Ray's launcher schema, and the shipped configs."""

import json
from pathlib import Path

import jsonschema
import ray.autoscaler
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_matches_ray_launcher_schema():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu and all(t["min_workers"] <= t["max_workers"] <= cfg["max_workers"] for t in gpu)
    setup = " ".join(cfg["setup_commands"])
    assert "pip install" in setup and "keplm" in setup and "cu1" in setup  # a CUDA torch, then keplm
    assert "constraints-cpu" not in setup


def test_every_node_starts_with_token_auth_and_a_head_local_dashboard():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert starts and all(c.startswith("RAY_AUTH_MODE=token ") for c in starts)
    head = [c for c in cfg["head_start_ray_commands"] if "--head" in c]
    assert head and "--dashboard-host=127.0.0.1" in head[0]
    assert "0.0.0.0" not in (ROOT / "cluster.yaml").read_text()
    assert any(k.endswith("/.ray/auth_token") for k in cfg["file_mounts"])   # one token on every node


def test_a_wrong_field_is_caught():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    cfg["max_workerz"] = 3
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    try:
        jsonschema.validate(cfg, schema)
    except jsonschema.ValidationError:
        return
    raise AssertionError("Ray's schema accepted an unknown top-level field")


def test_shipped_configs_load_with_paper_settings():
    from keplm import config

    for kind in ("smedbert", "mlm", "wem", "ernie"):
        cfg = config.load(ROOT / "configs" / f"{kind}-base.yaml")
        assert cfg.model.kind == kind and cfg.model.hidden_size == 768 and cfg.batches.max_seq_len == 512
        assert cfg.train.num_workers * cfg.train.batch_size * cfg.train.grad_accum == 512 and cfg.train.lr == 5e-5
    demo = config.load(ROOT / "configs" / "demo.yaml")
    assert demo.model.kind == "smedbert" and demo.train.use_gpu is None
