"""Pretraining batches: SOP, masking (token and whole-entity), mentions, neighbours, Q sampling."""

import numpy as np
import pytest
import torch

from keplm.models.data import KnowledgeCollator, KnowledgeIndex, read_shards

CLS, SEP, MASK, PAD, V = 1, 2, 3, 0, 100


def index():
    # 6 entities, types 0/1; entity 0 has 3 ranked neighbours, 1 has 1, the others none
    return KnowledgeIndex(
        offsets=np.array([0, 3, 4, 4, 4, 4, 4]), neighbour=np.array([1, 2, 3, 0]), relation=np.array([0, 1 + 2, 1, 0 + 2]),
        entity_type=np.array([0, 0, 1, 1, 1, 0]), type_names=["Disease", "Symptom"], num_relations=2,
        freq=np.array([5.0, 0.0, 9.0, 1.0, 0.0, 3.0]))


def row(n=20, mentions=((2, 5, 0), (8, 10, 1))):
    ids = [CLS, *range(10, 10 + n), SEP]
    return {"input_ids": ids, "mentions": [{"token_start": s, "token_end": e, "entity": x} for s, e, x in mentions]}


def collator(**kw):
    args = dict(knowledge=index(), k=2, num_negatives=4, max_seq_len=64, seed=0)
    args.update(kw)
    return KnowledgeCollator(CLS, SEP, MASK, PAD, V, **args)


def restored(batch, i):
    ids = batch["input_ids"][i].clone()
    lab = batch["labels"][i]
    return torch.where(lab >= 0, lab, ids)


def test_sop_keeps_tokens_and_moves_mentions_with_them():
    col = collator(mask_rate=0.15)
    r = row()
    swaps = set()
    for _ in range(20):
        b = col([r])
        ids = restored(b, 0)[: int(b["attention_mask"][0].sum())].tolist()
        assert ids[0] == CLS and ids[-1] == SEP and ids.count(SEP) == 2
        cut = ids.index(SEP)
        a, bb = ids[1:cut], ids[cut + 1:-1]
        swapped = bool(b["sop_label"][0])
        swaps.add(swapped)
        assert (bb + a if swapped else a + bb) == r["input_ids"][1:-1]
        types = b["token_type_ids"][0][: len(ids)].tolist()
        assert types == [0] * (cut + 1) + [1] * (len(ids) - cut - 1)
        for j in range(2):
            s, e = b["mention_spans"][0, j].tolist()
            orig = [m for m in r["mentions"] if m["entity"] == int(b["mention_entity"][0, j])][0]
            assert ids[s:e] == r["input_ids"][orig["token_start"]:orig["token_end"]]
            assert (b["token_entity"][0, s:e] == b["mention_entity"][0, j]).all()
    assert swaps == {True, False}


def test_short_segment_has_no_sop_pair():
    b = collator()([row(n=3, mentions=())])
    assert int(b["sop_label"][0]) == -100 and b["token_type_ids"].sum() == 0
    assert not b["mention_mask"].any()


def test_masking_rate_and_80_10_10():
    col = collator(mask_rate=0.15, sop=False, knowledge=None, max_seq_len=256)
    rows = [row(n=100, mentions=())] * 200
    b = col(rows)
    labelled = b["labels"] >= 0
    assert (labelled.sum(1) == 15).all()          # round(0.15 x 100) per sample, exactly
    masked = (b["input_ids"] == MASK) & labelled
    kept = (b["input_ids"] == b["labels"]) & labelled
    n = labelled.sum().item()
    assert abs(masked.sum().item() / n - 0.8) < 0.03
    assert abs(kept.sum().item() / n - 0.1) < 0.03 + 0.01  # 10 % kept, plus random draws that hit the same id


def test_whole_entity_masking_masks_mentions_whole():
    col = collator(mask_rate=0.3, sop=False, whole_entity_masking=True)
    b = col([row(n=20, mentions=((2, 5, 0), (8, 10, 1)))] * 50)
    lab = b["labels"] >= 0
    # budget 6: both mentions (3 + 2 tokens) always fit, so each is chosen whole
    assert lab[:, 2:5].all() and lab[:, 8:10].all()
    plain = collator(mask_rate=0.3, sop=False)([row(n=20)] * 50)["labels"] >= 0
    assert not plain[:, 2:5].all()


def test_neighbours_are_a_prefix_with_inverse_relations_and_typed_negatives():
    col = collator(k=2, num_negatives=4, sop=False)
    b = col([row()])
    assert b["neighbour_ids"][0, 0].tolist() == [1, 2]           # first 2 of entity 0's ranked 3
    assert b["neighbour_relation"][0, 0].tolist() == [0, 3]      # 3 = relation 1 seen inverse (1 + R)
    assert b["neighbour_mask"][0, 1].tolist() == [True, False]   # entity 1 has one neighbour: padded
    assert col.stats["mentions_short_of_k"] == 1
    kn = index()
    ntype = kn.entity_type[b["neighbour_ids"].numpy()]
    assert (b["neighbour_type"].numpy() == ntype).all()
    neg_types = kn.entity_type[b["negative_ids"].numpy()]
    assert (neg_types == ntype[..., None]).all()                 # negatives come from the positive's type
    np.testing.assert_allclose(b["log_q_pos"].numpy(), kn.log_q[b["neighbour_ids"].numpy()], rtol=1e-6)


def test_q_is_frequency_over_type_total_add_one():
    kn = index()
    # type 0 = entities 0, 1, 5 with t = 5, 0, 3: Q = (t + 1) / (8 + 3)
    np.testing.assert_allclose(np.exp(kn.log_q[[0, 1, 5]]), np.array([6, 1, 4]) / 11)
    draws = kn.sample_negatives(np.zeros(40_000, int), 1, np.random.default_rng(0)).ravel()
    freq = np.bincount(draws, minlength=6)[[0, 1, 5]] / len(draws)
    np.testing.assert_allclose(freq, np.array([6, 1, 4]) / 11, atol=0.01)


def test_over_long_rows_are_cut_and_counted():
    col = collator(sop=True, max_seq_len=16)
    b = col([row(n=20, mentions=((2, 5, 0), (12, 14, 1), (13, 15, 1)))])  # inner limit 13: the third ends at 14
    assert b["input_ids"].shape[1] == 16
    assert col.stats["tokens_cut_by_length"] == 20 - 13 and col.stats["mentions_cut_by_length"] == 1


def test_mentions_over_the_limit_are_counted():
    col = collator(max_mentions=1, sop=False)
    b = col([row()])
    assert b["mention_mask"].sum() == 1 and col.stats["mentions_truncated"] == 1


def test_collated_demo_batch_feeds_smedbert(demo_prepared, tmp_path, ray_local):
    from keplm.kg.graph import GraphConfig, build_graph
    from keplm.kg.pepr import PEPRConfig, run_neighbours
    from keplm.models import SMedBertConfig, SMedBertForPreTraining
    from keplm.platform.tokenizer import load_tokenizer
    from conftest import DEMO

    build_graph(DEMO / "kg", tmp_path / "g", GraphConfig(), {}, corpus_dir=demo_prepared)
    cfg = PEPRConfig(num_actors=1, actor_num_cpus=0.5)
    run_neighbours(tmp_path / "g", tmp_path / "nb", cfg, {})
    kn = KnowledgeIndex.load(tmp_path / "nb")
    tok = load_tokenizer(demo_prepared / "tokenizer")
    col = KnowledgeCollator(tok.cls_token_id, tok.sep_token_id, tok.mask_token_id, tok.pad_token_id, len(tok),
                            knowledge=kn, whole_entity_masking=True, k=5, num_negatives=3, max_seq_len=128)
    batch = col(read_shards(demo_prepared, 8))
    assert batch["mention_mask"].any() and batch["neighbour_mask"].any()
    model = SMedBertForPreTraining(SMedBertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, num_entities=kn.num_entities, num_relations=kn.num_relations,
        num_entity_types=len(kn.type_names), kg_dim=16))
    out = model(**batch)
    assert all(torch.isfinite(out[k]) for k in ("mlm_loss", "sop_loss", "mnem_loss", "mmem_loss"))


@pytest.mark.parametrize("rate", [0.075, 0.25])
def test_corruption_rate_is_configurable(rate):
    b = collator(mask_rate=rate, sop=False, knowledge=None, max_seq_len=256)([row(n=200, mentions=())])
    assert int((b["labels"] >= 0).sum()) == round(rate * 200)


@pytest.mark.parametrize("kind", ["smedbert", "mlm", "wem", "ernie"])
def test_setup_from_config_and_stage_outputs(kind, demo_prepared, demo_stages):
    from keplm import config
    from keplm.models.setup import build_pretraining_setup

    root = demo_stages
    tiny = ["model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
            "model.intermediate_size=64", "model.max_position_embeddings=128", "batches.k=5", "batches.num_negatives=3"]
    cfg = config.load(None, [f"model.kind={kind}", *tiny])
    setup = build_pretraining_setup(cfg.model, cfg.batches, demo_prepared, root / "nb", root / "transr")
    assert setup.collator.whole_entity_masking == (kind in ("smedbert", "wem"))
    assert setup.model.config.model_type == ("smedbert" if kind == "smedbert" else "keplm_bert")
    if kind == "smedbert":
        assert setup.model.config.kg_dim == 16 and setup.model.config.kg_relation_dim == 8
    batch = setup.collator(read_shards(demo_prepared, 4))
    out = setup.model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_setup_starts_the_backbone_from_a_local_checkpoint(demo_prepared, tmp_path):
    from transformers import BertConfig, BertModel

    from keplm import config
    from keplm.models.setup import build_pretraining_setup
    from keplm.platform.errors import KeplmError
    from keplm.platform.tokenizer import load_tokenizer

    vocab = len(load_tokenizer(str(demo_prepared / "tokenizer")))
    BertModel(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(tmp_path / "ckpt")
    cfg = config.load(None, ["model.kind=mlm", f"model.init={tmp_path / 'ckpt'}"])
    setup = build_pretraining_setup(cfg.model, cfg.batches, demo_prepared)
    ref = BertModel.from_pretrained(tmp_path / "ckpt")
    assert setup.model.config.hidden_size == 32
    assert torch.equal(setup.model.bert.encoder.layer[1].output.dense.weight, ref.encoder.layer[1].output.dense.weight)
    BertModel(BertConfig(vocab_size=vocab + 5, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "other")
    with pytest.raises(KeplmError, match="vocab_size"):
        build_pretraining_setup(config.load(None, ["model.kind=mlm", f"model.init={tmp_path / 'other'}"]).model,
                                cfg.batches, demo_prepared)
    with pytest.raises(KeplmError, match="needs --neighbours"):
        build_pretraining_setup(config.load(None, ["model.kind=smedbert"]).model, cfg.batches, demo_prepared)
