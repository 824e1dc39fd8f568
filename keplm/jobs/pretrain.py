"""`keplm pretrain`: the whole chain (prepare -> kg build -> kg neighbours -> kg embed -> Ray Train) in one job.

Stages live under ``--output DIR`` (``prepare/``, ``graph/``, ``neighbours/``, ``embed-transr/`` or
``embed-transe/``, ``train/``). A stage is reused when its ``stage_key.json`` — a hash of its config
section and of its inputs (files, or upstream manifests) — still matches, so a rerun skips finished stages
and a changed K or corpus reruns only what depends on it. ``--prepared``, ``--neighbours`` and
``--embeddings`` use existing stage outputs instead. Rerunning the same command after an interruption
resumes training from the latest checkpoint; a rerun whose training computes something else (``training_key``:
the model, batches and train sections and the stages' manifests) trains anew, in a new MLflow run.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from keplm import config as keplm_config
from keplm.jobs.common import add_common_args, module_main
from keplm.models.pipeline import check_lineage, ensure_stages, keyed_run, start_run, training_inputs, training_key
from keplm.platform import console
from keplm.platform.errors import KeplmError
from keplm.platform.manifest import sha256_json, write_manifest
from keplm.platform.outputs import remove_owned
from keplm.platform.ray_session import connect
from keplm.platform.tracking import check_tracking, mlflow_ui_command, redact_uri

log = logging.getLogger(__name__)
PRETRAIN_SCHEMA_VERSION = 1


def tracking_uri_for(cfg, out: Path) -> str:
    from keplm.platform.tracking import tracking_uri

    return tracking_uri(cfg.tracking) or f"sqlite:///{(out / 'mlflow.db').resolve()}"


def invocation(args: argparse.Namespace) -> str:
    """This job's command line as ``keplm pretrain ...`` (the manifest's ``command``, the model card's Reproduce)."""
    import shlex

    parts = ["keplm", "pretrain", *(["--config", args.config] if args.config else []), "--output", args.output]
    for flag in ("prepared", "neighbours", "embeddings"):
        if getattr(args, flag, None):
            parts += [f"--{flag}", getattr(args, flag)]
    return shlex.join(parts + list(args.overrides))


MODEL_DIRS = ("model", "model-bert")   # the final model and its export: named by the training that wrote them


def guard_pretrain_output(out: Path, args: argparse.Namespace, cfg) -> None:
    """``--output`` against every input (keplm.platform.outputs.guard_output): the stage directories pretrain
    builds, ``train/``, the models and the manifest must hold none of them; ``--prepared OUT/prepare`` is fine."""
    from keplm.platform.outputs import guard_output, prepare_inputs

    given = [p for p in (args.prepared, args.neighbours, args.embeddings) if p]
    given_resolved = {Path(p).expanduser().resolve() for p in given}
    writes = [out / n for n in ("prepare", "graph", "neighbours", "embed-transr", "embed-transe", "train",
                                *MODEL_DIRS, "manifest.json")]
    guard_output("pretrain", out, [*given, *prepare_inputs(cfg.prepare)],
                 writes=[w for w in writes if w.resolve() not in given_resolved])


def _model_key(d: Path) -> str | None:
    from keplm.platform.outputs import MARKER

    try:
        return json.loads((d / MARKER).read_text(encoding="utf-8")).get("training_key")
    except (OSError, ValueError, AttributeError):
        return None


def mark_model(d: Path, key: str) -> None:
    """Name ``d`` as the model of the training ``key`` (its keplm marker)."""
    from keplm.platform.outputs import MARKER

    (d / MARKER).write_text(json.dumps({"keplm": True, "job": "pretrain", "training_key": key}) + "\n",
                            encoding="utf-8")


def drop_other_trainings_model(out: Path, key: str) -> None:
    """Remove ``model/`` and ``model-bert/`` when another training wrote them: a run that stops early
    (``train.stop_after_steps``) or fails must not leave them in place, named by its manifest as its own."""
    from keplm.platform.outputs import remove_owned

    for name in MODEL_DIRS:
        d = out / name
        if d.is_dir() and _model_key(d) != key:
            log.warning("removing %s: the model of another training (this one computes something else)", d)
            remove_owned(d)


def run(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from keplm.models.setup import build_for_worker
    from keplm.platform.train_loop import run_in_process, run_training

    cfg = keplm_config.load(args.config, list(args.overrides))
    out = Path(args.output)
    guard_pretrain_output(out, args, cfg)
    uri = tracking_uri_for(cfg, out)
    check_tracking(uri)
    connect(cfg.ray, args.address)
    stages = ensure_stages(cfg, out, args.prepared, args.neighbours, args.embeddings)
    lineage = check_lineage(stages)
    train_dir = out / "train"
    train_dir.mkdir(exist_ok=True)
    inputs = training_inputs(cfg, stages, train_dir)

    # the training (its Ray Train run, so its checkpoints, and its MLflow run) is named by what it computes: a
    # rerun resumes it only while that is unchanged, and a changed K, corpus, model or lr trains anew
    key_parts = training_key(cfg, lineage)
    key = sha256_json(key_parts)
    client = MlflowClient(uri)
    run_id = keyed_run(
        client, cfg, train_dir / "mlflow_run.json", key, key_parts, uri, job="pretrain",
        anew=lambda changed: f"{train_dir} was trained on another config or inputs ({changed}): training anew in a new "
                             "MLflow run (the earlier checkpoints stay where they were)",
        start=lambda: start_run(client, cfg, f"pretrain-{cfg.model.kind}", {
            "keplm.job": "pretrain", "keplm.model": cfg.model.kind, "keplm.training_key": key, **lineage}))
    drop_other_trainings_model(out, key)
    t = cfg.train
    with console.stage("train", f"{inputs['rows']:,} rows, {t.num_workers} workers x batch {t.batch_size}"
                                f"{f' x {t.grad_accum} micro-steps' if t.grad_accum > 1 else ''}") as st:
        try:
            args_ = (cfg.train, inputs["files"], build_for_worker, inputs["context"], train_dir, uri, run_id,
                     cfg.batches.max_seq_len, inputs["val_files"])
            if t.runner == "in_process":
                result = run_in_process(*args_, name=f"pretrain-{key[:16]}")
            else:
                result = run_training(*args_, name=f"pretrain-{key[:16]}", bound_resource_wait=True)
        except Exception as exc:  # noqa: BLE001
            client.set_terminated(run_id, status="FAILED")
            if isinstance(exc, KeplmError):   # already one line (e.g. the workers' resources never came)
                raise
            # a ControllerError's own first line is only "Training failed due to controller error:"
            cause = getattr(exc, "controller_failure", None) or exc
            raise KeplmError(f"training failed: {cause.__class__.__name__}: "
                             f"{str(cause).splitlines()[0] if str(cause) else ''}") from None
        console.wait_for_worker_lines()   # the last progress line before this stage's end
        metrics = dict(result.metrics or {})
        st["counts"] = ", ".join([f"{metrics.get('step', 0)} steps"] + [
            f"{k} {metrics[k]:.4f}" for k in ("loss", "val_mlm_loss") if isinstance(metrics.get(k), float)])
    counts = {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool))}
    finished = result.checkpoint is not None and metrics.get("final")
    if finished:
        with result.checkpoint.as_directory() as d:
            remove_owned(out / "model")   # only what keplm wrote (keplm.platform.outputs)
            shutil.copytree(Path(d) / "model", out / "model")
        shutil.copytree(stages["prepare"] / "tokenizer", out / "model", dirs_exist_ok=True)
        mark_model(out / "model", key)
    summary = {**counts, "mlflow_run_id": run_id, "tracking_uri": redact_uri(uri),   # no credentials in files
               "model_dir": str(out / "model") if (out / "model").is_dir() else None}
    extra = {"stages": {k: str(Path(v).resolve()) for k, v in stages.items() if v is not None},
             "command": invocation(args), "cwd": str(Path.cwd())}
    if finished:
        from keplm.models.model_card import finish_pretrained

        # README.md model cards, and DIR/model-bert (plain BERT for stock transformers) unless export.after_pretrain=false
        bert = finish_pretrained(out, {"job": "pretrain", "config": keplm_config.dump(cfg), "inputs": lineage,
                                       "counts": summary, **extra}, cfg.export)
        client.log_artifacts(run_id, str(out / "model"), artifact_path="model")
        if bert is not None:
            mark_model(Path(bert), key)
            client.log_artifacts(run_id, str(bert), artifact_path="model-bert")
        client.set_terminated(run_id, status="FINISHED")
    summary["bert_model_dir"] = str(out / "model-bert") if (out / "model-bert").is_dir() else None
    write_manifest(out, "pretrain", PRETRAIN_SCHEMA_VERSION, keplm_config.dump(cfg), lineage, summary, **extra)
    model_dir = out / "model"
    console.add_summary("model", str(model_dir) if model_dir.is_dir() else
                        f"none yet: training stopped at step {counts.get('step', 0)}; the same command resumes it")
    if (out / "model-bert").is_dir():
        console.add_summary("BERT model", str(out / "model-bert"))
    here = [d for d in (*(stages.get(k) for k in ("prepare", "graph", "neighbours", "embed")), train_dir)
            if d is not None and d.parent == out]
    console.add_summary("output", f"{out}: " + " ".join(f"{d.name}/" for d in here))
    console.add_summary("MLflow run", f"{run_id} (experiment {cfg.tracking.experiment})")
    console.add_summary("look at it", mlflow_ui_command(uri))
    console.result(json.dumps({"job": "pretrain", "output": str(out), "mlflow_run_id": run_id, "counts": counts}))
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
