"""The one KG reader. Entity ids are assigned here and nowhere else.

KG input format (a directory): ``entities.tsv`` (``name\ttype``), ``triples.tsv``
(``head\trelation\ttail``) and optional ``aliases.tsv`` (``alias\tname``), each with that header
line, each optionally gzipped (``.tsv.gz``).

Ids: entity ``i`` is the i-th distinct name of entities.tsv in file order (a repeated name keeps its
first type and is counted in ``entities_duplicate``), so the same file always gives the same ids.
Every job that emits ids writes them as ``entities.parquet`` (``id``, ``name``, ``type``).

Bad lines never raise: they are counted by reason. A missing or headerless entities file, or one with
no usable entity, is one clear :class:`KeplmError`.
"""

from __future__ import annotations

import gzip
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from keplm.platform.errors import KeplmError

ENTITY_HEADER = ("name", "type")
TRIPLE_HEADER = ("head", "relation", "tail")
ALIAS_HEADER = ("alias", "name")


def find_table(kg_dir: str | Path, stem: str) -> Path | None:
    d = Path(kg_dir)
    for name in (f"{stem}.tsv", f"{stem}.tsv.gz"):
        if (d / name).is_file():
            return d / name
    return None


def iter_tsv(path: Path, header: tuple[str, ...], counts: Counter, prefix: str) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, fields) of a headed TSV; undecodable/wrong-width lines are counted, not raised."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            first = f.readline().decode("utf-8", errors="replace").rstrip("\r\n").split("\t")
            if tuple(c.strip().lower() for c in first) != header:
                want, got = " TAB ".join(header), " TAB ".join(first)[:80]
                raise KeplmError(f"{path}: expected header {want!r}, found {got!r}")
            for lineno, raw in enumerate(f, start=2):
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError:
                    counts[f"{prefix}_undecodable"] += 1
                    continue
                if not line.strip():
                    continue
                fields = [x.strip() for x in line.split("\t")]
                if len(fields) != len(header) or not all(fields):
                    counts[f"{prefix}_malformed"] += 1
                    continue
                yield lineno, fields
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise KeplmError(f"{path}: cannot read ({exc.__class__.__name__}: {exc})") from None


@dataclass
class Entities:
    names: list[str]
    types: list[str]
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        if not self.index:
            self.index = {n: i for i, n in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    def to_table(self) -> pa.Table:
        return pa.table({
            "id": pa.array(range(len(self.names)), pa.int32()),
            "name": pa.array(self.names, pa.string()),
            "type": pa.array(self.types, pa.string()),
        })


def read_entities(kg_dir: str | Path, counts: Counter | None = None) -> Entities:
    counts = counts if counts is not None else Counter()
    path = find_table(kg_dir, "entities")
    if path is None:
        raise KeplmError(f"{kg_dir}: no entities.tsv or entities.tsv.gz (a KG directory needs one)")
    names: list[str] = []
    types: list[str] = []
    seen: set[str] = set()
    for _, (name, etype) in iter_tsv(path, ENTITY_HEADER, counts, "entities"):
        counts["entities_lines"] += 1
        if name in seen:
            counts["entities_duplicate"] += 1
            continue
        seen.add(name)
        names.append(name)
        types.append(etype)
    if not names:
        raise KeplmError(f"{path}: no usable entity lines")
    counts["entities"] = len(names)
    return Entities(names, types)


def read_aliases(kg_dir: str | Path, entities: Entities, counts: Counter | None = None) -> list[tuple[str, int]]:
    """(alias, entity id) pairs. Unknown target names, self-aliases and duplicates are counted and dropped.

    An alias that equals another entity's name is kept here (``aliases_name_collision`` counts it):
    the linker lets the name win, while synonym tasks may still use the pair.
    """
    counts = counts if counts is not None else Counter()
    path = find_table(kg_dir, "aliases")
    if path is None:
        return []
    out: list[tuple[str, int]] = []
    seen: set[tuple[str, int]] = set()
    for _, (alias, name) in iter_tsv(path, ALIAS_HEADER, counts, "aliases"):
        counts["aliases_lines"] += 1
        target = entities.index.get(name)
        if target is None:
            counts["aliases_unknown_entity"] += 1
            continue
        if alias == name:
            counts["aliases_self"] += 1
            continue
        if (alias, target) in seen:
            counts["aliases_duplicate"] += 1
            continue
        if alias in entities.index:
            counts["aliases_name_collision"] += 1
        seen.add((alias, target))
        out.append((alias, target))
    counts["aliases"] = len(out)
    return out


def write_entities(entities: Entities, out_dir: str | Path, extra: dict[str, pa.Array] | None = None) -> Path:
    table = entities.to_table()
    for name, column in (extra or {}).items():
        table = table.append_column(name, column)
    path = Path(out_dir) / "entities.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


@dataclass
class Triples:
    """Kept triples as entity/relation ids; relation ids are first-seen order of kept triples' relations."""

    heads: list[int]
    relations: list[int]
    tails: list[int]
    relation_names: list[str]
    same_as: list[tuple[str, int]]  # (alias, entity id) pairs taken from "same as" triples

    def __len__(self) -> int:
        return len(self.heads)


def read_triples(kg_dir: str | Path, entities: Entities, counts: Counter | None = None,
                 same_as_relations: tuple[str, ...] = ()) -> Triples:
    """Read ``triples.tsv``; every line is kept or counted under one ``triples_*`` reason.

    Reasons: ``malformed`` (not three non-empty fields: this includes a missing relation name),
    ``undecodable``, ``unknown_entity`` (head or tail not in entities.tsv), ``self_loop``,
    ``duplicate`` (same head, relation, tail as an earlier line). A triple whose relation is one of
    ``same_as_relations`` (e.g. 别名) is not a graph edge: its tail becomes an alias of its head
    (``triples_same_as``). ``triples_lines == triples_kept + triples_same_as + the rejected reasons``.
    """
    counts = counts if counts is not None else Counter()
    path = find_table(kg_dir, "triples")
    if path is None:
        raise KeplmError(f"{kg_dir}: no triples.tsv or triples.tsv.gz (a KG directory needs one)")
    same = set(same_as_relations)
    rel_index: dict[str, int] = {}
    seen: set[tuple[int, int, int]] = set()
    out = Triples([], [], [], [], [])
    before = counts["triples_malformed"] + counts["triples_undecodable"]
    for _, (head, rel, tail) in iter_tsv(path, TRIPLE_HEADER, counts, "triples"):
        counts["triples_read"] += 1
        h, t = entities.index.get(head), entities.index.get(tail)
        if rel in same:
            if h is None:
                counts["triples_unknown_entity"] += 1
            elif head == tail:
                counts["triples_self_loop"] += 1
            else:
                counts["triples_same_as"] += 1
                out.same_as.append((tail, h))
            continue
        if h is None or t is None:
            counts["triples_unknown_entity"] += 1
            continue
        if h == t:
            counts["triples_self_loop"] += 1
            continue
        r = rel_index.setdefault(rel, len(rel_index))
        if (h, r, t) in seen:
            counts["triples_duplicate"] += 1
            continue
        seen.add((h, r, t))
        out.heads.append(h)
        out.relations.append(r)
        out.tails.append(t)
    counts["triples_lines"] = counts["triples_read"] + counts["triples_malformed"] + counts["triples_undecodable"] - before
    counts["triples_kept"] = len(out.heads)
    out.relation_names = sorted(rel_index, key=rel_index.get)  # ids in first-kept order
    if not out.heads:
        raise KeplmError(f"{path}: no usable triple ({dict((k, v) for k, v in counts.items() if k.startswith('triples_'))})")
    return out
