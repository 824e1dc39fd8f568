"""Forward+backward step time of SMedBERT, KeBioLM, EMBERT (and SMedBERT + EMBERT's heads) and the baselines vs
plain BERT MLM, same config and batch.
Prints one JSON line.

Shapes: ``tiny`` (2 layers, hidden 128) and ``base`` (BERT-base: 12 layers, hidden 768, d2 = 200, K = 10)
on CPU in fp32; with a GPU also BERT-base at batch 64 x seq 512 in bf16 with the encoder layers compiled
(``train.compile``), as the ``*-base`` configs train. Batches are synthetic but shaped as the
collator makes them: mentions covering ~30 % of tokens, K neighbours each, 10 negatives per neighbour; for
EMBERT 30 % of the mentions replaced (CECP), segmentation labels on every mention token, one 2-token term
masked in half of them (BEM); KeBioLM with l0 = 2/3 of the layers, top-k 100, 4,096 sampled EL negatives.
Interleaved repeats: every model is built once and kept (with its AdamW state), then each round times one
step of every model in turn (bert_mlm, smedbert, ..., A B C A B C ...), after ``--warmup`` untimed rounds;
the figure per model is the median over ``--repeats`` rounds of the round's ratio to bert_mlm, with the
ratios' min-max (``_spread``) and quartiles (``_iqr``). A machine that slows down for a while (other jobs
on a shared box) slows every model of those rounds alike, where the separate per-model runs of before
could put a busy minute on one model only. ``wem`` (tiny shape and GPU) is bert_mlm's own network: its
ratio is the noise floor.
``smedbert_diagnostic_step``: a step that also takes each loss term's encoder gradient norm
(train.diagnostics_every; the steps between run the plain ``smedbert`` step).

Defaults (CPU): base 4 x 128 as before, 7 repeats after 1 warm-up round, 1 step per model per round (3 at the
tiny shape, whose steps are short); at base only bert_mlm, smedbert (+ its diagnostic step), kebiolm, embert
and smedbert_embert, which all live at once (~1.4 GB each with AdamW's state; ``--models`` picks others).
A base round takes ~20 s on the 2-core dev box when it is quiet, so the base run ~3 minutes.

Each run records the torch threads, the clock and the 1-minute load average before and after it. On a shared
box the wall clock of a 2-thread step is at the mercy of the neighbours: every parallel region waits for
its slower thread, and a core lent to another process stalls it, so a busy minute can make a step several
times slower and weighs most on the models with the most operators. ``--threads 1 --clock cpu`` times the
work itself (the process's CPU time on one thread) and holds still under load.

    python benchmarks/bench_models.py [--repeats 7] [--warmup 1] [--steps N] [--base-batch 4] [--base-seq 128]
                                      [--shapes tiny,base] [--models smedbert,kebiolm,...] [--threads N]
                                      [--clock wall|cpu] [--skip-cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from keplm.models import (KeBioLMConfig, KeBioLMForPreTraining, KeplmBertConfig, KeplmBertForPreTraining,
                          SMedBertConfig, SMedBertForPreTraining)

SHAPES = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512, kg_dim=64, hybrid=2),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, kg_dim=200, hybrid=10),
}
VOCAB, Z, R, TYPES = 21128, 25000, 9, 8
EMBERT = ["cecp", "est", "bem"]
# at base on CPU, the models the knowledge-ratio target is about (each BERT-base with its AdamW state is ~1.4 GB)
BASE_CPU_MODELS = ["bert_mlm", "smedbert", "kebiolm", "embert", "smedbert_embert"]


def batch(b: int, t: int, k: int, n: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, VOCAB, (b, t), generator=g)
    labels = torch.full((b, t), -100)
    pick = torch.rand(b, t, generator=g) < 0.15
    labels[pick] = ids[pick]
    m = max(1, t // 12)  # mentions of 3-4 tokens every 12 tokens: ~30 % of tokens
    starts = torch.arange(m) * 12 + 1
    spans = torch.stack([starts, starts + 3 + (torch.arange(m) % 2)], -1).expand(b, m, 2).clone()
    nb = torch.randint(0, Z, (b, m, k), generator=g)
    out = dict(
        input_ids=ids, attention_mask=torch.ones(b, t, dtype=torch.long), token_type_ids=torch.zeros(b, t, dtype=torch.long),
        labels=labels, sop_label=torch.randint(0, 2, (b,), generator=g), mention_spans=spans,
        mention_mask=torch.ones(b, m, dtype=torch.bool), neighbour_ids=nb, neighbour_relation=torch.randint(0, 2 * R, (b, m, k), generator=g),
        neighbour_type=torch.randint(0, TYPES, (b, m, k), generator=g), neighbour_mask=torch.ones(b, m, k, dtype=torch.bool),
        negative_ids=torch.randint(0, Z, (b, m, k, n), generator=g), log_q_pos=-torch.rand(b, m, k, generator=g) * 5,
        log_q_neg=-torch.rand(b, m, k, n, generator=g) * 5,
    )
    te = torch.full((b, t), -1)
    for j in range(m):
        s, e = spans[0, j].tolist()
        te[:, s:e] = nb[:, j, 0:1]
    out["token_entity"] = te
    out["mention_entity"] = nb[:, :, 0]
    # EMBERT targets, shaped as KnowledgeCollator + EntityTasks make them
    seg = torch.full((b, t), -100)
    cecp = [j for j in range(m) if j % 10 < 3]
    bem = [j for j in range(m) if j % 10 >= 3 and j % 2 == 0]
    for j in range(m):
        s, e = spans[0, j].tolist()
        seg[:, s:e] = 0
        seg[:, s + 1] = seg[:, e - 1] = 1
    out["seg_labels"] = seg
    out["cecp_spans"] = spans[:, cecp].clone()
    out["cecp_labels"] = torch.randint(0, 2, (b, len(cecp)), generator=g)
    pos = torch.tensor([spans[0, j, 1].item() - d for j in bem for d in (2, 1)])
    anchor = torch.tensor([[spans[0, j, 0].item(), spans[0, j, 0].item() + 1] for j in bem for _ in (2, 1)])
    out["bem_positions"] = pos.expand(b, -1).clone()
    out["bem_anchor"] = anchor.expand(b, -1, 2).clone()
    out["bem_relative"] = torch.tensor([0, 1] * len(bem)).expand(b, -1).clone()
    out["bem_labels"] = ids[:, pos]
    return {k: v.to(device) for k, v in out.items()}


def models(shape: dict, seq: int):
    common = dict(vocab_size=VOCAB, hidden_size=shape["hidden_size"], num_hidden_layers=shape["num_hidden_layers"],
                  num_attention_heads=shape["num_attention_heads"], intermediate_size=shape["intermediate_size"],
                  max_position_embeddings=max(512, seq))
    kg = dict(num_entities=Z, num_relations=R, num_entity_types=TYPES, kg_dim=shape["kg_dim"], hybrid_layer=shape["hybrid"])
    return {
        "bert_mlm": lambda: KeplmBertForPreTraining(KeplmBertConfig(**common)),
        "wem": lambda: KeplmBertForPreTraining(KeplmBertConfig(**common)),  # same network; masking differs
        "ernie": lambda: KeplmBertForPreTraining(KeplmBertConfig(**common, entity_fusion=True, fusion_layer=shape["hybrid"],
                                                                 num_entities=Z, entity_dim=100)),
        "smedbert": lambda: SMedBertForPreTraining(SMedBertConfig(**common, **kg)),
        "smedbert_no_hybrid": lambda: SMedBertForPreTraining(SMedBertConfig(**common, **kg, use_hybrid_attention=False)),
        "kebiolm": lambda: KeBioLMForPreTraining(KeBioLMConfig(
            **common, num_entities=Z, entity_dim=100, text_layers=max(1, 2 * shape["num_hidden_layers"] // 3),
            entity_top_k=100, el_negatives=4096)),
        "embert": lambda: KeplmBertForPreTraining(KeplmBertConfig(**common, entity_objectives=EMBERT)),
        "smedbert_embert": lambda: SMedBertForPreTraining(SMedBertConfig(**common, **kg, entity_objectives=EMBERT)),
    }


def step_time(model, data, steps: int, warmup: int, dtype, diagnose: bool = False, opt=None, clock: str = "wall") -> float:
    """Median forward + backward + AdamW step, the optimizer as the train loop makes it (fused on GPU);
    ``diagnose``: every step is a loss-balance diagnostic step (each term's encoder gradient norm first);
    ``opt``: an optimizer made by :func:`optimizer` (a fresh one otherwise); ``clock``: ``wall`` or ``cpu``
    (the process's CPU time, all threads)."""
    from keplm.platform.loss_balance import term_gradient_norms

    opt = opt or optimizer(model)
    now = time.perf_counter if clock == "wall" else time.process_time
    times = []
    dev = next(model.parameters()).device
    for i in range(warmup + steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = now()
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(**data)
            if diagnose:
                term_gradient_norms(out, model.loss_weights(), model.shared_parameters())
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(now() - t)
    return statistics.median(times)


def optimizer(model) -> torch.optim.Optimizer:
    cuda = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=cuda)


def quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def run(shape_name: str, b: int, t: int, device, dtype, repeats: int, warmup: int, compiled: bool = False,
        steps: int = 1, names: list[str] | None = None, clock: str = "wall") -> dict:
    """Every model built once and kept; then ``warmup`` rounds and ``repeats`` timed rounds, each round one
    ``steps``-step median of every model in turn (bert_mlm first), so that whatever else the machine does
    in a round weighs on every model alike. ``{m}_vs_bert_mlm``: the median over the rounds of the round's
    ratio to bert_mlm; ``_spread``: its min and max, ``_iqr``: its quartiles; ``{m}_ms``: the median time."""
    from keplm.platform.train_loop import compile_blocks

    shape = SHAPES[shape_name]
    data = batch(b, t, k=10, n=10, device=device)
    makers = models(shape, t)
    names = ["bert_mlm"] + [n for n in (names or makers) if n != "bert_mlm"]
    built, entries = {}, []
    for name in names:
        torch.manual_seed(0)
        model = makers[name]().to(device).train()
        if compiled:
            compile_blocks(model)
        built[name] = (model, optimizer(model))
        entries.append((name, name, False))
        if name == "smedbert":   # the training loop's diagnostic steps (the first and each checkpoint's)
            entries.append(("smedbert_diagnostic_step", name, True))
    times: dict[str, list[float]] = {key: [] for key, _, _ in entries}
    for r in range(warmup + repeats):
        for key, name, diagnose in entries:
            model, opt = built[name]
            seconds = step_time(model, data, steps, 0, dtype, diagnose=diagnose, opt=opt, clock=clock)
            if r >= warmup:
                times[key].append(seconds)
    built.clear()
    ratios = {k: [x / y for x, y in zip(v, times["bert_mlm"])] for k, v in times.items() if k != "bert_mlm"}
    out = {"shape": shape_name, "batch": b, "seq": t, "device": device.type, "dtype": str(dtype).split(".")[-1],
           "compiled": compiled, "repeats": repeats, "steps_per_repeat": steps,
           **{f"{k}_ms": round(statistics.median(v) * 1e3, 1) for k, v in times.items()}}
    for k, v in ratios.items():
        lo, hi = quartiles(v)
        out[f"{k}_vs_bert_mlm"] = round(statistics.median(v), 3)
        out[f"{k}_vs_bert_mlm_spread"] = [round(min(v), 3), round(max(v), 3)]
        out[f"{k}_vs_bert_mlm_iqr"] = [round(lo, 3), round(hi, 3)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds (every model once per round)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--steps", type=int, default=None,
                    help="steps per model per round, their median the round's (default: 3 at the tiny shape, 1 at base)")
    ap.add_argument("--base-batch", type=int, default=4)
    ap.add_argument("--base-seq", type=int, default=128)
    ap.add_argument("--models", default=None, help="comma-separated subset (bert_mlm is always in); default: all at "
                                                    f"the tiny shape, {','.join(BASE_CPU_MODELS)} at base on CPU")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's, one per core)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time; cpu: the process's CPU time (with --threads 1: the work done, whatever "
                         "else the machine runs)")
    ap.add_argument("--shapes", default="tiny,base", help="CPU shapes to run")
    ap.add_argument("--skip-cpu", action="store_true", help="GPU row only")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cpu = torch.device("cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = {"tiny": (8, 128), "base": (args.base_batch, args.base_seq)}
    results = []
    for shape in [] if args.skip_cpu else args.shapes.split(","):
        names = args.models.split(",") if args.models else None if shape == "tiny" else BASE_CPU_MODELS
        load = os.getloadavg()[0]
        steps = args.steps or (3 if shape == "tiny" else 1)
        results.append(run(shape, *sizes[shape], cpu, torch.float32, args.repeats, args.warmup, steps=steps,
                           names=names, clock=args.clock))
        results[-1].update(threads=torch.get_num_threads(), clock=args.clock,
                           load_average=[round(load, 2), round(os.getloadavg()[0], 2)])
    if torch.cuda.is_available():
        # as the *-base configs train: 64 rows x 512 per GPU, encoder layers compiled
        results.append(run("base", 64, 512, torch.device("cuda"), torch.bfloat16, 10, 3, compiled=True, names=names))
    print(json.dumps({"bench": "models", "target_vs_bert_mlm": 1.1, "target_gpu_vs_bert_mlm": 1.15, "runs": results,
                      **{f"{k}_vs_bert_mlm_max": max(r[f"{k}_vs_bert_mlm"] for r in results)
                         for k in ("smedbert", "kebiolm", "embert", "smedbert_embert")
                         if all(f"{k}_vs_bert_mlm" in r for r in results)}}))


if __name__ == "__main__":
    main()
