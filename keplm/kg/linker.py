"""Exact-match entity linking (SMedBERT App. B) with an Aho-Corasick automaton and jieba tie-breaking.

Dictionary: every entity name and alias, normalised with the corpus cleaner
(:func:`keplm.platform.text.clean_text`) so that a full-width name matches its cleaned mention.
Surface forms shorter than ``min_name_chars`` are left out (counted). When two names normalise to the
same surface, the lower entity id keeps it. A name always beats an alias with the same surface. An
alias that points to several entities is ambiguous and left out of the dictionary (counted): linking
it to an arbitrary one of them would be wrong more often than right.

Conflicts: all dictionary matches in a segment are found in one pass of a Rust Aho-Corasick automaton (ahocorasick_rs); overlapping matches form
conflict clusters. Inside a cluster, candidates are taken greedily in the order
1. longer match first;
2. among equally long overlapping candidates, the one whose both ends fall on jieba word boundaries
   (jieba is loaded with every surface form as user dictionary and cuts the cluster's text plus
   ``jieba_context`` characters either side; it is only run for clusters that contain such a tie);
3. then the leftmost;
and a candidate is accepted only if it overlaps no accepted one. Matches outside clusters are accepted
directly. The result is non-overlapping and deterministic.
"""

from __future__ import annotations

from collections import Counter

import ahocorasick_rs
from pydantic import Field

from keplm.kg.reader import Entities
from keplm.platform.config import Section
from keplm.platform.text import CleanConfig, clean_text


JIEBA_USER_FREQ = 100_000


class LinkConfig(Section):
    min_name_chars: int = Field(2, description="names and aliases shorter than this many characters are not "
                                               "linked (counted)")
    use_aliases: bool = Field(True, description="link aliases too, not only entity names")
    jieba_context: int = Field(6, description="characters either side of a tied cluster that jieba cuts to "
                                              "find word boundaries")


class EntityLinker:
    """`link(text)` -> sorted non-overlapping ``(char_start, char_end, entity_id)``, end exclusive."""

    def __init__(self, entities: Entities, aliases: list[tuple[str, int]] = (),
                 cfg: LinkConfig | None = None, clean_cfg: CleanConfig | None = None):
        self.cfg = cfg or LinkConfig()
        self.counts: Counter = Counter()
        clean_cfg = clean_cfg or CleanConfig()
        surfaces: dict[str, int] = {}
        for eid, name in enumerate(entities.names):
            surface = clean_text(name, clean_cfg)
            if len(surface) < self.cfg.min_name_chars:
                self.counts["names_too_short"] += 1
                continue
            if surface in surfaces:
                self.counts["names_same_surface"] += 1
                continue
            surfaces[surface] = eid
        alias_targets: dict[str, set[int]] = {}
        if self.cfg.use_aliases:
            for alias, eid in aliases:
                surface = clean_text(alias, clean_cfg)
                if len(surface) < self.cfg.min_name_chars:
                    self.counts["aliases_too_short"] += 1
                elif surface in surfaces:
                    self.counts["aliases_shadowed_by_name"] += 1
                else:
                    alias_targets.setdefault(surface, set()).add(eid)
        for surface, targets in alias_targets.items():
            if len(targets) > 1:
                self.counts["aliases_ambiguous"] += 1
            else:
                surfaces[surface] = next(iter(targets))
        self.counts["surfaces"] = len(surfaces)
        self.surfaces = surfaces
        self._build()
        self.jieba_calls = 0

    def _build(self) -> None:
        self._patterns = list(self.surfaces)
        self._pattern_entity = [self.surfaces[p] for p in self._patterns]
        self._automaton = (ahocorasick_rs.AhoCorasick(self._patterns, matchkind=ahocorasick_rs.MatchKind.Standard)
                           if self._patterns else None)
        self._jieba = None

    def __getstate__(self):
        # the automaton and jieba are rebuilt where the linker lands (a Ray actor): cheap, not picklable
        return {k: v for k, v in self.__dict__.items() if k not in ("_automaton", "_jieba", "_patterns", "_pattern_entity")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._build()

    def _word_boundaries(self, text: str, start: int, end: int) -> set[int]:
        if self._jieba is None:
            import logging

            import jieba

            jieba.setLogLevel(logging.WARNING)
            tk = jieba.Tokenizer()
            for surface in self.surfaces:
                # a fixed, high frequency keeps every KG surface a single word; freq=None would call
                # jieba's slow suggest_freq for each of tens of thousands of names
                tk.add_word(surface, freq=JIEBA_USER_FREQ)
            self._jieba = tk
        self.jieba_calls += 1
        lo = max(0, start - self.cfg.jieba_context)
        hi = min(len(text), end + self.cfg.jieba_context)
        bounds = {lo}
        pos = lo
        for word in self._jieba.cut(text[lo:hi], HMM=False):
            pos += len(word)
            bounds.add(pos)
        return bounds

    def _resolve(self, text: str, cluster: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        lengths = [e - s for s, e, _ in cluster]
        if len(set(lengths)) < len(lengths):
            bounds = self._word_boundaries(text, min(s for s, _, _ in cluster), max(e for _, e, _ in cluster))
            key = lambda m: (-(m[1] - m[0]), -((m[0] in bounds) + (m[1] in bounds)), m[0])  # noqa: E731
        else:
            key = lambda m: (-(m[1] - m[0]), m[0])  # noqa: E731
        accepted: list[tuple[int, int, int]] = []
        for m in sorted(cluster, key=key):
            if all(m[1] <= a[0] or m[0] >= a[1] for a in accepted):
                accepted.append(m)
        return accepted

    def candidates(self, text: str) -> list[tuple[int, int, int]]:
        """Every dictionary match (overlapping), sorted by start then longest first."""
        if self._automaton is None:
            return []
        ent = self._pattern_entity
        found = [(s, e, ent[i]) for i, s, e in self._automaton.find_matches_as_indexes(text, overlapping=True)]
        found.sort(key=lambda m: (m[0], -m[1]))
        return found

    def link(self, text: str) -> list[tuple[int, int, int]]:
        found = self.candidates(text)
        if len(found) < 2:
            return found
        out: list[tuple[int, int, int]] = []
        cluster = [found[0]]
        cluster_end = found[0][1]
        for m in found[1:]:
            if m[0] < cluster_end:
                cluster.append(m)
                if m[1] > cluster_end:
                    cluster_end = m[1]
                continue
            out.extend(cluster if len(cluster) == 1 else self._resolve(text, cluster))
            cluster = [m]
            cluster_end = m[1]
        out.extend(cluster if len(cluster) == 1 else self._resolve(text, cluster))
        out.sort()
        return out
