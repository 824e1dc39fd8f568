"""Each composite pretraining objective's reduction, pinned by behaviour (docs/loss-reductions.md).

A mean over predictions is unchanged when every prediction is duplicated (the batch, a sentence's tokens,
a sample's mentions); a sum per sentence doubles when a sentence's predictions are doubled. Expected values
are recomputed here from the model's own heads and hidden states, never hard-coded; at init every term is
a cross-entropy of order log C (C classes), so none drowns the MLM under the papers' λ.
"""

import math

import pytest
import torch
from test_embert import TINY, V, make_model_batch
from test_kebiolm import batch as kebiolm_batch
from test_kebiolm import tiny as kebiolm_tiny
from test_models import make_batch as ernie_batch

from keplm.models import KeplmBertConfig, KeplmBertForPreTraining
from keplm.models.embert import EntityObjectives
from keplm.models.kebiolm import bio_targets
from keplm.models.modules import run_bert

ALL = ["cecp", "est", "bem"]


def nll(logits, target):
    """Per-prediction cross-entropy by hand."""
    return -torch.log_softmax(logits.float(), -1).gather(-1, target[:, None]).squeeze(-1)


def twice(b: dict) -> dict:
    """The batch with every sentence duplicated."""
    return {k: torch.cat([v, v]) if torch.is_tensor(v) else v for k, v in b.items()}


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a), torch.as_tensor(b), atol=tol, rtol=0)


# ------------------------------------------------------------------------------------ EMBERT heads


def heads(**kw):
    torch.manual_seed(0)
    return EntityObjectives(KeplmBertConfig(**TINY, entity_objectives=ALL, **kw)).eval()


def head_batch():
    return {
        "cecp_spans": torch.tensor([[[2, 4], [6, 9]], [[3, 5], [1, 1]]]),
        "cecp_labels": torch.tensor([[1, 0], [0, -100]]),
        "seg_labels": torch.tensor([[-100, -100, 0, 1, -100, -100, 0, 0, 1, -100],
                                    [-100, 0, 1, -100, -100, -100, -100, -100, -100, -100]]),
        "bem_anchor": torch.tensor([[[2, 3], [2, 3], [2, 3]], [[4, 5], [0, 0], [0, 0]]]),
        "bem_relative": torch.tensor([[0, 1, 2], [0, 0, 0]]),
        "bem_labels": torch.tensor([[11, 12, 13], [14, -100, -100]]),
    }


def duplicate_targets(b: dict) -> dict:
    """Every replaced entity and every masked BEM token of each sample listed twice."""
    out = dict(b)
    for k in ("cecp_spans", "cecp_labels", "bem_anchor", "bem_relative", "bem_labels"):
        out[k] = torch.cat([b[k], b[k]], dim=1)
    return out


def test_embert_heads_reduce_to_means_over_their_predictions_by_default():
    h = heads()
    assert h.reductions == {"est": "mean", "bem": "mean"}
    torch.manual_seed(1)
    seq, words, b = torch.randn(2, 10, 32), torch.randn(V, 32), head_batch()
    with torch.no_grad():
        got = h(seq, words, b)
        # by hand: one cross-entropy per prediction, then the mean over all of them in the batch
        sel = (b["cecp_labels"] >= 0).nonzero(as_tuple=True)
        cecp = nll(h.cecp_logits(seq, b["cecp_spans"][sel], sel[0]), b["cecp_labels"][sel])
        seg = b["seg_labels"] >= 0
        est = nll(h.est_logits(seq)[seg], b["seg_labels"][seg])
        sel = (b["bem_labels"] >= 0).nonzero(as_tuple=True)
        y = h.bem_states(seq, sel[0], b["bem_anchor"][sel], b["bem_relative"][sel])
        bem = nll(y @ words.T, b["bem_labels"][sel])
    assert (len(cecp), len(est), len(bem)) == (3, 7, 4)
    assert close(got["cecp"], cecp.mean()) and close(got["est"], est.mean()) and close(got["bem"], bem.mean())

    with torch.no_grad():
        batch2 = h(torch.cat([seq, seq]), words, twice(b))                     # every sentence twice
        mentions2 = h(seq, words, duplicate_targets(b))                        # every mention / masked token twice
        long2 = h(torch.cat([seq, seq], 1), words, {"seg_labels": torch.cat([b["seg_labels"]] * 2, 1)})
    for name in ALL:
        assert close(batch2[name], got[name]), name
    for name in ("cecp", "bem"):
        assert close(mentions2[name], got[name]), name
    assert close(long2["est"], got["est"])                                     # a sentence twice as long


def test_embert_sum_switches_are_eq_5_and_8_as_printed():
    h = heads(est_reduction="sum", bem_reduction="sum")
    mean = heads()
    torch.manual_seed(1)
    seq, words, b = torch.randn(2, 10, 32), torch.randn(V, 32), head_batch()
    with torch.no_grad():
        got, ref = h(seq, words, b), mean(seq, words, b)
        n_est, n_bem = int((b["seg_labels"] >= 0).sum()), int((b["bem_labels"] >= 0).sum())
        assert close(got["est"], ref["est"] * n_est / 2) and close(got["bem"], ref["bem"] * n_bem / 2)
        assert close(got["cecp"], ref["cecp"])                                  # eq. 3 is a mean either way
        assert close(h(torch.cat([seq, seq]), words, twice(b))["est"], got["est"])   # averaged over sentences
        long2 = h(torch.cat([seq, seq], 1), words, {"seg_labels": torch.cat([b["seg_labels"]] * 2, 1)})
        assert close(long2["est"], 2 * got["est"])                              # summed over a sentence's tokens
        assert close(h(seq, words, duplicate_targets(b))["bem"], 2 * got["bem"])


def test_unknown_reduction_is_refused():
    with pytest.raises(ValueError, match="est_reduction"):
        heads(est_reduction="max")


# --------------------------------------------------------------------------------- EMBERT model


def embert(**kw):
    torch.manual_seed(0)
    return KeplmBertForPreTraining(KeplmBertConfig(**TINY, entity_objectives=ALL, **kw)).eval()


def test_embert_model_losses_at_init_are_of_order_one_and_none_drowns_mlm():
    model, b = embert(), make_model_batch()
    with torch.no_grad():
        out = model(**b)
        h, seq = model.entity_objectives, out.last_hidden_state
        seg = b["seg_labels"] >= 0
        est = nll(h.est_logits(seq)[seg], b["seg_labels"][seg]).mean()         # from the model's own states
        again = model(**twice(b))
    assert close(out.est_loss, est)
    for name in ("mlm_loss", "sop_loss", "cecp_loss", "est_loss", "bem_loss"):
        assert close(again[name], out[name]), name                              # per prediction, not per batch
    classes = {"mlm_loss": V, "cecp_loss": 2, "est_loss": 2, "bem_loss": V}
    for name, c in classes.items():
        assert abs(out[name].item() - math.log(c)) < 1, (name, out[name].item())
    for name, lam in h.lambdas.items():
        assert lam * out[f"{name}_loss"] < out.mlm_loss, name                  # λ·L under L_MLM at init


def test_embert_reduction_keys_reach_the_model_and_its_checkpoint(tmp_path):
    from transformers import AutoModelForPreTraining

    from keplm.models.setup import ModelConfig, _backbone_kwargs

    cfg = ModelConfig(kind="embert")
    assert (cfg.est_reduction, cfg.bem_reduction) == ("mean", "mean")
    for key in ("est_reduction", "bem_reduction"):
        assert ModelConfig.model_fields[key].description
    kw = _backbone_kwargs(ModelConfig(kind="embert", est_reduction="sum", bem_reduction="sum"), V)
    model = embert(**{k: kw[k] for k in ("est_reduction", "bem_reduction")})
    assert model.entity_objectives.reductions == {"est": "sum", "bem": "sum"}
    model.save_pretrained(tmp_path)
    back = AutoModelForPreTraining.from_pretrained(tmp_path)
    assert back.entity_objectives.reductions == {"est": "sum", "bem": "sum"}
    with pytest.raises(ValueError):
        ModelConfig(kind="embert", bem_reduction="max")


# ------------------------------------------------------------------------------------------ KeBioLM


def kebiolm_reference(m, b):
    """ED and EL recomputed from the l0-th layer's states (before fusion), one cross-entropy per prediction."""
    states = {}

    def keep(h):
        states["h"] = h
        return h

    run_bert(m.bert, b["input_ids"], b["attention_mask"], None, after_layer=m.config.text_layers, hook=keep)
    h = states["h"]
    target = bio_targets(b["mention_spans"], b["mention_mask"], b["attention_mask"])
    real = target >= 0
    ed = nll(m.detect(h)[real], target[real])
    sel = b["mention_mask"].nonzero(as_tuple=True)
    spans, gold = b["mention_spans"][sel], b["mention_entity"][sel]
    proj = m.mention_proj(torch.cat([h[sel[0], spans[:, 0]], h[sel[0], spans[:, 1] - 1]], -1))
    el = nll(proj @ m.entity_emb.T, gold)
    return ed, el


def more_mentions(b: dict) -> dict:
    """Every mention of each sample listed twice."""
    return {**b, **{k: torch.cat([b[k], b[k]], 1) for k in ("mention_spans", "mention_mask", "mention_entity")}}


def padded(b: dict, n: int) -> dict:
    pad = lambda v, x: torch.cat([v, torch.full((v.size(0), n), x, dtype=v.dtype)], 1)  # noqa: E731
    return {**b, "input_ids": pad(b["input_ids"], 0), "attention_mask": pad(b["attention_mask"], 0),
            "labels": pad(b["labels"], -100)}


def test_kebiolm_ed_and_el_are_means_over_tokens_and_mentions():
    m, b = kebiolm_tiny(), kebiolm_batch()
    with torch.no_grad():
        out = m(**b)
        ed, el = kebiolm_reference(m, b)
        assert (len(ed), len(el)) == (18, 3)                      # non-padding tokens, linked mentions
        assert close(out.ed_loss, ed.mean()) and close(out.el_loss, el.mean())
        for other in (m(**twice(b)), m(**more_mentions(b)), m(**padded(b, 5))):
            assert close(other.ed_loss, out.ed_loss) and close(other.el_loss, out.el_loss)
    for value, c in ((out.ed_loss, 3), (out.el_loss, m.config.num_entities)):
        assert abs(value.item() - math.log(c)) < 1
    assert out.ed_loss < out.mlm_loss and out.el_loss < out.mlm_loss


def test_kebiolm_sampled_linking_is_a_mean_over_mentions_too():
    m, b = kebiolm_tiny(el_negatives=5), kebiolm_batch()
    with torch.no_grad():
        torch.manual_seed(3)
        once = m(**b).el_loss
        torch.manual_seed(3)                                      # the same shared negatives
        assert close(m(**more_mentions(b)).el_loss, once)
        torch.manual_seed(3)
        assert close(m(**twice(b)).el_loss, once)


# -------------------------------------------------------------------------------------------- ERNIE


def test_ernie_baseline_is_mean_mlm_plus_mean_sop_only():
    torch.manual_seed(0)
    model = KeplmBertForPreTraining(KeplmBertConfig(**TINY, entity_fusion=True, fusion_layer=1, num_entities=30,
                                                    entity_dim=8)).eval()
    model.load_kg(torch.randn(30, 8))
    b = ernie_batch()
    with torch.no_grad():
        out = model(**b)
        again = model(**twice(b))
    masked = b["labels"] >= 0
    mlm = nll(out.mlm_logits[masked], b["labels"][masked]).mean()
    sop = nll(out.sop_logits, b["sop_label"]).mean()
    assert close(out.mlm_loss, mlm) and close(out.sop_loss, sop) and close(out.loss, mlm + sop)
    assert close(again.mlm_loss, out.mlm_loss) and close(again.sop_loss, out.sop_loss)
    assert abs(out.mlm_loss.item() - math.log(V)) < 1
