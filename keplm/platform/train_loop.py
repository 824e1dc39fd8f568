"""A model-agnostic Ray Train loop: DDP, AdamW + linear warm-up/decay, accumulation, clipping, bf16 on GPU,
checkpoints with full resume state, per-step metrics to MLflow from rank 0.

The loop knows no model: ``build(context) -> (model, collate)`` is called on every worker, where
``model(**batch)`` returns an object with ``loss`` and optional ``*_loss`` terms, and ``collate(rows)``
turns a list of Parquet rows into a dict of tensors (with ``input_ids`` and ``attention_mask``). A
collate object with an ``rng`` (numpy Generator) has that state checkpointed too.

Data (``reader``): by default one Ray Data read of the shard files (in a seeded order, one read task per
file) that Ray Train splits across the workers (``streaming_split`` with equal row counts, each worker's
``get_dataset_shard``), so no worker reads the whole corpus. The split runs with ``preserve_order``, so every
run gives each worker the same rows in the same order (what makes kill-and-resume exact). Each worker then
shuffles its rows in a local buffer (``shuffle_buffer_rows``) seeded by ``seed``, the epoch and its rank, so
an epoch's batch order is new each epoch and the same on every run; a resumed epoch reads past the batches
consumed before the checkpoint. Every ``length_group_batches`` consecutive batches are then regrouped by
row length (``length_grouped``): the same rows in as many batches, each padded little, in a seeded order.
``reader: pyarrow`` has each worker stream its own contiguous share of the rows without Ray Data, the files
reshuffled per epoch (``seed + epoch``). Either way every worker runs the same number of
steps per epoch, the smallest share's, so DDP never waits on a worker that ran out (the rows left over —
fewer than one batch per worker — are counted as ``rows_skipped_for_balance``).

Checkpoint (every ``checkpoint_every`` optimizer steps and at the end): ``model/`` (``save_pretrained``,
safetensors), ``state.pt`` (optimizer, scheduler, step, epoch, batch position in the epoch, torch and
collator RNG states, the collators' counts): tensors and plain data only (the numpy RNG state is a dict of
ints, the counts a dict of ints), so it is read back with ``torch.load(weights_only=True)``: a ``state.pt``
that holds any other pickled object (e.g. one planted in a shared ``train.storage_path``) is refused, never
unpickled. Ray Train V2 restores the latest checkpoint when the same run (``RunConfig`` name
and storage path) is started again or when a worker fails (``FailureConfig(max_failures)``), and the loop
resumes from it: same step, same data position, same RNG.

Validation (``val_rows`` > 0, the held-out rows in ``val_files``): at every checkpoint each worker scores
its share of them with masking drawn from a fixed seed (the same masks at every evaluation, so the curve
compares like with like), and the workers' mean ``mlm_loss`` is reported as ``val_mlm_loss``.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from keplm.platform.config import Section
from keplm.platform.faults import exit_once
from keplm.platform.loss_balance import diagnostic_due, imbalance_warning, term_gradient_norms
from keplm.platform.ray_session import without_state_api

log = logging.getLogger(__name__)


class TrainConfig(Section):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one per GPU on a GPU cluster)")
    runner: Literal["ray_train", "in_process"] = Field(
        "ray_train", description="keplm pretrain: 'ray_train', the workers are a Ray Train run (DDP, a failed worker "
        "group restarted from its checkpoint, train.max_failures times); 'in_process', one worker (num_workers: 1) "
        "trained in the job's own process, the same loop without Ray Train's controller and worker processes (a "
        "failure ends the job; rerunning it resumes from the latest checkpoint). Part of the training key: the "
        "two keep their checkpoints apart")
    use_gpu: bool | None = Field(None, description="unset: GPU when the Ray cluster has one")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each worker asks Ray for")
    gpus_per_worker: float = Field(1.0, gt=0, description="GPUs each worker asks Ray for (with use_gpu)")
    batch_size: int = Field(8, ge=1, description="rows per worker per micro-step")
    grad_accum: int = Field(1, ge=1, description="micro-steps per optimizer step")
    epochs: int = Field(1, ge=1, description="passes over the shards, unless max_steps ends training first")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; unset: epochs x steps per epoch")
    lr: float = Field(5e-5, gt=0, description="AdamW peak learning rate")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of the steps with linear warm-up; linear "
                                                             "decay after")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not on biases and LayerNorms)")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    seed: int = Field(42, description="seed of initialisation, data order and shuffling")
    checkpoint_every: int = Field(100, ge=1, description="optimizer steps between checkpoints (and sweep reports)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept on storage")
    max_failures: int = Field(2, ge=0, description="restarts of a failed worker group from its last checkpoint")
    resources_timeout_s: float = Field(
        600.0, gt=0, description="keplm pretrain: how long a worker group may wait for its workers' resources (a "
        "lost node's worker, a cluster too small) before the run fails with one line and exit code 3; rerunning the "
        "same command resumes. Long enough by default for an autoscaler to replace a node")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how Ray places the workers on the nodes (Ray Train's ScalingConfig): PACK fills a node "
        "before the next, SPREAD puts them on as many nodes as it can, STRICT_* or not at all. The nodes each rank ran "
        "on are the MLflow tag keplm.worker_nodes")
    log_every: int = Field(10, ge=1, description="optimizer steps between metric logs")
    storage_path: str | None = Field(None, description="checkpoint storage: a path or a URI Ray supports "
                                                       "(s3://, gs://, an NFS path); unset: OUTPUT/ray_train")
    peak_tflops: float | None = Field(None, gt=0, description="device peak for MFU; unset: known GPUs, "
                                                              "or measured fp32 matmul rate on CPU")
    stop_after_steps: int | None = Field(None, ge=1, description="end this run early (tests of resume)")
    pause_at_steps: list[int] = Field(default_factory=list, description="end the run (with a checkpoint) at the "
                                      "first of these steps it reaches after starting or resuming: the rungs of a "
                                      "synchronous-halving trial, which is resumed from there if it survives")
    val_rows: int = Field(0, ge=0, description="hold out the corpus's last N rows; their MLM loss is reported "
                                               "as val_mlm_loss at every checkpoint (the sweep objective)")
    fault_at_step: int | None = Field(None, ge=1, description="fault injection: the last worker's process dies "
                                                              "once, after this step (tests of FailureConfig)")
    diagnostics_every: int | None = Field(
        None, ge=0, description="log each weighted loss term's gradient norm on the shared encoder "
        "(grad_norm/<term>) every N optimizer steps; unset: the first step and every checkpoint; 0: never")
    diagnostics_max_ratio: float = Field(100.0, gt=0, description="warn when a term's encoder gradient exceeds "
                                                                 "this multiple of MLM's")
    compile: bool = Field(False, description="torch.compile each repeated block (the encoder layers): fuses "
                                             "LayerNorm/GELU/dropout/residual kernels on GPU; the first steps "
                                             "pay the compile")
    deterministic: bool | None = Field(None, description="torch deterministic algorithms; unset: on CPU only "
                                                         "(the GPU's deterministic fallbacks are slower)")
    prefetch_batches: int = Field(2, ge=0, description="batches collated ahead in a background thread "
                                                       "(0: collate in the training thread)")
    reader: Literal["ray_data", "pyarrow"] = Field(
        "ray_data", description="how workers get the shard rows: 'ray_data', one Ray Data read of the shards "
        "split across the workers (streaming_split, get_dataset_shard); 'pyarrow', each worker reads its own "
        "contiguous share of the files (no Ray Data tasks)")
    read_cpus: float = Field(0.0, ge=0, description="CPUs each Ray Data read task asks for; 0 by default, since "
                                                     "Ray Data gets only the whole CPUs the workers leave free")
    read_concurrency: int = Field(2, ge=1, description="Ray Data read tasks running at once")
    shuffle_buffer_rows: int = Field(
        4096, ge=0, description="ray_data reader: each worker shuffles its rows in a buffer of this many, seeded "
        "by train.seed, the epoch and its rank (the shards keep a document's segments together; 0: off)")
    length_group_batches: int = Field(
        64, ge=1, description="batch rows of similar length together: each run of this many consecutive batches "
        "(after the shuffle) is sorted by row length, cut into batches again and served in a seeded random order, "
        "so a batch pads to a length close to each of its rows' (29 % of the computed tokens were padding on the "
        "real corpus with random batches of 64); 1: off")

    @model_validator(mode="after")
    def _runner(self):
        if self.runner == "in_process" and self.num_workers != 1:
            raise ValueError(f"train.runner=in_process trains one worker; train.num_workers is {self.num_workers}")
        if self.runner == "in_process" and not local_storage(self):
            raise ValueError("train.runner=in_process keeps its checkpoints on a local path; train.storage_path is "
                             f"{self.storage_path!r} (use runner ray_train for remote storage)")
        return self


GPU_PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def device_peak_flops(device, override_tflops: float | None) -> float:
    import torch

    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf in GPU_PEAK_TFLOPS_BF16.items():
            if key in name:
                return tf * 1e12
        return 100e12
    # CPU: the achieved fp32 matmul rate on this worker's threads, a practical peak
    a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))  # not the global RNG: resume must match
    a @ a   # warm-up: the first product pays for allocation
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    return 10 * 2 * 512**3 / (time.perf_counter() - t)


def flops_per_token(model, seq_len: int) -> float:
    """6·N (forward + backward over the non-embedding parameters) + 12·L·T·d for attention (PaLM, App. B)."""
    cfg = getattr(model, "config", None)
    n = sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and "embeddings" not in name)
    layers = getattr(cfg, "num_hidden_layers", 0)
    hidden = getattr(cfg, "hidden_size", 0)
    return 6.0 * n + 12.0 * layers * seq_len * hidden


def compile_blocks(model, mode: str | None = None) -> int:
    """``Module.compile(mode=mode)`` every block of each ModuleList of two or more modules of one type (a
    transformer's layers), as torchtitan does: one small graph shared by all layers, no graph breaks from the
    model's data-dependent glue (mention counts, span widths), and state-dict keys unchanged. Returns how many."""
    import torch

    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            for block in module:
                block.compile(mode=mode)
                n += 1
    return n


class Prefetcher:
    """Collates the batches of ``batches`` (an iterable of (index, row table)) ``depth`` ahead in a
    background thread, so that Python collation overlaps the device's step. Yields (index, tensors,
    rng_state, stats): the collator's RNG state and a copy of its ``stats`` counts (None without them)
    right after that batch, which is what a checkpoint taken after consuming it must hold (the thread
    has already collated the batches after it). ``depth`` 0 collates in the calling thread. Errors in
    the thread are raised in the consumer."""

    _END = object()

    def __init__(self, batches, collate, depth: int, pin: bool = False):
        import queue
        import threading

        self.batches, self.collate, self.pin = batches, collate, pin
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._thread = threading.Thread(target=self._run, daemon=True) if depth > 0 else None
        if self._thread is not None:
            self._thread.start()

    def _item(self, i, table):
        tensors = self.collate(table.to_pylist())
        if self.pin:
            tensors = {k: v.pin_memory() for k, v in tensors.items()}
        rng = getattr(self.collate, "rng", None)
        return i, tensors, (rng.bit_generator.state if rng is not None else None), collate_stats(self.collate)

    def _put(self, item) -> bool:
        import queue

        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self):
        try:
            for i, table in self.batches:
                if not self._put(self._item(i, table)):
                    return
            self._put(self._END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put(e)

    def __iter__(self):
        if self._thread is None:
            for i, table in self.batches:
                yield self._item(i, table)
            return
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop the thread (batches it collated ahead are dropped)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def collate_stats(collate) -> dict | None:
    """A copy of the collator's ``stats`` counts (what it cut, dropped or padded), if it keeps them."""
    stats = getattr(collate, "stats", None)
    if not isinstance(stats, dict):
        return None
    # plain str -> int/float (no numpy scalars, no Counter): what ``torch.load(weights_only=True)`` reads back
    return {str(k): (int(v) if float(v).is_integer() else float(v)) for k, v in stats.items()}


def load_train_state(path: str | Path) -> dict:
    """``state.pt`` read with ``weights_only=True``: tensors and plain data only, never an arbitrary pickle."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise RuntimeError(f"{path}: refusing to load a checkpoint state that holds objects other than tensors and "
                           f"plain data (weights_only=True): {first}") from None


def set_collate_stats(collate, stats: dict | None) -> None:
    if stats is not None and isinstance(getattr(collate, "stats", None), dict):
        collate.stats.clear()
        collate.stats.update(stats)


def epoch_files(files: list[str], epoch: int, seed: int) -> list[str]:
    """The shard files in this epoch's order (a permutation seeded by ``seed + epoch``)."""
    import numpy as np

    order = np.random.default_rng(seed + epoch).permutation(len(files))
    return [files[i] for i in order]


def iter_row_batches(files: list[str], batch_size: int, start: int = 0, stop: int | None = None):
    """Consecutive pyarrow tables of ``batch_size`` rows over rows [start, stop) of the files taken in
    order (the tail that does not fill a batch is dropped); only files overlapping the range are read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pending: list = []
    n = 0
    offset = 0
    for f in files:
        pf = pq.ParquetFile(f)
        rows = pf.metadata.num_rows
        lo, hi = max(start - offset, 0), min((stop if stop is not None else offset + rows) - offset, rows)
        offset += rows
        if hi <= lo:
            continue
        table = pf.read(columns=["input_ids", "mentions"]).slice(lo, hi - lo)
        for rb in table.to_batches(max_chunksize=batch_size):
            pending.append(rb)
            n += rb.num_rows
            while n >= batch_size:
                merged = pa.Table.from_batches(pending)
                yield merged.slice(0, batch_size)
                rest = merged.slice(batch_size)
                pending, n = rest.to_batches(), rest.num_rows


TRAIN_COLUMNS = ["input_ids", "mentions"]
TRAIN_BLOCK_BYTES = 128 * 2**20


def _read_shard_files(batch):
    """Ray Data map: a batch of shard paths -> their rows (the columns training reads)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(path, columns=TRAIN_COLUMNS) for path in batch["path"].to_pylist()])


def shard_dataset(files: list[str], seed: int, read_cpus: float, read_concurrency: int):
    """The shards as one Ray Data dataset: one read task per file, files in the seeded order of
    ``epoch_files(files, 0, seed)``. With ``preserve_order`` (see ``ingest_data_config``) its rows come out
    in this order on every run.

    Built as paths -> a map that reads each file, not ``read_parquet``: that one lists the files in a task
    that asks for a whole CPU, and the read tasks get only whole CPUs the training workers left over (Ray
    Data's share of a node is rounded down), so on a node the workers fill it would wait forever. Here
    every task asks for ``read_cpus``, 0 by default, with at most ``read_concurrency`` at a time."""
    import ray.data

    ordered = epoch_files(files, 0, seed)
    paths = ray.data.from_items([{"path": str(Path(f).resolve())} for f in ordered], override_num_blocks=len(ordered))
    rows = paths.map_batches(_read_shard_files, batch_size=1, batch_format="pyarrow", num_cpus=read_cpus,
                             compute=ray.data.TaskPoolStrategy(size=read_concurrency))
    # the split deals out whole blocks, so the block size decides which rows each worker gets: fixed
    # here, not taken from the caller's DataContext, which an earlier stage may have changed
    rows.context.target_max_block_size = TRAIN_BLOCK_BYTES
    return rows


def ingest_data_config():
    """Ray Train's DataConfig for ``shard_dataset``: split across workers with equal row counts, in a fixed
    order. Ray Data's splitter hands each block, in arrival order, to the worker with the fewest rows so
    far; with ``preserve_order`` (which also turns its locality hints off) the arrival order is the read
    order, so every run gives each worker the same rows in the same order — what exact resume needs."""
    from ray.train import DataConfig

    from ray.data import DataContext, ExecutionOptions

    # DataConfig.default_ingest_options() with preserve_order, built here: Ray's passes exclude_resources,
    # deprecated (a RayDeprecationWarning at each run), and always the zero of the default context
    ctx = DataContext.get_current().execution_options
    options = ExecutionOptions(resource_limits=ctx.resource_limits, preserve_order=True,
                               verbose_progress=ctx.verbose_progress)
    return DataConfig(datasets_to_split=["train"], execution_options=options, enable_shard_locality=False)


def shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    """The local shuffle's seed for one worker's epoch: distinct per (seed, epoch, rank), fixed across runs."""
    import numpy as np

    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def shard_batches(shard, batch_size: int, shuffle_rows: int, seed: int):
    """A worker's batches of its Ray Data split, whole ones only, shuffled in a buffer of ``shuffle_rows``
    rows drawn with ``seed`` (0 rows: in read order). Ray's local shuffle is deterministic for a given seed and
    sequence of blocks, and the split delivers the same blocks on every run."""
    shuffle = {"local_shuffle_buffer_size": shuffle_rows, "local_shuffle_seed": seed} if shuffle_rows else {}
    return shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", drop_last=True, **shuffle)


def length_grouped(batches, group: int, seed):
    """``batches`` (pyarrow tables of equal row counts) regrouped by length: every ``group`` consecutive
    batches are pooled, their rows sorted by ``input_ids`` length (stable, so equal lengths keep the shuffled
    order), cut into batches of the same size again and yielded in an order drawn from ``seed`` (the batch
    lengths do not follow an ascending sweep). The same batches in, the same number out, each row once: an
    epoch's rows and step count do not change, only which rows share a batch. Deterministic for a given
    input and seed, so a resumed epoch that skips its first batches skips the same ones. ``group`` 1: as is.
    HF Trainer's ``group_by_length`` does the same within megabatches."""
    if group <= 1:
        yield from batches
        return
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    rng = np.random.default_rng(seed)
    pool: list = []

    def regrouped():
        size = pool[0].num_rows
        rows = pa.concat_tables(pool)
        lengths = pc.list_value_length(rows.column("input_ids")).to_numpy(zero_copy_only=False)
        rows = rows.take(np.argsort(lengths, kind="stable"))
        for b in rng.permutation(len(pool)):
            yield rows.slice(b * size, size)

    for table in batches:
        pool.append(table)
        if len(pool) == group:
            yield from regrouped()
            pool = []
    if pool:
        yield from regrouped()


def bounded_batches(batches, start: int, stop: int):
    """(index, batch) for batches [start, stop) of ``batches``, then the rest read to the end, so that a
    Ray Data split finishes its epoch (its coordinator starts the next one only when every split has)."""
    it = iter(batches)
    for i, batch in enumerate(it):
        if i >= stop:
            break
        if i >= start:
            yield i, batch
    for _ in it:
        pass


def eta_text(s: float) -> str:
    """Seconds left as ``42 s``, ``3 min 5 s`` or ``2 h 10 min``."""
    s = max(0, round(s))
    if s < 60:
        return f"{s} s"
    return f"{s // 60} min {s % 60} s" if s < 3600 else f"{s // 3600} h {s % 3600 // 60} min"


def worker_rows(files: list[str], world: int, rank: int) -> tuple[int, int]:
    """Rank r's contiguous share [start, stop) of all rows: shares differ by at most one row."""
    import pyarrow.parquet as pq

    total = sum(pq.read_metadata(f).num_rows for f in files)
    return total * rank // world, total * (rank + 1) // world


def loss_names(out) -> list[str]:
    """The loss terms a model's output can hold: its dataclass fields named ``*loss`` (the same on every rank,
    whichever terms this rank's batch produced), else the terms it holds."""
    import dataclasses

    if dataclasses.is_dataclass(out):
        return sorted(f.name for f in dataclasses.fields(out) if f.name.endswith("loss"))
    return sorted(k for k in out if k.endswith("loss"))


def mean_over_ranks(sums: dict[str, Any], names: list[str], device) -> dict[str, float]:
    """Each term's mean over the ranks whose batches produced it (a batch without entity mentions has no
    mention loss). Every rank reduces the same vector, a sum and a count per name in ``names``: a vector of
    each rank's own terms would differ in length between ranks, which gloo aborts on (NCCL would hang)."""
    import torch

    zero = torch.zeros((), device=device)
    names = sorted(set(names) | set(sums)) if not torch.distributed.is_initialized() else names
    vec = torch.stack([*(sums.get(k, zero).float() for k in names),
                       *(torch.ones((), device=device) if k in sums else zero for k in names)]) if names else zero[None]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(vec)
    total, count = vec[:len(names)].tolist(), vec[len(names):].tolist()
    return {k: t / c for k, t, c in zip(names, total, count) if c > 0}


def train_loop_per_worker(config: dict, session=None) -> None:
    """The Ray Train worker function; ``config`` carries the TrainConfig dump, files, build and tracking.
    ``session`` (``keplm.platform.train_session``): where it runs; a Ray Train worker's by default."""
    import numpy as np
    import ray
    import torch
    from transformers import get_linear_schedule_with_warmup

    from keplm.platform.console import placement, worker_logging
    from keplm.platform.train_session import RayTrainSession

    session = session or RayTrainSession()
    if session.in_ray_worker:
        worker_logging()   # keplm's lines (progress, resume) reach the driver's console, marked
    cfg = TrainConfig(**config["train"])
    files: list[str] = config["files"]
    build: Callable[[dict], tuple[Any, Any]] = config["build"]
    rank, world = session.rank, session.world
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed + rank)
    device = session.device()
    if device.type == "cuda":   # this run's peak, not an earlier run's in the same process (a reused trial actor)
        torch.cuda.reset_peak_memory_stats(device)
    torch.use_deterministic_algorithms(cfg.deterministic if cfg.deterministic is not None else device.type == "cpu",
                                       warn_only=True)

    model, collate = build(config.get("build_context", {}))
    if getattr(collate, "rng", None) is not None:  # each rank masks and samples differently, reproducibly
        collate.rng = np.random.default_rng([cfg.seed, rank])
    n_flops = flops_per_token(model, config.get("seq_len", 512))
    if cfg.compile:
        compile_blocks(model)
    model = session.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    decay, no_decay = [], []
    for name, p in core.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name or name.endswith(".bias") or ".ln" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, fused=device.type == "cuda")
    # Ray Data's equal split gives every worker total // world rows, the smallest of these shares too
    shares = [worker_rows(files, world, r) for r in range(world)]
    steps_per_epoch = min(hi - lo for lo, hi in shares) // cfg.batch_size
    shard = session.dataset_shard() if cfg.reader == "ray_data" else None
    skipped = sum(hi - lo for lo, hi in shares) - steps_per_epoch * cfg.batch_size * world
    opt_steps_per_epoch = steps_per_epoch // cfg.grad_accum
    if opt_steps_per_epoch == 0:
        raise RuntimeError(f"too little data: {steps_per_epoch} micro-batches per worker per epoch "
                           f"< grad_accum {cfg.grad_accum}")
    total = cfg.max_steps or cfg.epochs * opt_steps_per_epoch
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * total), total)

    step, epoch, position = 0, 0, 0
    state = None
    with session.resume_checkpoint() as d:
        if d is not None:
            state = load_train_state(d / "state.pt")
            from safetensors.torch import load_file

            core.load_state_dict(load_file(str(d / "model" / "model.safetensors")), strict=False)
    if state is not None:
        if state.get("world", world) != world:
            raise RuntimeError(f"checkpoint was written by {state['world']} workers; resume with the same train.num_workers")
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, epoch, position = state["step"], state["epoch"], state["position"]
        if rank == 0:
            log.info("train: resuming from the checkpoint of step %d (epoch %d, batch %d)", step, epoch, position)
        torch.set_rng_state(state["torch_rng"][rank])
        if getattr(collate, "rng", None) is not None and state.get("collate_rng") is not None:
            collate.rng.bit_generator.state = state["collate_rng"][rank]
        if state.get("collate_stats") is not None:
            set_collate_stats(collate, state["collate_stats"][rank])
    # the collator's RNG state and counts after the last batch the model consumed (the prefetch thread
    # collates ahead)
    collate_state = collate.rng.bit_generator.state if getattr(collate, "rng", None) is not None else None
    consumed_stats = collate_stats(collate)

    # rank 0 logs each step's metrics through MLflow's asynchronous queue (a thread): a synchronous log_batch
    # is a round trip to the tracking store (5.8 ms against sqlite on this 2-core host, more to a remote
    # server) during which every worker's device waits for rank 0's next step; save() waits for the queue
    tracker, logging_ops = None, []
    if rank == 0 and config.get("tracking_uri") and config.get("run_id"):
        from mlflow.tracking import MlflowClient

        tracker = MlflowClient(config["tracking_uri"])
    peak = device_peak_flops(device, cfg.peak_tflops)
    if world > 1 and torch.distributed.is_initialized():
        # one peak for the whole run: ranks measuring CPU matmuls at the same moment slow each other, and a
        # rank that measured a low peak reported an MFU above 1
        peak_t = torch.tensor([peak], device=device, dtype=torch.float64)
        torch.distributed.all_reduce(peak_t, op=torch.distributed.ReduceOp.MAX)
        peak = float(peak_t)
    use_bf16 = device.type == "cuda"
    weights = core.loss_weights() if hasattr(core, "loss_weights") else {}
    shared_params = core.shared_parameters() if hasattr(core, "shared_parameters") else None

    def gather(obj):
        if world == 1 or not torch.distributed.is_initialized():
            return [obj]
        out = [None] * world
        torch.distributed.all_gather_object(out, obj)
        return out

    # where the group runs, said once per start (a restart after a lost node may land elsewhere)
    nodes = gather(ray.get_runtime_context().get_node_id())
    if rank == 0:
        log.info("train: %s", placement(world, "worker", nodes))
        if tracker is not None:
            tracker.set_tag(config["run_id"], "keplm.worker_nodes", json.dumps(nodes))

    val_files: list[str] = config.get("val_files") or []

    def validate() -> float:
        """Mean MLM loss on this rank's share of the held-out rows, averaged over ranks."""
        import copy

        lo, hi = worker_rows(val_files, world, rank)
        val_collate = copy.copy(collate)   # its own RNG: the training collator may be drawing in the prefetch thread
        if getattr(collate, "rng", None) is not None:
            val_collate.rng = np.random.default_rng([cfg.seed, 7919])   # fixed masks, not the training stream
        if isinstance(getattr(collate, "stats", None), dict):
            val_collate.stats = type(collate.stats)()                   # nor the training counts
        torch_state = torch.get_rng_state()
        core.eval()
        total_loss, batches = 0.0, 0
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            for batch in iter_row_batches(val_files, cfg.batch_size, lo, hi):
                out = core(**{k: v.to(device) for k, v in val_collate(batch.to_pylist()).items()})
                total_loss += float(out.mlm_loss if getattr(out, "mlm_loss", None) is not None else out.loss)
                batches += 1
        core.train()
        torch.set_rng_state(torch_state)
        vec = torch.tensor([total_loss, float(batches)], device=device)
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(vec)
        return float(vec[0] / vec[1]) if vec[1] > 0 else float("nan")

    def save(final: bool) -> None:
        metrics = dict(last)
        at_checkpoint: dict[str, float] = {}   # logged to MLflow at this step, beside the per-step metrics
        if val_files:
            at_checkpoint["val_mlm_loss"] = validate()
        # every rank's RNG states, so that each rank resumes its own masking/sampling/dropout stream
        torch_rngs = gather(torch.get_rng_state())
        collate_rngs = gather(collate_state)
        stats = gather(consumed_stats)
        # what the collators cut, dropped or padded in the batches trained on so far, all ranks summed
        # (counted, never silent): e.g. data.tokens_cut_by_length, data.mentions_truncated
        for rank_stats in stats:
            for k, v in (rank_stats or {}).items():
                at_checkpoint[f"data.{k}"] = at_checkpoint.get(f"data.{k}", 0) + v
        metrics.update(at_checkpoint)
        if tracker is not None:
            if at_checkpoint:
                from mlflow.entities import Metric

                ts = int(time.time() * 1000)
                logging_ops.append(tracker.log_batch(config["run_id"], synchronous=False, metrics=[
                    Metric(k, float(v), ts, step) for k, v in at_checkpoint.items()]))
            # every metric up to this step is stored before the checkpoint is: a failure to log surfaces
            # here (and fails the run), and a restart from this checkpoint loses none of them
            for op in logging_ops:
                op.wait()
            logging_ops.clear()
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                core.save_pretrained(Path(d) / "model", safe_serialization=True)
                torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                            "epoch": epoch, "position": position, "torch_rng": torch_rngs,
                            "collate_rng": collate_rngs, "collate_stats": stats, "world": world}, Path(d) / "state.pt")
                checkpoint = Path(d)
            metrics["final"] = final
            session.report(metrics, checkpoint)

    last: dict[str, float] = {"step": step, "rows_skipped_for_balance": skipped, "workers": world}
    start_step, pause_at = step, set(cfg.pause_at_steps)
    t_window, tokens_window, slots_window, samples_window = time.perf_counter(), 0, 0, 0
    t_start = time.perf_counter()
    done = step >= total
    while not done:
        micro = 0
        sums: dict[str, Any] = {}
        diagnostics: dict[str, float] = {}
        if collate_state is not None:  # where the consumed batches left it, whatever the last epoch's thread drew
            collate.rng.bit_generator.state = collate_state
        set_collate_stats(collate, consumed_stats)
        epoch_seed = shuffle_seed(cfg.seed, epoch, rank)
        if shard is not None:
            batches = shard_batches(shard, cfg.batch_size, cfg.shuffle_buffer_rows, epoch_seed)
        else:
            batches = iter_row_batches(epoch_files(files, epoch, cfg.seed), cfg.batch_size, *shares[rank])
        batches = length_grouped(batches, cfg.length_group_batches, [epoch_seed, 1])
        # resuming: the batches before `position` were consumed before the checkpoint
        pending = bounded_batches(batches, position, steps_per_epoch)
        feed = Prefetcher(pending, collate, cfg.prefetch_batches, pin=device.type == "cuda")
        try:   # the prefetch thread ends with the loop, also when a report raises (a trial Tune stopped)
            for i, cpu_tensors, rng_state, batch_stats in feed:
                tokens_window += int(cpu_tensors["attention_mask"].sum())   # on the host: no device sync
                slots_window += cpu_tensors["attention_mask"].numel()         # real tokens + padding: what is computed
                samples_window += cpu_tensors["input_ids"].shape[0]
                tensors = {k: v.to(device, non_blocking=True) for k, v in cpu_tensors.items()}
                sync = (micro + 1) % cfg.grad_accum == 0
                ctx_mgr = model.no_sync() if (not sync and hasattr(model, "no_sync")) else _null()
                with ctx_mgr, torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    out = model(**tensors)
                    if micro % cfg.grad_accum == 0 and shared_params and diagnostic_due(
                            step + 1, start_step, cfg.diagnostics_every, cfg.checkpoint_every):
                        diagnostics = term_gradient_norms(out, weights, shared_params)
                    (out.loss / cfg.grad_accum).backward()
                for k, v in out.items():  # summed on the device: one host sync per optimizer step, not per term
                    if k.endswith("loss") and v is not None and v.dim() == 0:
                        sums[k] = sums.get(k, 0.0) + v.detach().float() / cfg.grad_accum
                micro += 1
                position = i + 1
                collate_state, consumed_stats = rng_state, batch_stats
                if not sync:
                    continue
                grad_norm = torch.nn.utils.clip_grad_norm_(core.parameters(), cfg.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                # every worker's loss terms, averaged: what the step optimised
                last = mean_over_ranks(sums, loss_names(out), device)
                sums = {}
                elapsed = time.perf_counter() - t_window
                tok_s = tokens_window * world / max(elapsed, 1e-9)
                last.update(rows_skipped_for_balance=skipped, step=step, lr=sched.get_last_lr()[0],
                            grad_norm=float(grad_norm), tokens_per_s=tok_s,
                            samples_per_s=samples_window * world / max(elapsed, 1e-9),
                            mfu=tok_s / world * n_flops / peak, epoch=epoch,
                            padding_fraction=1 - tokens_window / max(slots_window, 1), workers=world)
                if diagnostics:
                    last.update({f"grad_norm/{k}": v for k, v in diagnostics.items()}, peak_tflops=peak / 1e12)
                    warning = imbalance_warning(diagnostics, cfg.diagnostics_max_ratio)
                    if warning and rank == 0:
                        log.warning("step %d: %s", step, warning)
                    diagnostics = {}
                if device.type == "cuda":
                    last["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
                else:
                    import resource

                    last["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                t_window, tokens_window, slots_window, samples_window = time.perf_counter(), 0, 0, 0
                if tracker is not None:
                    from mlflow.entities import Metric

                    ts = int(time.time() * 1000)
                    logging_ops.append(tracker.log_batch(config["run_id"], synchronous=False, metrics=[
                        Metric(k, float(v), ts, step) for k, v in last.items() if isinstance(v, (int, float)) and math.isfinite(v)]))
                if rank == 0 and (step % cfg.log_every == 0 or step == total):
                    eta = (time.perf_counter() - t_start) / max(step, 1) * (total - step)
                    log.info("train: step %d/%d, loss %.4f, %s tokens/s, ETA %s", step, total,
                             last.get("loss", float("nan")), f"{tok_s:,.0f}", eta_text(eta))
                if cfg.fault_at_step == step and rank == world - 1 and config.get("fault_marker"):
                    def before_exit():
                        session.wait_for_reports()   # the restart resumes from this step's checkpoint
                        log.warning("fault injection: worker rank %d exits after step %d", rank, step)

                    exit_once(config["fault_marker"], str(step), before_exit)   # the restarted group gets past it
                stop_early = ((cfg.stop_after_steps is not None and step >= cfg.stop_after_steps)
                              or (step in pause_at and step > start_step))
                if step >= total or stop_early:
                    done = True
                    save(final=step >= total)
                    break
                if step % cfg.checkpoint_every == 0:
                    save(final=False)
        finally:
            feed.close()
        if not done:
            epoch += 1
            position = 0


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def split_validation(files: list[str], val_rows: int, out_dir: str | Path) -> tuple[list[str], list[str]]:
    """Hold out the last ``val_rows`` rows (files in sorted order): -> (training files, validation files).

    The file the cut falls in is split into two new Parquet files under ``out_dir``; other files are used
    as they are. Rerunning gives the same split (same files, same names)."""
    import pyarrow.parquet as pq

    if val_rows <= 0:
        return list(files), []
    files = sorted(files)
    sizes = [pq.read_metadata(f).num_rows for f in files]
    if val_rows >= sum(sizes):
        raise ValueError(f"train.val_rows={val_rows} leaves no training rows ({sum(sizes)} in all)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keep, need, i = list(files), val_rows, len(files)
    val: list[str] = []
    while need > 0:
        i -= 1
        keep.pop()
        if sizes[i] <= need:
            val.insert(0, files[i])
            need -= sizes[i]
            continue
        table = pq.read_table(files[i])
        cut = sizes[i] - need
        pq.write_table(table.slice(0, cut), out / "train_part.parquet")
        pq.write_table(table.slice(cut), out / "val_part.parquet")
        keep.append(str(out / "train_part.parquet"))
        val.insert(0, str(out / "val_part.parquet"))
        need = 0
    return keep, val


def loop_config(cfg: TrainConfig, files: list[str], build: Callable, build_context: dict, out_dir: str | Path,
                tracking_uri: str | None, run_id: str | None, seq_len: int, val_files: list[str] | None) -> dict:
    """``train_loop_per_worker``'s config."""
    return {"train": cfg.model_dump(), "files": files, "build": build, "build_context": build_context,
            "tracking_uri": tracking_uri, "run_id": run_id, "seq_len": seq_len,
            "fault_marker": str(Path(out_dir).resolve() / "fault_injected"), "val_files": val_files or []}


def local_storage(cfg: TrainConfig) -> bool:
    """Whether the checkpoints go to a local path (unset, or a path), not a URI (s3://, gs://)."""
    return cfg.storage_path is None or "://" not in cfg.storage_path


def uses_gpu(cfg: TrainConfig) -> bool:
    """``train.use_gpu``, or when unset whether the connected Ray cluster has a GPU."""
    import ray

    return cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1


def trains_in_process(cfg: TrainConfig) -> bool:
    """Whether ``run_in_process`` can run this training: one worker, checkpoints on a local path."""
    return cfg.num_workers == 1 and local_storage(cfg)


def run_in_process(cfg: TrainConfig, files: list[str], build: Callable, build_context: dict, out_dir: str | Path,
                   tracking_uri: str | None, run_id: str | None, seq_len: int, val_files: list[str] | None = None,
                   on_report: Callable[[dict], None] | None = None, name: str = "train"):
    """The training ``run_training`` would run with one worker, run in this process (a ``LocalSession``):
    the same loop, data, checkpoint content and metrics, without a Ray Train controller or worker process.
    Resumes from the newest checkpoint under ``cfg.storage_path`` (default ``out_dir/in_process``) ``/name``, as
    ``run_training`` does from its run of that name, and returns a ``LocalResult`` (last report's metrics and
    checkpoint). ``on_report(metrics)`` follows each report."""
    from keplm.platform.train_session import LocalSession

    if not trains_in_process(cfg):
        raise ValueError("run_in_process trains one worker with checkpoints on a local path")
    storage = (Path(cfg.storage_path or Path(out_dir) / "in_process") / name).resolve()
    dataset = shard_dataset(files, cfg.seed, cfg.read_cpus, cfg.read_concurrency) if cfg.reader == "ray_data" else None
    session = LocalSession(storage, cfg.keep_checkpoints, cfg.use_gpu, on_report, dataset)
    import torch

    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        train_loop_per_worker(loop_config(cfg, files, build, build_context, out_dir, tracking_uri, run_id, seq_len,
                                          val_files), session)
    finally:
        # what the loop set for itself goes with it: this process goes on (a trial's evaluation, the job's export)
        torch.use_deterministic_algorithms(deterministic)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return session.result()


def run_training(cfg: TrainConfig, files: list[str], build: Callable, build_context: dict, out_dir: str | Path,
                 tracking_uri: str | None, run_id: str | None, seq_len: int, val_files: list[str] | None = None,
                 callbacks: list | None = None, name: str = "pretrain", bound_resource_wait: bool = False):
    """Start (or resume) the TorchTrainer; returns Ray Train's Result. ``callbacks``: Ray Train user
    callbacks (a Tune trial passes ``TuneReportCallback`` so every report reaches Tune).

    ``bound_resource_wait`` (``keplm pretrain``): a worker group waits at most ``cfg.resources_timeout_s`` for its
    resources, with one line naming a lost node and what it waits for, then the run fails with a
    ``ClusterResourcesError`` (``keplm.platform.train_resources``). Without it (a sweep's trials, which wait for
    each other's workers) Ray Train retries the placement every 60 s for as long as it takes."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = uses_gpu(cfg)
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if use_gpu else {})}
    storage = cfg.storage_path or str(Path(out_dir).resolve() / "ray_train")
    notice = []
    if bound_resource_wait:
        from keplm.platform.train_resources import ResourceWaitNotice

        notice = [ResourceWaitNotice(cfg.resources_timeout_s)]
    data = ({"datasets": {"train": shard_dataset(files, cfg.seed, cfg.read_cpus, cfg.read_concurrency)},
             "dataset_config": ingest_data_config()} if cfg.reader == "ray_data" else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(cfg, files, build, build_context, out_dir, tracking_uri, run_id, seq_len, val_files),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=cfg.placement_strategy),
        run_config=RunConfig(name=name, storage_path=storage, callbacks=[*(callbacks or []), *notice] or None,
                             # bounded: one start attempt of at most resources_timeout_s, then the run fails
                             failure_config=FailureConfig(max_failures=cfg.max_failures,
                                                          controller_failure_limit=0 if bound_resource_wait else -1),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
        **data,
    )
    if without_state_api():
        drop_placement_group_cleaner(trainer)
    if not bound_resource_wait:
        return trainer.fit()
    from keplm.platform.train_resources import bounded_start_wait, dead_node_ids, explain_start_failure

    dead_before = dead_node_ids()
    try:
        with bounded_start_wait(cfg.resources_timeout_s):
            return trainer.fit()
    except Exception as exc:  # noqa: BLE001 - only a worker group that could not start is explained
        explained = explain_start_failure(exc, cfg.num_workers, resources, cfg.resources_timeout_s, dead_before)
        if explained is None:
            raise
        raise explained from None


def drop_placement_group_cleaner(trainer) -> None:
    """Leave Ray Train's placement-group cleaner out of ``trainer``'s run. The cleaner (a detached actor) removes
    the run's placement group once the State API says the train controller is gone; on a Ray without a State API
    of its own (``ray_session.without_state_api``) it could only ask another Ray's, and a local Ray's placement
    groups go with the Ray anyway. Wraps Ray's private ``_create_default_callbacks`` (Ray Train V2)."""
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    defaults = trainer._create_default_callbacks
    trainer._create_default_callbacks = lambda: [c for c in defaults()
                                                 if not isinstance(c, PlacementGroupCleanerCallback)]
