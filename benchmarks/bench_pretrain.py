"""Pretraining throughput: tokens/s and MFU of `keplm pretrain` with 1 vs 2 Ray Train workers on CPU
(target >= 1.7x), and, when a GPU is present, BERT-base MLM at seq 512 in bf16 (targets >= 45 % MFU and
>= 450 K tokens/s on an H100) and the SMedBERT / plain-BERT tokens/s ratio (target >= 0.83).
Prints one JSON line.

CPU part: the real job (`python -m keplm.jobs.pretrain`, the demo corpus prepared once, `model.kind=mlm`,
hidden 256 x 4 layers, seq 128, batch 16 per worker), each worker one thread (`cpus_per_worker` 0.9, so
Ray gives it OMP_NUM_THREADS=1). tokens/s is the median of the per-step `tokens_per_s` that rank 0 logs to
MLflow (all workers' tokens), leaving out the first 3 steps (start-up); MFU as the job logs it
(model FLOPs/token = 6·N + 12·L·T·d, over each worker's measured fp32 matmul rate). Its baseline in the same
run, ``plain_ddp_speedup``: the same training step in one process vs two under plain torch DDP (no Ray, data
pipeline or tracking), the ceiling of the job's 1 -> 2 figure on this host; ``cpu_speedup_of_plain_ddp`` is the
job's share of it.

GPU part: one process, no Ray (what one worker does): forward + backward + fused AdamW step of keplm's
plain MLM model and of SMedBERT at BERT-base shape, seq 512, bf16 autocast, on synthetic batches shaped as
the collator makes them (bench_models.batch), eager and with the encoder layers compiled
(``train.compile``); MFU against the GPU's bf16 dense peak (989 TFLOP/s on an H100).

With ``--variants`` it also reports what bounds plain MLM (``bound_variants``): the host's share, each SDPA
backend, dropout, and compile modes, one change at a time.

``--gpu-kinds`` / ``--gpu-modes`` pick the GPU part's models and modes (benchmarks/gpu_check.sh times the compiled
plain MLM alone); ``--dry-run`` runs the GPU part on CPU at the tiny shape, to check that it runs.

With ``--real PREPARED`` it also runs the job on real shards (a `keplm prepare` output) with random and with
length-grouped batches, interleaved: real tokens/s and the padding share of each (``real_corpus_padding``).

    python benchmarks/bench_pretrain.py [--steps 20] [--real PREPARED [--real-rounds 2]] [--gpu-batch 64] [--skip-cpu] [--reader pyarrow]
                                        [--variants [--autotune] [--skip-gpu-figures]]
                                        [--gpu-kinds mlm,smedbert] [--gpu-modes eager,compiled] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_SHAPE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
CPU_BATCH, CPU_SEQ, DEMO_VOCAB = 16, 128, 3000   # rows per worker, tokens per row; configs/demo.yaml's vocab_size
REAL_BATCH = 16                                  # rows per step of the real-corpus runs (seq 512)
# the real runs shuffle the whole corpus (37,857 segments): the first files hold long documents cut into full
# 512-token segments, so a few steps from the default 4,096-row buffer would see almost no padding at all
REAL_SHUFFLE_ROWS = 50_000
MODEL = ["model.kind=mlm", *(f"model.{k}={v}" for k, v in CPU_SHAPE.items()), f"batches.max_seq_len={CPU_SEQ}",
         f"train.batch_size={CPU_BATCH}", "train.warmup_ratio=0.0", "train.checkpoint_every=1000", "train.log_every=5",
         "train.cpus_per_worker=0.9"]


def run_job(out: Path, *overrides: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "keplm.jobs.pretrain", "--config", str(ROOT / "configs" / "demo.yaml"),
                        "--output", str(out), *overrides], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def cpu_scaling(steps: int, reader: str) -> dict:
    from mlflow.tracking import MlflowClient

    out: dict = {"cpu_reader": reader}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # prepare once; both runs read the same shards
        run_job(tmp / "base", "model.kind=mlm", "train.max_steps=1", "train.num_workers=1", "train.batch_size=2")
        for workers in (1, 2):
            res = run_job(tmp / f"w{workers}", f"--prepared={tmp / 'base' / 'prepare'}", *MODEL,
                          f"train.reader={reader}", f"train.num_workers={workers}", f"train.max_steps={steps}")
            client = MlflowClient(f"sqlite:///{tmp / f'w{workers}' / 'mlflow.db'}")
            hist = {k: [m.value for m in sorted(client.get_metric_history(res["mlflow_run_id"], k), key=lambda m: m.step)]
                    for k in ("tokens_per_s", "mfu")}
            out[f"cpu_tokens_per_s_{workers}_worker"] = round(statistics.median(hist["tokens_per_s"][3:]), 1)
            out[f"cpu_mfu_{workers}_worker"] = round(statistics.median(hist["mfu"][3:]), 4)
    out["cpu_speedup_1_to_2"] = round(out["cpu_tokens_per_s_2_worker"] / out["cpu_tokens_per_s_1_worker"], 3)
    out["target_cpu_speedup"] = 1.7
    return out


def real_corpus_padding(prepared: str, steps: int, rounds: int) -> dict:
    """Real tokens/s of `keplm pretrain` on real shards with random batches (``train.length_group_batches=1``,
    the baseline) and length-grouped ones (the default, 64), ``rounds`` interleaved runs of each: plain MLM at
    the CPU shape with seq 512 (the paper's), 1 worker of 1 thread, ``REAL_BATCH`` rows, shuffled over the whole
    corpus (``REAL_SHUFFLE_ROWS``). tokens/s counts
    real tokens only (the job's ``tokens_per_s``: attention-mask sums); ``padding_fraction`` is the share of
    computed token slots that were padding, as the job logs it per step. Medians over each run's steps after
    the first 3, then over the rounds, with the rounds' range."""
    from mlflow.tracking import MlflowClient

    grouping = {"random": 1, "grouped": 64}
    runs: dict[str, list[dict]] = {k: [] for k in grouping}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name, group in grouping.items():
                out = Path(tmp) / f"{name}{r}"
                res = run_job(out, f"--prepared={prepared}", *MODEL, "batches.max_seq_len=512", "model.max_position_embeddings=512",
                              "train.num_workers=1",
                              f"train.batch_size={REAL_BATCH}", f"train.max_steps={steps}", "train.log_every=100",
                              f"train.length_group_batches={group}", f"train.shuffle_buffer_rows={REAL_SHUFFLE_ROWS}")
                client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
                hist = {k: [m.value for m in sorted(client.get_metric_history(res["mlflow_run_id"], k), key=lambda m: m.step)]
                        for k in ("tokens_per_s", "padding_fraction")}
                runs[name].append({k: statistics.median(v[3:]) for k, v in hist.items()})
    out: dict = {"real_prepared": str(prepared), "real_batch": REAL_BATCH, "real_seq": 512, "real_rounds": rounds}
    for name in grouping:
        tok = [run["tokens_per_s"] for run in runs[name]]
        out[f"real_{name}_tokens_per_s"] = round(statistics.median(tok), 1)
        out[f"real_{name}_tokens_per_s_range"] = [round(min(tok), 1), round(max(tok), 1)]
        out[f"real_{name}_padding_fraction"] = round(statistics.median(run["padding_fraction"] for run in runs[name]), 4)
    ratios = [g["tokens_per_s"] / b["tokens_per_s"] for b, g in zip(runs["random"], runs["grouped"])]
    out.update(real_grouped_speedup=round(statistics.median(ratios), 3),
               real_grouped_speedup_range=[round(min(ratios), 3), round(max(ratios), 3)],
               target_real_speedup=1.3, target_padding_fraction=0.05)
    return out


def _ddp_worker(rank: int, world: int, port: int, barrier, out, steps: int) -> None:
    import torch
    import torch.distributed as dist

    from keplm.models import KeplmBertConfig, KeplmBertForPreTraining

    torch.set_num_threads(1)   # as Ray gives a worker with cpus_per_worker 0.9
    torch.manual_seed(0)
    model = KeplmBertForPreTraining(KeplmBertConfig(vocab_size=DEMO_VOCAB, **CPU_SHAPE))
    if world > 1:   # Ray's prepare_model wraps in DDP only from 2 workers on, with the job's find_unused_parameters
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(5, DEMO_VOCAB, (CPU_BATCH, CPU_SEQ), generator=g)
    labels = torch.where(torch.rand(CPU_BATCH, CPU_SEQ, generator=g) < 0.15, ids, -100)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
                 sop_label=torch.randint(0, 2, (CPU_BATCH,), generator=g))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    if world > 1:
        dist.destroy_process_group()
    out.put(statistics.median(times[3:]))


def plain_ddp_speedup(steps: int, rounds: int = 3) -> float:
    """The same step as the CPU runs (the plain MLM model at their shape, 16 x 128 per worker, one thread per
    worker, AdamW, clipping) in one process, then in two under torch DDP over gloo — no Ray, no data pipeline,
    no tracking: the 1 -> 2 ceiling of the job's training step on this host. Median over ``rounds``
    (interleaved) of 2 * t(one) / t(two), each t the median step time after 3 warm-up steps."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from host_scaling import one_vs_two_processes

    return round(one_vs_two_processes(_ddp_worker, (steps,), rounds), 3)


def gpu_figures(steps: int, batch_size: int, kinds=("mlm", "smedbert"), modes=("eager", "compiled"),
                device=None, shape_name: str = "base", seq: int = 512) -> dict:
    """tokens/s, MFU and peak memory of each of ``kinds`` (mlm, smedbert) in each of ``modes`` (eager; compiled:
    the encoder layers compiled as ``train.compile`` does). On a GPU in bf16; ``device`` cpu (a dry run) in fp32."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_models import SHAPES, batch, models, step_time

    from keplm.platform.train_loop import compile_blocks, device_peak_flops, flops_per_token

    dev = device or torch.device("cuda")
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    peak = device_peak_flops(dev, None)
    out = {"gpu": torch.cuda.get_device_name(dev) if cuda else "cpu (dry run)", "gpu_seq": seq, "gpu_batch": batch_size,
           "gpu_shape": shape_name, "gpu_dtype": str(dtype).split(".")[-1], "gpu_peak_tflops": peak / 1e12}
    data = batch(batch_size, seq, k=10, n=10, device=dev)
    makers = models(SHAPES[shape_name], seq)
    # eager, then with train.compile=true (each encoder layer torch.compile'd, as the train loop does)
    for tag in modes:
        compiled = tag == "compiled"
        for kind in kinds:
            torch.manual_seed(0)
            model = makers["bert_mlm" if kind == "mlm" else kind]().to(dev).train()
            if compiled:
                compile_blocks(model)
            tok_s = batch_size * seq / step_time(model, data, steps, 5 if compiled else 3, dtype)
            out[f"gpu_{tag}_{kind}_tokens_per_s"] = round(tok_s)
            out[f"gpu_{tag}_{kind}_mfu"] = round(tok_s * flops_per_token(model, seq) / peak, 4)
            if cuda:
                out[f"gpu_{tag}_{kind}_peak_memory_gb"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
            del model
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
        if "mlm" in kinds and "smedbert" in kinds:
            out[f"gpu_{tag}_smedbert_vs_plain"] = round(out[f"gpu_{tag}_smedbert_tokens_per_s"]
                                                        / out[f"gpu_{tag}_mlm_tokens_per_s"], 3)
    if "mlm" in kinds:
        best = max(modes, key=lambda t: out[f"gpu_{t}_mlm_tokens_per_s"])
        out.update(gpu_best=best, gpu_mlm_tokens_per_s=out[f"gpu_{best}_mlm_tokens_per_s"],
                   gpu_mlm_mfu=out[f"gpu_{best}_mlm_mfu"])
        if "smedbert" in kinds:
            out["gpu_smedbert_vs_plain"] = out[f"gpu_{best}_smedbert_vs_plain"]
    out.update(target_gpu_mfu=0.45, target_gpu_tokens_per_s_h100=450_000, target_smedbert_vs_plain=0.83)
    return out


def queued_step_time(model, data, steps: int, warmup: int, dtype) -> float:
    """Mean forward + backward + AdamW step with the steps queued back to back and one device sync at the end,
    as a training loop that never waits on the device runs; step_time syncs every step, so its figure also
    holds the time the device waits for the host to launch the next step's first kernels."""
    import torch

    cuda = next(model.parameters()).device.type == "cuda"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=cuda)

    def one():
        with torch.autocast("cuda" if cuda else "cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**data).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        one()
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        one()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def bound_variants(steps: int, batch_size: int, seq: int, shape_name: str, device, autotune: bool) -> dict:
    """What bounds plain MLM's tokens/s, one change at a time against the eager step as bench_models times it
    (synchronised every step): the steps queued back to back (the host's share), also without the model's own
    sync on its MLM targets, each SDPA backend forced (flash, cuDNN, memory-efficient; 'unavailable' where the
    device has none), dropout off (p = 0 in every nn.Dropout, SDPA's included), the encoder layers compiled as
    ``train.compile`` does, and, with ``autotune``, compiled with ``mode="max-autotune-no-cudagraphs"`` (Inductor's
    GEMM templates with fused epilogues; minutes of autotuning). Each figure is tokens/s and MFU."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_models import SHAPES, batch, models, step_time

    from keplm.platform.train_loop import compile_blocks, device_peak_flops, flops_per_token

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    data = batch(batch_size, seq, k=10, n=10, device=device)
    make = models(SHAPES[shape_name], seq)["bert_mlm"]
    peak = device_peak_flops(device, None)
    warmup = 2
    out: dict = {"variants_shape": shape_name, "variants_batch": batch_size, "variants_seq": seq}

    def record(tag: str, seconds: float, model) -> None:
        tok_s = batch_size * seq / seconds
        out[f"variant_{tag}_tokens_per_s"] = round(tok_s)
        out[f"variant_{tag}_mfu"] = round(tok_s * flops_per_token(model, seq) / peak, 4)

    def fresh(compile_mode: str | None = None, dropout: bool = True):
        torch.manual_seed(0)
        model = make().to(device).train()
        if not dropout:
            for m in model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
        if compile_mode is not None:
            compile_blocks(model, None if compile_mode == "default" else compile_mode)
        return model

    model = fresh()
    record("eager_synced", step_time(model, data, steps, warmup, dtype), model)
    record("eager_queued", queued_step_time(model, data, steps, warmup, dtype), model)
    # the model's own host sync (the MLM targets' nonzero at the start of forward), replaced by the indices of
    # this fixed batch computed once: what a collator that hands over the targets' indices would save
    import keplm.models.baselines as baselines

    rows, real = baselines.labelled_rows(data["labels"]), baselines.labelled_rows
    baselines.labelled_rows = lambda labels: rows
    try:
        record("eager_queued_no_model_sync", queued_step_time(model, data, steps, warmup, dtype), model)
    finally:
        baselines.labelled_rows = real
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                record(f"eager_sdpa_{name}", queued_step_time(model, data, steps, warmup, dtype), model)
        except RuntimeError as e:   # "No available kernel": this device/dtype/shape has no such backend
            out[f"variant_eager_sdpa_{name}_tokens_per_s"] = f"unavailable: {str(e).splitlines()[0][:120]}"
    del model
    model = fresh(dropout=False)
    record("eager_no_dropout", queued_step_time(model, data, steps, warmup, dtype), model)
    modes = ["default"] + (["max-autotune-no-cudagraphs"] if autotune else [])
    for mode in modes:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model = fresh(compile_mode=mode)
        record(f"compiled_{mode.replace('-', '_')}_queued", queued_step_time(model, data, steps, warmup + 3, dtype),
               model)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--gpu-batch", type=int, default=64)
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--reader", choices=["ray_data", "pyarrow"], default="ray_data", help="train.reader of the CPU runs")
    ap.add_argument("--skip-gpu-figures", action="store_true", help="leave out the GPU part above (e.g. with --variants)")
    ap.add_argument("--variants", action="store_true",
                    help="also what bounds plain MLM's tokens/s (bound_variants): BERT-base, seq 512, --gpu-batch rows on "
                         "a GPU; on CPU (no GPU) the tiny shape, 8 x 128, which only checks the variants run")
    ap.add_argument("--autotune", action="store_true", help="with --variants: add compile mode max-autotune-no-cudagraphs")
    ap.add_argument("--gpu-kinds", default="mlm,smedbert", help="models of the GPU part, comma-separated: mlm, smedbert")
    ap.add_argument("--gpu-modes", default="eager,compiled", help="modes of the GPU part, comma-separated: eager, compiled")
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: the GPU part on CPU at the tiny shape, 8 x 128 rows in fp32, to check it runs "
                         "(benchmarks/gpu_check.sh --dry-run); its figures mean nothing")
    ap.add_argument("--real", metavar="PREPARED", help="also real tokens/s and padding on this keplm prepare output "
                    "(e.g. ../shared/data's corpus prepared with min_chars=256, max_seq_len=512), random vs "
                    "length-grouped batches")
    ap.add_argument("--real-rounds", type=int, default=2, help="interleaved runs of each with --real")
    args = ap.parse_args()
    import torch

    out: dict = {"bench": "pretrain"}
    if args.real:
        out.update(real_corpus_padding(args.real, args.steps, args.real_rounds))
    if not args.skip_cpu:
        out.update(cpu_scaling(args.steps, args.reader))
        out["cpu_plain_ddp_speedup_1_to_2"] = plain_ddp_speedup(args.steps)
        out["cpu_speedup_of_plain_ddp"] = round(out["cpu_speedup_1_to_2"] / out["cpu_plain_ddp_speedup_1_to_2"], 3)
    cuda = torch.cuda.is_available()
    kinds, modes = tuple(args.gpu_kinds.split(",")), tuple(args.gpu_modes.split(","))
    if args.dry_run and not args.skip_gpu_figures:
        out.update(gpu_figures(args.steps, 8, kinds, modes, torch.device("cpu"), "tiny", 128))
    elif cuda and not args.skip_gpu_figures:
        out.update(gpu_figures(args.steps, args.gpu_batch, kinds, modes))
    elif not cuda:
        out["gpu"] = None
    if args.variants:
        out.update(bound_variants(args.steps, args.gpu_batch, 512, "base", torch.device("cuda"), args.autotune) if cuda
                   else bound_variants(args.steps, 8, 128, "tiny", torch.device("cpu"), args.autotune))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
