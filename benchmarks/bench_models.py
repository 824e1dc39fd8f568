"""Forward+backward step time of SMedBERT, KeBioLM, EMBERT (and SMedBERT + EMBERT's heads) and the baselines vs
plain BERT MLM, same config and batch.
Prints one JSON line.

Shapes: ``tiny`` (2 layers, hidden 128) and ``base`` (BERT-base: 12 layers, hidden 768, d2 = 200, K = 10)
on CPU in fp32; with a GPU also BERT-base at batch 64 x seq 512 in bf16 with the encoder layers compiled
(``train.compile``), as the ``*-base`` configs train. Batches are synthetic but shaped as the
collator makes them: mentions covering ~30 % of tokens, K neighbours each, 10 negatives per neighbour; for
EMBERT 30 % of the mentions replaced (CECP), segmentation labels on every mention token, one 2-token term
masked in half of them (BEM); KeBioLM with l0 = 2/3 of the layers, top-k 100, 4,096 sampled EL negatives.
Median of ``--steps`` timed steps after ``--warmup`` steps. ``smedbert_diagnostic_step``: a step that also takes
each loss term's encoder gradient norm (train.diagnostics_every; the steps between run the plain ``smedbert`` step).

    python benchmarks/bench_models.py [--steps 5] [--base-batch 4] [--base-seq 128]
"""

from __future__ import annotations

import argparse
import json
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


def step_time(model, data, steps: int, warmup: int, dtype, diagnose: bool = False) -> float:
    """Median forward + backward + AdamW step, the optimizer as the train loop makes it (fused on GPU);
    ``diagnose``: every step is a loss-balance diagnostic step (each term's encoder gradient norm first)."""
    from keplm.platform.loss_balance import term_gradient_norms

    cuda = next(model.parameters()).device.type == "cuda"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=cuda)
    times = []
    dev = next(model.parameters()).device
    for i in range(warmup + steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
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
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def run(shape_name: str, b: int, t: int, device, dtype, steps: int, warmup: int, compiled: bool = False) -> dict:
    from keplm.platform.train_loop import compile_blocks

    shape = SHAPES[shape_name]
    data = batch(b, t, k=10, n=10, device=device)
    out = {}
    for name, make in models(shape, t).items():
        torch.manual_seed(0)
        model = make().to(device).train()
        if compiled:
            compile_blocks(model)
        out[name] = step_time(model, data, steps, warmup, dtype)
        if name == "smedbert":   # the training loop's diagnostic steps (the first and each checkpoint's)
            out["smedbert_diagnostic_step"] = step_time(model, data, steps, warmup, dtype, diagnose=True)
        del model
    base = out["bert_mlm"]
    return {"shape": shape_name, "batch": b, "seq": t, "device": device.type, "dtype": str(dtype).split(".")[-1],
            "compiled": compiled,
            **{f"{k}_ms": round(v * 1e3, 1) for k, v in out.items()},
            **{f"{k}_vs_bert_mlm": round(v / base, 3) for k, v in out.items() if k != "bert_mlm"}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--base-batch", type=int, default=4)
    ap.add_argument("--base-seq", type=int, default=128)
    ap.add_argument("--skip-cpu", action="store_true", help="GPU row only")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cpu = torch.device("cpu")
    results = [] if args.skip_cpu else [run("tiny", 8, 128, cpu, torch.float32, args.steps, args.warmup),
                                        run("base", args.base_batch, args.base_seq, cpu, torch.float32, args.steps, args.warmup)]
    if torch.cuda.is_available():
        # as the *-base configs train: 64 rows x 512 per GPU, encoder layers compiled
        results.append(run("base", 64, 512, torch.device("cuda"), torch.bfloat16, 10, 5, compiled=True))
    print(json.dumps({"bench": "models", "target_vs_bert_mlm": 1.2, "runs": results,
                      **{f"{k}_vs_bert_mlm_max": max(r[f"{k}_vs_bert_mlm"] for r in results)
                         for k in ("smedbert", "kebiolm", "embert", "smedbert_embert")}}))


if __name__ == "__main__":
    main()
