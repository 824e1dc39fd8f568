"""The Tune trial: one short pretraining run on Ray Train (Train inside Tune), then its objective.

``pretrain_trial(config, shared)`` is a Tune function trainable. ``config`` is the trial's point of the
search space (``{"K": 10, "train.lr": 3e-4}``) or of an ablation grid (``{"variant": "-type_att", "seed":
1}``); ``shared`` (``tune.with_parameters``) carries the base config, the stage directories per model kind
(built once by the driver), the tracking URI and the parent MLflow run. Every Ray Train report (one per
checkpoint: step, losses, ``val_mlm_loss``) reaches Tune through ``TuneReportCallback``, so ASHA can stop
the trial between checkpoints. Under synchronous halving (``shared["rungs"]``) the Train run ends at each
rung with a checkpoint and the trial waits for the rung's decision; a paused trial is restarted later,
and Ray Train resumes it from that checkpoint into the same MLflow run. The trial's MLflow run is a child
of the sweep's run and receives the per-step metrics from rank 0, the objective at the end, FAILED when
the trial raises and KILLED when Tune stopped it.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any

from keplm.tuning.space import ABLATION_GRIDS, NOT_PRETRAINED, config_key, merge, nest


def trial_overrides(config: dict[str, Any], model: str | None) -> tuple[dict[str, Any], dict[str, str]]:
    """Search-space point -> (dotted config overrides, MLflow tags)."""
    overrides = {config_key(k): v for k, v in config.items() if k not in ("variant", "seed")}
    tags: dict[str, str] = {}
    if "variant" in config:
        overrides.update(ABLATION_GRIDS[model][config["variant"]])
        tags["keplm.variant"] = config["variant"]
    if "seed" in config:
        overrides.update({"train.seed": int(config["seed"]), "batches.seed": int(config["seed"])})
        tags["keplm.seed"] = str(config["seed"])
    return overrides, tags


def trial_config(base: dict, overrides: dict[str, Any]):
    from keplm.config import KeplmConfig

    return KeplmConfig(**merge(base, nest(overrides)))


def pretrain_trial(config: dict, shared: dict) -> None:
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from keplm.models.pipeline import start_run, training_inputs
    from keplm.models.setup import build_for_worker
    from keplm.platform.train_loop import run_in_process, run_training, trains_in_process

    class RungHoldingReport(TuneReportCallback):
        """Forwards every Ray Train report to Tune except the one a run ends with at a rung
        (``pause_at_steps``): the trial reports that itself, once the run has shut down (below)."""

        def __init__(self, rungs: list[int]):
            super().__init__()
            self.rungs = set(rungs)

        def after_report(self, run_context, metrics, checkpoint):
            if not held_at_rung(metrics[0] if metrics else {}, self.rungs):
                super().after_report(run_context, metrics, checkpoint)

    trial_id = tune.get_context().get_trial_id()
    overrides, tags = trial_overrides(config, shared.get("model"))
    client = MlflowClient(shared["tracking_uri"])
    cfg = trial_config(shared["base"], overrides)
    tags.update({"mlflow.parentRunId": shared["parent_run"], "keplm.job": f"{shared['job']}-trial",
                 "keplm.trial_id": trial_id, "keplm.model": cfg.model.kind})
    run_id = resumed_run(client, shared["parent_run"], trial_id) or start_run(
        client, cfg, f"{tags.get('keplm.variant', 'trial')}-{trial_id}", tags)
    trial_dir = Path(shared["out"]) / "trials" / trial_id
    try:
        stages = {k: (Path(v) if v else None) for k, v in shared["stages"][cfg.model.kind].items()}
        inputs = training_inputs(cfg, stages, trial_dir)
        rungs = shared.get("rungs") or []
        train_cfg = cfg.train.model_copy(update={"pause_at_steps": rungs}) if rungs else cfg.train
        if config.get("variant") == NOT_PRETRAINED:
            # the backbone as pretraining would start it, fine-tuned directly: does pretraining help at all?
            model_dir = untrained_model(inputs["context"], stages["prepare"], trial_dir, cfg.train.seed)
            evaluate_trial(model_dir, shared.get("eval_tasks") or {}, cfg, client, run_id, step=0)
            tune.report({"step": 0})
            client.set_terminated(run_id, status="FINISHED")
            return
        t_train = time.perf_counter()
        args = (train_cfg, inputs["files"], build_for_worker, inputs["context"], trial_dir, shared["tracking_uri"],
                run_id, cfg.batches.max_seq_len, inputs["val_files"])
        in_trial = shared.get("train_in_trial") and trains_in_process(train_cfg)
        if in_trial:   # on a GPU when the sweep gave the trial one (trial_resources), never one it does not hold
            train_cfg = train_cfg.model_copy(update={"use_gpu": bool(shared.get("trial_gpu"))})
            args = (train_cfg, *args[1:])
        # named by trial: a train.storage_path the trials share keeps each trial's checkpoints apart
        name = f"trial-{trial_id}"
        while True:
            if in_trial:
                result = run_in_process(*args, on_report=lambda m: None if held_at_rung(m, rungs) else tune.report(m),
                                        name=name)
            else:
                result = run_training(*args, callbacks=[RungHoldingReport(rungs)], name=name)
            if result.error is not None:
                raise result.error
            metrics = dict(result.metrics or {})
            if not rungs or metrics.get("final"):
                break
            # The run ended at a rung with a checkpoint, and has shut down (its workers' placement group is
            # gone) only now: a PAUSE that killed this process while Ray Train was still shutting down would
            # leave the placement group reserved, and the sweep waiting for CPUs no one holds. So the rung's
            # report is made here, not by the callback. tune.report returns only when Tune asks for the next
            # result, i.e. on CONTINUE (this trial was the last to arrive and survived): the next segment
            # resumes from the rung's checkpoint. A PAUSE or STOP ends this process while it waits.
            tune.report(metrics)
        client.log_metric(run_id, "time.pretrain_s", time.perf_counter() - t_train, step=int(metrics.get("step", 0)))
        if shared.get("eval_tasks"):
            evaluate_trial(final_model(result, stages["prepare"], trial_dir), shared["eval_tasks"], cfg, client,
                           run_id, step=int(metrics.get("step", 0)))
        if shared["objective"] == "proxy_f1":
            f1 = proxy_objective(result, stages["prepare"], trial_dir, cfg, shared["proxy_task"])
            metrics["proxy_f1"] = f1
            client.log_metric(run_id, "proxy_f1", f1, step=int(metrics.get("step", 0)))
            tune.report({"proxy_f1": f1, "step": metrics.get("step", 0)})
        value = metrics.get(shared["objective"])
        if value is not None:
            client.log_metric(run_id, "objective", float(value), step=int(metrics.get("step", 0)))
        client.set_terminated(run_id, status="FINISHED")
    except Exception:
        client.set_terminated(run_id, status="KILLED" if stopped_by_tune() else "FAILED")
        raise
    except BaseException:   # stopped by the scheduler
        client.set_terminated(run_id, status="KILLED")
        raise


def held_at_rung(metrics: dict, rungs) -> bool:
    """Whether a report is the one a run ends with at a rung (``pause_at_steps``), which the trial makes to
    Tune itself once the run has ended (below in ``pretrain_trial``)."""
    return metrics.get("step") in set(rungs) and not metrics.get("final")


def stopped_by_tune() -> bool:
    """Whether Tune has told this trial to stop (a scheduler's STOP, an interrupted sweep's cleanup):
    its session is shut down or has its stop event set. Tune stops a trial without waiting for the trial's
    thread, so an error raised after that comes from the trial's Ray Train run being torn down with the
    trial actor, possibly after the sweep's driver recorded the run KILLED: the trial then writes KILLED
    too, rather than a FAILED that would mark a cut-off trial as broken. Reads Ray's (private) session."""
    from ray.train._internal import session

    s = session.get_session()
    return s is None or s.stop_event.is_set()


def resumed_run(client, parent_run: str, trial_id: str) -> str | None:
    """The MLflow run of a trial that ran before (paused by SHA, or a restored sweep), set RUNNING again
    and no longer tagged as interrupted (or as stopped early, which sweeps summarised before interruptions
    were told apart tagged them); its metrics go on from the step Ray Train resumes at."""
    exp = client.get_run(parent_run).info.experiment_id
    runs = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_run}' and tags.`keplm.trial_id` = '{trial_id}'",
                              max_results=1)
    if not runs:
        return None
    run = runs[0]
    for tag in ("keplm.interrupted", "keplm.stopped_early"):
        if tag in run.data.tags:
            client.delete_tag(run.info.run_id, tag)
    client.update_run(run.info.run_id, status="RUNNING")
    return run.info.run_id


def final_model(result, prepare_dir: Path, trial_dir: Path) -> Path:
    """The trial's last checkpointed model with the prepared tokenizer, as ``trial_dir/model``."""
    model_dir = trial_dir / "model"
    with result.checkpoint.as_directory() as d:
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.copytree(Path(d) / "model", model_dir)
    shutil.copytree(prepare_dir / "tokenizer", model_dir, dirs_exist_ok=True)
    return model_dir


def untrained_model(context: dict, prepare_dir: Path, trial_dir: Path, seed: int) -> Path:
    """The trial's model as pretraining would initialise it (same config and seed), saved untrained."""
    import torch

    from keplm.models.setup import build_for_worker

    torch.manual_seed(seed)   # the train loop seeds the same way before building the model
    model, _ = build_for_worker(context)
    model_dir = trial_dir / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    shutil.copytree(prepare_dir / "tokenizer", model_dir, dirs_exist_ok=True)
    return model_dir


def evaluate_trial(model_dir: Path, tasks: dict[str, dict], cfg, client, run_id: str, step: int) -> dict[str, float]:
    """Each of ``ablate.evaluate``'s tasks on the trial's model (one seed: the trial's), its numeric results
    logged to the trial's run as ``<task>.<metric>`` (e.g. ``cmedqaner.test_f1``, ``probe.recall_at_5``)."""
    import torch
    from mlflow.entities import Metric

    from keplm.models.downstream.tasks import TaskSpec, run_task

    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # one thread beside the other trial (a Ray Train trial's actor holds no CPU of its own)
    scores: dict[str, float] = {}
    try:
        for name, spec in tasks.items():
            t = time.perf_counter()
            result = run_task(str(model_dir), TaskSpec(**spec), cfg.finetune, cfg.train.seed)
            scores.update({f"{name}.{k}": float(v) for k, v in result.items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "seed"})
            scores[f"time.eval_{name}_s"] = time.perf_counter() - t
    finally:
        torch.set_num_threads(threads)
    ts = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v in scores.items() if math.isfinite(v)])
    return scores


def proxy_objective(result, prepare_dir: Path, trial_dir: Path, cfg, task: dict) -> float:
    """Dev F1 of a short NER fine-tuning of the trial's final model (keplm.models.downstream)."""
    from keplm.models.downstream.data import read_ner
    from keplm.models.downstream.finetune import proxy_dev_f1
    from keplm.platform.config import resolve_path

    model_dir = final_model(result, prepare_dir, trial_dir)
    train = read_ner(resolve_path(task["train"]), task.get("format"))
    dev = read_ner(resolve_path(task["dev"]), task.get("format"))
    return proxy_dev_f1(model_dir, train, dev, steps=task["steps"], dev_subset=task["dev_subset"], cfg=cfg.finetune)
