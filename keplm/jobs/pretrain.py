"""`keplm pretrain`: the whole chain (prepare -> kg build -> kg neighbours -> kg embed -> Ray Train) in one job.

Stages live under ``--output DIR`` (``prepare/``, ``graph/``, ``neighbours/``, ``embed-transr/`` or
``embed-transe/``, ``train/``). A stage is reused when its ``stage_key.json`` — a hash of its config
section and of its inputs (files, or upstream manifests) — still matches, so a rerun skips finished stages
and a changed K or corpus reruns only what depends on it. ``--prepared``, ``--neighbours`` and
``--embeddings`` use existing stage outputs instead. Rerunning the same command after an interruption
resumes training from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path

from keplm import config as keplm_config
from keplm.jobs.common import add_common_args, module_main
from keplm.platform.config import flatten, resolve_path
from keplm.platform.errors import KeplmError
from keplm.platform.manifest import MANIFEST, hash_inputs, read_manifest, sha256_file, sha256_json, write_manifest
from keplm.platform.ray_session import connect
from keplm.platform.tracking import check_tracking

log = logging.getLogger(__name__)
PRETRAIN_SCHEMA_VERSION = 1
NEEDS = {"smedbert": ("neighbours", "transr"), "ernie": (None, "transe"), "mlm": (None, None), "wem": (None, None)}


def _stage(out: Path, key_parts: dict, run) -> Path:
    """Run ``run(out)`` unless ``out`` holds a finished stage with the same key."""
    key = sha256_json(key_parts)
    key_file = out / "stage_key.json"
    if (out / MANIFEST).is_file() and key_file.is_file() and json.loads(key_file.read_text())["key"] == key:
        log.warning("pretrain: reusing %s (inputs and config unchanged)", out)
        return out
    log.warning("pretrain: running stage %s", out.name)
    run(out)
    key_file.write_text(json.dumps({"key": key}))
    return out


def _manifest_hash(d: Path) -> str:
    return sha256_file(d / MANIFEST)


def _entity_names_hash(d: Path) -> str:
    import pyarrow.parquet as pq

    names = pq.read_table(d / "entities.parquet", columns=["name"]).column("name").to_pylist()
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def ensure_stages(cfg, out: Path, args) -> dict[str, Path | None]:
    from keplm.kg.embed import run_embed
    from keplm.kg.graph import build_graph
    from keplm.kg.pepr import run_neighbours
    from keplm.kg.prepare import run_prepare

    dump = keplm_config.dump(cfg)
    need_nb, need_embed = NEEDS[cfg.model.kind]
    if args.prepared:
        prepared = Path(args.prepared)
        read_manifest(prepared, "prepare")
    else:
        if not cfg.prepare.corpus or not cfg.prepare.kg:
            raise KeplmError("pretrain: the config names no corpus/KG (prepare.corpus, prepare.kg) and no --prepared")
        inputs = hash_inputs([resolve_path(c) for c in cfg.prepare.corpus] + [resolve_path(cfg.prepare.kg)])
        prepared = _stage(out / "prepare", {"prepare": dump["prepare"], "inputs": inputs},
                          lambda d: run_prepare(cfg.prepare, d, {"prepare": dump["prepare"]}))
    stages: dict[str, Path | None] = {"prepare": prepared, "neighbours": None, "embed": None}
    if need_nb is None and need_embed is None:
        return stages
    kg_dir = resolve_path(cfg.prepare.kg) if cfg.prepare.kg else None
    graph = None
    if (need_nb and not args.neighbours) or (need_embed and not args.embeddings):
        if kg_dir is None:
            raise KeplmError("pretrain: prepare.kg is needed to build the graph")
        graph = _stage(out / "graph", {"graph": dump["graph"], "kg": hash_inputs([kg_dir]), "corpus": _manifest_hash(prepared)},
                       lambda d: build_graph(kg_dir, d, cfg.graph, {"graph": dump["graph"]}, corpus_dir=prepared))
    if need_nb:
        stages["neighbours"] = Path(args.neighbours) if args.neighbours else _stage(
            out / "neighbours", {"pepr": dump["pepr"], "graph": _manifest_hash(graph)},
            lambda d: run_neighbours(graph, d, cfg.pepr, {"pepr": dump["pepr"]}))
    if need_embed:
        if args.embeddings:
            stages["embed"] = Path(args.embeddings)
        else:
            embed_cfg = cfg.embed.model_copy(update={"model": need_embed})
            section = {"embed": embed_cfg.model_dump(mode="json")}
            stages["embed"] = _stage(out / f"embed-{need_embed}", {**section, "graph": _manifest_hash(graph)},
                                     lambda d: run_embed(graph, d, embed_cfg, section, cfg.tracking))
    return stages


def check_lineage(stages: dict[str, Path | None]) -> dict[str, str]:
    """All KG artifacts must carry the entity ids the shards were linked with; -> lineage tags."""
    prepared = stages["prepare"]
    want = _entity_names_hash(prepared)
    tags = {"lineage.prepare": "manifest:" + _manifest_hash(prepared)}
    for name in ("neighbours", "embed"):
        d = stages[name]
        if d is None:
            continue
        read_manifest(d)
        if _entity_names_hash(d) != want:
            raise KeplmError(f"{d}: its entity ids differ from the shards' ({prepared}); rebuild it from the same KG")
        tags[f"lineage.{name}"] = "manifest:" + _manifest_hash(d)
    return tags


def tracking_uri_for(cfg, out: Path) -> str:
    from keplm.platform.tracking import tracking_uri

    return tracking_uri(cfg.tracking) or f"sqlite:///{(out / 'mlflow.db').resolve()}"


def training_inputs(cfg, stages: dict[str, Path | None], train_dir: Path) -> dict:
    """Shard lists (training / held-out validation) and the worker build context, KG arrays in the object store."""
    import pyarrow.parquet as pq
    import ray

    from keplm.models.data import KnowledgeIndex
    from keplm.platform.train_loop import split_validation

    files = sorted(str(f.resolve()) for f in (stages["prepare"] / "shards").glob("*.parquet"))
    if not files:
        raise KeplmError(f"{stages['prepare']}: no shards")
    try:
        files, val_files = split_validation(files, cfg.train.val_rows, train_dir / "split")
    except ValueError as exc:
        raise KeplmError(str(exc)) from None
    rows = sum(pq.read_metadata(f).num_rows for f in files)
    if rows < cfg.train.num_workers * cfg.train.batch_size * cfg.train.grad_accum:
        raise KeplmError(f"{rows} training rows cannot fill one step of {cfg.train.num_workers} workers x "
                         f"batch {cfg.train.batch_size} x accumulation {cfg.train.grad_accum}")
    arrays_ref = knowledge_ref = None
    if stages["embed"] is not None:
        from keplm.kg.embed import load_embeddings

        arrays_ref = ray.put(load_embeddings(stages["embed"]))
    if stages["neighbours"] is not None:
        knowledge_ref = ray.put(KnowledgeIndex.load(stages["neighbours"]))
    context = {"model": cfg.model.model_dump(mode="json"), "batches": cfg.batches.model_dump(mode="json"),
               "prepare_dir": str(stages["prepare"].resolve()), "arrays": arrays_ref, "knowledge": knowledge_ref}
    return {"files": files, "val_files": val_files, "context": context}


def start_run(client, cfg, run_name: str, tags: dict[str, str]) -> str:
    """An MLflow run with the resolved config as flattened params; -> run id."""
    from mlflow.entities import Param

    exp = client.get_experiment_by_name(cfg.tracking.experiment) or client.get_experiment(
        client.create_experiment(cfg.tracking.experiment))
    run_id = client.create_run(exp.experiment_id, run_name=run_name, tags=tags).info.run_id
    params = {k: ("" if v is None else str(v))[:6000] for k, v in flatten(keplm_config.dump(cfg)).items()}
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])
    return run_id


def run(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from keplm.models.setup import build_for_worker
    from keplm.platform.train_loop import run_training

    cfg = keplm_config.load(args.config, list(args.overrides))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri_for(cfg, out)
    check_tracking(uri)
    connect(cfg.ray, args.address)
    stages = ensure_stages(cfg, out, args)
    lineage = check_lineage(stages)
    train_dir = out / "train"
    train_dir.mkdir(exist_ok=True)
    inputs = training_inputs(cfg, stages, train_dir)

    client = MlflowClient(uri)
    run_file = train_dir / "mlflow_run.json"
    run_id = json.loads(run_file.read_text())["run_id"] if run_file.is_file() else None
    if run_id is None:
        run_id = start_run(client, cfg, f"pretrain-{cfg.model.kind}",
                           {"keplm.job": "pretrain", "keplm.model": cfg.model.kind, **lineage})
        run_file.write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))
    try:
        result = run_training(cfg.train, inputs["files"], build_for_worker, inputs["context"], train_dir, uri, run_id,
                              cfg.batches.max_seq_len, val_files=inputs["val_files"])
    except Exception as exc:  # noqa: BLE001
        client.set_terminated(run_id, status="FAILED")
        raise KeplmError(f"training failed: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    metrics = dict(result.metrics or {})
    counts = {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool))}
    if result.checkpoint is not None and metrics.get("final"):
        with result.checkpoint.as_directory() as d:
            shutil.rmtree(out / "model", ignore_errors=True)
            shutil.copytree(Path(d) / "model", out / "model")
        shutil.copytree(stages["prepare"] / "tokenizer", out / "model", dirs_exist_ok=True)
        client.log_artifacts(run_id, str(out / "model"), artifact_path="model")
        client.set_terminated(run_id, status="FINISHED")
    write_manifest(out, "pretrain", PRETRAIN_SCHEMA_VERSION, keplm_config.dump(cfg), lineage,
                   {**counts, "mlflow_run_id": run_id, "tracking_uri": uri,
                    "model_dir": str(out / "model") if (out / "model").is_dir() else None})
    print(json.dumps({"job": "pretrain", "output": str(out), "mlflow_run_id": run_id, "counts": counts}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="the whole chain on Ray: prepare, KG stage, Ray Train pretraining")
    add_common_args(p)
    p.add_argument("--prepared", help="use this keplm prepare output instead of running prepare")
    p.add_argument("--neighbours", help="use this keplm kg neighbours output")
    p.add_argument("--embeddings", help="use this keplm kg embed output")
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    return module_main(register, argv)


if __name__ == "__main__":
    sys.exit(main())
