"""EMBERT (seed 001 §3 + Appendix): segmentation rules, synonym/random replacement, bidirectional masking,
the three heads' equations (eq. 2-9), the loss sum (eq. 10), composition with SMedBERT, save/reload,
overfitting one batch, and the pretrain job."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from keplm.kg.segment import EntitySegmenter, SegmentConfig, adjective_atomic
from keplm.models import KeplmBertConfig, KeplmBertForPreTraining, SMedBertConfig, SMedBertForPreTraining
from keplm.models.data import KnowledgeCollator
from keplm.models.embert import CONSISTENT, INCONSISTENT, EntityObjectives, EntityTasks

DEMO = Path(__file__).resolve().parents[1] / "keplm" / "data" / "demo"
V, MASK = 60, 4
TINY = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64)
ALL = ["cecp", "est", "bem"]


# ------------------------------------------------------------------------------------ segmentation rules

def test_cut_points_come_from_primitive_segment_boundaries():
    vocab = ["贫血", "肝炎", "缺铁性贫血", "病毒性肝炎", "溶血性贫血", "过敏性鼻炎"]
    seg = EntitySegmenter(vocab, SegmentConfig(min_count=2))
    assert "性" in seg.end_cuts                       # ends an inner segment in every long name
    assert "贫" not in seg.end_cuts                   # only ever at an entity's start of "贫血"
    assert seg.segment("缺铁性贫血") == ("缺铁性", "贫血")
    assert seg.segment("肝炎") == ("肝炎",)             # three characters or fewer: short
    assert adjective_atomic(seg.segment("病毒性肝炎")) == (("病毒性",), "肝炎")
    assert adjective_atomic(("肝炎",)) is None


def test_cut_points_split_before_jieba_and_single_character_results_are_errors():
    seg = EntitySegmenter(["感染"], SegmentConfig())
    seg.end_cuts, seg.start_cuts = frozenset("性"), frozenset()
    assert seg._split_at_cut_points("感染性腹泻") == ["感染性", "腹泻"]
    seg.end_cuts = frozenset("甲乙丙")                  # a cut after every character: all single pieces
    before = seg.counts["corrected"]
    pieces = seg.segment("甲乙丙丁")
    assert seg.counts["corrected"] == before + 1       # the primitive segmentation replaced the error
    assert sum(len(p) == 1 for p in pieces) <= 1 or pieces == ("甲乙丙丁",)
    assert "".join(pieces) == "甲乙丙丁"


# ------------------------------------------------------------------------------- replacement (CECP data)

def tasks():
    surfaces = {0: [(10, 11), (20, 21, 22)], 1: [(30, 31)], 2: [(40, 41, 42, 43)]}
    pieces = {(10, 11): (2,), (20, 21, 22): (1, 2), (30, 31): (2,), (40, 41, 42, 43): (2, 2)}
    return EntityTasks(surfaces, pieces)


def test_replacement_keeps_synonyms_consistent_and_random_entities_inconsistent():
    t = tasks()
    ids = [1, 5, 10, 11, 6, 30, 31, 7, 2]
    mentions = [(2, 4, 0), (5, 7, 1)]
    seen = Counter()
    for seed in range(60):
        out, ms = t.replace(ids, mentions, 1.0, np.random.default_rng(seed), Counter())
        rest = [x for i, x in enumerate(out) if not any(s <= i < e for s, e, *_ in ms)]
        assert rest == [1, 5, 6, 7, 2]                          # the context is untouched
        for (s, e, ent, label), (_, _, orig) in zip(ms, mentions):
            surface = tuple(out[s:e])
            assert surface in t.surfaces[ent]
            if label == CONSISTENT:
                assert ent == orig                              # a synonym: the same entity
                if orig == 0:
                    assert surface == (20, 21, 22)              # the other surface of entity 0
                else:
                    assert surface == (30, 31)                  # entity 1 has no synonym: kept, consistent
            else:
                assert label == INCONSISTENT and ent != orig
            seen[label] += 1
    assert seen[CONSISTENT] > 15 and seen[INCONSISTENT] > 15
    out, ms = t.replace(ids, mentions, 0.0, np.random.default_rng(0), Counter())
    assert out == ids and [m[3] for m in ms] == [-100, -100]
    stats = Counter()
    out, ms = t.replace(ids, [(2, 4, 0), (3, 5, 1)], 1.0, np.random.default_rng(0), stats)
    assert len(ms) == 1 and stats["cecp_overlapping_mentions_dropped"] == 1 and out[-5:] == ids[-5:]


# ------------------------------------------------------------------ segmentation labels and bidirectional masking

def test_segmentation_labels_mark_sub_entity_ends_inside_mentions_only():
    ids = np.array([1, 5, 40, 41, 42, 43, 6, 10, 11, 2])
    targets, exclude = tasks().annotate(ids, [(2, 6, 2, -100), (7, 9, 0, -100)], 0.0, MASK,
                                        np.random.default_rng(0), Counter())
    assert targets["seg"].tolist() == [-100, -100, 0, 1, 0, 1, -100, 0, 1, -100]
    assert not exclude.any() and not targets["bem"]


def test_bidirectional_masking_masks_one_term_and_anchors_on_the_other():
    directions = Counter()
    for seed in range(40):
        ids = np.array([1, 5, 40, 41, 42, 43, 6, 2])
        targets, exclude = tasks().annotate(ids, [(2, 6, 2, -100)], 1.0, MASK, np.random.default_rng(seed), Counter())
        bem = targets["bem"]
        masked = sorted(p for p, *_ in bem)
        assert masked in ([2, 3], [4, 5])                          # adjective [2,4) or atomic [4,6)
        other = [4, 5] if masked == [2, 3] else [2, 3]
        assert (ids[masked] == MASK).all() and (ids[other] != MASK).all()
        for pos, a0, a1, rel, target in bem:
            assert (a0, a1) == (other[0], other[-1])               # the other term's first and last token
            assert rel == pos - masked[0]
            assert target == [0, 0, 40, 41, 42, 43][pos]             # the original token
        assert exclude[2:6].all() and not exclude[:2].any()
        directions["atomic" if masked == [4, 5] else "adjective"] += 1
    assert directions["atomic"] > 5 and directions["adjective"] > 5


def test_collator_emits_entity_targets_after_sop_and_keeps_them_out_of_mlm():
    rows = [{"input_ids": [1, *range(44, 50), 40, 41, 42, 43, 50, 51, 10, 11, 52, 53, 2],
             "mentions": [{"token_start": 7, "token_end": 11, "entity": 2},
                          {"token_start": 13, "token_end": 15, "entity": 0}]}] * 4
    col = KnowledgeCollator(1, 2, MASK, 0, V, mask_rate=0.3, seed=3, entity_tasks=tasks(), cecp_rate=0.5, bem_rate=1.0)
    for _ in range(10):
        b = col(rows)
        mlm = b["labels"] >= 0
        for i in range(len(rows)):
            for j in range(b["cecp_labels"].shape[1]):
                if b["cecp_labels"][i, j] >= 0:
                    s, e = b["cecp_spans"][i, j].tolist()
                    surface = tuple(b["input_ids"][i, s:e].tolist())
                    assert any(surface in v for v in tasks().surfaces.values())
                    assert not mlm[i, s:e].any()
            pos = b["bem_positions"][i][b["bem_labels"][i] >= 0]
            assert (b["input_ids"][i, pos] == MASK).all() and not mlm[i, pos].any()
            seg = b["seg_labels"][i]
            inside = torch.zeros_like(seg, dtype=torch.bool)
            for s, e in b["mention_spans"][i][b["mention_mask"][i]].tolist():
                inside[s:e] = True
                assert seg[e - 1] == 1                                   # every mention ends a sub-entity
            assert ((seg >= 0) == inside).all()
    assert col.stats["bem_atomic_masked"] + col.stats["bem_adjective_masked"] > 0
    assert col.stats["cecp_synonym"] + col.stats["cecp_random"] + col.stats["cecp_kept_no_synonym"] > 0


def test_thesaurus_from_the_demo_graph(demo_prepared, tmp_path):
    from keplm.kg.graph import GraphConfig, build_graph
    from keplm.platform.tokenizer import load_tokenizer

    build_graph(DEMO / "kg", tmp_path / "g", GraphConfig(), {})
    tok = load_tokenizer(str(demo_prepared / "tokenizer"))
    t = EntityTasks.build(tmp_path / "g", tok)
    ids = lambda s: tuple(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    cold = [e for e, v in t.surfaces.items() if ids("感冒") in v][0]
    assert ids("伤风") in t.surfaces[cold] and ids("普通感冒") in t.surfaces[cold]
    for surface, lengths in t.pieces.items():
        assert sum(lengths) == len(surface)
    assert sum(len(v) >= 2 for v in t.pieces.values()) > 50        # the demo KG has long entities


# ------------------------------------------------------------------------------------------ the heads

def heads(**kw):
    torch.manual_seed(0)
    cfg = KeplmBertConfig(**TINY, entity_objectives=kw.pop("objectives", ALL), **kw)
    return EntityObjectives(cfg).eval(), cfg


def head_batch():
    return {
        "cecp_spans": torch.tensor([[[2, 4], [6, 9]], [[3, 5], [1, 1]]]),
        "cecp_labels": torch.tensor([[1, 0], [0, -100]]),
        "seg_labels": torch.tensor([[-100, -100, 0, 1, -100, -100, 0, 0, 1, -100]] * 2),
        "bem_positions": torch.tensor([[6, 7, 8], [2, 0, 0]]),
        "bem_anchor": torch.tensor([[[2, 3], [2, 3], [2, 3]], [[4, 5], [0, 0], [0, 0]]]),
        "bem_relative": torch.tensor([[0, 1, 2], [0, 0, 0]]),
        "bem_labels": torch.tensor([[11, 12, 13], [14, -100, -100]]),
    }


def test_cecp_is_the_boundary_token_ffn_of_eq_2_and_3():
    h, _ = heads()
    seq = torch.randn(2, 10, 32)
    b = head_batch()
    want = []
    for (i, (s, e)), label in zip([(0, (2, 4)), (0, (6, 9)), (1, (3, 5))], [1, 0, 0]):
        x = torch.cat([seq[i, s - 1], seq[i, e]])                     # x_{s-1}, x_{e+1} (e is exclusive)
        y = F.layer_norm(F.gelu(h.cecp_w1(x)), (32,), h.cecp_ln.weight, h.cecp_ln.bias, h.cecp_ln.eps)
        want.append(-torch.log_softmax(h.cecp_w2(y), -1)[label])
    got = h(seq, torch.randn(V, 32), b)["cecp"]
    assert torch.allclose(got, torch.stack(want).mean(), atol=1e-6)


def test_est_is_eq_4_summed_per_sentence():
    h, _ = heads(est_reduction="sum")         # eq. 5 as printed (the mean default: test_loss_reductions.py)
    seq = torch.randn(2, 10, 32)
    b = head_batch()
    total = 0.0
    for i in range(2):
        for t, label in enumerate(b["seg_labels"][i].tolist()):
            if label < 0:
                continue
            y = torch.tanh(h.est_w3(h.est_ln(F.gelu(h.est_w4(seq[i, t])))))
            total = total - torch.log_softmax(h.est_w5(y), -1)[label]
    assert torch.allclose(h(seq, torch.randn(V, 32), b)["est"], total / 2, atol=1e-5)


def test_bem_predicts_the_masked_side_only_from_the_other_sides_boundaries():
    h, _ = heads(bem_reduction="sum")         # eq. 8-9 as printed (the mean default: test_loss_reductions.py)
    seq = torch.randn(2, 10, 32, requires_grad=True)
    words = torch.randn(V, 32)
    b = head_batch()
    loss = h(seq, words, b)["bem"]
    total = 0.0
    for i, j in [(0, 0), (0, 1), (0, 2), (1, 0)]:
        a0, a1 = b["bem_anchor"][i, j].tolist()
        p = h.bem_position(b["bem_relative"][i, j])
        h1 = h.bem_ln6(F.gelu(h.bem_w6(torch.cat([seq[i, a0], seq[i, a1], p]))))
        y = h.bem_ln7(F.gelu(h.bem_w7(h1)))
        total = total - torch.log_softmax(words @ y, -1)[b["bem_labels"][i, j]]     # eq. 8: y · w_k
    assert torch.allclose(loss, total / 2, atol=1e-5)
    loss.backward()
    touched = (seq.grad.abs().sum(-1) > 0).nonzero().tolist()
    assert touched == [[0, 2], [0, 3], [1, 4], [1, 5]]        # anchors only: never the masked tokens
    assert h.bem_position.embedding_dim == 200


def test_total_loss_is_eq_10_and_each_term_is_reported():
    torch.manual_seed(0)
    model = KeplmBertForPreTraining(KeplmBertConfig(**TINY, entity_objectives=ALL)).eval()
    b = make_model_batch()
    out = model(**b)
    assert {k for k in ("cecp_loss", "est_loss", "bem_loss") if out[k] is not None} == {"cecp_loss", "est_loss", "bem_loss"}
    want = out.mlm_loss + out.sop_loss + 2 * out.cecp_loss + 2 * out.est_loss + 0.5 * out.bem_loss
    assert torch.allclose(out.loss, want, atol=1e-6)
    plain = KeplmBertForPreTraining(KeplmBertConfig(**TINY, entity_objectives=["est"]))
    assert not hasattr(plain.entity_objectives, "cecp_w1") and plain(**b).cecp_loss is None


def make_model_batch(seed=0):
    col = KnowledgeCollator(1, 2, MASK, 0, V, mask_rate=0.2, seed=seed, entity_tasks=tasks(), cecp_rate=0.6, bem_rate=1.0)
    rows = [{"input_ids": [1, *range(44, 50), 40, 41, 42, 43, 50, 51, 10, 11, 52, 53, 2],
             "mentions": [{"token_start": 7, "token_end": 11, "entity": 2},
                          {"token_start": 13, "token_end": 15, "entity": 0}]},
            {"input_ids": [1, 45, 30, 31, 46, 40, 41, 42, 43, 47, 48, 49, 2],
             "mentions": [{"token_start": 2, "token_end": 4, "entity": 1},
                          {"token_start": 5, "token_end": 9, "entity": 2}]}]
    for _ in range(50):     # a batch with every target present
        b = col(rows)
        if (b["cecp_labels"] >= 0).any() and (b["bem_labels"] >= 0).any() and (b["labels"] >= 0).any():
            return b
    raise AssertionError("no batch with all targets")


def test_embert_heads_compose_with_smedbert_on_one_backbone():
    torch.manual_seed(0)
    cfg = SMedBertConfig(**TINY, num_entities=8, num_relations=2, num_entity_types=2, kg_dim=8, hybrid_layer=1,
                         entity_objectives=ALL, mmem_mentions="all")   # the batch masks no mention whole
    model = SMedBertForPreTraining(cfg).eval()
    b = make_model_batch()
    m = b["mention_mask"].shape[1]
    b.update(neighbour_ids=torch.randint(0, 8, (2, m, 3)), neighbour_relation=torch.randint(0, 4, (2, m, 3)),
             neighbour_type=torch.randint(0, 2, (2, m, 3)), neighbour_mask=torch.ones(2, m, 3, dtype=torch.bool),
             negative_ids=torch.randint(0, 8, (2, m, 3, 4)), log_q_pos=torch.full((2, m, 3), -2.0),
             log_q_neg=torch.full((2, m, 3, 4), -2.0))
    b["mention_entity"] = b["mention_entity"].clamp(max=7)
    out = model(**b)
    parts = [out.mlm_loss, out.sop_loss, 2 * out.mnem_loss, 4 * out.mmem_loss,
             2 * out.cecp_loss, 2 * out.est_loss, 0.5 * out.bem_loss]
    assert all(p is not None for p in parts)
    assert torch.allclose(out.loss, sum(parts), atol=1e-5)


def test_bem_scored_in_the_mlm_decoders_gemm_equals_its_own_product():
    """In training the BEM states join the MLM rows in the decoder's GEMM (heads_and_objectives): every loss
    and every gradient equals eq. 8 as its own product y·Γpᵀ beside the MLM head (fp32, 1e-5)."""
    from keplm.models.embert import apply_objectives
    from keplm.models.modules import add_losses, labelled_rows, run_bert

    torch.manual_seed(0)
    model = KeplmBertForPreTraining(KeplmBertConfig(**TINY, entity_objectives=ALL, hidden_dropout_prob=0.0,
                                                    attention_probs_dropout_prob=0.0)).train()
    b = make_model_batch()
    out = model(**b)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight   # fused: tied
    seq = run_bert(model.bert, b["input_ids"], b["attention_mask"], b["token_type_ids"])
    _, _, mlm, sop = model.ex_loss(seq, b["labels"], b["sop_label"], labelled_rows(b["labels"]))
    heads = model.entity_objectives
    y, target = heads.bem_inputs(seq, b)
    bem_alone = F.cross_entropy(y @ model.bert.embeddings.word_embeddings.weight.T, target)
    terms, losses = apply_objectives(model, seq, {k: v for k, v in b.items() if k != "bem_labels"})
    want = add_losses((1.0, mlm), (1.0, sop), *terms, (heads.lambdas["bem"], bem_alone))
    want.backward()
    assert torch.allclose(out.bem_loss, bem_alone, atol=1e-5) and torch.allclose(out.mlm_loss, mlm, atol=1e-5)
    assert torch.allclose(out.loss, want, atol=1e-5)
    assert set(got) == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if n in got:
            assert torch.allclose(got[n], p.grad, atol=1e-5), n


def test_save_and_reload_keeps_the_objectives(tmp_path):
    from transformers import AutoModelForPreTraining

    torch.manual_seed(0)
    model = KeplmBertForPreTraining(KeplmBertConfig(**TINY, entity_objectives=["cecp", "bem"], lambda_bem=0.25)).eval()
    model.save_pretrained(tmp_path)
    back = AutoModelForPreTraining.from_pretrained(tmp_path).eval()
    assert back.config.entity_objectives == ["cecp", "bem"] and back.entity_objectives.lambdas["bem"] == 0.25
    b = make_model_batch()
    with torch.no_grad():
        assert torch.allclose(model(**b).loss, back(**b).loss, atol=1e-6)


def test_one_batch_overfits():
    torch.manual_seed(0)
    b = make_model_batch()
    model = KeplmBertForPreTraining(KeplmBertConfig(**TINY, entity_objectives=ALL, hidden_dropout_prob=0.0,
                                                    attention_probs_dropout_prob=0.0)).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        out = model(**b)
        first = first if first is not None else {k: out[k].item() for k in ("loss", "cecp_loss", "est_loss", "bem_loss")}
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    for k, v in first.items():
        assert out[k].item() < 0.1 * v, (k, v, out[k].item())


def test_unknown_objective_is_refused():
    with pytest.raises(ValueError, match="unknown entity objectives"):
        EntityObjectives(KeplmBertConfig(**TINY, entity_objectives=["nsp"]))


def pretrain_demo(tmp_path, demo_run, *overrides):
    """8 steps on 1 worker in the job's process (train.runner=in_process) from the session demo run's prepared shards
    (the other stages are the model's own)."""
    import json
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    r = subprocess.run([sys.executable, "-m", "keplm.jobs.pretrain", "--config", "configs/demo.yaml", "--output",
                        str(tmp_path), f"--prepared={demo_run[0] / 'prepare'}", *overrides, "train.max_steps=8", "train.num_workers=1",
                        "train.runner=in_process",
                        "train.batch_size=8", "train.lr=0.003", "train.warmup_ratio=0.0", "train.checkpoint_every=8"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return client, client.get_run(res["mlflow_run_id"])


@pytest.mark.slow
def test_embert_pretrains_on_the_demo_and_logs_each_objective(tmp_path, demo_run):
    client, run = pretrain_demo(tmp_path, demo_run, "model.kind=embert")
    assert (tmp_path / "graph" / "aliases.parquet").is_file()              # the stage its thesaurus needs
    assert not (tmp_path / "neighbours").exists()
    assert {"mlm_loss", "cecp_loss", "est_loss", "bem_loss"} <= set(run.data.metrics)
    history = {k: [m.value for m in sorted(client.get_metric_history(run.info.run_id, k), key=lambda m: m.step)]
               for k in ("est_loss", "mlm_loss")}
    # every step logs each objective (test_one_batch_overfits checks that they learn); MLM shows the job training
    assert len(history["est_loss"]) == 8 and all(0 < v < float("inf") for v in history["est_loss"])
    assert history["mlm_loss"][-1] < history["mlm_loss"][0]


@pytest.mark.slow
def test_smedbert_with_embert_heads_and_whole_entity_masking_pretrains(tmp_path, demo_run):
    _, run = pretrain_demo(tmp_path, demo_run, "model.kind=smedbert", "model.objectives=[cecp,est,bem]",
                           "batches.whole_entity_masking=true")
    assert {"mlm_loss", "mnem_loss", "mmem_loss", "cecp_loss", "est_loss", "bem_loss"} <= set(run.data.metrics)
    assert run.data.params["model.objectives"] == "['cecp', 'est', 'bem']"


def test_ablation_grid_is_table_4_and_5():
    from keplm import config
    from keplm.config import KeplmConfig
    from keplm.tuning.space import ABLATION_GRIDS, merge, nest

    base = config.dump(config.load(Path(__file__).resolve().parents[1] / "configs" / "embert-base.yaml"))
    got = {}
    for name, over in ABLATION_GRIDS["embert"].items():
        cfg = KeplmConfig(**merge(base, nest(over)))
        got[name] = (sorted(cfg.model.entity_objectives), cfg.batches.mask_rate)
    S = sorted(ALL)
    assert got == {"full": (S, 0.15), "-consistency": (["bem", "est"], 0.15), "-bidirectional_mask": (["cecp", "est"], 0.15),
                   "-segmentation": (["bem", "cecp"], 0.15), "-all": ([], 0.15), "corruption=7.5%": (S, 0.075),
                   "corruption=25%": (S, 0.25)}
