"""Length-grouped batches: the same rows and steps, little padding, and every row's loss what it was."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
import torch.nn.functional as F

from keplm.platform.train_loop import length_grouped

# token-axis tensors of a collated batch and what their padding holds
TOKEN_AXIS = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0, "labels": -100, "token_entity": -1,
              "seg_labels": -100}


def batches_of(lengths, batch_size):
    rows = pa.table({"input_ids": [list(range(n)) for n in lengths], "row": list(range(len(lengths)))})
    return [rows.slice(i, batch_size) for i in range(0, len(lengths) - batch_size + 1, batch_size)]


def padding_fraction(batches) -> float:
    real = slots = 0
    for b in batches:
        lengths = pc.list_value_length(b.column("input_ids")).to_numpy()
        real, slots = real + lengths.sum(), slots + lengths.max() * len(lengths)
    return 1 - real / slots


def test_grouping_keeps_every_row_once_and_the_batch_count():
    lengths = np.random.default_rng(0).integers(10, 500, 1000)
    before = batches_of(lengths, 8)
    after = list(length_grouped(iter(before), 16, [3, 1]))
    assert len(after) == len(before) and all(b.num_rows == 8 for b in after)
    rows = lambda bs: sorted(r for b in bs for r in b.column("row").to_pylist())  # noqa: E731
    assert rows(after) == rows(before)
    # each pool of 16 batches holds the rows those 16 batches held (groups never reach across the pool)
    first_pool = {r for b in before[:16] for r in b.column("row").to_pylist()}
    assert {r for b in after[:16] for r in b.column("row").to_pylist()} == first_pool


def test_grouping_is_seeded_and_off_at_one():
    batches = batches_of(np.random.default_rng(1).integers(10, 500, 520), 8)   # 65 batches: a partial last pool
    order = lambda bs: [b.column("row").to_pylist() for b in bs]  # noqa: E731
    a = order(length_grouped(iter(batches), 16, [7, 1]))
    assert a == order(length_grouped(iter(batches), 16, [7, 1]))           # a resumed epoch replays it exactly
    assert a != order(length_grouped(iter(batches), 16, [8, 1]))
    assert order(length_grouped(iter(batches), 1, [7, 1])) == order(batches)
    # the order of the batches is drawn, not a sweep from short to long
    maxima = [max(len(x) for x in b.column("input_ids").to_pylist()) for b in length_grouped(iter(batches), 16, [7, 1])]
    assert maxima[:16] != sorted(maxima[:16])


def test_grouping_cuts_padding_on_a_real_corpus_length_profile():
    # segment lengths shaped like the real corpus prepared with max_seq_len 512 (mean ~360, p10 ~180, p90 ~480)
    rng = np.random.default_rng(2)
    lengths = np.clip(rng.normal(380, 120, 8192), 40, 512).astype(int)
    batches = batches_of(lengths, 64)
    assert padding_fraction(batches) > 0.2
    assert padding_fraction(length_grouped(iter(batches), 64, [0, 1])) <= 0.05


def trim(batch: dict, i: int, n: int) -> dict:
    """Row i of a collated batch on its own, cut to its n real tokens: the batch it would be in alone."""
    return {k: (v[i:i + 1, :n] if k in TOKEN_AXIS else v[i:i + 1]) for k, v in batch.items()}


def extra_padding(batch: dict, pad_id: int, extra: int) -> dict:
    out = dict(batch)
    for k, fill in TOKEN_AXIS.items():
        if k in batch:
            v = batch[k]
            out[k] = torch.cat([v, torch.full((v.shape[0], extra), pad_id if fill is None else fill, dtype=v.dtype)], 1)
    return out


def row_mlm_losses(out, batch) -> torch.Tensor:
    """Each row's MLM loss (mean over its masked tokens), fp32."""
    ce = F.cross_entropy(out.mlm_logits.float().transpose(1, 2), batch["labels"], ignore_index=-100, reduction="none")
    return ce.sum(1) / (batch["labels"] >= 0).sum(1).clamp(min=1)


@pytest.mark.parametrize("kind", ["mlm", "smedbert", "kebiolm", "embert", "ernie"])
def test_each_rows_loss_is_the_same_however_much_its_batch_pads(kind, demo_prepared, demo_stages):
    from keplm import config
    from keplm.models.data import read_shards
    from keplm.models.setup import build_pretraining_setup

    tiny = ["model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
            "model.intermediate_size=64", "model.max_position_embeddings=256", "batches.max_seq_len=128", "batches.k=5",
            "batches.num_negatives=3", "model.top_k_entities=8"]
    cfg = config.load(None, [f"model.kind={kind}", *tiny])
    torch.manual_seed(0)
    setup = build_pretraining_setup(cfg.model, cfg.batches, demo_prepared, demo_stages / "nb", demo_stages / "transr",
                                    graph_dir=demo_stages / "g")
    model = setup.model.eval()   # no dropout: the same row gives the same numbers
    rows = sorted(read_shards(demo_prepared, 200), key=lambda r: len(r["input_ids"]))
    rows = [r for r in rows if r["mentions"]]
    batch = setup.collator([rows[0], rows[len(rows) // 3], rows[-1]])   # a short, a middling and a long row
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths[0] < lengths[2] and (batch["labels"] >= 0).sum(1).min() > 0

    with torch.no_grad():
        torch.manual_seed(1)
        out = model(**batch)
        # the whole batch with 40 more padding columns: every loss term as before
        torch.manual_seed(1)
        padded = model(**extra_padding(batch, setup.tokenizer.pad_token_id, 40))
        for k, v in out.items():
            if k.endswith("loss") and v is not None:
                assert torch.allclose(padded[k], v, atol=1e-5, rtol=0), k
        real = batch["attention_mask"].bool()
        assert torch.allclose(padded.last_hidden_state[:, :real.shape[1]][real], out.last_hidden_state[real], atol=1e-5)
        # each row alone, without padding: its hidden states, MLM loss and SOP logits as in the mixed batch
        losses = row_mlm_losses(out, batch)
        for i, n in enumerate(lengths):
            alone_batch = trim(batch, i, n)
            torch.manual_seed(1)
            alone = model(**alone_batch)
            assert torch.allclose(alone.last_hidden_state[0], out.last_hidden_state[i, :n], atol=1e-5), i
            assert torch.allclose(row_mlm_losses(alone, alone_batch)[0], losses[i], atol=1e-5), i
            assert torch.allclose(alone.sop_logits[0], out.sop_logits[i], atol=1e-5), i
