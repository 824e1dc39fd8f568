"""`keplm kg build`: KG ingestion into id tables and the PPR-ready adjacency.

Output directory (graph schema version 1)::

    entities.parquet    id int32, name, type, freq int64 (linked mentions in the corpus; only with --corpus)
    relations.parquet   id int32, name, triples int64 (kept triples with this relation)
    triples.parquet     head int32, relation int32, tail int32 (ids above; duplicates, self-loops removed)
    aliases.parquet     alias string, entity int32 (aliases.tsv pairs, then "same as" triples)
    adjacency.npz       scipy.sparse CSR (Z x Z, float64): A[i, j] = 1/deg(j) when i and j share a triple
                        (either direction; several triples count once), so every column of a
                        non-isolated entity sums to 1 — the column-stochastic A of PPR
    adjacency_relation.npy  int32 per stored entry of A (same order as A.indices): the relation of
                        the first triple (triples.parquet order) that joins the row and column entity
    adjacency_inverse.npy   bool per stored entry: True when that triple is (column, r, row), i.e. the
                        row entity is its tail
    degree.npy          int32 (Z,): distinct neighbours per entity (0 = isolated)
    manifest.json       counts: entities, relations, triples_lines / kept / rejected reasons, aliases,
                        isolated_entities, edges (undirected entity pairs), ...

The graph is undirected for PPR: the disease-centred KG has almost every edge pointing from a disease,
so a directed walk would stop at the first symptom or drug.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from pydantic import Field

from keplm.kg.reader import read_aliases, read_entities, read_triples, write_entities
from keplm.platform.config import Section
from keplm.platform.errors import KeplmError
from keplm.platform.manifest import hash_inputs, read_manifest, write_manifest

GRAPH_SCHEMA_VERSION = 1


class GraphConfig(Section):
    same_as_relations: list[str] = Field(
        default_factory=lambda: ["别名", "同义词", "sameas", "SameAs", "synonym"],
        description="relations whose triples mean 'tail is another name of head': aliases, not edges")


@dataclass
class Graph:
    """A built graph directory, loaded."""

    entities: pa.Table
    relations: pa.Table
    triples: pa.Table
    adjacency: sp.csr_matrix
    edge_relation: np.ndarray
    edge_inverse: np.ndarray
    degree: np.ndarray
    path: Path

    @property
    def num_entities(self) -> int:
        return self.entities.num_rows

    @property
    def freq(self) -> np.ndarray | None:
        if "freq" not in self.entities.column_names:
            return None
        return self.entities.column("freq").to_numpy()


def adjacency_from_triples(num_entities: int, heads: np.ndarray, relations: np.ndarray, tails: np.ndarray):
    """-> (A column-stochastic CSR, relation per stored entry, inverse flag per entry, degree)."""
    n_t = len(heads)
    # both directions of every triple; the entry (row, col) remembers the triple's index and whether
    # the row entity is the triple's tail
    rows = np.concatenate([heads, tails]).astype(np.int64)
    cols = np.concatenate([tails, heads]).astype(np.int64)
    order_key = np.concatenate([np.arange(n_t), np.arange(n_t)])
    inverse = np.concatenate([np.zeros(n_t, bool), np.ones(n_t, bool)])
    # first triple per (row, col) pair in file order; forward before inverse for the same triple
    idx = np.lexsort((inverse, order_key, cols, rows))
    rows, cols, order_key, inverse = rows[idx], cols[idx], order_key[idx], inverse[idx]
    first = np.ones(len(rows), bool)
    first[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])
    rows, cols, order_key, inverse = rows[first], cols[first], order_key[first], inverse[first]
    degree = np.bincount(rows, minlength=num_entities).astype(np.int32)
    # sorted by (row, col) already, so this is canonical CSR order and the side arrays line up
    indptr = np.zeros(num_entities + 1, np.int64)
    np.cumsum(degree, out=indptr[1:])
    values = 1.0 / degree[cols]
    a = sp.csr_matrix((values, cols.astype(np.int32), indptr), shape=(num_entities, num_entities))
    return a, relations[order_key].astype(np.int32), inverse, degree


def build_graph(kg_dir: str | Path, out_dir: str | Path, cfg: GraphConfig, config_dump: dict,
                corpus_dir: str | Path | None = None) -> dict:
    """Build the graph stage into a staging directory, published into ``out_dir`` (manifest last) on success."""
    from keplm.platform.outputs import staged

    with staged(out_dir, "kg_build") as stage:
        return _build_graph(kg_dir, stage, cfg, config_dump, corpus_dir)


def _build_graph(kg_dir: str | Path, out_dir: str | Path, cfg: GraphConfig, config_dump: dict,
                 corpus_dir: str | Path | None = None) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts: Counter = Counter()
    entities = read_entities(kg_dir, counts)
    aliases = read_aliases(kg_dir, entities, counts)
    triples = read_triples(kg_dir, entities, counts, tuple(cfg.same_as_relations))
    heads = np.asarray(triples.heads, np.int64)
    rels = np.asarray(triples.relations, np.int64)
    tails = np.asarray(triples.tails, np.int64)

    extra = {}
    inputs = hash_inputs([str(kg_dir)])
    if corpus_dir is not None:
        corpus_dir = Path(corpus_dir)
        prepared = read_manifest(corpus_dir, "prepare")  # one clear error when it is not a prepare output
        counts["corpus_segments"] = int(prepared["counts"].get("segments", 0))  # M of PEPR eq. 1
        ids_there = pq.read_table(corpus_dir / "entities.parquet", columns=["name"]).column("name").to_pylist()
        if ids_there != entities.names:
            raise KeplmError(f"{corpus_dir} was prepared with a different KG (entity names/ids differ from {kg_dir})")
        ef = pq.read_table(corpus_dir / "entity_freq.parquet")
        freq = np.zeros(len(entities), np.int64)
        freq[ef.column("entity").to_numpy()] = ef.column("count").to_numpy()
        extra["freq"] = pa.array(freq, pa.int64())
        counts["entities_linked_in_corpus"] = int((freq > 0).sum())
        inputs.update(hash_inputs([str(corpus_dir)]))
    write_entities(entities, out, extra)

    rel_counts = np.bincount(rels, minlength=len(triples.relation_names))
    pq.write_table(pa.table({
        "id": pa.array(range(len(triples.relation_names)), pa.int32()),
        "name": pa.array(triples.relation_names, pa.string()),
        "triples": pa.array(rel_counts, pa.int64()),
    }), out / "relations.parquet")
    pq.write_table(pa.table({
        "head": pa.array(heads, pa.int32()), "relation": pa.array(rels, pa.int32()), "tail": pa.array(tails, pa.int32()),
    }), out / "triples.parquet")

    all_aliases: list[tuple[str, int]] = list(aliases)
    seen = set(all_aliases)
    for pair in triples.same_as:
        if pair in seen:
            counts["aliases_same_as_duplicate"] += 1
            continue
        if pair[0] in entities.index:
            counts["aliases_name_collision"] += 1
        seen.add(pair)
        all_aliases.append(pair)
    pq.write_table(pa.table({
        "alias": pa.array([a for a, _ in all_aliases], pa.string()),
        "entity": pa.array([e for _, e in all_aliases], pa.int32()),
    }), out / "aliases.parquet")

    a, edge_rel, edge_inv, degree = adjacency_from_triples(len(entities), heads, rels, tails)
    sp.save_npz(out / "adjacency.npz", a, compressed=False)
    np.save(out / "adjacency_relation.npy", edge_rel)
    np.save(out / "adjacency_inverse.npy", edge_inv)
    np.save(out / "degree.npy", degree)

    counts.update({
        "relations": len(triples.relation_names),
        "aliases_total": len(all_aliases),
        "edges": int(a.nnz // 2),
        "isolated_entities": int((degree == 0).sum()),
        "max_degree": int(degree.max()),
    })
    counts["triples_same_as"] += 0  # always reported, zero included
    rejected = {k.removeprefix("triples_"): v for k, v in counts.items()
                if k in ("triples_malformed", "triples_undecodable", "triples_unknown_entity",
                         "triples_self_loop", "triples_duplicate") and v}
    counts_out = dict(sorted(counts.items()))
    counts_out["triples_rejected"] = dict(sorted(rejected.items()))
    assert counts["triples_lines"] == counts["triples_kept"] + counts["triples_same_as"] + sum(rejected.values())
    write_manifest(out, "kg_build", GRAPH_SCHEMA_VERSION, config_dump, inputs, counts_out)
    return counts_out


def load_graph(graph_dir: str | Path) -> Graph:
    d = Path(graph_dir)
    read_manifest(d, "kg_build")
    try:
        return Graph(
            entities=pq.read_table(d / "entities.parquet"),
            relations=pq.read_table(d / "relations.parquet"),
            triples=pq.read_table(d / "triples.parquet"),
            adjacency=sp.load_npz(d / "adjacency.npz").tocsr(),
            edge_relation=np.load(d / "adjacency_relation.npy"),
            edge_inverse=np.load(d / "adjacency_inverse.npy"),
            degree=np.load(d / "degree.npy"),
            path=d,
        )
    except (OSError, ValueError) as exc:
        raise KeplmError(f"{d}: incomplete graph directory ({exc}); rebuild it with keplm kg build") from None
