"""Loss-balance diagnostics: how hard each weighted loss term pulls on the shared encoder.

A composite objective (MLM + SOP + λ·knowledge terms) helps the model only while no term's gradient
drowns the others in the encoder every term trains through: Adam normalises the summed gradient, so a term
whose gradient is thousands of times MLM's decides every step's direction alone. At a diagnostic step the
training loop takes ``term_gradient_norms`` of the step's first micro-batch — one extra backward pass per
term through the graph the step built (``torch.autograd.grad``: no ``.grad`` is touched, no RNG drawn, so
the trajectory is the one without diagnostics) — logs them as ``grad_norm/<term>`` and warns with
``imbalance_warning``. Between diagnostic steps nothing of this runs.

The model supplies ``loss_weights()`` (term -> λ) and ``shared_parameters()``; this module knows no model.
"""

from __future__ import annotations

import math


def term_gradient_norms(output, weights: dict[str, float], params) -> dict[str, float]:
    """{term: ||∂(λ·term)/∂θ_shared||₂} for every scalar ``*_loss`` field of ``output`` except the total."""
    import torch

    terms = {k: v for k, v in output.items()
             if k.endswith("_loss") and k != "loss" and v is not None and v.dim() == 0 and v.requires_grad}
    norms = {}
    for name, value in terms.items():
        weight = weights.get(name, 1.0)
        if not weight:
            continue
        grads = torch.autograd.grad(weight * value, params, retain_graph=True, allow_unused=True)
        sq = sum(float(g.detach().float().pow(2).sum()) for g in grads if g is not None)
        norms[name] = math.sqrt(sq)
    return norms


def imbalance_warning(norms: dict[str, float], max_ratio: float, reference: str = "mlm_loss") -> str | None:
    """One line naming the terms whose encoder gradient exceeds ``max_ratio`` times the reference term's."""
    ref = norms.get(reference)
    if not ref:
        return None
    over = sorted(((n / ref, name) for name, n in norms.items() if name != reference and n > max_ratio * ref),
                  reverse=True)
    if not over:
        return None
    parts = ", ".join(f"{name} {ratio:.0f}x" for ratio, name in over)
    return (f"loss balance: gradient on the shared encoder relative to {reference}: {parts} (over "
            f"train.diagnostics_max_ratio={max_ratio:g}); these terms steer the optimizer's steps alone — "
            "lower their λ or check their reduction")


def diagnostic_due(step: int, start_step: int, every: int | None, checkpoint_every: int) -> bool:
    """Whether optimizer step ``step`` (1-based) runs the diagnostics: every ``every`` steps (0: never), or,
    unset, the first step of the run (or of a resumed run) and each checkpoint step."""
    if every == 0:
        return False
    if every is not None:
        return step % every == 0
    return step == start_step + 1 or step % checkpoint_every == 0
