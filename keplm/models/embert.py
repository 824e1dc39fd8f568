"""EMBERT's entity objectives (Cai et al.; seed 001 §3 and Appendix) as plug-ins for any keplm backbone.

``entity_objectives`` in a model's config (any of ``cecp``, ``est``, ``bem``) adds the heads below on the
encoder output; ``model.kind=embert`` is the plain BERT backbone with all three. The same heads sit on
SMedBERT, the ERNIE baseline or KeBioLM when their config lists them, so objectives compose on one
backbone. Batches come from :class:`EntityTasks` in the collator.

- **Context-entity consistency prediction** (eq. 1-3): a linked mention is replaced by a synonym (another
  name or alias of the same entity: aliases.tsv and the KG's "same as" triples) — consistent, label 1 —
  or by a random entity's name — inconsistent, label 0. ``h_i = [x_{s_i-1}; x_{e_i+1}]`` (the tokens just
  outside the entity), ``y_i = LN(GELU(W1 h_i))``, ``p = softmax(W2 y_i)``; the loss is the mean over
  the replaced entities.
- **Entity segmentation** (eq. 4-5): inside every linked mention the last token of each sub-entity
  (``keplm.kg.segment``) is labelled 1, the other tokens 0, tokens outside mentions are ignored;
  ``y_t = tanh(W3 LN(GELU(W4 x_t)) + b)``, ``p = softmax(W5 y_t)``.
- **Bidirectional entity masking** (eq. 6-9): a long mention's adjective term or its atomic term is
  replaced by [MASK]; each masked token j is predicted from the other term's first and last output states
  and a ``bem_position_dim`` (200) relative position embedding ``p_{j-s}`` (s = start of the masked
  term, clipped at ``bem_max_relative − 1``) through the 2-layer FFN
  ``y = LN(GELU(W7 LN(GELU(W6 [x_s; x_e; p]))))``, scored against the input word embeddings
  (eq. 8, no bias). Each long mention is masked in one direction drawn at random, so both directions
  are trained; L_bem = L^ato + L^adj (eq. 9).
- Loss (eq. 10): ``L_ex + λ1·L_cecp + λ2·L_est + λ3·L_bem``, λ = (2, 2, 0.5).

Reductions (docs/loss-reductions.md), each a cross-entropy in nats per prediction, like L_ex's MLM:

- **CECP**: the mean over the batch's replaced entities — eq. 3 as printed (Σ_i …/N, N entities).
- **EST** (``est_reduction``): ``mean`` (default) over the batch's labelled entity tokens. Eq. 5 prints a
  bare sum over a sentence's tokens, but the text computes the loss "similar to token-level masked
  language modeling" (a mean) and gives it λ2 = 2 next to L_ex: summed, it grows with every sentence's
  entity tokens (≈ 17 against MLM's 6.5 in the demo, ×2) and drowns L_ex. ``sum``: eq. 5 as printed,
  summed per sentence, averaged over the batch's sentences.
- **BEM** (``bem_reduction``): ``mean`` (default) over the batch's masked entity tokens, both directions
  together, so eq. 9's L^ato + L^adj keeps its sum over one count. Eq. 8 sums over a term's tokens, again
  "similar to MLM"; summed it grows with long mentions per sentence (≈ 20 in the demo). ``sum``: eq. 8-9 as
  printed, summed per sentence, averaged over sentences.

Tokens of replaced or bidirectionally masked mentions are left out of the MLM's choice, so each of them is
predicted by one objective only.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from keplm.kg.segment import EntitySegmenter, adjective_atomic
from keplm.platform.errors import KeplmError

OBJECTIVES = ("cecp", "est", "bem")
REDUCTIONS = ("mean", "sum")
DEFAULTS = {"entity_objectives": (), "lambda_cecp": 2.0, "lambda_est": 2.0, "lambda_bem": 0.5,
            "bem_position_dim": 200, "bem_max_relative": 32, "est_reduction": "mean", "bem_reduction": "mean"}
CONSISTENT, INCONSISTENT = 1, 0


def setting(config, name: str):
    """An EMBERT setting of a model config (any keplm config; absent in checkpoints written before EMBERT)."""
    return getattr(config, name, DEFAULTS[name])


class EntityObjectives(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.names = tuple(setting(config, "entity_objectives"))
        unknown = set(self.names) - set(OBJECTIVES)
        if unknown:
            raise ValueError(f"unknown entity objectives {sorted(unknown)}; known: {OBJECTIVES}")
        h, eps = config.hidden_size, config.layer_norm_eps
        self.lambdas = {n: float(setting(config, f"lambda_{n}")) for n in OBJECTIVES}
        self.reductions = {n: setting(config, f"{n}_reduction") for n in ("est", "bem")}
        for n, how in self.reductions.items():
            if how not in REDUCTIONS:
                raise ValueError(f"{n}_reduction must be one of {REDUCTIONS}, got {how!r}")
        if "cecp" in self.names:
            self.cecp_w1 = nn.Linear(2 * h, h)
            self.cecp_ln = nn.LayerNorm(h, eps=eps)
            self.cecp_w2 = nn.Linear(h, 2)
        if "est" in self.names:
            self.est_w4 = nn.Linear(h, h)
            self.est_ln = nn.LayerNorm(h, eps=eps)
            self.est_w3 = nn.Linear(h, h)                  # its bias is b of eq. 4
            self.est_w5 = nn.Linear(h, 2)
        if "bem" in self.names:
            p = int(setting(config, "bem_position_dim"))
            self.max_relative = int(setting(config, "bem_max_relative"))
            self.bem_position = nn.Embedding(self.max_relative, p)
            self.bem_w6 = nn.Linear(2 * h + p, h)
            self.bem_ln6 = nn.LayerNorm(h, eps=eps)
            self.bem_w7 = nn.Linear(h, h)
            self.bem_ln7 = nn.LayerNorm(h, eps=eps)

    def cecp_logits(self, seq, spans, rows):
        h = torch.cat([seq[rows, spans[:, 0] - 1], seq[rows, spans[:, 1]]], dim=-1)      # eq. 2: x_{s-1}, x_{e+1}
        return self.cecp_w2(self.cecp_ln(F.gelu(self.cecp_w1(h))))

    def est_logits(self, seq):
        return self.est_w5(torch.tanh(self.est_w3(self.est_ln(F.gelu(self.est_w4(seq))))))  # eq. 4

    def bem_states(self, seq, rows, anchor, relative):
        p = self.bem_position(relative.clamp(0, self.max_relative - 1))
        h0 = torch.cat([seq[rows, anchor[:, 0]], seq[rows, anchor[:, 1]], p], dim=-1)       # eq. 7
        return self.bem_ln7(F.gelu(self.bem_w7(self.bem_ln6(F.gelu(self.bem_w6(h0))))))

    def bem_inputs(self, seq: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """BEM's states y (eq. 7) of the batch's masked entity tokens and their targets; None without any.
        For a model that scores them against the word embeddings in its MLM decoder's GEMM (``bem`` of
        :meth:`forward`)."""
        target = batch.get("bem_labels")
        if "bem" not in self.names or target is None or not bool((target >= 0).any()):
            return None
        sel = (target >= 0).nonzero(as_tuple=True)
        return self.bem_states(seq, sel[0], batch["bem_anchor"][sel], batch["bem_relative"][sel]), target[sel]

    def forward(self, seq: torch.Tensor, word_embeddings: torch.Tensor, batch: dict,
                bem: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """-> {name: unweighted loss} for the objectives that have targets in this batch. ``bem``: BEM's eq. 8
        logits (y·Γpᵀ) and targets when the model has already scored :meth:`bem_inputs`."""
        out: dict[str, torch.Tensor] = {}
        n_sent = seq.size(0)
        labels = batch.get("cecp_labels")
        if "cecp" in self.names and labels is not None and bool((labels >= 0).any()):
            sel = (labels >= 0).nonzero(as_tuple=True)
            logits = self.cecp_logits(seq, batch["cecp_spans"][sel], sel[0])
            out["cecp"] = F.cross_entropy(logits.float(), labels[sel])                           # eq. 3
        seg = batch.get("seg_labels")
        if "est" in self.names and seg is not None and bool((seg >= 0).any()):
            sel = seg >= 0                                                 # entity tokens; the rest is ignored
            logits = self.est_logits(seq[sel])
            out["est"] = self.reduce("est", F.cross_entropy(logits.float(), seg[sel], reduction="none"), n_sent)  # eq. 5
        if bem is None and (inputs := self.bem_inputs(seq, batch)) is not None:
            bem = inputs[0] @ word_embeddings.T, inputs[1]                                       # eq. 8
        if bem is not None:
            logits, target = bem
            out["bem"] = self.reduce("bem", F.cross_entropy(logits.float(), target, reduction="none"), n_sent)  # eq. 8-9
        return out

    def reduce(self, name: str, nll: torch.Tensor, n_sent: int) -> torch.Tensor:
        """Per-token losses -> ``mean`` over the batch's tokens, or ``sum`` per sentence averaged over sentences."""
        return nll.mean() if self.reductions[name] == "mean" else nll.sum() / n_sent

    def weighted(self, losses: dict[str, torch.Tensor]) -> list[tuple[float, torch.Tensor]]:
        return [(self.lambdas[n], v) for n, v in losses.items()]


def objectives_for(config) -> EntityObjectives | None:
    return EntityObjectives(config) if setting(config, "entity_objectives") else None


def apply_objectives(model, seq: torch.Tensor, batch: dict,
                     bem: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[list, dict[str, torch.Tensor]]:
    """The model's entity objectives on its encoder output: (weighted terms for add_losses, {name_loss: value});
    ``bem``: see :meth:`EntityObjectives.forward`."""
    heads = getattr(model, "entity_objectives", None)
    if heads is None:
        return [], {}
    losses = heads(seq, model.bert.embeddings.word_embeddings.weight, batch, bem)
    return heads.weighted(losses), {f"{k}_loss": v for k, v in losses.items()}


# ---------------------------------------------------------------------------------------------- data


class EntityTasks:
    """The token-level thesaurus and segmentation the collator needs for the EMBERT objectives.

    ``surfaces[e]``: the token-id tuples of entity e's name and aliases; ``pieces[surface]``: the token
    lengths of its sub-entities (one entry: a short entity).
    """

    def __init__(self, surfaces: dict[int, list[tuple[int, ...]]], pieces: dict[tuple[int, ...], tuple[int, ...]],
                 counts: Counter | None = None):
        self.surfaces = surfaces
        self.pieces = pieces
        self.entities = np.array(sorted(surfaces), np.int64)
        self.counts = counts or Counter()

    @classmethod
    def build(cls, graph_dir: str | Path, tokenizer, segment_cfg=None) -> EntityTasks:
        import pyarrow.parquet as pq

        d = Path(graph_dir)
        try:
            names = pq.read_table(d / "entities.parquet", columns=["id", "name"]).to_pydict()
            aliases = pq.read_table(d / "aliases.parquet").to_pydict()
        except OSError as exc:
            raise KeplmError(f"{d}: EMBERT's objectives need a `keplm kg build` output (entities, aliases) ({exc})") from None
        pairs = list(zip(names["name"], names["id"])) + list(zip(aliases["alias"], aliases["entity"]))
        seg = EntitySegmenter([p for p, _ in pairs], segment_cfg)
        counts: Counter = Counter()
        surfaces: dict[int, list[tuple[int, ...]]] = {}
        pieces: dict[tuple[int, ...], tuple[int, ...]] = {}
        for text, entity in pairs:
            ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
            if not ids:
                counts["surfaces_untokenizable"] += 1
                continue
            surfaces.setdefault(int(entity), [])
            if ids not in surfaces[int(entity)]:
                surfaces[int(entity)].append(ids)
            parts = seg.segment(text)
            lengths = tuple(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in parts)
            if sum(lengths) != len(ids):             # wordpieces across a cut: keep the entity whole
                counts["segments_token_mismatch"] += 1
                lengths = (len(ids),)
            pieces.setdefault(ids, lengths)
        counts.update({f"segment_{k}": v for k, v in seg.counts.items()})
        return cls(surfaces, pieces, counts)

    def segment(self, surface: tuple[int, ...]) -> tuple[int, ...]:
        return self.pieces.get(surface) or (len(surface),)

    def replace(self, ids: list[int], mentions: list[tuple[int, int, int]], rate: float, rng: np.random.Generator,
                stats: Counter) -> tuple[list[int], list[tuple[int, int, int, int]]]:
        """Context-entity consistency corruption of one row (token spans, [CLS] at 0).

        Each mention is chosen with probability ``rate``; a chosen one becomes, with probability 1/2, a
        synonym of its entity (consistent; the original stays when the entity has no other surface, still
        consistent) or a random other entity's name (inconsistent; its entity id becomes that entity's).
        -> (ids, mentions as (start, end, entity, label)), label −100 for mentions not chosen.
        """
        out_ids: list[int] = []
        out_ms: list[tuple[int, int, int, int]] = []
        last = 0
        for s, e, ent in mentions:
            if s < last:                                 # overlaps the previous mention: the linker makes none
                stats["cecp_overlapping_mentions_dropped"] += 1
                continue
            out_ids.extend(ids[last:s])
            surface, label = tuple(ids[s:e]), -100
            if rate > 0 and rng.random() < rate:
                if rng.random() < 0.5:
                    label = CONSISTENT
                    others = [x for x in self.surfaces.get(ent, []) if x != surface]
                    if others:
                        surface = others[rng.integers(len(others))]
                        stats["cecp_synonym"] += 1
                    else:
                        stats["cecp_kept_no_synonym"] += 1
                elif len(self.entities) > 1:
                    label = INCONSISTENT
                    other = ent
                    while other == ent:
                        other = int(self.entities[rng.integers(len(self.entities))])
                    choices = self.surfaces[other]
                    surface, ent = choices[rng.integers(len(choices))], other
                    stats["cecp_random"] += 1
            start = len(out_ids)
            out_ids.extend(surface)
            out_ms.append((start, len(out_ids), ent, label))
            last = e
        out_ids.extend(ids[last:])
        return out_ids, out_ms

    def annotate(self, ids: np.ndarray, mentions, bem_rate: float, mask_id: int, rng: np.random.Generator,
                 stats: Counter) -> tuple[dict, np.ndarray]:
        """Segmentation labels, CECP spans and bidirectional masking of one row (after SOP; masks ``ids`` in place).

        -> (per-row targets, tokens the MLM must not choose)."""
        n = len(ids)
        seg = np.full(n, -100, np.int64)
        exclude = np.zeros(n, bool)
        cecp, bem = [], []
        for s, e, _, label in mentions:
            lengths = self.segment(tuple(int(x) for x in ids[s:e]))
            seg[s:e] = 0
            seg[s + np.cumsum(lengths) - 1] = 1
            if label >= 0:
                cecp.append((s, e, label))
                exclude[s:e] = True
            elif (terms := adjective_atomic(lengths)) is not None and bem_rate > 0 and rng.random() < bem_rate:
                cut = s + sum(terms[0])                          # adjective [s, cut), atomic [cut, e)
                (ms, me), (os_, oe) = ((cut, e), (s, cut)) if rng.random() < 0.5 else ((s, cut), (cut, e))
                stats["bem_atomic_masked" if ms == cut else "bem_adjective_masked"] += 1
                for j in range(ms, me):
                    bem.append((j, os_, oe - 1, j - ms, int(ids[j])))
                ids[ms:me] = mask_id
                exclude[s:e] = True
        return {"seg": seg, "cecp": cecp, "bem": bem}, exclude


def entity_task_tensors(rows: list[dict], t: int) -> dict[str, torch.Tensor]:
    """Pad the per-row targets of :meth:`EntityTasks.annotate` into batch tensors."""
    b = len(rows)
    c = max(max(len(r["cecp"]) for r in rows), 1)
    p = max(max(len(r["bem"]) for r in rows), 1)
    out = {
        "seg_labels": torch.full((b, t), -100, dtype=torch.long),
        "cecp_spans": torch.ones((b, c, 2), dtype=torch.long),
        "cecp_labels": torch.full((b, c), -100, dtype=torch.long),
        "bem_positions": torch.zeros((b, p), dtype=torch.long),
        "bem_anchor": torch.zeros((b, p, 2), dtype=torch.long),
        "bem_relative": torch.zeros((b, p), dtype=torch.long),
        "bem_labels": torch.full((b, p), -100, dtype=torch.long),
    }
    for i, r in enumerate(rows):
        out["seg_labels"][i, :len(r["seg"])] = torch.from_numpy(r["seg"])
        for j, (s, e, label) in enumerate(r["cecp"]):
            out["cecp_spans"][i, j] = torch.tensor([s, e])
            out["cecp_labels"][i, j] = label
        for j, (pos, a0, a1, rel, target) in enumerate(r["bem"]):
            out["bem_positions"][i, j] = pos
            out["bem_anchor"][i, j] = torch.tensor([a0, a1])
            out["bem_relative"][i, j] = rel
            out["bem_labels"][i, j] = target
    return out
