"""kg build: triple accounting, bad input, the PPR adjacency and its relation lookup."""

import gzip
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import DEMO, job_in_process, need_shared
from keplm.kg.graph import GraphConfig, adjacency_from_triples, build_graph, load_graph
from keplm.platform.errors import KeplmError
from keplm.platform.manifest import read_manifest


def write_kg(d, entities, triples, aliases=None, raw_triples: bytes = b""):
    d.mkdir(parents=True, exist_ok=True)
    (d / "entities.tsv").write_text("name\ttype\n" + "".join(f"{n}\t{t}\n" for n, t in entities), encoding="utf-8")
    body = "head\trelation\ttail\n" + "".join("\t".join(t) + "\n" for t in triples)
    (d / "triples.tsv").write_bytes(body.encode("utf-8") + raw_triples)
    if aliases is not None:
        (d / "aliases.tsv").write_text("alias\tname\n" + "".join(f"{a}\t{n}\n" for a, n in aliases), encoding="utf-8")
    return d


ENTS = [("感冒", "Disease"), ("发热", "Symptom"), ("咳嗽", "Symptom"), ("肺炎", "Disease"), ("孤立病", "Disease")]


def test_triple_accounting_and_bad_lines(tmp_path):
    kg = write_kg(tmp_path / "kg", ENTS, [
        ("感冒", "症状", "发热"), ("感冒", "症状", "咳嗽"),
        ("感冒", "症状", "发热"),            # duplicate
        ("感冒", "并发症", "肺炎"),
        ("肺炎", "症状", "发热"),
        ("感冒", "症状", "感冒"),            # self-loop
        ("感冒", "症状", "不存在"),          # unknown entity
        ("感冒", "", "咳嗽"),               # relation with no name -> malformed
        ("感冒", "症状"),                   # two fields -> malformed
        ("感冒", "别名", "伤风"),            # same-as: an alias, not an edge
        ("肺炎", "别名", "发热"),            # same-as whose alias is another entity's name
    ], aliases=[("伤风", "感冒"), ("头伤风", "感冒")], raw_triples=b"\xff\xfe\t\x80\n")
    c = build_graph(kg, tmp_path / "g", GraphConfig(), {})
    rejected = c["triples_rejected"]
    assert rejected == {"duplicate": 1, "self_loop": 1, "unknown_entity": 1, "malformed": 2, "undecodable": 1}
    assert c["triples_kept"] == 4 and c["triples_same_as"] == 2
    assert c["triples_lines"] == 12 == c["triples_kept"] + c["triples_same_as"] + sum(rejected.values())
    assert c["isolated_entities"] == 1  # 孤立病
    aliases = pq.read_table(tmp_path / "g" / "aliases.parquet").to_pylist()
    # 伤风 comes from aliases.tsv and again from the 别名 triple: kept once
    assert sorted((a["alias"], a["entity"]) for a in aliases) == [("伤风", 0), ("发热", 3), ("头伤风", 0)]
    assert c["aliases_same_as_duplicate"] == 1 and c["aliases_name_collision"] == 1
    rel = pq.read_table(tmp_path / "g" / "relations.parquet").to_pydict()
    assert rel == {"id": [0, 1], "name": ["症状", "并发症"], "triples": [3, 1]}
    ents = pq.read_table(tmp_path / "g" / "entities.parquet").to_pydict()
    assert ents["name"] == [n for n, _ in ENTS] and ents["id"] == list(range(5))


def test_adjacency_is_column_stochastic_with_first_relation(tmp_path):
    # 0-1 joined by two triples (relation 0 first, then relation 1 the other way round)
    heads, rels, tails = np.array([0, 1, 0, 2]), np.array([0, 1, 2, 0]), np.array([1, 0, 2, 3])
    a, er, ei, deg = adjacency_from_triples(5, heads, rels, tails)
    dense = a.toarray()
    assert deg.tolist() == [2, 1, 2, 1, 0]
    np.testing.assert_allclose(dense.sum(axis=0), [1, 1, 1, 1, 0])
    assert ((dense > 0) == (dense.T > 0)).all()  # undirected pattern
    lookup = {(i, int(a.indices[k])): (int(er[k]), bool(ei[k]))
              for i in range(5) for k in range(a.indptr[i], a.indptr[i + 1])}
    assert lookup[(0, 1)] == (0, False)   # first triple: (0, r0, 1)
    assert lookup[(1, 0)] == (0, True)    # seen from 1, the same triple has 1 as its tail
    assert lookup[(3, 2)] == (0, True) and lookup[(2, 3)] == (0, False)
    assert lookup[(2, 0)] == (2, True)


def test_unusable_inputs_give_one_clear_error(tmp_path, capsys):
    kg = write_kg(tmp_path / "kg", ENTS, [("感冒", "症状", "不存在")])
    with pytest.raises(KeplmError, match="no usable triple"):
        build_graph(kg, tmp_path / "g", GraphConfig(), {})
    (tmp_path / "kg" / "triples.tsv").write_text("a\tb\n", encoding="utf-8")
    with pytest.raises(KeplmError, match="expected header"):
        build_graph(kg, tmp_path / "g", GraphConfig(), {})
    with pytest.raises(KeplmError, match="no manifest|no manifest.json"):
        load_graph(tmp_path / "nothing")
    # the command line's main prints exactly that line, exit 2, no traceback
    rc, err = job_in_process("kg", ["build", "--kg", kg, "--output", tmp_path / "g"], capsys)
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("keplm kg build: error:")


def test_build_demo_with_corpus_frequencies(tmp_path, demo_prepared):
    c = build_graph(DEMO / "kg", tmp_path / "g", GraphConfig(), {}, corpus_dir=demo_prepared)
    g = load_graph(tmp_path / "g")
    freq = dict(zip(*pq.read_table(demo_prepared / "entity_freq.parquet").to_pydict().values()))
    assert g.freq.sum() == sum(freq.values()) and all(g.freq[e] == n for e, n in freq.items())
    assert c["entities_linked_in_corpus"] == len(freq)
    assert c["corpus_segments"] == read_manifest(demo_prepared)["counts"]["segments"]
    assert str(demo_prepared) in read_manifest(tmp_path / "g")["inputs"]
    # a corpus prepared against another KG is refused
    other = write_kg(tmp_path / "other", ENTS, [("感冒", "症状", "发热")])
    with pytest.raises(KeplmError, match="different KG"):
        build_graph(other, tmp_path / "g2", GraphConfig(), {}, corpus_dir=demo_prepared)


@pytest.mark.slow
def test_build_real_kg():
    kg = need_shared("kg")
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        c = build_graph(kg, Path(tmp), GraphConfig(), {})
        with gzip.open(kg / "triples.tsv.gz", "rt", encoding="utf-8") as f:
            lines = sum(1 for line in f if line.strip()) - 1
        assert c["triples_lines"] == lines
        assert c["triples_kept"] + c["triples_same_as"] + sum(c["triples_rejected"].values()) == lines
        assert c["relations"] == 9 and c["entities"] > 20000
        g = load_graph(tmp)
        col = np.asarray(g.adjacency.sum(axis=0)).ravel()
        np.testing.assert_allclose(col[g.degree > 0], 1.0)
        assert json.loads((Path(tmp) / "manifest.json").read_text())["job"] == "kg_build"
