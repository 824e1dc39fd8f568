"""`keplm evaluate`: one checkpoint on the tasks of ``evaluate.tasks`` x seeds, in parallel as Ray tasks.

Each (task, seed) is one Ray task (``evaluate.cpus_per_run`` / ``gpus_per_run``) and one MLflow run. When
the checkpoint is a ``keplm pretrain`` output's ``model/``, its pretraining run is found from that job's
manifest: evaluation runs go to the same tracking store and experiment, tagged ``keplm.pretrain_run`` and
nested under it (``mlflow.parentRunId``). Writes ``results.json`` (every run), ``summary.json`` (per task,
mean ± std over seeds) and ``manifest.json`` under ``--output``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from keplm import config as keplm_config
from keplm.jobs.common import add_common_args, module_main
from keplm.platform.config import flatten
from keplm.platform.errors import KeplmError
from keplm.platform.manifest import hash_inputs, write_manifest

log = logging.getLogger(__name__)
EVALUATE_SCHEMA_VERSION = 1
SUMMARY_METRICS = ("test_f1", "test_precision", "test_recall", "test_accuracy", "dev_f1", "acc_at_1", "recall_at_5",
                   "recall_at_5_type1", "recall_at_5_type2")


def _own_store(model_dir: Path, found_uri: str | None) -> str | None:
    """The pretraining run's store when it is the local SQLite file of the checkpoint's own pretrain output
    (``DIR/mlflow.db`` beside ``DIR/model``): the only store a manifest may name that evaluate uses unasked. A
    tracking server named by another run's manifest is used only when it is the configured one (tracking.uri,
    $MLFLOW_TRACKING_URI)."""
    if not found_uri or not found_uri.startswith("sqlite:///"):
        return None
    db = Path(found_uri.removeprefix("sqlite:///"))
    db = db if db.is_absolute() else Path("/") / db
    return found_uri if db.resolve() == (model_dir.resolve().parent / "mlflow.db").resolve() else None


def pretrain_run_of(model_dir: Path) -> tuple[str | None, str | None]:
    """(pretraining MLflow run id, its tracking URI) when ``model_dir`` is a keplm pretrain output's model/."""
    manifest = model_dir.resolve().parent / "manifest.json"
    if not manifest.is_file():
        return None, None
    try:
        doc = json.loads(manifest.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None, None
    if doc.get("job") != "pretrain":
        return None, None
    counts = doc.get("counts", {})
    return counts.get("mlflow_run_id"), counts.get("tracking_uri")


def _run_one(model_dir: str, spec: dict, finetune: dict, seed: int, threads: int) -> dict:
    import torch

    from keplm.models.downstream.finetune import FinetuneConfig
    from keplm.models.downstream.tasks import TaskSpec, run_task

    torch.set_num_threads(max(1, threads))
    try:
        return {"ok": True, **run_task(model_dir, TaskSpec(**spec), FinetuneConfig(**finetune), seed)}
    except KeplmError as exc:
        return {"ok": False, "error": str(exc)}


def summarise(results: list[dict]) -> dict[str, dict]:
    from keplm.models.downstream.finetune import mean_std

    out: dict[str, dict] = {}
    for name in sorted({r["task_name"] for r in results}):
        runs = [r for r in results if r["task_name"] == name and r["ok"]]
        row: dict = {"runs": len(runs)}
        for m in SUMMARY_METRICS:
            vals = [r[m] for r in runs if isinstance(r.get(m), (int, float))]
            if vals:
                row[f"{m}_mean"], row[f"{m}_std"] = mean_std(vals)
        out[name] = row
    return out


def _log(client, exp_id: str, result: dict, params: dict, tags: dict) -> str:
    from mlflow.entities import Metric, Param

    run = client.create_run(exp_id, run_name=f"eval-{result['task_name']}-seed{result['seed']}", tags=tags)
    rid = run.info.run_id
    items = [Param(k, ("" if v is None else str(v))[:6000]) for k, v in flatten(params).items()]
    for i in range(0, len(items), 100):
        client.log_batch(rid, params=items[i:i + 100])
    metrics = [Metric(k, float(v), 0, 0) for k, v in result.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("seed", "dev_score")]
    metrics += [Metric(k, float(v), 0, 0) for k, v in result.get("counts", {}).items() if isinstance(v, (int, float))]
    for h in result.get("history", []):
        metrics += [Metric("dev_score", float(h["dev"]), 0, h["step"]), Metric("train_loss", float(h["loss"]), 0, h["step"])]
    for i in range(0, len(metrics), 1000):
        client.log_batch(rid, metrics=metrics[i:i + 1000])
    client.set_terminated(rid, status="FINISHED" if result["ok"] else "FAILED")
    return rid


def evaluate_checkpoint(cfg, model_dir: str | Path, out: str | Path, address: str | None = None,
                        parent_run: str | None = None) -> dict:
    import ray
    from mlflow.tracking import MlflowClient

    from keplm.models.downstream.tasks import task_config
    from keplm.platform.ray_session import connect
    from keplm.platform.tracking import check_tracking, redact_uri, tracking_uri

    model_dir, out = Path(model_dir), Path(out)
    if not (model_dir / "config.json").is_file():
        raise KeplmError(f"{model_dir}: not a model directory (no config.json)")
    tasks = cfg.evaluate.tasks
    if not tasks:
        raise KeplmError("no evaluation tasks: declare evaluate.tasks in the config (see configs/eval-real.yaml)")
    out.mkdir(parents=True, exist_ok=True)
    found_run, found_uri = pretrain_run_of(model_dir)
    uri = tracking_uri(cfg.tracking) or _own_store(model_dir, found_uri) or f"sqlite:///{(out / 'mlflow.db').resolve()}"
    if found_uri and found_uri != redact_uri(uri) and not parent_run:
        # the pretraining run is in another store: results go where the user said (or beside them), not there
        log.warning("evaluate: the checkpoint's pretraining run %s is in %s, not in %s: the results are not nested "
                    "under it (set tracking.uri to that store, or pass --parent-run)", found_run, found_uri,
                    redact_uri(uri))
        found_run = None
    parent_run = parent_run or found_run
    check_tracking(uri)
    connect(cfg.ray, address)

    remote = ray.remote(_run_one).options(num_cpus=cfg.evaluate.cpus_per_run, num_gpus=cfg.evaluate.gpus_per_run)
    jobs = [(name, seed) for name in tasks for seed in range(cfg.evaluate.seeds)]
    threads = int(cfg.evaluate.cpus_per_run)
    refs = [remote.remote(str(model_dir.resolve()), tasks[n].model_dump(mode="json"),
                          cfg.finetune.model_dump(mode="json"), s, threads) for n, s in jobs]
    results = []
    for (name, seed), res in zip(jobs, ray.get(refs)):
        results.append({"task_name": name, "seed": seed, **res})

    client = MlflowClient(uri)
    if parent_run:
        exp_id = client.get_run(parent_run).info.experiment_id
    else:
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment)
    for r in results:
        spec = tasks[r["task_name"]]
        params = {"task": spec.model_dump(mode="json"), "finetune": task_config(spec, cfg.finetune).model_dump(mode="json"),
                  "checkpoint": str(model_dir.resolve()), "seed": r["seed"]}
        tags = {"keplm.job": "evaluate", "keplm.task": r["task_name"], "keplm.task_kind": spec.kind,
                "keplm.seed": str(r["seed"]), "keplm.checkpoint": str(model_dir.resolve())}
        if parent_run:
            tags.update({"keplm.pretrain_run": parent_run, "mlflow.parentRunId": parent_run})
        if not r["ok"]:
            tags["keplm.error"] = r["error"][:5000]
        r["mlflow_run_id"] = _log(client, exp_id, r, params, tags)

    summary = summarise(results)
    (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False), encoding="utf-8")
    counts = {"runs": len(results), "failed": sum(not r["ok"] for r in results)}
    write_manifest(out, "evaluate", EVALUATE_SCHEMA_VERSION, keplm_config.dump(cfg), hash_inputs([model_dir]),
                   counts, summary=summary, pretrain_run=parent_run, tracking_uri=uri)
    failed = [r for r in results if not r["ok"]]
    if failed:
        raise KeplmError(f"{len(failed)} of {len(results)} evaluation runs failed; first: "
                         f"{failed[0]['task_name']} seed {failed[0]['seed']}: {failed[0]['error']}")
    return {"summary": summary, "tracking_uri": uri, "pretrain_run": parent_run}


def print_summary(summary: dict) -> None:
    """One console line per task: mean ± std over its seeds."""
    from keplm.platform import console

    for name, row in summary.items():
        cells = [f"{m} {row[m + '_mean']:.4f} ± {row[m + '_std']:.4f}" for m in SUMMARY_METRICS if m + "_mean" in row]
        console.echo(f"{name} ({row['runs']} runs): " + ", ".join(cells))


def add_run_summary(out: str, res: dict) -> None:
    """The closing summary of evaluate / finetune: outputs, the pretraining run, the command to look at them."""
    from keplm.platform import console
    from keplm.platform.tracking import mlflow_ui_command

    console.add_summary("results", str(Path(out) / "results.json"))
    if res.get("pretrain_run"):
        console.add_summary("MLflow runs", f"nested under the pretraining run {res['pretrain_run']}")
    console.add_summary("look at it", mlflow_ui_command(res["tracking_uri"]))


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.seeds:
        overrides.append(f"evaluate.seeds={args.seeds}")
    cfg = keplm_config.load(args.config, overrides)
    if args.tasks:
        wanted = [t.strip() for t in args.tasks.split(",") if t.strip()]
        unknown = [t for t in wanted if t not in cfg.evaluate.tasks]
        if unknown:
            raise KeplmError(f"unknown task(s) {unknown}; the config declares {sorted(cfg.evaluate.tasks)}")
        cfg.evaluate.tasks = {t: cfg.evaluate.tasks[t] for t in wanted}
    from keplm.platform import console
    from keplm.platform.outputs import guard_output

    guard_output("evaluate", args.output, [args.checkpoint])
    res = evaluate_checkpoint(cfg, args.checkpoint, args.output, args.address, args.parent_run)
    print_summary(res["summary"])
    add_run_summary(args.output, res)
    console.result(json.dumps({"job": "evaluate", "output": args.output, **res}, ensure_ascii=False))
    return 0


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="model directory (a keplm pretrain output's model/, or any BERT)")
    p.add_argument("--seeds", type=int, help="runs per task (seeds 0..N-1), mean ± std reported")
    p.add_argument("--parent-run", help="MLflow run id of the pretraining run (default: from the checkpoint's manifest)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a checkpoint on NER / sentence-pair / similarity tasks x seeds")
    add_common_args(p)
    add_checkpoint_args(p)
    p.add_argument("--tasks", help="comma-separated names from evaluate.tasks (default: all)")
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    return module_main(register, argv)


if __name__ == "__main__":
    sys.exit(main())
