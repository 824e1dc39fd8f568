"""The sweep / ablation driver: stages once, Ray Tune over trials (OptunaSearch + ASHA, or a grid),
MLflow parent + child runs, the best config as YAML that ``keplm pretrain`` accepts unchanged.

Resumable: the Tune experiment lives in ``OUT/tune/<job>-<key>`` (``sweep_key``: the config less ``ray`` and the
train keys that only say how runs are carried out); running the same command again restores it with
``Tuner.restore`` (finished trials are kept, unfinished ones resumed) and reuses the parent run, while a changed
config on the same output is a new sweep (a new experiment and parent run; the earlier ones are kept).
A trial that raises is recorded (Tune error, FAILED MLflow run) and the others go on. An interrupted
sweep (Ctrl-C / SIGINT, SIGUSR1: Tune saves its state and returns) is recorded as such — parent and
unfinished trials KILLED and tagged ``keplm.interrupted``, no best config — and the job exits 130.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import yaml

from keplm.platform.config import dump_config, flatten
from keplm.platform.errors import KeplmError
from keplm.platform.manifest import sha256_json
from keplm.platform.train_loop import trains_in_process, uses_gpu
from keplm.tuning.space import ABLATION_GRIDS, merge, nest
from keplm.tuning.trainable import pretrain_trial, trial_overrides

log = logging.getLogger(__name__)


class SweepInterrupted(KeplmError):
    """Tune was stopped (SIGINT / SIGUSR1) before every trial ended; its state is saved for a resume."""

    exit_code = 130  # the shell's code for "ended by SIGINT"


def kinds_in(cfg, space_points: list[dict[str, Any]], *, with_base: bool = True) -> set[str]:
    """The model kinds whose stages the trials need: each point's ``model.kind`` (the base kind where it sets none),
    and the base kind itself when ``with_base`` (a sweep's search may leave any point at the base config)."""
    kinds = {p.get("model.kind", cfg.model.kind) for p in space_points}
    return kinds | {cfg.model.kind} if with_base or not kinds else kinds


def sweep_key(cfg) -> dict:
    """What a sweep computes: the whole config less ``ray`` and the train keys that only say how a run is carried
    out (``TRAIN_RUN_CONTROL``). A rerun on the same output restores the Tune experiment only while this is
    unchanged; another space, sample count, scheduler or base config is a new sweep."""
    from keplm.models.pipeline import computed_train_section

    dump = {k: v for k, v in dump_config(cfg).items() if k != "ray"}
    # how often a lost trial is rerun is how the sweep is carried out, not what it computes
    sweep = {k: v for k, v in dump.get("sweep", {}).items() if k != "max_failures"}
    return {**dump, "sweep": sweep, "train": computed_train_section(dump)}


def trial_resources(train) -> dict[str, float]:
    """What a trial that trains in its own process asks Tune for: one Ray Train worker's resources."""
    return {"cpu": train.cpus_per_worker, **({"gpu": train.gpus_per_worker} if uses_gpu(train) else {})}


def _parent_run(client, cfg, out: Path, job: str, params: dict, key: str, key_parts: dict, tracking_uri: str) -> str:
    from mlflow.entities import Param

    from keplm.models.pipeline import keyed_run, start_run

    def start() -> str:
        run_id = start_run(client, cfg, f"{job}-{out.name}", {"keplm.job": job, "keplm.sweep_key": key})
        client.log_batch(run_id, params=[Param(f"tune.{k}", str(v)[:6000]) for k, v in flatten(params).items()])
        return run_id

    return keyed_run(client, cfg, out / "mlflow_parent.json", key, key_parts, tracking_uri, job=job, start=start,
                     anew=lambda changed: f"{out} holds a {job} of another config ({changed}): sweeping anew in a new "
                                          "parent run (the earlier trials stay in its Tune experiment and MLflow runs)")


def run_tune(cfg, out: Path, job: str, param_space: dict, *, metric: str, mode: str, num_samples: int,
             search_alg=None, scheduler=None, max_concurrent: int, kinds: set[str], model: str | None,
             tracking_uri: str, proxy_task: dict | None = None, objective: str, rungs: list[int] | None = None,
             eval_tasks: dict[str, dict] | None = None) -> dict:
    from mlflow.tracking import MlflowClient
    from ray import tune

    from keplm.models.pipeline import ensure_stages
    from keplm.platform import console
    from keplm.tuning.events import TrialEvents

    out.mkdir(parents=True, exist_ok=True)
    # the trials' own lines (their training progress) go to the log file: the console has one line per trial event
    console.set_worker_console_level(logging.WARNING)
    stages, stage_seconds = {}, {}
    for kind in sorted(kinds):
        t = time.perf_counter()
        st = ensure_stages(cfg, out / "stages", kind=kind)
        stage_seconds[f"time.stages_{kind}_s"] = time.perf_counter() - t
        stages[kind] = {k: (str(v.resolve()) if v else None) for k, v in st.items()}
    client = MlflowClient(tracking_uri)
    key_parts = sweep_key(cfg)
    key = sha256_json({"job": job, **key_parts})
    parent = _parent_run(client, cfg, out, job, {"param_space": {k: str(v) for k, v in param_space.items()},
                                                 "metric": metric, "mode": mode, "num_samples": num_samples},
                         key, key_parts, tracking_uri)
    for name, seconds in stage_seconds.items():
        client.log_metric(parent, name, seconds)
    base = dump_config(cfg)
    in_trial = cfg.sweep.train_in_trial and trains_in_process(cfg.train)
    resources = trial_resources(cfg.train) if in_trial else {"cpu": 0.01}
    shared = {"base": base, "stages": stages, "tracking_uri": tracking_uri, "parent_run": parent, "out": str(out.resolve()),
              "job": job, "model": model, "objective": objective, "proxy_task": proxy_task,
              "rungs": list(rungs or []), "eval_tasks": eval_tasks or {}, "train_in_trial": in_trial,
              "trial_gpu": "gpu" in resources}
    if objective == "proxy_f1" or job == "ablate":
        # the proxy F1 only exists in a trial's last result, and the ablation's not-pretrained variant has no
        # training to report a loss from; the step reports carry the losses
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # a trial that trains in its own process holds its worker's CPUs/GPUs; one that runs Ray Train only waits
    # on it, and the Train workers hold them
    trainable = tune.with_resources(tune.with_parameters(pretrain_trial, shared=shared), resources)
    storage = str((out / "tune").resolve())
    name = f"{job}-{key[:16]}"   # one Tune experiment per sweep key: a changed sweep never restores another's
    path = os.path.join(storage, name)
    if tune.Tuner.can_restore(path):
        log.info("%s: resuming the Tune experiment in %s", job, path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=False, restart_errored=False,
                                   param_space=param_space)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=num_samples, search_alg=search_alg,
                                        scheduler=scheduler,
                                        # a trial that trains in its own process leaves it with torch and the
                                        # models imported: the next trial starts in it. Not under synchronous
                                        # halving: Tune would keep a paused trial's actor, its thread waiting
                                        # in tune.report, while the trial resumes elsewhere
                                        reuse_actors=in_trial and not rungs,
                                        # a sweep's searcher is already a ConcurrencyLimiter (SHA moves its cap)
                                        max_concurrent_trials=None if search_alg is not None else max_concurrent),
            # Tune's status tables off (verbose=0): the console gets TrialEvents' lines, and Tune's log the log file
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0,
                                      callbacks=[TrialEvents(metric, cfg.train.max_steps, scheduler is not None)],
                                      failure_config=tune.FailureConfig(max_failures=cfg.sweep.max_failures, fail_fast=False)))
        log.info("%s: %d trial(s), at most %d at a time; objective %s (%s)", job,
                 expected_trials(num_samples, param_space), max_concurrent, metric,
                 "lowest best" if mode == "min" else "highest best")
    with console.stdout_to_log_file():   # Tune prints its experiment's table and end notes whatever its verbosity
        grid = tuner.fit()
    return finish(cfg, out, job, grid, client, parent, base, model, metric, mode,
                  unfinished=unfinished_trials(path, expected_trials(num_samples, param_space)))


def expected_trials(num_samples: int, param_space: dict) -> int:
    return num_samples * math.prod(len(v["grid_search"]) for v in param_space.values()
                                   if isinstance(v, dict) and "grid_search" in v)


def unfinished_trials(experiment_path: str, expected: int) -> list[str] | None:
    """None when every trial of the experiment ended, else the ids of those that had not when Tune stopped.

    Tune handles SIGINT / SIGUSR1 itself: it saves the experiment state and returns from ``fit()`` as if
    done, after its cleanup marked the trials it was running TERMINATED in memory. The state it saved
    still holds them live (PENDING / RUNNING / PAUSED), so that is what is read here. Trials the searcher
    had not created yet count too: fewer than ``expected`` trials means the sweep was cut short."""
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(experiment_path).trials
    live = [t.trial_id for t in trials if t.status not in ("TERMINATED", "ERROR")]
    return live if live or len(trials) < expected else None


def _write_summary(out: Path, summary: dict) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False, default=str), encoding="utf-8")


def finish(cfg, out: Path, job: str, grid, client, parent: str, base: dict, model: str | None, metric: str, mode: str,
           unfinished: list[str] | None = None) -> dict:
    """Summarise the trials into MLflow and OUT (trials.csv, summary.json, best_config.yaml); ``unfinished``
    (see ``unfinished_trials``) marks an interrupted sweep, which gets no best config and raises
    ``SweepInterrupted`` after its summary is written."""
    max_steps = cfg.train.max_steps
    interrupted = unfinished is not None
    trials = []
    for r in grid:
        m = dict(r.metrics or {})
        trials.append({"trial_id": m.get("trial_id") or Path(r.path).name.split("_")[2], "config": r.config,
                       "steps": int(m.get("step", 0) or 0), metric: m.get(metric),
                       "error": (str(r.error).splitlines()[0][:500] if r.error else None)})
    children = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    # runs a scheduler stopped: their trial actor was killed mid-run (or while paused by SHA), which leaves
    # their MLflow run RUNNING, KILLED or (when the kill surfaced as an error in the trial) FAILED, though Tune
    # recorded no error for them
    errored = {t["trial_id"] for t in trials if t["error"] is not None}
    live = set(unfinished or ())
    for run in children:
        tid = run.data.tags.get("keplm.trial_id")
        if run.info.status != "FINISHED" and tid not in errored:
            # a trial the interrupt cut off is resumed by the next run of the command, not stopped early
            client.set_tag(run.info.run_id, "keplm.interrupted" if tid in live else "keplm.stopped_early", "true")
            client.set_terminated(run.info.run_id, status="KILLED")
    # steps reached, and optimizer steps actually run: one logged `step` value per step, so a trial stopped
    # a little after its last report, or resumed from a checkpoint behind where it was paused, is charged
    # for every step it ran
    reached = {r.data.tags.get("keplm.trial_id"): int(r.data.metrics.get("step", 0)) for r in children}
    run_ids = {r.data.tags.get("keplm.trial_id"): r.info.run_id for r in children}
    # the objective as the trial's MLflow run holds it: a trial logs it there just before it reports to Tune,
    # so a trial the scheduler stops in between has a later value than Tune's last result (the one the user
    # sees in MLflow, and ranks by)
    logged = {r.data.tags.get("keplm.trial_id"): r.data.metrics.get(metric) for r in children}
    for t in trials:
        t["steps"] = reached.get(t["trial_id"], t["steps"])
        if logged.get(t["trial_id"]) is not None:
            t[metric] = logged[t["trial_id"]]
        t["steps_run"] = (len(client.get_metric_history(run_ids[t["trial_id"]], "step"))
                          if t["trial_id"] in run_ids else t["steps"])
    ok = [t for t in trials if t["error"] is None and t[metric] is not None]
    summary: dict[str, Any] = {"job": job, "trials": len(trials), "failed": sum(t["error"] is not None for t in trials),
                               "trial_steps": sum(t["steps_run"] for t in trials), "metric": metric, "mode": mode,
                               "parent_run": parent,
                               "stopped_early": sum(t["steps"] < (max_steps or 0) and t["trial_id"] not in live
                                                    for t in trials)}
    if interrupted:
        summary.update(interrupted=True, unfinished_trials=len(live))
    with open(out / "trials.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["trial_id", "config", "steps", "steps_run", metric, "error"])
        for t in trials:
            w.writerow([t["trial_id"], json.dumps(t["config"], ensure_ascii=False), t["steps"], t["steps_run"], t[metric],
                        t["error"] or ""])
    client.log_artifact(parent, str(out / "trials.csv"))
    if interrupted:
        client.set_tag(parent, "keplm.interrupted", "true")
        client.set_terminated(parent, status="KILLED")
        _write_summary(out, summary)
        raise SweepInterrupted(f"{job} interrupted with {len(live)} trial(s) unfinished ({len(trials)} started); "
                               f"its state is saved: run the same command again to resume it")
    if "keplm.interrupted" in client.get_run(parent).data.tags:   # this run resumed an interrupted one
        client.delete_tag(parent, "keplm.interrupted")
    if ok:
        best = (min if mode == "min" else max)(ok, key=lambda t: t[metric])
        overrides, _ = trial_overrides(best["config"], model)
        best_cfg = merge(base, nest(overrides))
        from keplm.config import KeplmConfig

        KeplmConfig(**best_cfg)   # what pretrain will load: fail here, not there
        (out / "best_config.yaml").write_text(yaml.safe_dump(best_cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
        client.log_artifact(parent, str(out / "best_config.yaml"))
        client.log_metric(parent, f"best_{metric}", float(best[metric]))
        for k, v in overrides.items():
            client.set_tag(parent, f"best.{k}", str(v))
        summary.update(best_trial=best["trial_id"], best_value=best[metric], best_overrides=overrides,
                       best_config=str(out / "best_config.yaml"))
    client.log_metric(parent, "trial_steps", summary["trial_steps"])
    client.set_terminated(parent, status="FINISHED" if ok else "FAILED")
    _write_summary(out, summary)
    if ok:
        from keplm.platform import console
        from keplm.platform.tracking import mlflow_ui_command
        from keplm.tuning.events import best_table

        console.echo("\n".join(best_table(trials, metric, mode)))
        console.add_summary("trials", f"{len(trials)} ({summary['stopped_early']} stopped early, {summary['failed']} "
                                      f"failed): {out / 'trials.csv'}")
        console.add_summary("best config", f"{out / 'best_config.yaml'} (keplm pretrain --config takes it)")
        console.add_summary("MLflow run", f"{parent} (experiment {cfg.tracking.experiment}), a child run per trial")
        console.add_summary("look at it", mlflow_ui_command(client.tracking_uri))
    if not ok:
        raise KeplmError(f"{job}: every trial failed; first error: {trials[0]['error'] if trials else 'no trials'}")
    return summary


def sweep(cfg, out: Path, tracking_uri: str) -> dict:
    from optuna.samplers import TPESampler
    from ray.tune.schedulers import ASHAScheduler, HyperBandScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from keplm.tuning.halving import SynchronousHalving

    sc = cfg.sweep
    if not sc.space:
        raise KeplmError("sweep.space is empty: declare the knobs to search (see configs/sweep-demo.yaml)")
    if sc.objective == "val_mlm_loss" and cfg.train.val_rows <= 0:
        raise KeplmError("sweep.objective=val_mlm_loss needs held-out rows: set train.val_rows > 0")
    mode = sc.metric_mode
    metric = sc.objective
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={
        "num_workers": sc.trial_workers, "runner": "ray_train", "cpus_per_worker": sc.cpus_per_worker,
        "gpus_per_worker": sc.gpus_per_worker})})
    max_t = cfg.train.max_steps or 10**9
    search = ConcurrencyLimiter(OptunaSearch(sampler=TPESampler(seed=sc.seed),
                                                   points_to_evaluate=sc.points_to_evaluate or None), max_concurrent=sc.max_concurrent)
    scheduler = None
    if sc.scheduler != "fifo" and sc.objective == "val_mlm_loss":
        grace = sc.grace_period * cfg.train.checkpoint_every
        if sc.scheduler == "asha":
            scheduler = ASHAScheduler(time_attr="step", max_t=max_t, grace_period=grace,
                                      reduction_factor=sc.reduction_factor, stop_last_trials=False)
        elif sc.scheduler == "sha":
            scheduler = SynchronousHalving(time_attr="step", metric=metric, mode=mode, max_t=max_t, grace_period=grace,
                                           reduction_factor=sc.reduction_factor, num_samples=sc.num_samples,
                                           max_concurrent=sc.max_concurrent).limit(search)
        else:
            scheduler = HyperBandScheduler(time_attr="step", max_t=max_t, reduction_factor=sc.reduction_factor)
    space = {k: v.to_tune() for k, v in sc.space.items()}
    choices = [{"model.kind": c} for k, v in sc.space.items() if k == "model.kind" for c in (v.choice or [])]
    proxy = _proxy_task(cfg) if sc.objective == "proxy_f1" else None
    return run_tune(cfg, out, "sweep", space, metric=metric, mode=mode, num_samples=sc.num_samples, search_alg=search,
                    scheduler=scheduler, max_concurrent=sc.max_concurrent, kinds=kinds_in(cfg, choices), model=None,
                    tracking_uri=tracking_uri, proxy_task=proxy, objective=sc.objective,
                    rungs=scheduler.milestones if isinstance(scheduler, SynchronousHalving) else None)


def ablate(cfg, out: Path, tracking_uri: str, model: str, command: str | None = None,
           config_path: str | None = None) -> dict:
    from ray import tune

    if model not in ABLATION_GRIDS:
        raise KeplmError(f"no ablation grid for {model!r}; grids: {sorted(ABLATION_GRIDS)}")
    grid = ABLATION_GRIDS[model]
    variants = cfg.ablate.variants or list(grid)
    unknown = [v for v in variants if v not in grid]
    if unknown:
        raise KeplmError(f"unknown variant(s) {unknown} for {model}; the grid has {list(grid)}")
    if cfg.ablate.objective == "val_mlm_loss" and cfg.train.val_rows <= 0:
        raise KeplmError("ablate.objective=val_mlm_loss needs held-out rows: set train.val_rows > 0")
    sc = cfg.sweep
    cfg = cfg.model_copy(update={
        "model": cfg.model.model_copy(update={"kind": model}),
        "train": cfg.train.model_copy(update={"num_workers": sc.trial_workers, "runner": "ray_train", "cpus_per_worker": sc.cpus_per_worker,
                                              "gpus_per_worker": sc.gpus_per_worker})})
    missing = [t for t in cfg.ablate.evaluate if t not in cfg.evaluate.tasks]
    if missing:
        raise KeplmError(f"ablate.evaluate names {missing}, which evaluate.tasks does not declare "
                         f"({sorted(cfg.evaluate.tasks)})")
    eval_tasks = {t: absolute_paths(cfg.evaluate.tasks[t].model_dump(mode="json")) for t in cfg.ablate.evaluate}
    space = {"variant": tune.grid_search(variants), "seed": tune.grid_search(list(range(cfg.ablate.seeds)))}
    metric = cfg.ablate.objective
    proxy = _proxy_task(cfg) if metric == "proxy_f1" else None
    started = time.time()
    summary = run_tune(cfg, out, "ablate", space, metric=metric, mode="min" if metric.endswith("loss") else "max",
                       num_samples=1, max_concurrent=sc.max_concurrent, model=model,
                       kinds=kinds_in(cfg, [grid[v] for v in variants], with_base=False), tracking_uri=tracking_uri,
                       proxy_task=proxy, objective=metric, eval_tasks=eval_tasks)
    if cfg.ablate.report_dir:
        summary["report"] = write_report(cfg, summary, tracking_uri, started, model, command, config_path)
    return summary


def write_report(cfg, summary: dict, tracking_uri: str, started: float, model: str, command: str | None,
                 config_path: str | None) -> str:
    """keplm compare's report of the ablation that just ended (its setup list carries the git SHA, the dates and
    the parent's ``time.*`` wall times: stages and trials), with the command that reproduces it."""
    from mlflow.tracking import MlflowClient

    from keplm.platform.config import resolve_path
    from keplm.tuning.report import compare

    out = Path(resolve_path(cfg.ablate.report_dir))
    meta = {"model": model, "wall time, the whole ablation": f"{time.time() - started:.0f} s"}
    compare(MlflowClient(tracking_uri), cfg.tracking.experiment, out, summary["parent_run"], cfg.ablate.report_metrics,
            meta=meta, command=command, config_path=config_path)
    return str(out / "report.md")


TASK_PATHS = ("train", "dev", "test", "augmented_train", "kg")


def absolute_paths(task: dict) -> dict:
    """A task's file paths resolved here, in the driver: Tune runs each trial in its own working directory, where
    a path relative to the one the command ran in points nowhere."""
    from keplm.platform.config import resolve_path

    return {k: (str(Path(resolve_path(v)).resolve()) if k in TASK_PATHS and v else v) for k, v in task.items()}


def _proxy_task(cfg) -> dict:
    name = cfg.sweep.proxy_task
    task = cfg.evaluate.tasks.get(name or "")
    if task is None or task.kind != "ner":
        raise KeplmError(f"sweep.proxy_task {name!r} is not an ner task of evaluate.tasks ({sorted(cfg.evaluate.tasks)})")
    return absolute_paths({"train": task.train, "dev": task.dev, "format": task.format, "steps": cfg.sweep.proxy_steps,
                           "dev_subset": cfg.sweep.proxy_dev_subset})
