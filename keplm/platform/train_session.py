"""Where the train loop runs: on Ray Train's workers, or in the calling process.

``train_loop_per_worker`` asks its session for everything that depends on where it runs: its rank and the
world size, its device, the model wrapped for that world (DDP or not), its part of the Ray Data read, the
checkpoint to resume from, and where each report (metrics, and a checkpoint directory or none) goes.

- ``RayTrainSession`` answers from Ray Train (``ray.train.get_context``, ``get_checkpoint``, ``report``...):
  the session of every ``TorchTrainer`` worker (``keplm pretrain``, and sweep trials with several workers).
- ``LocalSession`` answers itself: rank 0 of a world of 1, in the process that calls ``run_in_process``. A
  1-worker sweep trial trains this way in its Tune trial's process (``sweep.train_in_trial``), instead of
  starting a Ray Train controller and a worker process, each importing torch and the models, for every trial
  and every rung segment. Its checkpoints are directories ``checkpoint_NNNNNN`` (same content as Ray Train's)
  under its storage, the newest ``keep`` kept; the next start on the same storage resumes from the newest, as
  a Ray Train run of the same name and storage does.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHECKPOINT_PREFIX = "checkpoint_"
METRICS_FILE = "keplm_report.json"


def in_ray_worker() -> bool:
    """Whether this process is a Ray worker (an actor or task), not a driver: its log lines reach the driver's
    console only as worker output (``keplm.platform.console.worker_logging``)."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


class RayTrainSession:
    """The loop's session on a Ray Train worker."""

    in_ray_worker = True

    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def device(self):
        import ray.train.torch

        return ray.train.torch.get_device()

    def prepare_model(self, model):
        import ray.train.torch

        # find_unused_parameters stays on: which parameters a step uses depends on the model kind, its
        # objectives and the batch (a term with no entity mention in it, a head an ablation switches off).
        # When a run uses all of them, DDP's reducer notes once per rank that the flag was not needed; that
        # notice is a C++ log line (c10's TORCH_WARN_ONCE on the worker's stderr), not a Python warning that
        # warnings.filterwarnings could filter, so it goes with the worker's other lines to the job's log file.
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})

    def dataset_shard(self):
        import ray.train

        return ray.train.get_dataset_shard("train")

    @contextmanager
    def resume_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield Path(d)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir is not None else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def wait_for_reports(self) -> None:
        """Until Ray Train's controller has taken in every report so far. It collects them when it polls the
        workers (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), and a checkpoint whose report died with a worker is
        not restored: a fault injected before this returns would restart from the checkpoint before."""
        import ray.train

        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED,
                                               timeout_s=120)


class LocalSession:
    """The loop's session in this process: rank 0 of 1, checkpoints under ``storage``.

    ``on_report(metrics)`` is called after each report's checkpoint is stored (a sweep trial forwards it to
    Tune). ``dataset``: the Ray Data read of the shards (``reader: ray_data``), iterated whole."""

    rank, world = 0, 1

    def __init__(self, storage: str | Path, keep: int, use_gpu: bool | None = None,
                 on_report: Callable[[dict[str, Any]], None] | None = None, dataset=None):
        self.storage = Path(storage)
        self.keep = keep
        self.use_gpu = use_gpu
        self.on_report = on_report
        self.dataset = dataset
        self.last_metrics: dict[str, Any] = {}
        self.in_ray_worker = in_ray_worker()   # a sweep trial's actor; not keplm pretrain's driver

    def device(self):
        """The GPU when ``use_gpu`` (unset: when this process sees one); in a Ray actor given a GPU, Ray has made
        it the only one visible, so it is ``cuda:0``."""
        import torch

        if self.use_gpu and not torch.cuda.is_available():
            raise RuntimeError("train.use_gpu is true, but this process sees no GPU")
        gpu = torch.cuda.is_available() if self.use_gpu is None else self.use_gpu
        return torch.device("cuda", 0) if gpu else torch.device("cpu")

    def prepare_model(self, model):
        return model.to(self.device())

    def dataset_shard(self):
        if self.dataset is None:
            return None
        # the whole read in file order, as Ray Train's split gives its one worker (ingest_data_config)
        self.dataset.context.execution_options.preserve_order = True
        return self.dataset.iterator()

    def checkpoints(self) -> list[Path]:
        """The stored checkpoints, oldest first (a copy cut off mid-write has no final name)."""
        if not self.storage.is_dir():
            return []
        return sorted(p for p in self.storage.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
                      and p.name[len(CHECKPOINT_PREFIX):].isdigit())

    @contextmanager
    def resume_checkpoint(self) -> Iterator[Path | None]:
        stored = self.checkpoints()
        yield stored[-1] if stored else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is not None:
            stored = self.checkpoints()
            n = int(stored[-1].name[len(CHECKPOINT_PREFIX):]) + 1 if stored else 0
            final = self.storage / f"{CHECKPOINT_PREFIX}{n:06d}"
            partial = self.storage / f".{final.name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(checkpoint_dir, partial)
            # the report beside its checkpoint: a later start with nothing left to train returns it
            (partial / METRICS_FILE).write_text(json.dumps(metrics, default=float), encoding="utf-8")
            os.replace(partial, final)   # a checkpoint appears whole or not at all
            for old in [*stored, final][:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.last_metrics = dict(metrics)
        if self.on_report is not None:
            self.on_report(dict(metrics))

    def wait_for_reports(self) -> None:
        """Every report is stored before ``report`` returns."""

    def result(self) -> LocalResult:
        """The last report's metrics and checkpoint; when this start reported nothing (its checkpoint was the
        last step already), those stored with the newest checkpoint, as Ray Train's ``Result`` has them."""
        from ray.train import Checkpoint

        stored = self.checkpoints()
        metrics = self.last_metrics
        if not metrics and stored and (stored[-1] / METRICS_FILE).is_file():
            metrics = json.loads((stored[-1] / METRICS_FILE).read_text(encoding="utf-8"))
        return LocalResult(metrics, Checkpoint.from_directory(str(stored[-1])) if stored else None)


@dataclass
class LocalResult:
    """What ``run_in_process`` returns, read as a Ray Train ``Result`` is: the last report's metrics and
    checkpoint (``as_directory()``), no error (an error raises)."""

    metrics: dict[str, Any]
    checkpoint: Any
    error: BaseException | None = None
