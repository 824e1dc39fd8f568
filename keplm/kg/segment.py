"""Entity segmentation by EMBERT's rule system (seed 001, Appendix), for its entity-segmentation and
bidirectional-entity-masking objectives.

The entity vocabulary is the KG's names and aliases. The paper adds AutoPhrase phrases mined from the
corpus and uses AutoPhrase's segmentation model twice; AutoPhrase is not available here, so:

- **Primitive segmentation** (what AutoPhrase's model gave the paper) is jieba's own segmentation (HMM
  on) with the short entities added to its dictionary.
- **Cut points.** Characters are counted where a primitive segment ends inside an entity (a cut *after*
  the character, e.g. 性 in 缺铁性|贫血) and where one starts inside an entity (a cut *before* it). The paper
  keeps the 100 most frequent after a manual check; the check is replaced by a precision rule: a
  character qualifies only when at least ``min_precision`` of its occurrences at such inner positions
  are segment boundaries and it was seen at a boundary at least ``min_count`` times.
- **Long / short.** Entities of more than three characters are long candidates; the others are short and
  go into jieba's dictionary. A long candidate is split at its cut points, each part is cut by jieba
  (HMM off, so that the dictionary decides), and the pieces are combined. When more than
  ``max_single_ratio`` of the pieces are single characters the result is an error and the primitive
  segmentation replaces it (the paper's AutoPhrase correction); if that is no better, the entity stays
  whole. An entity left in one piece is short.

A long entity's pieces are then merged into an **adjective term** (all pieces but the last) and an
**atomic term** (the last piece): Chinese medical terms are head-final (再生障碍性 + 贫血).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

from pydantic import Field

from keplm.platform.config import Section


class SegmentConfig(Section):
    long_min_chars: int = Field(4, ge=2, description="entities of at least this many characters are long candidates")
    top_cut_points: int = Field(100, ge=0, description="cut-point characters kept per side (start / end)")
    min_precision: float = Field(0.5, gt=0, le=1, description="stand-in for the paper's manual check of cut points")
    min_count: int = Field(2, ge=1, description="a cut point must be seen at a segment boundary this many times")
    max_single_ratio: float = Field(0.5, gt=0, le=1, description="more single characters than this: an error")


class EntitySegmenter:
    def __init__(self, vocabulary: Iterable[str], cfg: SegmentConfig | None = None):
        import jieba

        jieba.setLogLevel(logging.WARNING)
        self.cfg = cfg or SegmentConfig()
        vocab = sorted({v for v in vocabulary if v})
        self.tok = jieba.Tokenizer()
        self.tok.initialize()
        for word in vocab:
            if len(word) < self.cfg.long_min_chars:
                self.tok.add_word(word)
        self.counts: Counter = Counter()
        self.end_cuts, self.start_cuts = self._cut_points(v for v in vocab if len(v) >= self.cfg.long_min_chars)

    def primitive(self, name: str) -> list[str]:
        return self.tok.lcut(name, HMM=True)

    def _cut_points(self, long_names: Iterable[str]) -> tuple[frozenset[str], frozenset[str]]:
        ends, starts, end_seen, start_seen = Counter(), Counter(), Counter(), Counter()
        for name in long_names:
            end_seen.update(name[:-1])
            start_seen.update(name[1:])
            pos = 0
            pieces = self.primitive(name)
            for piece in pieces[:-1]:
                pos += len(piece)
                ends[name[pos - 1]] += 1
                starts[name[pos]] += 1

        def pick(hits: Counter, seen: Counter) -> frozenset[str]:
            ok = [(n, c) for c, n in hits.items() if n >= self.cfg.min_count and n / seen[c] >= self.cfg.min_precision]
            return frozenset(c for _, c in sorted(ok, key=lambda x: (-x[0], x[1]))[: self.cfg.top_cut_points])

        return pick(ends, end_seen), pick(starts, start_seen)

    def _split_at_cut_points(self, name: str) -> list[str]:
        parts, begin = [], 0
        for i in range(1, len(name)):
            if name[i - 1] in self.end_cuts or name[i] in self.start_cuts:
                parts.append(name[begin:i])
                begin = i
        parts.append(name[begin:])
        return parts

    def _too_many_singles(self, pieces: list[str]) -> bool:
        singles = sum(len(p) == 1 for p in pieces)
        return singles >= 2 and singles / len(pieces) > self.cfg.max_single_ratio

    def segment(self, name: str) -> tuple[str, ...]:
        """The sub-entities of ``name`` (one piece: a short entity)."""
        if len(name) < self.cfg.long_min_chars:
            self.counts["short"] += 1
            return (name,)
        pieces = [w for part in self._split_at_cut_points(name) for w in self.tok.lcut(part, HMM=False)]
        if self._too_many_singles(pieces):
            pieces = self.primitive(name)
            self.counts["corrected"] += 1
            if self._too_many_singles(pieces):
                self.counts["rejected_single_chars"] += 1
                return (name,)
        if len(pieces) == 1:
            self.counts["long_candidate_unsplit"] += 1
            return (name,)
        self.counts["long"] += 1
        return tuple(pieces)


def adjective_atomic(pieces: tuple[str, ...] | tuple[int, ...]):
    """Split a long entity's pieces (strings, or token lengths) into (adjective, atomic); None when short."""
    if len(pieces) < 2:
        return None
    return pieces[:-1], pieces[-1]
