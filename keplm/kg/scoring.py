"""TransE / TransR as PyKEEN models whose ranking against every entity costs a matrix product per relation.

PyKEEN scores a batch of b (head, relation) pairs against all n entities by broadcasting the interaction over a
(b, n, d) tensor. For TransR that means projecting every entity once per batch row: b·n·d·k multiply-adds
and a (b, n, k) tensor (b = 32, n = 275 K, k = 200: 7 GB), which is what made the evaluation of the real KG's
stage take minutes and that of the SMedBERT KG's size hours. These subclasses score the same function:

* TransR: each relation's projection of all entities, ``clamp(E·M_r)`` (n, k), is computed once, cached while
  no parameter changes (in evaluation), and the scores are the distances of the batch's
  ``clamp(h·M_r) + r`` (or ``clamp(t·M_r) - r``) to those rows: one (b, n) matrix, no (b, n, k) tensor;
* TransE: the distances of ``h + r`` (or ``t - r``) to every entity, likewise one (b, n) matrix.

TransR's ``score_hrt`` (training's positives and negatives) likewise projects each relation's rows of the batch
with one product instead of PyKEEN's per-triple (d, k) gather. Everything else is PyKEEN's own. The scores equal
PyKEEN's up to float rounding (the distances are taken with torch.cdist); tests/test_kg_embed.py checks the
scores, their gradients and the evaluator's metrics against the stock models.
"""

from __future__ import annotations

import torch
from pykeen.models import TransE, TransR
from pykeen.utils import clamp_norm


def _distances(q: torch.Tensor, targets: torch.Tensor, p: int, power_norm: bool) -> torch.Tensor:
    """-||q_i - targets_j||_p (or its p-th power) for every pair: (b, d) x (n, d) -> (b, n)."""
    d = torch.cdist(q.unsqueeze(0), targets.unsqueeze(0), p=float(p)).squeeze(0)
    return -(d ** p) if power_norm else -d


class _AllEntityScoring:
    """score_t / score_h against all entities (no ``tails`` / ``heads`` subset, no slicing, no inductive
    mode) by distances; any other call is PyKEEN's."""

    def _fast(self, slice_size, mode, subset) -> bool:
        return subset is None and mode is None and not (slice_size and slice_size < self.num_entities)

    def score_t(self, hr_batch, *, slice_size=None, mode=None, tails=None):
        if not self._fast(slice_size, mode, tails):
            return super().score_t(hr_batch, slice_size=slice_size, mode=mode, tails=tails)
        return self._rank_scores(hr_batch[:, 0], hr_batch[:, 1], tail_side=True)

    def score_h(self, rt_batch, *, slice_size=None, mode=None, heads=None):
        if not self._fast(slice_size, mode, heads):
            return super().score_h(rt_batch, slice_size=slice_size, mode=mode, heads=heads)
        return self._rank_scores(rt_batch[:, 1], rt_batch[:, 0], tail_side=False)


class RankingTransE(_AllEntityScoring, TransE):
    """PyKEEN's TransE; all-entity scores as -||h + r - e|| (tails) and -||e + r - t|| (heads)."""

    def _rank_scores(self, known: torch.Tensor, relations: torch.Tensor, tail_side: bool) -> torch.Tensor:
        ent = self.entity_representations[0](indices=None)
        r = self.relation_representations[0](indices=relations)
        k = self.entity_representations[0](indices=known)
        q = k + r if tail_side else k - r    # the tail is near h + r; the head near t - r
        return _distances(q, ent, self.interaction.p, self.interaction.power_norm)


class RankingTransR(_AllEntityScoring, TransR):
    """PyKEEN's TransR; all-entity scores per relation from the cached projection of every entity."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._projected: dict[int, torch.Tensor] = {}
        self._projected_key = None

    def _projection(self, relation: int) -> torch.Tensor:
        """clamp(E·M_r) for every entity; cached while the parameters stay as they are (their version counters
        move with every in-place update: optimiser steps and PyKEEN's constraints) and no gradient is wanted."""
        ent_rep, proj_rep = self.entity_representations[0], self.relation_representations[1]
        key = tuple((p.data_ptr(), p._version) for p in (*ent_rep.parameters(), *proj_rep.parameters()))
        cache = not torch.is_grad_enabled()
        if cache and key == self._projected_key and relation in self._projected:
            return self._projected[relation]
        m = proj_rep(indices=torch.tensor([relation], device=self.device))[0]
        inter = self.interaction
        out = clamp_norm(ent_rep(indices=None) @ m, p=inter.p, dim=-1, maxnorm=inter.max_projection_norm)
        if cache:
            if key != self._projected_key:
                self._projected, self._projected_key = {}, key
            self._projected[relation] = out
        return out

    def score_hrt(self, hrt_batch, *, mode=None):
        """PyKEEN's TransR score of each triple (training's positives and negatives), projecting each relation's
        rows with one (rows, d) x (d, k) product instead of gathering a (d, k) matrix per triple: PyKEEN's
        per-triple gather moves batch x d x k floats (a 2,048 batch at d = k = 200: 328 MB) through memory at
        every step, and its backward scatters them back."""
        if mode is not None:
            return super().score_hrt(hrt_batch, mode=mode)
        inter = self.interaction
        rel = hrt_batch[:, 1]
        order = torch.argsort(rel, stable=True)
        ordered = hrt_batch[order]
        relations, counts = torch.unique_consecutive(ordered[:, 1], return_counts=True)
        h = self.entity_representations[0](indices=ordered[:, 0])
        t = self.entity_representations[0](indices=ordered[:, 2])
        r = self.relation_representations[0](indices=ordered[:, 1])
        m = self.relation_representations[1](indices=relations)                 # (relations in the batch, d, k)
        parts = []
        for i, (hs, ts) in enumerate(zip(h.split(counts.tolist()), t.split(counts.tolist()))):
            parts.append((hs @ m[i], ts @ m[i]))
        h_bot = clamp_norm(torch.cat([a for a, _ in parts]), p=inter.p, dim=-1, maxnorm=inter.max_projection_norm)
        t_bot = clamp_norm(torch.cat([b for _, b in parts]), p=inter.p, dim=-1, maxnorm=inter.max_projection_norm)
        x = h_bot + r - t_bot
        scores = -(x.abs() ** inter.p).sum(-1) if inter.power_norm else -x.norm(p=inter.p, dim=-1)
        return scores[torch.argsort(order)].unsqueeze(-1)

    def _rank_scores(self, known: torch.Tensor, relations: torch.Tensor, tail_side: bool) -> torch.Tensor:
        inter = self.interaction
        scores = torch.empty(len(known), self.num_entities, device=self.device)
        for rel in relations.unique().tolist():
            rows = (relations == rel).nonzero().squeeze(1)
            projected = self._projection(rel)
            r = self.relation_representations[0](indices=relations[rows])
            k = projected[known[rows]]
            q = k + r if tail_side else k - r
            scores[rows] = _distances(q, projected, inter.p, inter.power_norm)
        return scores
