"""Downstream data: character-level BIO NER sets and sentence-pair sets, read with counted rejects.

Formats (those of the real sets in ../shared/data, README there):

* ``conll``: one ``char label`` per line, a blank line between sentences (cMedQANER/cEHRNER ``*.txt``).
* ``tsv``: header ``text_a\\tlabel``; characters and labels space-separated (CCKS / K-BERT medical_ner).
* ``spans``: JSON lines ``{"text", "mention_data": [{"mention", "type" (or "label"), "offset"}]}`` (``*.json``).
* pairs: ``label\\tsentence1\\tsentence2`` with label 0/1 (cMedQQ / cMedQNLI-style).

Labels are normalised to ``B-type`` / ``I-type`` / ``O`` (``B_x`` -> ``B-x``). Rules, each counted:

* an ``I`` with no type continues the type of the tag before it; after ``O`` or at a sentence start it
  becomes ``O`` (``untyped_i_fixed``, ``untyped_i_dropped``);
* an ``I-x`` that does not follow ``B-x``/``I-x`` starts the entity (``B-x``; ``orphan_i_fixed``), as
  seqeval's IOB2 reading would do;
* nested or overlapping spans (cNNER-style) are flattened by keeping the **longest** span, ties to the
  earliest; every span that overlaps a kept one is dropped (``nested_dropped``);
* a span whose ``mention`` differs from ``text[offset:offset+len(mention)]`` is dropped (``span_mismatch``).

Malformed lines or records are skipped and counted by reason, never raised; a file that cannot be read
at all (missing, not gzip, not UTF-8) is one clear :class:`KeplmError`.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from keplm.platform.errors import KeplmError

NER_FORMATS = ("conll", "tsv", "spans")


@dataclass
class NerSet:
    sentences: list[list[str]] = field(default_factory=list)   # characters
    labels: list[list[str]] = field(default_factory=list)      # BIO tags, one per character
    counts: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.sentences)

    def subset(self, n: int | None) -> NerSet:
        if n is None or n >= len(self):
            return self
        return NerSet(self.sentences[:n], self.labels[:n], Counter(self.counts))

    def label_set(self) -> list[str]:
        """``O`` first, then ``B-x``/``I-x`` for every type seen, sorted (ids stable for a given train set)."""
        types = sorted({t[2:] for seq in self.labels for t in seq if t != "O"})
        return ["O"] + [f"{p}-{t}" for t in types for p in "BI"]


@dataclass
class PairSet:
    first: list[str] = field(default_factory=list)
    second: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int | None) -> PairSet:
        if n is None or n >= len(self):
            return self
        return PairSet(self.first[:n], self.second[:n], self.labels[:n], Counter(self.counts))


def _lines(path: str | Path):
    p = Path(path)
    if not p.is_file():
        raise KeplmError(f"data file not found: {p}")
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rt", encoding="utf-8") as f:
            yield from f
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise KeplmError(f"{p}: cannot read ({exc.__class__.__name__}: {exc})") from None


def normalise_tag(tag: str) -> str | None:
    """``B_x``/``B-x``/``O``/``I`` -> canonical form (``I`` stays untyped); None when not a BIO tag."""
    tag = tag.strip()
    if tag == "O":
        return "O"
    if tag in ("B", "I"):
        return tag
    if len(tag) > 2 and tag[0] in "BI" and tag[1] in "-_":
        return f"{tag[0]}-{tag[2:]}"
    return None


def repair_tags(tags: list[str], counts: Counter) -> list[str]:
    """Untyped ``I`` and orphan ``I-x`` fixed by the module's documented rules (counted)."""
    out: list[str] = []
    for tag in tags:
        prev = out[-1] if out else "O"
        if tag in ("I", "B"):
            if prev == "O" or tag == "B":
                counts["untyped_i_dropped" if tag == "I" else "untyped_b_dropped"] += 1
                tag = "O"
            else:
                counts["untyped_i_fixed"] += 1
                tag = "I-" + prev[2:]
        elif tag.startswith("I-") and prev[2:] != tag[2:]:
            counts["orphan_i_fixed"] += 1
            tag = "B-" + tag[2:]
        out.append(tag)
    return out


def _add(ds: NerSet, chars: list[str], tags: list[str]) -> None:
    if not chars:
        return
    ds.sentences.append(chars)
    ds.labels.append(repair_tags(tags, ds.counts))
    ds.counts["sentences"] += 1


def read_conll(path: str | Path) -> NerSet:
    ds = NerSet()
    chars: list[str] = []
    tags: list[str] = []
    bad_sentence = False
    for raw in _lines(path):
        line = raw.rstrip("\n").rstrip("\r")
        if not line.strip():
            if bad_sentence:
                ds.counts["rejected_sentences"] += 1
            else:
                _add(ds, chars, tags)
            chars, tags, bad_sentence = [], [], False
            continue
        ds.counts["lines"] += 1
        # the character itself may be a space: split the label off the right
        head, sep, label = line.rpartition(" ")
        if not sep:
            head, sep, label = line.rpartition("\t")
        tag = normalise_tag(label) if sep else None
        if tag is None or len(head) != 1:
            ds.counts["malformed_line"] += 1
            bad_sentence = True
            continue
        chars.append(head)
        tags.append(tag)
    if bad_sentence:
        ds.counts["rejected_sentences"] += 1
    else:
        _add(ds, chars, tags)
    return ds


def read_tsv(path: str | Path) -> NerSet:
    ds = NerSet()
    for i, raw in enumerate(_lines(path)):
        line = raw.rstrip("\n").rstrip("\r")
        if i == 0 and line.startswith("text_a"):
            continue
        if not line.strip():
            continue
        ds.counts["lines"] += 1
        parts = line.split("\t")
        if len(parts) != 2:
            ds.counts["malformed_line"] += 1
            continue
        chars, labels = parts[0].split(" "), parts[1].split(" ")
        tags = [normalise_tag(t) for t in labels]
        if len(chars) != len(labels):
            ds.counts["length_mismatch"] += 1
            continue
        if any(t is None for t in tags) or any(len(c) != 1 for c in chars):
            ds.counts["malformed_line"] += 1
            continue
        _add(ds, chars, tags)
    return ds


def flatten_spans(spans: list[tuple[int, int, str]], counts: Counter) -> list[tuple[int, int, str]]:
    """Longest span wins, ties to the earliest; spans overlapping a kept one are dropped (counted)."""
    kept: list[tuple[int, int, str]] = []
    for s, e, t in sorted(spans, key=lambda x: (-(x[1] - x[0]), x[0])):
        if any(s < ke and ks < e for ks, ke, _ in kept):
            counts["nested_dropped"] += 1
            continue
        kept.append((s, e, t))
    return sorted(kept)


def spans_to_bio(n: int, spans: list[tuple[int, int, str]]) -> list[str]:
    tags = ["O"] * n
    for s, e, t in spans:
        tags[s] = f"B-{t}"
        for i in range(s + 1, e):
            tags[i] = f"I-{t}"
    return tags


def read_spans(path: str | Path) -> NerSet:
    ds = NerSet()
    for raw in _lines(path):
        if not raw.strip():
            continue
        ds.counts["lines"] += 1
        try:
            rec = json.loads(raw)
            text = rec["text"]
            mentions = rec.get("mention_data") or []
            if not isinstance(text, str) or not isinstance(mentions, list):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            ds.counts["malformed_line"] += 1
            continue
        spans = []
        for m in mentions:
            try:
                mention, start = str(m["mention"]), int(m["offset"])
                typ = str(m["type"] if "type" in m else m["label"]).strip()  # cEHRNER says "label"
            except (KeyError, ValueError, TypeError):
                ds.counts["malformed_span"] += 1
                continue
            if not mention or not typ or text[start:start + len(mention)] != mention or start < 0:
                ds.counts["span_mismatch"] += 1
                continue
            spans.append((start, start + len(mention), typ))
        ds.counts["spans"] += len(spans)
        _add(ds, list(text), spans_to_bio(len(text), flatten_spans(spans, ds.counts)))
    return ds


def guess_format(path: str | Path) -> str:
    name = Path(path).name.removesuffix(".gz")
    if name.endswith(".json") or name.endswith(".jsonl"):
        return "spans"
    if name.endswith(".tsv"):
        return "tsv"
    return "conll"


def read_ner(path: str | Path, fmt: str | None = None) -> NerSet:
    fmt = fmt or guess_format(path)
    if fmt not in NER_FORMATS:
        raise KeplmError(f"unknown NER format {fmt!r}; expected one of {NER_FORMATS}")
    return {"conll": read_conll, "tsv": read_tsv, "spans": read_spans}[fmt](path)


def read_pairs(path: str | Path) -> PairSet:
    ds = PairSet()
    for raw in _lines(path):
        line = raw.rstrip("\n").rstrip("\r")
        if not line.strip():
            continue
        ds.counts["lines"] += 1
        parts = line.split("\t")
        if len(parts) != 3 or parts[0].strip() not in ("0", "1") or not parts[1].strip() or not parts[2].strip():
            ds.counts["malformed_line"] += 1
            continue
        ds.labels.append(int(parts[0]))
        ds.first.append(parts[1].strip())
        ds.second.append(parts[2].strip())
    ds.counts["pairs"] = len(ds.labels)
    return ds
