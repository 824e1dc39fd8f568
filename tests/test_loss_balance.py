"""Loss-balance diagnostics (keplm.platform.loss_balance): per-term encoder gradient norms, taken without
changing the step, and the warning that names a term drowning MLM."""

import math

import torch

from keplm.platform.loss_balance import diagnostic_due, imbalance_warning, term_gradient_norms
from tests.test_models import kg_model, make_batch, smedbert_config


def test_term_norms_are_each_weighted_terms_encoder_gradient_and_leave_the_step_unchanged():
    torch.manual_seed(0)
    model = kg_model(smedbert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    batch = make_batch()
    params = model.shared_parameters()
    assert params and all(id(p) in {id(q) for q in model.bert.encoder.parameters()} for p in params)
    weights = model.loss_weights()
    assert weights["mnem_loss"] == 2.0 and weights["mmem_loss"] == 4.0 and weights["mlm_loss"] == 1.0

    out = model(**batch)
    norms = term_gradient_norms(out, weights, params)
    assert set(norms) == {"mlm_loss", "sop_loss", "mnem_loss", "mmem_loss"}
    out.loss.backward()
    with_diagnostics = [p.grad.clone() for p in params]

    for name in norms:   # each one by hand: that term alone, weighted, backpropagated into fresh grads
        model.zero_grad()
        single = model(**batch)
        (weights[name] * single[name]).backward()
        by_hand = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params if p.grad is not None))
        assert math.isclose(norms[name], by_hand, rel_tol=1e-5), name

    model.zero_grad()
    model(**batch).loss.backward()   # the step without diagnostics: the same gradients
    assert all(torch.equal(a, p.grad) for a, p in zip(with_diagnostics, params))


def test_the_mean_reduced_mmem_pulls_on_the_encoder_d2_times_mentions_less_than_the_printed_sum():
    """The issue's measurement: at init 4·MMeM as printed (a sum) pulled on the encoder 3,500x harder than MLM."""
    norms = {}
    for reduction in ("mean", "sum"):
        torch.manual_seed(0)
        model = kg_model(smedbert_config(mmem_reduction=reduction, mmem_mentions="all"))
        norms[reduction] = term_gradient_norms(model(**make_batch()), model.loss_weights(), model.shared_parameters())
    mentions_per_sample, d2 = 2, model.config.kg_dim
    assert math.isclose(norms["sum"]["mmem_loss"], norms["mean"]["mmem_loss"] * d2 * mentions_per_sample, rel_tol=1e-5)
    assert math.isclose(norms["sum"]["mlm_loss"], norms["mean"]["mlm_loss"], rel_tol=1e-6)


def test_imbalance_warning_names_only_the_terms_over_the_ratio():
    norms = {"mlm_loss": 0.1, "sop_loss": 0.05, "mnem_loss": 3.45, "mmem_loss": 379.0}
    line = imbalance_warning(norms, 10.0)
    assert "mmem_loss 3790x" in line and "mnem_loss 34x" in line and "sop_loss" not in line
    assert line.index("mmem_loss") < line.index("mnem_loss") and "\n" not in line
    assert imbalance_warning(norms, 5000.0) is None
    assert imbalance_warning({"mnem_loss": 1.0}, 10.0) is None     # no MLM term to compare with


def test_diagnostics_run_at_the_first_step_and_each_checkpoint_unless_told():
    assert [s for s in range(1, 13) if diagnostic_due(s, 0, None, 4)] == [1, 4, 8, 12]
    assert [s for s in range(7, 13) if diagnostic_due(s, 6, None, 4)] == [7, 8, 12]    # a resumed run
    assert [s for s in range(1, 13) if diagnostic_due(s, 0, 5, 4)] == [5, 10]
    assert not any(diagnostic_due(s, 0, 0, 4) for s in range(1, 13))
