"""Downstream evaluation: loaders, CRF math, seqeval scoring, windows, augmentation, similarity, finetuning."""

import gzip
import itertools
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DEMO, need_shared
from keplm.models.downstream.data import (NerSet, flatten_spans, read_conll, read_ner, read_pairs, read_spans,
                                          read_tsv, repair_tags)
from keplm.models.downstream.finetune import FinetuneConfig, finetune_ner, ner_scores, proxy_dev_f1, window_bounds
from keplm.models.downstream.heads import NerTagger, char_token_ids
from keplm.platform.errors import KeplmError

SENTENCES = [
    ("感冒引起鼻塞和发热，需要多喝水休息", [(0, 2, "disease"), (4, 6, "symptom"), (7, 9, "symptom")]),
    ("糖尿病患者应该控制饮食并且定期检查血糖", [(0, 3, "disease"), (17, 19, "test")]),
    ("高血压病人每天按时服用降压药", [(0, 3, "disease"), (11, 14, "drug")]),
    ("咳嗽很厉害的时候可以去医院看看呼吸内科", [(0, 2, "symptom"), (15, 19, "department")]),
]


def bio(text, spans):
    tags = ["O"] * len(text)
    for s, e, t in spans:
        tags[s] = "B-" + t
        for i in range(s + 1, e):
            tags[i] = "I-" + t
    return tags


def toy_set(n_repeat=1) -> NerSet:
    ds = NerSet()
    for _ in range(n_repeat):
        for text, spans in SENTENCES:
            ds.sentences.append(list(text))
            ds.labels.append(bio(text, spans))
    return ds


def make_tiny_bert(out: Path, tokens: list[str], hidden=32, layers=2, seed=0) -> Path:
    """A random-init BERT masked LM + WordPiece tokenizer saved like a keplm pretrain model/ dir."""
    from transformers import BertConfig, BertForPreTraining, BertTokenizer

    torch.manual_seed(seed)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [t for t in dict.fromkeys(tokens) if t.strip()]
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=128)
    BertForPreTraining(cfg).save_pretrained(str(out))
    BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    chars = [c for text, _ in SENTENCES for c in text] + list("的了是在有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处理")
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), chars)


# ------------------------------------------------------------------ loaders

def test_conll_reader_counts_and_repairs(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("便 B_disease\n秘 I_disease\n天 I\n好 O\n\n坏行\n痛 O\n\n  O\n头 I-symptom\n痛 I-symptom\n", encoding="utf-8")
    ds = read_conll(p)
    assert ds.sentences == [list("便秘天好"), [" ", "头", "痛"]]
    # untyped I continues the entity before it; an orphan I-x starts one
    assert ds.labels == [["B-disease", "I-disease", "I-disease", "O"], ["O", "B-symptom", "I-symptom"]]
    assert ds.counts["malformed_line"] == 1 and ds.counts["rejected_sentences"] == 1
    assert ds.counts["untyped_i_fixed"] == 1 and ds.counts["orphan_i_fixed"] == 1


def test_repair_untyped_i_after_o_becomes_o():
    c = Counter()
    assert repair_tags(["O", "I", "B-x", "I"], c) == ["O", "O", "B-x", "I-x"]
    assert c == Counter(untyped_i_dropped=1, untyped_i_fixed=1)


def test_tsv_reader_rejects_length_mismatch_and_bad_labels(tmp_path):
    p = tmp_path / "a.tsv"
    p.write_text("text_a\tlabel\n头 痛\tB-Symptom I-Symptom\n头 痛\tO\n头 痛\tO X\nno tab here\n", encoding="utf-8")
    ds = read_tsv(p)
    assert ds.labels == [["B-Symptom", "I-Symptom"]]
    assert ds.counts["length_mismatch"] == 1 and ds.counts["malformed_line"] == 2


def test_span_reader_flattens_nested_spans_longest_first(tmp_path):
    p = tmp_path / "a.json"
    rows = [{"text": "急性胃炎引起腹痛", "mention_data": [
                {"mention": "胃炎", "type": "disease", "offset": "2"},
                {"mention": "急性胃炎", "type": "disease", "offset": "0"},
                {"mention": "腹痛", "type": "symptom", "offset": "6"},
                {"mention": "腹泻", "type": "symptom", "offset": "6"},     # text says 腹痛
                {"mention": "x", "type": "symptom"}]},                    # no offset
            "not json"]
    p.write_text("\n".join(json.dumps(r, ensure_ascii=False) if isinstance(r, dict) else r for r in rows), encoding="utf-8")
    ds = read_spans(p)
    assert ds.labels == [["B-disease", "I-disease", "I-disease", "I-disease", "O", "O", "B-symptom", "I-symptom"]]
    assert ds.counts["nested_dropped"] == 1 and ds.counts["span_mismatch"] == 1
    assert ds.counts["malformed_span"] == 1 and ds.counts["malformed_line"] == 1


def test_flatten_spans_tie_goes_to_earliest():
    c = Counter()
    assert flatten_spans([(1, 3, "b"), (0, 2, "a")], c) == [(0, 2, "a")]
    assert c["nested_dropped"] == 1


def test_pairs_reader_and_unreadable_file(tmp_path):
    p = tmp_path / "p.tsv"
    p.write_text("1\t头痛怎么办\t头疼怎么治\n2\ta\tb\n0\tonly two\n0\t咳嗽\t发热\n", encoding="utf-8")
    ds = read_pairs(p)
    assert ds.labels == [1, 0] and ds.counts["malformed_line"] == 2
    bad = tmp_path / "x.txt.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(KeplmError, match="cannot read"):
        read_ner(bad)
    with pytest.raises(KeplmError, match="not found"):
        read_ner(tmp_path / "missing.txt")


def test_real_loaders_agree_between_txt_and_json():
    d = need_shared("ner", "cmedqaner")
    txt, js = read_ner(d / "dev.txt.gz"), read_ner(d / "dev.json.gz")
    assert len(txt) == len(js) == 175
    assert [len(s) for s in txt.sentences] == [len(s) for s in js.sentences]
    assert txt.label_set() == js.label_set() and len(txt.label_set()) == 23   # O + 11 types x B/I
    with gzip.open(d / "dev.json.gz", "rt", encoding="utf-8") as f:
        n_spans = sum(len(json.loads(line)["mention_data"]) for line in f)
    kept = sum(t.startswith("B-") for seq in js.labels for t in seq)
    assert kept == n_spans - js.counts["nested_dropped"] - js.counts["span_mismatch"]


# ------------------------------------------------------------------ scoring and windows

def test_seqeval_scores_count_partial_matches_as_errors():
    gold = [["B-dis", "I-dis", "O", "B-sym", "I-sym"], ["B-drug", "O"]]
    pred = [["B-dis", "O", "O", "B-sym", "I-sym"], ["B-sym", "O"]]       # truncated dis, wrong type
    s = ner_scores(gold, pred)
    assert s["precision"] == pytest.approx(1 / 3) and s["recall"] == pytest.approx(1 / 3)
    assert ner_scores(gold, gold)["f1"] == 1.0
    assert ner_scores(gold, [["O"] * 5, ["O"] * 2])["f1"] == 0.0


def test_window_bounds_cover_the_sentence_and_never_cut_an_entity():
    text = "头痛，" * 50 + "急性上呼吸道感染" * 10
    tags = ["O"] * 150 + bio("急性上呼吸道感染" * 10, [(8 * i, 8 * i + 8, "d") for i in range(10)])
    for width, t in ((30, tags), (17, tags), (30, None)):
        w = window_bounds(list(text), width, t)
        assert w[0][0] == 0 and w[-1][1] == len(text)
        assert all(a[1] == b[0] for a, b in zip(w, w[1:]))
        assert all(0 < e - s <= width for s, e in w)
        if t is not None:
            assert all(not t[e].startswith("I-") for _, e in w[:-1])
    # a window ends after punctuation when one is in its last half
    assert all(text[e - 1] == "，" for _, e in window_bounds(list(text[:150]), 30)[:-1])


# ------------------------------------------------------------------ CRF math

def _crf_score(crf, em, y):
    s = crf.start_transitions[y[0]] + crf.end_transitions[y[-1]] + sum(em[t, y[t]] for t in range(len(y)))
    return s + sum(crf.transitions[y[t - 1], y[t]] for t in range(1, len(y)))


@pytest.mark.parametrize("head", ["crf", "bilstm-crf"])
def test_crf_viterbi_and_nll_equal_brute_force(tiny_bert, head):
    from transformers import BertModel

    torch.manual_seed(1)
    enc = BertModel.from_pretrained(str(tiny_bert))
    model = NerTagger(enc, 3, head).eval()
    with torch.no_grad():   # make transitions matter
        for p in (model.crf.transitions, model.crf.start_transitions, model.crf.end_transitions):
            p.normal_(0, 2.0)
    ids = torch.randint(5, 40, (3, 7))
    ids[:, 0] = 2
    lengths = torch.tensor([5, 3, 1])
    att = torch.ones_like(ids)
    labels = torch.randint(0, 3, (3, 5))
    em = model.emissions(ids, att, lengths).detach()
    paths = model.decode(ids, att, lengths)
    nll = []
    for b, n in enumerate(lengths.tolist()):
        scores = {y: float(_crf_score(model.crf, em[b], y).detach()) for y in itertools.product(range(3), repeat=n)}
        assert tuple(paths[b]) == max(scores, key=scores.get)
        log_z = torch.logsumexp(torch.tensor(list(scores.values())), 0)
        nll.append(float(log_z) - scores[tuple(labels[b, :n].tolist())])
    with torch.no_grad():
        assert float(model(ids, att, lengths, labels)) == pytest.approx(np.mean(nll), rel=1e-4)


def test_fc_head_is_argmax_and_frozen_encoder_gets_no_gradient(tiny_bert):
    from transformers import BertModel

    model = NerTagger(BertModel.from_pretrained(str(tiny_bert)), 4, "fc", freeze_encoder=True)
    ids = torch.randint(5, 40, (2, 6))
    lengths = torch.tensor([4, 2])
    model.train()
    assert not model.encoder.training            # feature extraction: no encoder dropout
    loss = model(ids, torch.ones_like(ids), lengths, torch.randint(0, 4, (2, 4)))
    loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.classifier.weight.grad is not None
    em = model.eval().emissions(ids, torch.ones_like(ids), lengths)
    assert model.decode(ids, torch.ones_like(ids), lengths) == [em[0, :4].argmax(-1).tolist(), em[1, :2].argmax(-1).tolist()]


def test_char_token_ids_one_per_character(tiny_bert):
    from keplm.platform.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_bert)
    ids = char_token_ids(list("感冒 A鼻塞"), tok)
    assert len(ids) == 6 and ids[2] == ids[3] == tok.unk_token_id
    assert tok.convert_ids_to_tokens(ids[0]) == "感"


# ------------------------------------------------------------------ augmentation

def test_augmentation_keeps_entities_and_labels_and_changes_other_words(tiny_bert, tmp_path):
    from keplm.models.downstream.augment import augment_ner, write_conll

    ds = toy_set()
    aug = augment_ner(ds, tiny_bert, rate=0.3, seed=0)
    n = len(ds)
    assert len(aug) == 2 * n and aug.sentences[:n] == ds.sentences and aug.counts["augment_generated"] == n
    for orig, tags, new, new_tags in zip(ds.sentences, ds.labels, aug.sentences[n:], aug.labels[n:]):
        assert new_tags == tags and len(new) == len(orig)
        changed = [i for i in range(len(orig)) if new[i] != orig[i]]
        assert changed, "every generated sentence differs from its source"
        assert all(tags[i] == "O" for i in changed)          # entity characters never change
    assert aug.counts["augment_chars_replaced"] >= n
    back = read_conll(write_conll(aug, tmp_path / "aug.txt"))
    assert back.sentences == aug.sentences and back.labels == aug.labels


def test_augmentation_skips_sentences_that_are_all_entity(tiny_bert):
    from keplm.models.downstream.augment import augment_ner

    ds = NerSet([list("感冒")], [["B-d", "I-d"]])
    aug = augment_ner(ds, tiny_bert)
    assert len(aug) == 1 and aug.counts["augment_no_eligible_word"] == 1


# ------------------------------------------------------------------ intrinsic similarity

def test_similarity_queries_follow_appendix_c(tmp_path):
    from rapidfuzz.distance import JaroWinkler

    from keplm.models.downstream.similarity import build_queries

    diseases = ["急性胃炎", "慢性胃炎", "急性肠炎", "慢性肠炎", "胃溃疡", "急性胰腺炎", "高血压", "糖尿病", "肺炎"]
    (tmp_path / "entities.tsv").write_text("name\ttype\n" + "".join(f"{d}\tDisease\n" for d in diseases)
                                           + "头痛\tSymptom\n发热\tSymptom\n", encoding="utf-8")
    (tmp_path / "triples.tsv").write_text("head\trelation\ttail\n急性胃炎\t症状\t头痛\n", encoding="utf-8")
    (tmp_path / "aliases.tsv").write_text("alias\tname\n急性胃粘膜炎\t急性胃炎\n", encoding="utf-8")
    queries, counts = build_queries(tmp_path, n_neg=3, min_jw=0.6, seed=0)
    assert counts["similarity_pairs"] == 1 and len(queries) == 2
    assert {(q.query, q.truth) for q in queries} == {("急性胃粘膜炎", "急性胃炎"), ("急性胃炎", "急性胃粘膜炎")}
    for q in queries:
        assert q.truth not in q.negatives and q.query not in q.negatives
        assert set(q.negatives) <= set(diseases)                   # same type only
        close = [n for n in diseases if n not in (q.query, q.truth) and JaroWinkler.similarity(q.truth, n) > 0.6]
        if len(close) >= 3:
            assert all(JaroWinkler.similarity(q.truth, n) > 0.6 for n in q.negatives)
    assert counts["similarity_fallback_queries"] == sum(
        len([n for n in diseases if n not in (q.query, q.truth) and JaroWinkler.similarity(q.truth, n) > 0.6]) < 3
        for q in queries)


def test_accuracy_at_1_and_mean_pooling_exclude_special_tokens(tiny_bert):
    from transformers import BertModel

    from keplm.models.downstream.similarity import SimilarityQuery, accuracy_at_1, mean_pooled
    from keplm.platform.tokenizer import load_tokenizer

    v = {"q": np.array([1.0, 0.0]), "t": np.array([2.0, 0.1]), "n1": np.array([0.0, 1.0]), "n2": np.array([1.0, 1.0])}
    assert accuracy_at_1([SimilarityQuery("q", "t", ["n1", "n2"])], v) == 1.0
    assert accuracy_at_1([SimilarityQuery("q", "n2", ["t", "n1"])], v) == 0.0
    enc, tok = BertModel.from_pretrained(str(tiny_bert)), load_tokenizer(tiny_bert)
    got = mean_pooled(enc, tok, ["感冒", "糖尿病患者"])
    ids = tok("感冒", return_tensors="pt")
    with torch.no_grad():
        h = enc(**ids).last_hidden_state[0]
    np.testing.assert_allclose(got[0], h[1:-1].mean(0).numpy(), rtol=1e-5, atol=1e-6)


def test_similarity_on_the_demo_kg(tiny_bert):
    from keplm.models.downstream.similarity import evaluate_similarity

    r = evaluate_similarity(tiny_bert, DEMO / "kg", max_queries=40)
    assert r["counts"]["similarity_queries"] == 40 and 0.0 <= r["acc_at_1"] <= 1.0


# ------------------------------------------------------------------ finetuning

def test_finetune_learns_the_toy_set_and_selects_on_dev(tiny_bert):
    ds = toy_set(4)
    cfg = FinetuneConfig(head="crf", epochs=15, lr=5e-3, head_lr=5e-2, batch_size=4, eval_every=3, dropout=0.0,
                         max_seq_len=64)
    r = finetune_ner(tiny_bert, ds, toy_set(), toy_set(), cfg, seed=0)
    assert r["test_f1"] > 0.9, r                                  # a memorisable set must be memorised
    assert r["dev_f1"] == max(h["dev"] for h in r["history"])     # model selection keeps the best dev state
    assert r["dev_f1"] == pytest.approx(r["test_f1"])             # dev == test here, so the kept state scores it
    assert r["steps"] == math.ceil(len(ds) / 4) * 15


def test_proxy_mode_is_deterministic_and_bounded(tiny_bert):
    ds = toy_set(2)
    a = proxy_dev_f1(tiny_bert, ds, toy_set(), steps=4, cfg=FinetuneConfig(batch_size=4, lr=1e-3), seed=3)
    b = proxy_dev_f1(tiny_bert, ds, toy_set(), steps=4, cfg=FinetuneConfig(batch_size=4, lr=1e-3), seed=3)
    assert a == b and 0.0 <= a <= 1.0
    full = finetune_ner(tiny_bert, ds, toy_set(), None, FinetuneConfig(batch_size=4, lr=1e-3, max_steps=4, eval_every=1,
                                                                       dev_subset=200), seed=3)
    assert full["steps"] == 4 and full["dev_f1"] >= a


@pytest.mark.slow
def test_real_ner_sample_beats_trivial_baselines(tmp_path):
    """A tiny random-init BERT (2 layers, d=64, the real 21 K vocab) fine-tuned on 800 cMedQANER sentences.

    Trivial taggers score F1 = 0 (all O) or ~0.01 (tags drawn from the training tag prior; measured below).
    Threshold 0.3: far above both, and reached by memorising frequent entity strings (便秘, 糖尿病, …) —
    what a tiny model can learn in seconds; a broken label/position alignment stays near 0.
    """
    d = need_shared("ner", "cmedqaner")
    vocab = need_shared("vocab", "bert-base-chinese-vocab.txt").read_text(encoding="utf-8").split("\n")
    model_dir = make_tiny_bert(tmp_path / "m", [t for t in vocab if t not in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")],
                               hidden=64)
    train, dev, test = (read_ner(d / f"{s}.txt.gz") for s in ("train", "dev", "test"))
    cfg = FinetuneConfig(head="crf", epochs=3, lr=1e-3, head_lr=1e-2, batch_size=16, max_seq_len=128, train_subset=800)
    r = finetune_ner(model_dir, train, dev, test, cfg, seed=0)
    rng = np.random.default_rng(0)
    prior = [t for seq in train.labels[:800] for t in seq]
    random_f1 = ner_scores(test.labels, [list(rng.choice(prior, len(s))) for s in test.labels])["f1"]
    assert random_f1 < 0.05
    assert r["test_f1"] > 0.3, r


def test_pair_classifier_learns_a_separable_toy_task(tiny_bert):
    """label 1 iff the second question is about a metabolic disease (糖尿病 / 高血压), whatever the first says."""
    from keplm.models.downstream.data import PairSet
    from keplm.models.downstream.finetune import finetune_pairs, pair_scores

    diseases = ["感冒", "糖尿病", "高血压", "咳嗽"]
    ds = PairSet()
    for i, a in enumerate(diseases):
        for j, b in enumerate(diseases):
            ds.first.append(f"{a}怎么治疗")
            ds.second.append(f"{b}要检查什么")
            ds.labels.append(int(b in ("糖尿病", "高血压")))
    ds = PairSet(ds.first * 3, ds.second * 3, ds.labels * 3)
    cfg = FinetuneConfig(epochs=30, lr=5e-3, head_lr=5e-2, batch_size=8, dropout=0.0, max_seq_len=32)
    r = finetune_pairs(tiny_bert, ds, ds, ds, cfg, seed=0)
    assert r["test_f1"] > 0.9 and r["test_accuracy"] > 0.9, r
    assert pair_scores([1, 0, 1, 0], [1, 1, 0, 0]) == {"f1": 0.5, "accuracy": 0.5}
