"""The pretraining chain as functions: the KG/corpus stages a model kind needs (reused when unchanged),
lineage checks, the worker inputs, and the MLflow run of a training. ``keplm pretrain`` runs them once;
``keplm sweep`` / ``keplm ablate`` run the stages once and the training per trial.

Stages live under one output directory (``prepare/``, ``graph/``, ``neighbours/``, ``embed-transr/`` or
``embed-transe/``). A stage is reused when its ``stage_key.json`` — a hash of its config section and of its
inputs (files, or upstream manifests), and of the manifest it was written for — still matches, so a rerun skips
finished stages and a changed K or corpus reruns only what depends on it. A stage is written into a staging
directory and published with its manifest last, and its key is removed before a rebuild and written (atomically)
after it: a stage whose run failed or was killed part-way is rebuilt, never reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from keplm.platform.config import dump_config, flatten, resolve_path
from keplm.platform.errors import KeplmError
from keplm.platform.manifest import MANIFEST, describe_counts, hash_inputs, read_manifest, sha256_file, sha256_json

log = logging.getLogger(__name__)
NEEDS = {"smedbert": ("neighbours", "transr"), "ernie": (None, "transe"), "kebiolm": (None, "transe"),
         "mlm": (None, None), "wem": (None, None), "embert": (None, None)}


def _stage(out: Path, key_parts: dict, run) -> Path:
    """Run ``run(out)`` unless ``out`` holds a finished stage with the same key; a console line at its start and
    one at its end (seconds, counts)."""
    from keplm.platform import console

    from keplm.platform.outputs import is_owned, mark, write_json_atomic

    key = sha256_json(key_parts)
    key_file = out / "stage_key.json"
    if _finished_stage_key(out) == key:
        log.info("reusing stage %s: %s (inputs and config unchanged)", out.name, out)
        return out
    with console.stage(out.name) as st:
        if is_owned(out.parent) or key_file.is_file():   # a stage directory of a keplm output (or of keplm before markers)
            mark(out)
        key_file.unlink(missing_ok=True)   # from here until the new key is written, nothing here is reused
        run(out)   # publishes the stage (manifest last) only when it succeeds: keplm.platform.outputs.staged
        write_json_atomic(key_file, {"key": key, "manifest": sha256_file(out / MANIFEST)})
        manifest = read_manifest(out)
        st["counts"] = describe_counts(manifest.get("job", ""), manifest.get("counts") or {})
    return out


def _finished_stage_key(out: Path) -> str | None:
    """The key of the finished stage in ``out``, or None (rebuild) when its manifest is missing, its
    ``stage_key.json`` is missing, empty or corrupt, or the manifest is not the one the key was written for."""
    try:
        doc = json.loads((out / "stage_key.json").read_text(encoding="utf-8"))
        if doc["manifest"] != sha256_file(out / MANIFEST):
            return None
        return str(doc["key"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _manifest_hash(d: Path) -> str:
    return sha256_file(d / MANIFEST)


def _entity_names_hash(d: Path) -> str:
    import pyarrow.parquet as pq

    names = pq.read_table(d / "entities.parquet", columns=["name"]).column("name").to_pylist()
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def ensure_stages(cfg, out: Path, prepared: str | Path | None = None, neighbours: str | Path | None = None,
                  embeddings: str | Path | None = None, kind: str | None = None) -> dict[str, Path | None]:
    """The stage directories ``kind`` (default ``cfg.model.kind``) trains on, built under ``out`` unless given."""
    from keplm.kg.embed import run_embed
    from keplm.kg.graph import build_graph
    from keplm.kg.pepr import run_neighbours
    from keplm.kg.prepare import run_prepare

    from keplm.models.setup import needs_graph

    dump = dump_config(cfg)
    kind = kind or cfg.model.kind
    need_nb, need_embed = NEEDS[kind]
    need_graph = needs_graph(cfg.model.model_copy(update={"kind": kind}))
    if prepared:
        prepared = Path(prepared)
        read_manifest(prepared, "prepare")
    else:
        if not cfg.prepare.corpus or not cfg.prepare.kg:
            raise KeplmError("pretrain: the config names no corpus/KG (prepare.corpus, prepare.kg) and no --prepared")
        inputs = hash_inputs([resolve_path(c) for c in cfg.prepare.corpus] + [resolve_path(cfg.prepare.kg)])
        prepared = _stage(out / "prepare", {"prepare": dump["prepare"], "inputs": inputs},
                          lambda d: run_prepare(cfg.prepare, d, {"prepare": dump["prepare"]}))
    stages: dict[str, Path | None] = {"prepare": prepared, "neighbours": None, "embed": None, "graph": None}
    if need_nb is None and need_embed is None and not need_graph:
        return stages
    kg_dir = resolve_path(cfg.prepare.kg) if cfg.prepare.kg else None
    graph = None
    if (need_nb and not neighbours) or (need_embed and not embeddings) or need_graph:
        if kg_dir is None:
            raise KeplmError("pretrain: prepare.kg is needed to build the graph")
        graph = _stage(out / "graph", {"graph": dump["graph"], "kg": hash_inputs([kg_dir]), "corpus": _manifest_hash(prepared)},
                       lambda d: build_graph(kg_dir, d, cfg.graph, {"graph": dump["graph"]}, corpus_dir=prepared))
        stages["graph"] = graph
    if need_nb:
        stages["neighbours"] = Path(neighbours) if neighbours else _stage(
            out / "neighbours", {"pepr": dump["pepr"], "graph": _manifest_hash(graph)},
            lambda d: run_neighbours(graph, d, cfg.pepr, {"pepr": dump["pepr"]}))
    if need_embed:
        if embeddings:
            stages["embed"] = Path(embeddings)
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
    for name in ("neighbours", "embed", "graph"):
        d = stages.get(name)
        if d is None:
            continue
        read_manifest(d)
        if _entity_names_hash(d) != want:
            raise KeplmError(f"{d}: its entity ids differ from the shards' ({prepared}); rebuild it from the same KG")
        tags[f"lineage.{name}"] = "manifest:" + _manifest_hash(d)
    return tags


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
    tasks_ref = None
    if cfg.model.entity_objectives:
        from keplm.models.embert import EntityTasks
        from keplm.platform.tokenizer import load_tokenizer

        if stages.get("graph") is None:
            raise KeplmError(f"model objectives {cfg.model.entity_objectives} need the graph stage (kg build)")
        tasks = EntityTasks.build(stages["graph"], load_tokenizer(str(stages["prepare"] / "tokenizer")), cfg.batches.segment)
        log.info("EMBERT thesaurus of %d entities; %s", len(tasks.surfaces), dict(tasks.counts))
        tasks_ref = ray.put(tasks)
    context = {"model": cfg.model.model_dump(mode="json"), "batches": cfg.batches.model_dump(mode="json"),
               "prepare_dir": str(stages["prepare"].resolve()), "arrays": arrays_ref, "knowledge": knowledge_ref,
               "entity_tasks": tasks_ref}
    return {"files": files, "val_files": val_files, "context": context, "rows": rows}


# train.* keys that say how a run is carried out, not what it computes: they may change between two invocations
# on one output directory (a resume on other hardware, a test's stop or fault) and it is still the same training
TRAIN_RUN_CONTROL = frozenset({
    "use_gpu", "cpus_per_worker", "gpus_per_worker", "checkpoint_every", "keep_checkpoints", "max_failures",
    "log_every", "storage_path", "peak_tflops", "stop_after_steps", "pause_at_steps", "fault_at_step", "compile",
    "deterministic", "prefetch_batches", "read_cpus", "read_concurrency", "diagnostics_every",
    "resources_timeout_s", "diagnostics_max_ratio"})


def computed_train_section(dump: dict) -> dict:
    """A config dump's train section less TRAIN_RUN_CONTROL, and less ``runner`` at its default (a key made before
    that setting existed stays the same; an in-process training keeps its checkpoints apart)."""
    return {k: v for k, v in dump["train"].items()
            if k not in TRAIN_RUN_CONTROL and not (k == "runner" and v == "ray_train")}


def training_key(cfg, lineage: dict[str, str]) -> dict:
    """What a training computes: the model, batches and train sections (less TRAIN_RUN_CONTROL) and the stages it
    reads (their manifest hashes, ``check_lineage``'s tags). A rerun on the same output resumes the training only
    while this is unchanged; a changed K, corpus, model or learning rate starts a new one."""
    dump = dump_config(cfg)
    stages = {k.removeprefix("lineage."): v for k, v in lineage.items()}
    return {"model": dump["model"], "batches": dump["batches"], "train": computed_train_section(dump), "stages": stages}


def changed_keys(old: dict, new: dict) -> list[str]:
    """The dotted keys whose values differ between two nested dicts (either side may lack a key)."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def key_change(previous: dict, key: str, key_parts: dict) -> str | None:
    """For a marker ``previous`` ({} when absent) written with its ``key`` and ``key_parts``: None when it is
    absent or has ``key``, else the changed dotted keys as one line (the first 8 named)."""
    if not previous or previous.get("key") == key:
        return None
    changed = changed_keys(previous.get("key_parts", {}), key_parts)
    return ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")


def config_params(cfg) -> dict[str, str]:
    """The resolved config as MLflow params: dotted keys, values as strings (MLflow's 6000-character cap)."""
    from keplm.platform.tracking import redact_uri

    return {k: redact_uri("" if v is None else str(v))[:6000] for k, v in flatten(dump_config(cfg)).items()}


def record_invocation(client, run_id: str, cfg) -> tuple[int, dict[str, str]]:
    """A run resumed by another invocation of its job: MLflow params cannot change, so they keep the first
    invocation's values; the keys whose values this invocation changed (run control such as
    ``train.stop_after_steps``: what is computed is pinned by the run's key) go to the tag
    ``keplm.invocation.N`` as JSON, and ``keplm.invocations`` counts the invocations. -> (N, changed)."""
    run = client.get_run(run_id)
    n = int(run.data.tags.get("keplm.invocations", "1")) + 1
    logged, now = run.data.params, config_params(cfg)
    changed = {k: v for k, v in sorted(now.items()) if logged.get(k) != v}
    client.set_tag(run_id, "keplm.invocations", str(n))
    if changed:
        client.set_tag(run_id, f"keplm.invocation.{n}", json.dumps(changed)[:8000])
    return n, changed


def keyed_run(client, cfg, marker: Path, key: str, key_parts: dict, uri: str, *, job: str, anew, start) -> str:
    """The MLflow run a job's output keeps for what it computes, recorded in ``marker`` (JSON: run_id,
    tracking_uri, key, key_parts). The same key in the same store: that run, resumed (``record_invocation``).
    Otherwise ``start()`` makes a new one, which the marker then names, and a warning says why: ``anew(changed
    keys)`` for another key; the old run and store for another store."""
    from keplm.platform.tracking import redact_uri

    previous = json.loads(marker.read_text()) if marker.is_file() else {}
    same = previous.get("key") == key
    # the marker names the store redacted, and tells it by the hash of the full URI (credentials included)
    uri_hash = hashlib.sha256(uri.encode()).hexdigest()
    same_store = (previous["tracking_uri_sha256"] == uri_hash if "tracking_uri_sha256" in previous
                  else previous.get("tracking_uri", uri) == uri)
    if same and same_store:
        n, differ = record_invocation(client, previous["run_id"], cfg)
        if differ:
            log.warning("%s: MLflow run %s keeps its first invocation's params; invocation %d's other values (%s) are "
                        "in its tag keplm.invocation.%d", job, previous["run_id"], n, ", ".join(list(differ)[:8]), n)
        return previous["run_id"]
    if same:
        log.warning("%s: its MLflow run %s is in %s: logging to a new run in %s, which lacks what was logged before "
                    "this resume", job, previous["run_id"], redact_uri(previous["tracking_uri"]), redact_uri(uri))
    else:
        changed = key_change(previous, key, key_parts)
        if changed:
            log.warning("%s: %s", job, anew(changed))
    run_id = start()
    marker.write_text(json.dumps({"run_id": run_id, "tracking_uri": redact_uri(uri), "tracking_uri_sha256": uri_hash,
                                  "key": key, "key_parts": key_parts}))
    return run_id


def start_run(client, cfg, run_name: str, tags: dict[str, str]) -> str:
    """An MLflow run with the resolved config as flattened params; -> run id."""
    from mlflow.entities import Param

    exp = client.get_experiment_by_name(cfg.tracking.experiment) or client.get_experiment(
        client.create_experiment(cfg.tracking.experiment))
    run_id = client.create_run(exp.experiment_id, run_name=run_name, tags=tags).info.run_id
    items = [Param(k, v) for k, v in config_params(cfg).items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])
    return run_id


