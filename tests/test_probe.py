"""Knowledge probing (KeBioLM §4.6): query building, multi-[MASK] beam decoding, recall@5 end to end."""

import math
from pathlib import Path

import pytest
import torch

from keplm.models.downstream.probe import (FALLBACK_TEMPLATE, SpecialIds, build_queries, check_template,
                                           decode_slots, macro_recall, query_hit)

TRIPLES = [
    ("感冒", "症状", "鼻塞"), ("感冒", "症状", "流涕"), ("感冒", "症状", "发热"), ("肺炎", "症状", "发热"),
    ("肺炎", "症状", "咳嗽"), ("胃炎", "症状", "胃痛"), ("感冒", "所属科室", "呼吸内科"),
    ("肺炎", "所属科室", "呼吸内科"), ("胃炎", "所属科室", "消化内科"), ("糖尿病", "所属科室", "内分泌科"),
    ("糖尿病", "并发症", "糖尿病肾病"), ("感冒", "并发症", "肺炎"), ("胃炎", "好发人群", "老年人"),
    ("感冒", "症状", "鼻塞"),                      # a repeated triple
    ("感冒", "别名", "伤风"),                      # same-as relation: an alias, not a probed relation
]
ENTITIES = {"感冒": "Disease", "肺炎": "Disease", "胃炎": "Disease", "糖尿病": "Disease", "糖尿病肾病": "Disease",
            "鼻塞": "Symptom", "流涕": "Symptom", "发热": "Symptom", "咳嗽": "Symptom", "胃痛": "Symptom",
            "呼吸内科": "Department", "消化内科": "Department", "内分泌科": "Department", "老年人": "Crowd"}


def write_kg(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "entities.tsv").write_text("name\ttype\n" + "".join(f"{n}\t{t}\n" for n, t in ENTITIES.items()), "utf-8")
    (d / "triples.tsv").write_text("head\trelation\ttail\n" + "".join("\t".join(t) + "\n" for t in TRIPLES), "utf-8")
    (d / "aliases.tsv").write_text("alias\tname\n普通感冒\t感冒\n", "utf-8")
    return d


# ------------------------------------------------------------------ queries

def test_queries_dedup_multi_answer_types_and_templates(tmp_path):
    queries, counts = build_queries(write_kg(tmp_path / "kg"))
    by = {(q.relation, q.direction, q.text): q for q in queries}
    assert len(by) == len(queries)
    assert {q.relation for q in queries} == {"症状", "所属科室", "并发症", "好发人群"}   # 别名 is an alias
    # Q1: one query per (s, r) with all its objects; Q2: one per (r, o) with all its subjects
    assert by["症状", "Q1", "感冒的症状是[MASK]。"].answers == ("发热", "流涕", "鼻塞")
    assert by["症状", "Q2", "[MASK]的症状是发热。"].answers == ("感冒", "肺炎")
    assert by["所属科室", "Q2", "[MASK]应到呼吸内科就诊。"].answers == ("感冒", "肺炎")
    assert sum(q.relation == "症状" for q in queries) == 3 + 5
    assert counts["probe_queries"] == len(queries) == 8 + 7 + 4 + 2
    # aliases (aliases.tsv and the 别名 triple) are accepted answers too
    assert set(by["并发症", "Q2", "[MASK]可并发肺炎。"].accepted) == {"感冒", "普通感冒", "伤风"}
    # unknown relation: the generic template
    assert "胃炎的好发人群是[MASK]。" in {q.text for q in queries}
    assert counts["probe_relations_fallback_template"] == 1
    # Type 1: an answer occurs in the query itself
    t1 = [q for q in queries if q.type == 1]
    assert [q.text for q in t1] == ["[MASK]可并发糖尿病肾病。"]
    assert by["并发症", "Q1", "糖尿病可并发[MASK]。"].type == 2
    assert counts["probe_queries_type1"] == 1 and counts["probe_queries_type2"] == len(queries) - 1


def test_queries_cap_per_relation_and_seed(tmp_path):
    kg = write_kg(tmp_path / "kg")
    a, counts = build_queries(kg, max_queries_per_relation=3, seed=1)
    b, _ = build_queries(kg, max_queries_per_relation=3, seed=1)
    assert [q.text for q in a] == [q.text for q in b]
    per = {r: sum(q.relation == r for q in a) for r in {q.relation for q in a}}
    assert per == {"症状": 3, "所属科室": 3, "并发症": 3, "好发人群": 2}
    assert counts["probe_candidate_queries"] == 21
    others = {tuple(q.text for q in build_queries(kg, max_queries_per_relation=3, seed=s)[0]) for s in range(8)}
    assert len(others) > 1
    q, _ = build_queries(kg, templates={"症状": "{o}是{s}的表现。"})
    assert "鼻塞是[MASK]的表现。" in {x.text for x in q}


def test_template_checks():
    assert check_template(FALLBACK_TEMPLATE)
    for bad in ("{s}的症状", "{s}{o}{o}", "{s}{o}{x}"):
        with pytest.raises(ValueError):
            check_template(bad)
    from keplm.models.downstream.tasks import TaskSpec

    with pytest.raises(ValueError):
        TaskSpec(kind="probe", kg="x", templates={"症状": "{s}"})
    with pytest.raises(ValueError):
        TaskSpec(kind="probe")
    assert TaskSpec(kind="probe", kg="x").max_queries_per_relation == 200


# ------------------------------------------------------------------ decoding on a fake masked LM

SP = SpecialIds(cls=2, sep=3, pad=0, mask=4)
V = 16
A, B, C, D, E, F = 5, 6, 7, 8, 9, 10


class FakeLM:
    """Logits fixed by a lookup: slot contents (MASK = 4 where undecoded) -> per-slot probabilities."""

    def __init__(self, table):
        self.table, self.seen = table, []

    def __call__(self, ids, att, positions):
        out = torch.full((ids.size(0), positions.size(1), V), -30.0)
        for r in range(ids.size(0)):
            slots = tuple(ids[r, positions[r]].tolist())
            self.seen.append(slots)
            for p, probs in enumerate(self.table[slots]):
                for tok, pr in probs.items():
                    out[r, p, tok] = math.log(pr)
                out[r, p, 1] = 5.0   # [UNK] is the likeliest everywhere but banned
        return out


def test_confidence_order_and_beam_keeps_the_best_hypothesis():
    M = SP.mask
    table = {
        (M, M): [{A: .5, B: .5}, {C: .6, D: .4}],        # slot 1 is the more confident: filled first
        (M, C): [{A: .3, B: .3, E: .4}, {}],              # after C the best total is .6 * .4 = .24
        (M, D): [{A: .99, B: .01}, {}],                   # after D: .4 * .99 = .396
    }
    for slots in list(table):
        for tok in (A, B, E):
            table[(tok, slots[1])] = [{}, {}]
    lm = FakeLM(table)
    greedy = decode_slots(lm, [([11], [12])], 2, SP, beam_size=1, banned=[0, 1, 2, 3, 4])[0]
    assert greedy[0][0] == (E, C)
    beam = decode_slots(lm, [([11], [12])], 2, SP, beam_size=2, banned=[0, 1, 2, 3, 4])[0]
    assert beam[0][0] == (A, D) and beam[0][1] == pytest.approx(math.log(.396), abs=1e-4)
    assert beam[1][0] == (E, C) and beam[1][1] == pytest.approx(math.log(.24), abs=1e-4)
    assert all(s == (M, M) or s[1] != M for s in lm.seen)   # slot 1 is always decoded first


def test_three_masks_fill_in_confidence_order():
    M = SP.mask
    table = {(M, M, M): [{A: .4, B: .3, E: .3}, {C: .9, D: .1}, {D: .7, F: .3}],
             (M, C, M): [{A: .6, B: .4}, {}, {F: .8, D: .2}],
             (M, C, F): [{A: .95, B: .05}, {}, {}]}
    lm = FakeLM(table)
    out = decode_slots(lm, [([], [])], 3, SP, beam_size=1, banned=[0, 1])[0]
    assert out[0][0] == (A, C, F)
    assert lm.seen == [(M, M, M), (M, C, M), (M, C, F)]   # middle, then right, then left
    assert out[0][1] == pytest.approx(math.log(.9 * .8 * .95), abs=1e-4)


def test_hits_and_macro_recall(tmp_path):
    cands = [("鼻塞", -1.2, 2), ("鼻", -0.1, 1), ("发", -0.2, 1), ("热", -0.3, 1), ("咳", -0.4, 1),
             ("嗽", -0.5, 1), ("流涕", -4.0, 2)]
    paper, pooled, top = query_hit(cands, {"流涕"})
    assert paper and not pooled and top == ["鼻", "发", "热", "咳", "嗽"]
    assert query_hit(cands, {"鼻塞"})[:2] == (True, False)    # mean per token -0.6: sixth
    assert query_hit(cands, {"咳", "胃痛"})[:2] == (True, True)
    assert query_hit(cands, {"胃痛"})[:2] == (False, False)
    queries, _ = build_queries(write_kg(tmp_path / "kg"))
    hits = [q.relation == "症状" or q.type == 1 for q in queries]
    macro, per = macro_recall(queries, hits)
    assert per == {"好发人群": 0.0, "并发症": 0.25, "所属科室": 0.0, "症状": 1.0}
    assert macro == pytest.approx(1.25 / 4)
    assert macro_recall(queries, hits, 1) == (1.0, {"并发症": 1.0})


# ------------------------------------------------------------------ a real tiny BERT

@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sentences(kg_dir):
    """(left ids-to-be text, answer, right text) for every triple in both directions, aliases included."""
    queries, _ = build_queries(kg_dir)
    return [(q.left, a, q.right) for q in queries for a in q.accepted]


def tiny_mlm(tmp_path, kg_dir, train_steps: int, seed: int = 0) -> Path:
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    items = sentences(kg_dir)
    chars = sorted({c for item in items for c in "".join(item)} | set("甲乙丙丁戊己庚辛壬癸子丑寅卯辰巳午未申酉"))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars]
    out = tmp_path / "model"
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    model = BertForMaskedLM(cfg)
    if train_steps:   # the probe's own input: the answer span masked, on half the rows some of it visible
        rows = []
        for left, ans, right in items:
            lft, a, rgt = (tok(x, add_special_tokens=False)["input_ids"] for x in (left, ans, right))
            rows.append(([tok.cls_token_id, *lft, *a, *rgt, tok.sep_token_id], 1 + len(lft), len(a)))
        n = max(len(r[0]) for r in rows)
        full = torch.tensor([r[0] + [tok.pad_token_id] * (n - len(r[0])) for r in rows])
        span = torch.zeros_like(full, dtype=torch.bool)
        for i, (_, start, k) in enumerate(rows):
            span[i, start:start + k] = True
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(train_steps):
            keep = (torch.rand(full.shape, generator=gen) < 0.5) & (torch.rand(len(rows), 1, generator=gen) < 0.5)
            masked = span & ~keep
            loss = model(input_ids=full.masked_fill(masked, tok.mask_token_id), attention_mask=(full != 0).long(),
                         labels=full.masked_fill(~masked, -100)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def run_probe(model_dir, kg_dir):
    from keplm.models.downstream.finetune import FinetuneConfig
    from keplm.models.downstream.tasks import TaskSpec, run_task

    spec = TaskSpec(kind="probe", kg=str(kg_dir), max_answer_tokens=5)
    return run_task(str(model_dir), spec, FinetuneConfig(), seed=0)


@pytest.mark.slow   # 300 training steps
def test_trained_tiny_bert_memorises_the_kg(tmp_path, one_thread):
    kg = write_kg(tmp_path / "kg")
    res = run_probe(tiny_mlm(tmp_path, kg, train_steps=300), kg)
    assert res["task"] == "probe"
    assert res["recall_at_5"] == 1.0, res["examples"]
    assert res["recall_at_5_type1"] == 1.0 and res["recall_at_5_type2"] == 1.0
    assert res["recall_at_5.症状"] == 1.0 and res["per_relation"]["症状"]["queries"] == 8
    assert res["counts"]["probe_queries"] == 21 and res["counts"]["probe_queries.症状"] == 8
    assert res["recall_at_5_pooled"] >= 0.8
    assert res["examples"]["并发症"][0]["top5"]


def test_random_tiny_bert_knows_nothing(tmp_path, one_thread):
    kg = write_kg(tmp_path / "kg")
    res = run_probe(tiny_mlm(tmp_path, kg, train_steps=0), kg)
    assert res["recall_at_5"] < 0.2 and res["recall_at_5_pooled"] < 0.2
