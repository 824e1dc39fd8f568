"""Pretraining batches: prepare shards + PEPR neighbours -> the tensors SMedBERT and the baselines take.

A row is one shard row (``input_ids`` with [CLS]/[SEP], ``mentions`` with token spans and entity ids).
:class:`KnowledgeCollator` turns a list of rows into a batch:

- **SOP** (ALBERT's sentence-order prediction): the segment's tokens are cut into A and B at the token
  boundary nearest the middle that splits no mention; ``[CLS] A [SEP] B [SEP]`` (label 0) or, with
  probability 1/2, ``[CLS] B [SEP] A [SEP]`` (label 1); segments under ``min_sop_tokens`` get label −100.
- **Masking**: ``mask_rate`` (default 15 %) of the non-special tokens are chosen, each replaced 80/10/10 by
  [MASK] / a random token / itself; ``labels`` hold the original id there and −100 elsewhere. With
  ``whole_entity_masking`` (SMedBERT's masked mentions for MMeM, MC-BERT's whole-entity masking) whole
  linked mentions are chosen first, in random order, while they fit the budget; single tokens fill the rest.
- **Length**: rows longer than ``max_seq_len`` (with the SOP's extra [SEP]) lose their last tokens, counted
  in ``stats['tokens_cut_by_length']``; mentions in the cut part in ``stats['mentions_cut_by_length']``.
- **Mentions**: token spans (after the SOP shift), up to ``max_mentions`` per sample; further mentions
  are dropped and counted (``stats['mentions_truncated']``).
- **Neighbours**: each mention entity's top-``k`` PEPR neighbours (a prefix of neighbours.parquet's
  k_max) with relation ids (``r + R`` when the triple is (neighbour, r, entity): the inverse relation) and
  entity type ids; fewer than k are padded and masked (``stats['mentions_short_of_k']``).
- **Negatives** for Masked Neighbor Modeling: ``num_negatives`` per positive neighbour, drawn from
  Q(e) = t_e / C_τ within the positive's type τ (SMedBERT App. B), add-one smoothed
  (Q(e) = (t_e + 1) / (C_τ + n_τ)) so that entities never seen in the corpus have a finite log Q;
  ``log_q_pos`` / ``log_q_neg`` carry log Q for the correction of eq. 19.
- ``token_entity``: the linked entity id of every token inside a mention (−1 elsewhere), for ERNIE fusion.
- **EMBERT targets** (with ``entity_tasks``, see keplm.models.embert): before SOP, ``cecp_rate`` of the
  mentions are replaced by a synonym or a random entity; after it, segmentation labels for every mention
  and, for ``bem_rate`` of the long ones, one masked term; ``seg_labels``, ``cecp_spans``/``cecp_labels``,
  ``bem_positions``/``bem_anchor``/``bem_relative``/``bem_labels``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from keplm.models.embert import entity_task_tensors
from keplm.platform.errors import KeplmError


@dataclass
class KnowledgeIndex:
    """Neighbours as CSR over entity ids, entity types, and the negative sampler Q."""

    offsets: np.ndarray        # (Z+1,) rows of entity e are offsets[e]:offsets[e+1], in rank order
    neighbour: np.ndarray
    relation: np.ndarray       # relation id, + num_relations for an inverse triple
    entity_type: np.ndarray    # (Z,) type id
    type_names: list[str]
    num_relations: int
    freq: np.ndarray           # (Z,) corpus frequency t_e (0 when unknown)

    def __post_init__(self):
        self._by_type = []
        self.log_q = np.zeros(len(self.entity_type))
        for t in range(len(self.type_names)):
            ents = np.flatnonzero(self.entity_type == t)
            q = (self.freq[ents] + 1.0) / (self.freq[ents].sum() + len(ents))
            self.log_q[ents] = np.log(q)
            self._by_type.append((ents, np.cumsum(q)))

    @property
    def num_entities(self) -> int:
        return len(self.entity_type)

    @property
    def k_max(self) -> int:
        return int(np.diff(self.offsets).max()) if len(self.offsets) > 1 else 0

    def neighbours(self, entity: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[entity], min(self.offsets[entity + 1], self.offsets[entity] + k)
        return self.neighbour[lo:hi], self.relation[lo:hi]

    def sample_negatives(self, types: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        """n entities per entry of ``types`` from Q restricted to that type -> (len(types), n)."""
        out = np.zeros((len(types), n), np.int64)
        for t in np.unique(types):
            rows = np.flatnonzero(types == t)
            ents, cdf = self._by_type[t]
            draws = np.searchsorted(cdf, rng.random((len(rows), n)) * cdf[-1], side="right")
            out[rows] = ents[np.minimum(draws, len(ents) - 1)]
        return out

    @classmethod
    def load(cls, neighbours_dir: str | Path) -> KnowledgeIndex:
        d = Path(neighbours_dir)
        try:
            ents = pq.read_table(d / "entities.parquet")
            rels = pq.read_table(d / "relations.parquet")
            nb = pq.read_table(d / "neighbours.parquet").sort_by([("entity", "ascending"), ("rank", "ascending")])
        except OSError as exc:
            raise KeplmError(f"{d}: not a keplm kg neighbours output ({exc})") from None
        n = ents.num_rows
        types = ents.column("type").to_pylist()
        type_names = sorted(set(types))
        type_id = {t: i for i, t in enumerate(type_names)}
        entity = nb.column("entity").to_numpy()
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(entity, minlength=n), out=offsets[1:])
        num_rel = rels.num_rows
        relation = nb.column("relation").to_numpy().astype(np.int64)
        relation = relation + num_rel * nb.column("inverse").to_numpy(zero_copy_only=False).astype(np.int64)
        freq = ents.column("freq").to_numpy() if "freq" in ents.column_names else np.zeros(n, np.int64)
        return cls(offsets, nb.column("neighbour").to_numpy().astype(np.int64), relation,
                   np.array([type_id[t] for t in types], np.int64), type_names, num_rel, freq.astype(np.float64))


class KnowledgeCollator:
    def __init__(self, cls_id: int, sep_id: int, mask_id: int, pad_id: int, vocab_size: int,
                 knowledge: KnowledgeIndex | None = None, mask_rate: float = 0.15, whole_entity_masking: bool = False,
                 k: int = 10, max_mentions: int = 32, num_negatives: int = 10, max_seq_len: int = 512,
                 sop: bool = True, min_sop_tokens: int = 4, special_ids: tuple[int, ...] = (), seed: int = 0,
                 entity_tasks=None, cecp_rate: float = 0.0, bem_rate: float = 0.0):
        self.cls_id, self.sep_id, self.mask_id, self.pad_id = cls_id, sep_id, mask_id, pad_id
        self.vocab_size = vocab_size
        self.special = np.array(sorted({cls_id, sep_id, mask_id, pad_id, *special_ids}))
        self.knowledge = knowledge
        self.mask_rate, self.whole_entity_masking = mask_rate, whole_entity_masking
        self.k, self.max_mentions, self.num_negatives = k, max_mentions, num_negatives
        self.max_seq_len, self.sop, self.min_sop_tokens = max_seq_len, sop, min_sop_tokens
        self.entity_tasks, self.cecp_rate, self.bem_rate = entity_tasks, cecp_rate, bem_rate
        self.rng = np.random.default_rng(seed)
        self.stats: Counter = Counter()

    # ------------------------------------------------------------------ one row

    def _sop(self, ids: list[int], mentions: list[tuple]):
        """-> (ids, token types, mentions (start, end, *fields) in new positions, label)."""
        inner = ids[1:-1] if ids and ids[0] == self.cls_id and ids[-1] == self.sep_id else list(ids)
        limit = self.max_seq_len - (3 if self.sop else 2)
        self.stats["tokens_cut_by_length"] += max(len(inner) - limit, 0)
        inner = inner[:limit]
        ms = [(s - 1, e - 1, *rest) for s, e, *rest in mentions]
        kept = [m for m in ms if m[1] <= len(inner)]
        self.stats["mentions_cut_by_length"] += len(ms) - len(kept)
        n = len(inner)
        if not self.sop or n < self.min_sop_tokens:
            return [self.cls_id, *inner, self.sep_id], [0] * (n + 2), [(s + 1, e + 1, *r) for s, e, *r in kept], -100
        inside = np.zeros(n + 1, bool)  # inside[p]: cutting before token p would split a mention
        for s, e, *_ in kept:
            inside[s + 1:e] = True
        cand = np.flatnonzero(~inside[1:n]) + 1
        if len(cand) == 0:
            return [self.cls_id, *inner, self.sep_id], [0] * (n + 2), [(s + 1, e + 1, *r) for s, e, *r in kept], -100
        p = int(cand[np.argmin(np.abs(cand - n / 2))])
        swap = bool(self.rng.random() < 0.5)
        parts = [(0, p), (p, n)][::-1] if swap else [(0, p), (p, n)]
        first_len = parts[0][1] - parts[0][0]
        starts = {parts[0][0]: 1, parts[1][0]: first_len + 2}
        new_ids = [self.cls_id, *inner[parts[0][0]:parts[0][1]], self.sep_id, *inner[parts[1][0]:parts[1][1]], self.sep_id]
        types = [0] * (first_len + 2) + [1] * (n - first_len + 1)
        moved = []
        for s, e, *rest in kept:
            lo = 0 if s < p else p
            shift = starts[lo] - lo
            moved.append((s + shift, e + shift, *rest))
        moved.sort()
        return new_ids, types, moved, int(swap)

    def _mask(self, ids: np.ndarray, mentions, exclude: np.ndarray | None = None) -> np.ndarray:
        """``exclude``: tokens another objective predicts (never chosen, and they count in no budget)."""
        labels = np.full(len(ids), -100, np.int64)
        allowed = ~np.isin(ids, self.special) if exclude is None else ~np.isin(ids, self.special) & ~exclude
        candidates = np.flatnonzero(allowed)
        if len(candidates) == 0:
            return labels
        budget = max(1, int(round(self.mask_rate * len(candidates))))
        chosen = np.zeros(len(ids), bool)
        if self.whole_entity_masking and mentions:
            for i in self.rng.permutation(len(mentions)):
                s, e = mentions[i][:2]
                if allowed[s:e].all() and chosen.sum() + (e - s) <= budget:
                    chosen[s:e] = True
        rest = budget - int(chosen.sum())
        if rest > 0:
            free = candidates[~chosen[candidates]]
            chosen[self.rng.choice(free, size=min(rest, len(free)), replace=False)] = True
        pos = np.flatnonzero(chosen)
        labels[pos] = ids[pos]
        roll = self.rng.random(len(pos))
        ids[pos[roll < 0.8]] = self.mask_id
        rand = pos[(roll >= 0.8) & (roll < 0.9)]
        ids[rand] = self.rng.integers(0, self.vocab_size, len(rand))
        return labels

    # ------------------------------------------------------------------ batch

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        samples, targets = [], []
        for row in rows:
            ms = sorted((int(m["token_start"]), int(m["token_end"]), int(m["entity"])) for m in (row.get("mentions") or []))
            ids = list(row["input_ids"])
            if self.entity_tasks is not None:
                ids, ms = self.entity_tasks.replace(ids, ms, self.cecp_rate, self.rng, self.stats)
            ids, types, ms, sop = self._sop(ids, ms)
            if len(ms) > self.max_mentions:
                self.stats["mentions_truncated"] += len(ms) - self.max_mentions
                ms = ms[: self.max_mentions]
            ids = np.asarray(ids, np.int64)
            exclude = None
            if self.entity_tasks is not None:
                row_targets, exclude = self.entity_tasks.annotate(ids, ms, self.bem_rate, self.mask_id, self.rng,
                                                                  self.stats)
                targets.append(row_targets)
            labels = self._mask(ids, ms, exclude)
            samples.append((ids, np.asarray(types), labels, ms, sop))
        b = len(samples)
        t = max(len(s[0]) for s in samples)
        m = max(max((len(s[3]) for s in samples), default=0), 1)
        out = {
            "input_ids": torch.full((b, t), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((b, t), dtype=torch.long),
            "token_type_ids": torch.zeros((b, t), dtype=torch.long),
            "labels": torch.full((b, t), -100, dtype=torch.long),
            "sop_label": torch.tensor([s[4] for s in samples], dtype=torch.long),
            "mention_spans": torch.zeros((b, m, 2), dtype=torch.long),
            "mention_mask": torch.zeros((b, m), dtype=torch.bool),
            "mention_entity": torch.full((b, m), -1, dtype=torch.long),
            "token_entity": torch.full((b, t), -1, dtype=torch.long),
        }
        for i, (ids, types, labels, ms, _) in enumerate(samples):
            n = len(ids)
            out["input_ids"][i, :n] = torch.from_numpy(ids)
            out["attention_mask"][i, :n] = 1
            out["token_type_ids"][i, :n] = torch.from_numpy(types)
            out["labels"][i, :n] = torch.from_numpy(labels)
            for j, (s, e, ent, *_) in enumerate(ms):
                out["mention_spans"][i, j] = torch.tensor([s, e])
                out["mention_mask"][i, j] = True
                out["mention_entity"][i, j] = ent
                out["token_entity"][i, s:e] = ent
        if self.entity_tasks is not None:
            out.update(entity_task_tensors(targets, t))
        if self.knowledge is not None:
            out.update(self._neighbours(out["mention_entity"].numpy(), out["mention_mask"].numpy()))
        self.stats["samples"] += b
        self.stats["tokens"] += int(out["attention_mask"].sum())   # non-padding tokens: the card's "tokens seen"
        return out

    def _neighbours(self, entity: np.ndarray, mask: np.ndarray) -> dict[str, torch.Tensor]:
        kn, k = self.knowledge, self.k
        b, m = entity.shape
        ids = np.zeros((b, m, k), np.int64)
        rel = np.zeros((b, m, k), np.int64)
        nmask = np.zeros((b, m, k), bool)
        for i, j in zip(*np.nonzero(mask)):
            nb, r = kn.neighbours(int(entity[i, j]), k)
            ids[i, j, :len(nb)], rel[i, j, :len(nb)], nmask[i, j, :len(nb)] = nb, r, True
            if len(nb) < k:
                self.stats["mentions_short_of_k"] += 1
        ntype = kn.entity_type[ids]
        neg = kn.sample_negatives(ntype.reshape(-1), self.num_negatives, self.rng).reshape(b, m, k, -1)
        return {
            "neighbour_ids": torch.from_numpy(ids), "neighbour_relation": torch.from_numpy(rel),
            "neighbour_type": torch.from_numpy(ntype), "neighbour_mask": torch.from_numpy(nmask),
            "negative_ids": torch.from_numpy(neg),
            "log_q_pos": torch.from_numpy(kn.log_q[ids]).float(),
            "log_q_neg": torch.from_numpy(kn.log_q[neg]).float(),
        }


def read_shards(prepare_dir: str | Path, limit: int | None = None) -> list[dict]:
    """Shard rows of a prepare output as dicts (for tests, benchmarks and small runs; Ray Data streams them)."""
    table = pq.read_table(Path(prepare_dir) / "shards", columns=["input_ids", "mentions"])
    if limit is not None:
        table = table.slice(0, limit)
    return table.to_pylist()
