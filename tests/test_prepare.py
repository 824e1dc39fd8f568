"""keplm prepare on a real local Ray: the demo, a corrupted corpus, and a sample of the real data."""

import gzip
import json
from collections import Counter
from itertools import islice

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import DEMO, job_in_process, need_shared
from keplm import config
from keplm.kg.prepare import run_prepare
from keplm.kg.reader import read_aliases, read_entities
from keplm.platform.manifest import read_manifest
from keplm.platform.text import clean_text
from keplm.platform.tokenizer import load_tokenizer


def prepare(out, overrides, config_file="configs/demo.yaml"):
    cfg = config.load(config_file, overrides)
    return run_prepare(cfg.prepare, out, {"prepare": config.dump(cfg)["prepare"]})


def check_outputs(out, kg_dir, max_seq_len):
    """Invariants every prepare output keeps; returns the shard rows."""
    m = read_manifest(out, "prepare")
    c = m["counts"]
    rows = pq.read_table(out / "shards").to_pylist()
    rejected = pq.read_table(out / "rejected").to_pylist() if any((out / "rejected").iterdir()) else []
    assert c["documents_in"] == c["documents_kept"] + sum(c["documents_rejected"].values())
    assert c["segments"] == len(rows)
    assert c["documents_kept"] == len({r["doc_id"] for r in rows})
    assert sum(c["documents_rejected"].values()) == len(rejected)
    assert dict(Counter(r["reason"] for r in rejected)) == c["documents_rejected"]
    assert c["mentions"] == sum(len(r["mentions"]) for r in rows)
    freq = pq.read_table(out / "entity_freq.parquet").to_pydict()
    assert sum(freq["count"]) == c["mentions"] and len(freq["entity"]) == c["entities_linked"]
    # every mention is the surface of its entity (name or alias), and its tokens cover exactly it
    ents = read_entities(kg_dir)
    surfaces = {}
    for i, n in enumerate(ents.names):
        surfaces.setdefault(clean_text(n), i)  # two names with one cleaned surface: the lower id keeps it
    alias_of = {}
    for alias, eid in read_aliases(kg_dir, ents):
        alias_of.setdefault(clean_text(alias), set()).add(eid)
    tok = load_tokenizer(out / "tokenizer")
    for r in rows[:300]:
        assert len(r["input_ids"]) <= max_seq_len
        enc = tok(r["text"], return_offsets_mapping=True, truncation=True, max_length=max_seq_len)
        assert enc["input_ids"] == r["input_ids"]
        last_end = 0
        for mm in r["mentions"]:
            surface = r["text"][mm["char_start"]:mm["char_end"]]
            assert surfaces.get(surface) == mm["entity"] or mm["entity"] in alias_of.get(surface, ())
            assert mm["char_start"] >= last_end  # non-overlapping, sorted
            last_end = mm["char_end"]
            offs = enc["offset_mapping"][mm["token_start"]:mm["token_end"]]
            assert offs[0][0] <= mm["char_start"] < offs[0][1] and offs[-1][0] < mm["char_end"] <= offs[-1][1]
    return m, rows


@pytest.mark.slow   # two linking actors; the quick tier's prepares run one
def test_demo_prepare_with_two_workers(ray_local, tmp_path):
    out = tmp_path / "demo"
    counts = prepare(out, ["prepare.num_workers=2"])
    n_docs = sum(1 for _ in open(DEMO / "corpus" / "demo_corpus.jsonl", encoding="utf-8"))
    assert counts["documents_in"] == n_docs
    m, rows = check_outputs(out, DEMO / "kg", 128)
    assert counts["documents_kept"] > 0.95 * n_docs and counts["mentions"] > 3 * counts["segments"]
    assert counts["shard_files"] > 1  # the one demo file fanned out over the worker pool
    assert set(m) >= {"job", "schema_version", "created", "config", "inputs", "counts"}
    assert all(len(h) == 64 or h.startswith("manifest:") for h in m["inputs"].values())
    ents = pq.read_table(out / "entities.parquet").to_pydict()
    assert ents["id"] == list(range(len(ents["id"])))
    text = " ".join(r["text"] for r in rows)
    assert "http" not in text and "<p>" not in text and "@" not in text


@pytest.mark.slow
def test_a_linking_actor_that_dies_has_its_batch_retried_and_the_output_is_whole(ray_local, demo_prepared, tmp_path,
                                                                                  caplog):
    """A linking actor exits after writing its first batch's files and before reporting them (as on a lost node):
    Ray Data restarts it and retries the batch, which rewrites the same files. The output equals an undisturbed
    run's, file for file, with the same counts."""
    out = tmp_path / "hit"
    with caplog.at_level("WARNING", logger="keplm"):
        counts = prepare(out, ["prepare.fault_at_batch=1"])
    assert "a linking actor exited after batch 1" in caplog.text
    calm = read_manifest(demo_prepared, "prepare")["counts"]
    assert counts == calm
    names = sorted(f.name for f in (out / "shards").glob("*.parquet"))
    assert names == sorted(f.name for f in (demo_prepared / "shards").glob("*.parquet"))
    for name in names:
        assert pq.read_table(out / "shards" / name).equals(pq.read_table(demo_prepared / "shards" / name)), name
    assert not (out / "fault_injected").exists()
    check_outputs(out, DEMO / "kg", 128)


def test_corrupted_corpus_is_counted_not_raised(ray_local, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    good = "患者出现头痛和发热，医生怀疑感冒，建议多休息多喝水。" * 3
    (corpus / "a.jsonl").write_bytes(b"\n".join([
        json.dumps({"id": "ok1", "text": good}, ensure_ascii=False).encode(),
        b'{"id": "bad", "text": "\xff\xfe"}',
        b"{broken json",
        json.dumps({"id": "nofield", "content": good}, ensure_ascii=False).encode(),
        json.dumps({"id": "short", "text": "感冒。"}, ensure_ascii=False).encode(),
        json.dumps({"id": "emoji", "text": "😀😀😀"}).encode(),
        json.dumps({"id": "long", "text": "感冒引起发热。" * 15000}, ensure_ascii=False).encode(),
    ]) + b"\n")
    (corpus / "empty.txt").write_text("")
    (corpus / "b.txt").write_text(good + "\n\n" + good + "\n", encoding="utf-8")
    counts = prepare(tmp_path / "out", [f"prepare.corpus=[{str(corpus)!r}]", "prepare.min_chars=10",
                                        "prepare.tokenizer=null"])
    assert counts["documents_in"] == 7 + 3
    assert counts["documents_rejected"] == {"undecodable": 1, "malformed_json": 1, "missing_field": 1,
                                            "too_short": 1, "empty_after_cleaning": 1, "empty": 1}
    assert counts["documents_kept"] == 4
    assert counts["segments"] >= 3 + 15000 * 7 // 126  # the 105k-char document became many segments
    check_outputs(tmp_path / "out", DEMO / "kg", 128)


def test_all_rejected_is_one_clear_error(ray_local, tmp_path, capsys):
    from keplm.jobs import prepare

    (tmp_path / "c.txt").write_text("短\n")
    capsys.readouterr()
    rc = prepare.main(["--config", "configs/demo.yaml", "--output", str(tmp_path / "o"), "--corpus", str(tmp_path / "c.txt")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    # exactly one keplm error line, and it is the right one
    errors = [line for line in err.splitlines() if line.startswith("keplm prepare: error:")]
    assert len(errors) == 1 and errors[0].startswith("keplm prepare: error: prepare: all 1 documents were rejected")
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_cli_bad_config_is_one_line(tmp_path, capsys):
    # in process (the command line's main); test_bad_input runs the same check as a subprocess
    rc, err = job_in_process("cli", ["prepare", "--config", "configs/demo.yaml", "--output", tmp_path,
                                     "prepare.max_seq_len=-3"], capsys)
    assert rc == 2
    assert err.strip() == ("keplm prepare: error: config error: prepare.max_seq_len: "
                           "Input should be greater than or equal to 8 (got -3)")
    assert "Traceback" not in err


@pytest.mark.slow
def test_real_corpus_sample_with_real_kg_and_vocab(ray_local, tmp_path):
    kg = need_shared("kg")
    vocab = need_shared("vocab", "bert-base-chinese-vocab.txt")
    corpus_dir = need_shared("corpus")
    sample = tmp_path / "sample.jsonl"
    with open(sample, "w", encoding="utf-8") as out:
        for f in sorted(corpus_dir.glob("*.jsonl.gz")):
            with gzip.open(f, "rt", encoding="utf-8") as src:
                out.writelines(islice(src, 400))
    counts = prepare(tmp_path / "real", [f"prepare.corpus=[{str(sample)!r}]", f"prepare.kg={str(kg)!r}",
                                         f"prepare.tokenizer={str(vocab)!r}", "prepare.min_chars=10",
                                         "prepare.max_seq_len=512", "prepare.block_kb=256"], config_file=None)
    assert counts["documents_in"] == 1200
    assert counts["documents_kept"] > 900
    assert counts["entities_linked"] > 500 and counts["mentions"] > 5 * counts["documents_kept"]
    check_outputs(tmp_path / "real", kg, 512)
    # the batches training draws from these real shards: random ones of 16 rows pad heavily, length-grouped
    # ones (train.length_group_batches, 64) waste at most 5 % of their token slots
    import numpy as np
    import pyarrow.compute as pc

    from keplm.platform.train_loop import iter_row_batches, length_grouped

    files = sorted(str(f) for f in (tmp_path / "real" / "shards").glob("*.parquet"))
    rows = pa.concat_tables(list(iter_row_batches(files, 1)))
    rows = rows.take(np.random.default_rng(0).permutation(rows.num_rows))
    batches = [rows.slice(i, 16) for i in range(0, rows.num_rows - 15, 16)]

    def padding(bs):
        lengths = [pc.list_value_length(b.column("input_ids")).to_numpy() for b in bs]
        return 1 - sum(n.sum() for n in lengths) / sum(n.max() * len(n) for n in lengths)

    assert padding(batches) > 0.15
    assert padding(length_grouped(iter(batches), 64, [0, 1])) <= 0.05


def test_vocab_job_trains_a_loadable_tokenizer(ray_local, tmp_path):
    from keplm.jobs import vocab

    assert vocab.main(["--config", "configs/demo.yaml", "--output", str(tmp_path), "prepare.vocab.vocab_size=800"]) == 0
    m = read_manifest(tmp_path, "vocab")
    tok = load_tokenizer(tmp_path / "tokenizer")
    assert m["counts"]["vocab_size"] == len(tok) <= 800
    assert tok.tokenize("感冒发热") == ["感", "冒", "发", "热"]
    assert tok.convert_tokens_to_ids("[MASK]") != tok.unk_token_id


def test_cli_help_lists_jobs(capsys):
    from keplm.jobs.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "prepare" in out and "vocab" in out
