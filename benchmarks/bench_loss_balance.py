"""Do the knowledge losses help MLM or drown it? The demo SMedBERT trained 300 steps from one seed on the same
batches, once per variant, in one process (no Ray Train):

- ``full``: SMedBERT as configured (MMeM mean-reduced over the masked mentions: the defaults);
- ``mmem_printed_sum``: MMeM as eq. 21 prints it (``model.mmem_reduction=sum``, every mention);
- ``no_mmem``: λ2 = 0; ``no_knowledge_loss``: ``model.use_knowledge_loss=false`` (hybrid attention kept);
- ``mlm_sop``: MLM + SOP alone (no knowledge loss, no hybrid attention): the baseline.

For each, over ``--seeds`` seeds (init, masks and row order; the variants interleaved): the MLM loss on held-out
rows (the corpus's first ``--held-out``, the same masks for all) after training — a last-10-steps training mean
moved by up to 0.3 nats between settings that should not differ — and at step 1 each weighted term's gradient
norm on the shared encoder relative to MLM's (keplm.platform.loss_balance). AdamW at the demo's lr (1e-3),
clipping 1.0, the demo's batch (8 x 128). The issue's target: ``full`` within 0.05 nats of ``mlm_sop``, or below
it. Prints one JSON line.

    python benchmarks/bench_loss_balance.py [--steps 300] [--config configs/demo.yaml] [--stages DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "full": {},
    "mmem_printed_sum": {"mmem_reduction": "sum", "mmem_mentions": "all"},
    "no_mmem": {"lambda_mmem": 0.0},
    "no_knowledge_loss": {"use_knowledge_loss": False},
    "mlm_sop": {"use_knowledge_loss": False, "use_hybrid_attention": False},
}


def stages(cfg, out: Path) -> dict:
    import ray

    from keplm.models.pipeline import ensure_stages

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 2**20)
    try:
        return ensure_stages(cfg, out)
    finally:
        ray.shutdown()


def train(cfg, st: dict, overrides: dict, steps: int, rows: list[dict], seed: int, held_out: int) -> dict:
    """``steps`` AdamW steps on the rows after the first ``held_out``; MLM on those held-out rows at the end."""
    from keplm.models.setup import build_pretraining_setup
    from keplm.platform.loss_balance import term_gradient_norms

    torch.manual_seed(seed)
    batches_cfg = cfg.batches.model_copy(update={"seed": seed})
    setup = build_pretraining_setup(cfg.model.model_copy(update=overrides), batches_cfg, st["prepare"],
                                    st["neighbours"], st["embed"])
    model, collate = setup.model, setup.collator
    bs = cfg.train.batch_size
    test_rows, train_rows = rows[:held_out], rows[held_out:]
    order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = [collate([train_rows[order[(i * bs + j) % len(order)]] for j in range(bs)]) for i in range(steps)]
    collate.rng = __import__("numpy").random.default_rng(12345)   # the same held-out masks for every variant
    test_batches = [collate(test_rows[i:i + bs]) for i in range(0, len(test_rows), bs)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr, weight_decay=0.01)
    model.train()
    norms, t0 = {}, time.perf_counter()
    for i, batch in enumerate(batches):
        out = model(**batch)
        if i == 0:
            norms = term_gradient_norms(out, model.loss_weights(), model.shared_parameters())
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    with torch.no_grad():
        held = statistics.mean(float(model(**b).mlm_loss) for b in test_batches)
    return {"held_out_mlm": held, "encoder_grad_at_init": norms, "seconds": time.perf_counter() - t0}


def summarise(runs: list[dict]) -> dict:
    vals = [r["held_out_mlm"] for r in runs]
    grads = {k: statistics.median(r["encoder_grad_at_init"][k] for r in runs) for k in runs[0]["encoder_grad_at_init"]}
    return {"held_out_mlm": round(statistics.mean(vals), 4),
            "held_out_mlm_std": round(statistics.stdev(vals), 4) if len(vals) > 1 else None,
            "held_out_mlm_runs": [round(v, 4) for v in vals],
            "encoder_grad_at_init_ratio_to_mlm": {k: round(v / grads["mlm_loss"], 2) for k, v in grads.items()},
            "seconds": round(sum(r["seconds"] for r in runs), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--stages", help="reuse this directory for the demo's stages (built when absent)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", type=int, default=3, help="runs per variant (seeds 0..n-1: init, masks, order)")
    ap.add_argument("--held-out", type=int, default=256, help="rows kept out of training, scored at the end")
    args = ap.parse_args()

    from keplm import config as keplm_config
    from keplm.models.data import read_shards

    cfg = keplm_config.load(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        st = stages(cfg, Path(args.stages or tmp))
        rows = read_shards(st["prepare"])
        result = {"bench": "loss_balance", "steps": args.steps, "batch": cfg.train.batch_size, "lr": cfg.train.lr,
                  "model": f"{cfg.model.num_hidden_layers}x{cfg.model.hidden_size}", "seeds": args.seeds,
                  "held_out_rows": args.held_out}
        names = args.variants.split(",")
        runs: dict[str, list] = {n: [] for n in names}
        for seed in range(args.seeds):          # interleaved: a drifting host slows every variant alike
            for name in names:
                runs[name].append(train(cfg, st, VARIANTS[name], args.steps, rows, seed, args.held_out))
        for name in names:
            result[name] = summarise(runs[name])
    base = result.get("mlm_sop", {}).get("held_out_mlm")
    if base is not None and "full" in result:
        result["full_minus_mlm_sop"] = round(result["full"]["held_out_mlm"] - base, 4)
        result["target_within_nats"] = 0.05
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
