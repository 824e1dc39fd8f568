"""cluster.yaml against Ray's launcher schema and safe to launch, the constraints files, the KubeRay RayJob example,
and the shipped configs."""

import argparse
import importlib.metadata
import json
import re
import shlex
import tomllib
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


def pins(path: Path) -> tuple[dict[str, str], list[str]]:
    """A constraints file's ``name==version`` pins (canonical names) and its option lines."""
    from packaging.utils import canonicalize_name

    versions, options = {}, []
    for line in path.read_text().splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            options.append(line)
            continue
        name, version = line.split("==")
        versions[canonicalize_name(name)] = version
    return versions, options


def test_gpu_nodes_install_the_pinned_gpu_stack():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    installs = [c for c in cfg["setup_commands"] if "pip install" in c]
    assert installs and all("-c ~/keplm/constraints-gpu.txt" in c and "~/keplm" in c for c in installs)
    assert not any("constraints-cpu" in c or "--index-url" in c for c in cfg["setup_commands"])
    assert "/home/ubuntu/keplm" in cfg["file_mounts"]   # the constraints file travels with the repository
    gpu, gpu_options = pins(ROOT / "constraints-gpu.txt")
    cpu, cpu_options = pins(ROOT / "constraints-cpu.txt")
    # the same versions, bar torch's build: the release CI tests, built for CUDA, from PyTorch's index for that build
    assert {k: v for k, v in gpu.items() if k != "torch"} == {k: v for k, v in cpu.items() if k != "torch"}
    cuda = re.fullmatch(re.escape(cpu["torch"]) + r"\+(cu\d+)", gpu["torch"])
    assert cuda, (cpu["torch"], gpu["torch"])
    assert gpu_options == [f"--extra-index-url https://download.pytorch.org/whl/{cuda.group(1)}"] and not cpu_options
    # every runtime dependency pinned, at the version this environment (CI's install) runs
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert {canonicalize_name(Requirement(d).name) for d in deps} == set(cpu)
    for name, version in cpu.items():
        assert importlib.metadata.version(name).split("+")[0] == version, name


def test_every_node_starts_with_token_auth_and_a_head_local_dashboard():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert starts and all(c.startswith("RAY_AUTH_MODE=token ") for c in starts)
    head = [c for c in cfg["head_start_ray_commands"] if "--head" in c]
    assert head and "--dashboard-host=127.0.0.1" in head[0]
    assert "0.0.0.0" not in (ROOT / "cluster.yaml").read_text()
    assert any(k.endswith("/.ray/auth_token") for k in cfg["file_mounts"])   # one token on every node
    assert "chmod 600 ~/.ray/auth_token" in cfg["setup_commands"]
    # the Jobs API is reached through `ray dashboard cluster.yaml`'s SSH tunnel, with the token
    text = (ROOT / "cluster.yaml").read_text()
    assert "ray dashboard cluster.yaml" in text
    assert "RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265" in text


def test_stages_and_checkpoints_go_to_nfs_and_s3():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    mounts = [c for c in cfg["initialization_commands"] if "mount -t nfs" in c]
    assert mounts and "mountpoint -q /mnt/keplm ||" in mounts[0]   # idempotent: the commands rerun on a config change
    text = (ROOT / "cluster.yaml").read_text()
    assert "--output /mnt/keplm/" in text and "train.storage_path=s3://" in text


def pretrain_args(argv: list[str]) -> argparse.Namespace:
    from keplm.jobs.common import add_common_args

    assert argv[:3] == ["python", "-m", "keplm.jobs.pretrain"], argv
    parser = argparse.ArgumentParser()
    add_common_args(parser)
    return parser.parse_args(argv[3:])


def test_kuberay_rayjob_example():
    from keplm import config

    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "docs" / "kuberay-rayjob.yaml").read_text())}
    assert set(docs) == {"RayJob", "NetworkPolicy"}   # no Secret: the token is created apart, never written here
    job, policy = docs["RayJob"], docs["NetworkPolicy"]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    # the entrypoint: the pretrain job, its config and overrides valid, outputs on the shared volume, checkpoints on S3
    args = pretrain_args(shlex.split(spec["entrypoint"]))
    assert args.config.startswith("/home/ray/keplm/configs/") and args.output.startswith("/mnt/keplm/")
    cfg = config.load(ROOT / "configs" / Path(args.config).name, list(args.overrides))
    assert cfg.train.storage_path.startswith("s3://") and cfg.train.use_gpu
    assert all(p.startswith("/mnt/keplm/") for p in [*cfg.prepare.corpus, cfg.prepare.kg, cfg.prepare.tokenizer])
    cluster = spec["rayClusterSpec"]
    # Ray's token auth, the token from a Kubernetes Secret; the Ray version the constraints pin
    assert cluster["authOptions"] == {"mode": "token", "secretName": "keplm-ray-token"}
    assert cluster["rayVersion"] == pins(ROOT / "constraints-cpu.txt")[0]["ray"]
    # the dashboard not exposed: a ClusterIP head service, no Ingress, the NetworkPolicy over every Ray pod
    head = cluster["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and not cluster.get("enableIngress", False)
    groups = [head, *cluster["workerGroupSpecs"]]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for group in groups:
        pod = group["template"]
        assert selector.items() <= pod["metadata"]["labels"].items()
        mounts = {m["mountPath"]: m["name"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes[mounts["/mnt/keplm"]]["persistentVolumeClaim"]["claimName"] == "keplm-shared"
        assert "env" not in pod["spec"]["containers"][0] or all(
            "value" not in e for e in pod["spec"]["containers"][0]["env"] if "TOKEN" in e["name"])
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = policy["spec"]["ingress"]
    assert rules[0] == {"from": [{"podSelector": {"matchLabels": selector}}]}   # the cluster's own pods
    # from anything else: the dashboard port only, for the submitter (a Job named after the RayJob) and the operator
    assert all(r.get("ports") == [{"port": 8265, "protocol": "TCP"}] for r in rules[1:])
    peers = [p["podSelector"]["matchLabels"] for r in rules[1:] for p in r["from"]]
    assert peers == [{"job-name": job["metadata"]["name"]}, {"app.kubernetes.io/name": "kuberay-operator"}]


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
