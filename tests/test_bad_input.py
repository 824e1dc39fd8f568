"""Bad input, bad config and hostile files: each case ends in its documented outcome (one line ``keplm <job>:
error: …`` and exit 2, or a counted reject with the rest of the output intact), never a traceback, a hang or a
half-trusted output (issue 30)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from conftest import job_in_process as job

# --- checkpoints: state.pt is read with weights_only=True ------------------------------------------------------

MARK = Path("/tmp/keplm-bad-input-pickle-ran")


class _Planted:
    """A pickled object whose unpickling would run code (here: touch a file)."""

    def __reduce__(self):
        return (Path.touch, (MARK,))


def _real_state():
    import collections
    import functools

    import numpy as np
    import torch

    from keplm.platform.train_loop import collate_stats

    m = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(m.parameters())
    # what transformers' get_linear_schedule_with_warmup builds: a LambdaLR over a functools.partial
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(max, 0.5))
    m(torch.randn(2, 3)).sum().backward()
    opt.step()
    sched.step()

    class Collate:
        stats = collections.Counter(samples=np.int64(4), tokens=7)

    return {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": 1, "epoch": 0, "position": 1,
            "torch_rng": [torch.get_rng_state()], "collate_rng": [np.random.default_rng([0, 1]).bit_generator.state],
            "collate_stats": [collate_stats(Collate())], "world": 1}


def test_checkpoint_state_loads_weights_only(tmp_path):
    import torch

    from keplm.platform.train_loop import load_train_state

    state = _real_state()
    torch.save(state, tmp_path / "state.pt")
    back = load_train_state(tmp_path / "state.pt")
    assert back["collate_stats"] == [{"samples": 4, "tokens": 7}]
    assert back["collate_rng"][0] == state["collate_rng"][0]
    assert torch.equal(back["torch_rng"][0], state["torch_rng"][0])


def test_checkpoint_state_with_a_planted_object_is_refused(tmp_path):
    import torch

    from keplm.platform.train_loop import load_train_state

    MARK.unlink(missing_ok=True)
    torch.save({**_real_state(), "extra": _Planted()}, tmp_path / "state.pt")
    with pytest.raises(RuntimeError, match="refusing to load"):
        load_train_state(tmp_path / "state.pt")
    assert not MARK.exists()
    (tmp_path / "raw.pt").write_bytes(pickle.dumps(_Planted()))   # a bare pickle, not even a torch file
    with pytest.raises(RuntimeError, match="refusing to load"):
        load_train_state(tmp_path / "raw.pt")
    assert not MARK.exists()


def test_no_torch_load_without_weights_only():
    import re

    root = Path(__file__).resolve().parents[1] / "keplm"
    for f in root.rglob("*.py"):
        for call in re.findall(r"torch\.load\([^)]*\)", f.read_text()):
            assert "weights_only=True" in call, f"{f}: {call}"


# --- cleaning and linking: linear time, no exception on any text ------------------------------------------------

ADVERSARIAL = {
    "letters before an @": "a" * 1_000_000 + "@",
    "letters after an @": "a@" + "b" * 1_000_000,
    "one letter": "a" * 1_000_000,
    "one CJK character": "中" * 1_000_000,
    "unclosed comments": "<!--" * 250_000,
    "comments closed at the end": "<!--" * 250_000 + "-->",
    "unclosed tags": "<a " * 333_333,
    "spaces": " " * 1_000_000 + "x",
    "dots and letters before an @": "a." * 500_000 + "@",
    "sentence ends": "。" * 1_000_000,
}


def _seconds(fn, *args) -> float:
    import time

    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


@pytest.fixture(scope="module")
def ordinary_seconds():
    """Cleaning and segmenting 1 MB of ordinary text here and now: the yardstick of a loaded machine."""
    from keplm.platform.text import clean_text, segment_text

    ordinary = ("患者主诉头痛三天，伴恶心。CT 检查未见异常，建议随访。" * 40_000)[:1_000_000]
    return _seconds(clean_text, ordinary), _seconds(segment_text, clean_text(ordinary), 510)


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_a_1mb_adversarial_document_cleans_and_segments_in_linear_time(name, ordinary_seconds):
    """Quadratic patterns took hours on these (0.11 s at 5 K letters before an '@', 1.83 s at 20 K); linear ones
    take about as long as ordinary text of the same length. The bound is one second, or ten times ordinary text
    on a loaded machine."""
    import time

    from keplm.platform.text import clean_text, segment_text

    clean_s, segment_s = ordinary_seconds
    t = time.perf_counter()
    cleaned = clean_text(ADVERSARIAL[name])
    assert time.perf_counter() - t < max(1.0, 10 * clean_s)
    assert _seconds(segment_text, cleaned, 510) < max(1.0, 10 * segment_s)


def test_the_email_rule_still_removes_addresses():
    from keplm.platform.text import clean_text

    assert clean_text("联系 doc.li@hosp.cn 或 a_b+c@x-y.example.org。") == "联系 或 。"
    assert clean_text("x" * 5000 + "@hosp.cn 完") == "完"
    assert clean_text("<!-- a --> 正文 <!-- b") == "正文 <!-- b"


def test_clean_text_never_raises_on_random_unicode():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from keplm.platform.text import CleanConfig, clean_text, segment_text

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.text(alphabet=st.characters(codec=None), max_size=300) | st.text(alphabet="a@.<!->/中 \n\r\t", max_size=300),
           st.integers(1, 40), st.booleans())
    def check(text, max_chars, lower):
        out = clean_text(text, CleanConfig(lowercase=lower))
        assert clean_text(out, CleanConfig(lowercase=lower)) == out or "&" in text   # cleaning settles
        segs = segment_text(out, max_chars)
        assert all(len(s) <= max_chars for s in segs)

    check()


def test_the_linker_never_raises_on_random_unicode():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from keplm.kg.linker import EntityLinker
    from keplm.kg.reader import Entities

    names = ["头痛", "头痛症", "痛症", "CT检查", "ＣＴ", "β受体", "a@b.cn", "\u3000", ""]
    ents = Entities(names=names, types=["t"] * len(names))
    linker = EntityLinker(ents, [("头疼", 0), ("头疼", 1), ("痛", 2)])

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.text(max_size=200) | st.text(alphabet="头痛症CT检查β受体 ，", max_size=200))
    def check(text):
        links = linker.link(text)
        assert links == sorted(links)
        assert all(0 <= s < e <= len(text) and 0 <= eid < len(names) for s, e, eid in links)
        assert all(a[1] <= b[0] for a, b in zip(links, links[1:]))   # never overlapping

    check()


# --- jobs run in-process: one line "keplm <job>: error: ..." and exit code 2 ------------------------------------

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = str(REPO / "configs" / "demo.yaml")


def one_error_line(err: str, job_name: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("keplm ")]
    assert len(lines) == 1 and lines[0].startswith(f"keplm {job_name}: error: "), err
    assert "Traceback" not in err, err
    return lines[0]


def fake_output(d: Path, job_name: str = "prepare") -> Path:
    import json

    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.json").write_text(json.dumps({"job": job_name, "schema_version": 1, "counts": {}}))
    return d


def test_prepare_refuses_a_tokenizer_inside_its_output_and_leaves_it(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "tokenizer").mkdir(parents=True)
    vocab = out / "tokenizer" / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n头\n痛\n")
    rc, err = job("prepare", ["--config", DEMO_CONFIG, "--output", out, f"prepare.tokenizer={vocab}"], capsys)
    assert rc == 2 and "lies inside" in one_error_line(err, "prepare")
    assert vocab.read_text().endswith("痛\n")


def test_kg_build_refuses_to_write_into_its_corpus_input(tmp_path, capsys):
    prepared = fake_output(tmp_path / "p")
    before = (prepared / "manifest.json").read_bytes()
    rc, err = job("kg", ["build", "--config", DEMO_CONFIG, "--corpus", prepared, "--output", prepared], capsys)
    assert rc == 2 and "inside" in one_error_line(err, "kg build")
    assert (prepared / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("step", ["neighbours", "embed"])
def test_kg_neighbours_and_embed_refuse_their_graph_as_output(tmp_path, capsys, step):
    graph = fake_output(tmp_path / "g", "kg_build")
    rc, err = job("kg", [step, "--config", DEMO_CONFIG, "--graph", graph, "--output", graph], capsys)
    assert rc == 2 and "inside" in one_error_line(err, f"kg {step}")


def test_augment_refuses_an_output_holding_its_input(tmp_path, capsys):
    data = tmp_path / "train.txt"
    data.write_text("头 B-x\n痛 I-x\n\n")
    rc, err = job("augment", ["--checkpoint", tmp_path / "nomodel", "--data", data, "--output", tmp_path], capsys)
    assert rc == 2 and "inside" in one_error_line(err, "augment")
    assert data.read_text() == "头 B-x\n痛 I-x\n\n"


def test_an_output_that_is_a_file_is_one_line(tmp_path, capsys):
    f = tmp_path / "out.txt"
    f.write_text("mine")
    rc, err = job("prepare", ["--config", DEMO_CONFIG, "--output", f], capsys)
    assert rc == 2 and "existing file" in one_error_line(err, "prepare") and f.read_text() == "mine"


@pytest.mark.parametrize("override,words", [
    ("ray.num_cpus=0", "ray.num_cpus"),                      # a local Ray with 0 CPUs waited forever
    ("prepare.vocab.vocab_size=-5", "prepare.vocab.vocab_size"),
    ("prepare.max_seq_len=abc", "prepare.max_seq_len"),
    ("prepare.nonsense=1", "nonsense"),
])
def test_a_bad_config_value_is_one_line(tmp_path, capsys, override, words):
    rc, err = job("prepare", ["--config", DEMO_CONFIG, "--output", tmp_path / "o", override], capsys)
    assert rc == 2 and words in one_error_line(err, "prepare")


@pytest.mark.parametrize("text", ["- a\n- b\n", "ray: 3\n", "prepare: [1, 2\n", "\x00\x01"])
def test_a_config_of_the_wrong_yaml_type_is_one_line(tmp_path, capsys, text):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    rc, err = job("prepare", ["--config", cfg, "--output", tmp_path / "o"], capsys)
    assert rc == 2
    one_error_line(err, "prepare")


def test_a_missing_input_file_is_one_line(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    rc, err = job("augment", ["--checkpoint", tmp_path / "model", "--data", tmp_path / "absent.txt",
                              "--output", tmp_path / "o"], capsys)
    assert rc == 2 and "absent.txt" in one_error_line(err, "augment")


def test_user_input_errors_are_one_line_and_bugs_stay_tracebacks(capsys):
    import argparse
    import gzip
    import zlib

    from keplm.jobs.common import run_job

    args = argparse.Namespace(job="kg", kg_job="build")
    for exc in (FileNotFoundError(2, "No such file or directory", "/data/kg/entities.tsv"),
                gzip.BadGzipFile("Not a gzipped file (b'ab')"), EOFError("Compressed file ended before the end"),
                zlib.error("Error -3 while decompressing data"), UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad")):
        def fn(_, exc=exc):
            raise exc
        assert run_job(fn, args) == 2
        one_error_line(capsys.readouterr().err, "kg build")

    def bug(_):
        raise ZeroDivisionError("a bug of keplm")
    with pytest.raises(ZeroDivisionError):
        run_job(bug, args)


def test_an_output_holding_someone_elses_files_is_refused_untouched(tmp_path, capsys):
    out = tmp_path / "thesis"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "chapter1.parquet").write_text("not keplm's")
    rc, err = job("prepare", ["--config", DEMO_CONFIG, "--output", out], capsys)
    assert rc == 2 and "did not write" in one_error_line(err, "prepare")
    assert (out / "shards" / "chapter1.parquet").read_text() == "not keplm's"


def test_pretrain_accepts_its_own_stage_as_prepared_but_not_an_input_it_overwrites(tmp_path):
    from types import SimpleNamespace

    from keplm import config
    from keplm.jobs.pretrain import guard_pretrain_output
    from keplm.platform.errors import KeplmError

    cfg = config.load(DEMO_CONFIG)
    out = tmp_path / "run"
    prepared = fake_output(out / "prepare")
    guard_pretrain_output(out, SimpleNamespace(prepared=str(prepared), neighbours=None, embeddings=None), cfg)
    # pretrain builds OUT/prepare when no --prepared is given: a tokenizer there would be overwritten
    cfg = config.load(DEMO_CONFIG, [f"prepare.tokenizer={out / 'prepare' / 'tokenizer' / 'vocab.txt'}"])
    with pytest.raises(KeplmError, match="inside"):
        guard_pretrain_output(out, SimpleNamespace(prepared=None, neighbours=None, embeddings=None), cfg)


def test_keplm_deletes_only_what_it_created(tmp_path):
    from keplm.platform.errors import KeplmError
    from keplm.platform.outputs import mark, remove_owned

    mine = tmp_path / "mine"
    mark(mine)
    (mine / "x").write_text("1")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "y").write_text("2")
    remove_owned(mine)
    assert not mine.exists()
    with pytest.raises(KeplmError, match="did not create"):
        remove_owned(theirs)
    with pytest.raises(KeplmError, match="did not create"):
        remove_owned(theirs / "y")
    assert (theirs / "y").read_text() == "2"


def test_a_second_job_on_the_same_output_is_refused(tmp_path):
    import subprocess
    import sys

    from keplm.platform.errors import KeplmError
    from keplm.platform.outputs import guard_output, release

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from keplm.platform.outputs import guard_output;"
                               f"guard_output('prepare', {str(out)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(KeplmError, match="another keplm job is writing"):
            guard_output("prepare", out)
    finally:
        holder.kill()
        holder.wait()
    guard_output("prepare", out)   # free again once the first job has gone
    release(out)


# --- stages are published whole, manifest last; a half-written stage is rebuilt -----------------------------------

def _fake_stage(files: int, fail_after: int | None = None):
    """A stage run that writes ``files`` data files and its manifest through ``staged``; it raises after
    ``fail_after`` files (a crash part-way)."""
    from keplm.platform.manifest import write_manifest
    from keplm.platform.outputs import staged

    calls = []

    def run(out):
        calls.append(out)
        with staged(out, "fake") as stage:
            (stage / "shards").mkdir()
            for i in range(files):
                if fail_after is not None and i == fail_after:
                    raise RuntimeError("killed part-way")
                (stage / "shards" / f"{i}.parquet").write_text(str(i))
            write_manifest(stage, "fake", 1, {}, {}, {"shard_files": files})
    return run, calls


def test_a_stage_crashed_part_way_is_rebuilt_never_reused(tmp_path):
    from keplm.models.pipeline import _stage
    from keplm.platform.manifest import read_manifest

    out = tmp_path / "prepare"
    run_a, calls_a = _fake_stage(3)
    _stage(out, {"config": "A"}, run_a)
    _stage(out, {"config": "A"}, run_a)
    assert len(calls_a) == 1                                   # built once, then reused
    run_b, _ = _fake_stage(3, fail_after=1)
    with pytest.raises(RuntimeError, match="part-way"):
        _stage(out, {"config": "B"}, run_b)
    # the crashed B left A's files and manifest as they were, but no key: A is rebuilt, not reused
    assert sorted(p.name for p in (out / "shards").glob("*.parquet")) == ["0.parquet", "1.parquet", "2.parquet"]
    assert not (out / "stage_key.json").exists()
    _stage(out, {"config": "A"}, run_a)
    assert len(calls_a) == 2
    assert read_manifest(out)["counts"]["shard_files"] == len(list((out / "shards").glob("*.parquet")))
    assert not [p for p in out.iterdir() if p.name.startswith(".staging-")]


@pytest.mark.parametrize("key_text", ["", "{", "[]", '{"key": 1}', "null"])
def test_an_empty_or_corrupt_stage_key_means_rebuild(tmp_path, key_text):
    from keplm.models.pipeline import _stage

    out = tmp_path / "graph"
    run, calls = _fake_stage(2)
    _stage(out, {"k": 1}, run)
    (out / "stage_key.json").write_text(key_text)
    _stage(out, {"k": 1}, run)
    assert len(calls) == 2


def test_a_crash_between_a_stages_data_and_its_manifest_leaves_no_manifest(tmp_path, monkeypatch):
    import os

    from keplm.models.pipeline import _stage
    from keplm.platform import outputs

    out = tmp_path / "neighbours"
    run, calls = _fake_stage(2)
    _stage(out, {"k": 1}, run)
    real_replace = os.replace

    def crash_on_manifest(src, dst):
        if Path(dst) == out / "manifest.json":   # publishing the manifest, after the data
            raise KeyboardInterrupt("killed between the data and the manifest")
        return real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", crash_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        _stage(out, {"k": 2}, run)
    monkeypatch.setattr(outputs.os, "replace", real_replace)
    assert not (out / "manifest.json").exists() and not (out / "stage_key.json").exists()
    _stage(out, {"k": 2}, run)                                 # rebuilt, then complete
    assert len(calls) == 3 and (out / "manifest.json").is_file()


def test_a_manifest_changed_after_its_key_was_written_is_stale(tmp_path):
    from keplm.models.pipeline import _stage
    from keplm.platform.manifest import write_manifest

    out = tmp_path / "embed-transr"
    run, calls = _fake_stage(1)
    _stage(out, {"k": 1}, run)
    write_manifest(out, "fake", 1, {"other": True}, {}, {})   # e.g. another job published here since
    _stage(out, {"k": 1}, run)
    assert len(calls) == 2


def test_pretrain_drops_the_model_of_another_training(tmp_path):
    from keplm.jobs.pretrain import drop_other_trainings_model, mark_model
    from keplm.platform.outputs import mark

    out = tmp_path / "run"
    mark(out)
    for name in ("model", "model-bert"):
        (out / name).mkdir()
        mark_model(out / name, "key-A")
    drop_other_trainings_model(out, "key-A")
    assert (out / "model").is_dir() and (out / "model-bert").is_dir()   # this training's: kept
    drop_other_trainings_model(out, "key-B")                              # a run of another training
    assert not (out / "model").exists() and not (out / "model-bert").exists()


# --- corpus records: bounded sizes, every bad record a counted reject, the rest intact -----------------------------

def _docs(path, fmt=None, limit=None):
    from keplm.platform.corpus_io import MAX_RECORD_BYTES, detect_format, iter_documents

    return list(iter_documents(str(path), Path(path).name, fmt or detect_format(str(path)), "text", "id", 100,
                               limit or MAX_RECORD_BYTES))


def _reasons(rows):
    from collections import Counter

    return Counter(r["reject_reason"] for r in rows)


def test_a_10mb_single_line_is_one_counted_reject_and_the_next_lines_stand(tmp_path):
    f = tmp_path / "c.txt"
    f.write_bytes(b"x" * (10 << 20) + b"\n" + "头痛三天。\n".encode() * 3)
    rows = _docs(f)
    assert _reasons(rows) == {"record_too_large": 1, None: 3}
    assert rows[0]["doc_id"] == "c.txt:1" and rows[1]["text"] == "头痛三天。"


def test_a_file_without_newlines_is_never_read_whole(tmp_path):
    import tracemalloc

    f = tmp_path / "c.jsonl"
    f.write_bytes(b'{"text": "' + b"a" * (32 << 20) + b'"}')   # 32 MB, no newline
    tracemalloc.start()
    rows = _docs(f, limit=64 << 10)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert _reasons(rows) == {"record_too_large": 1}
    assert peak < 8 << 20                                   # a few 1 MiB skip reads, never the 32 MB line


def test_a_minified_json_array_is_a_counted_reject(tmp_path):
    import json

    f = tmp_path / "c.json"
    f.write_text(json.dumps([{"id": i, "text": "头痛" * 50} for i in range(2000)]))
    assert _reasons(_docs(f, limit=64 << 10)) == {"record_too_large": 1}
    assert _reasons(_docs(f)) == {"malformed_json": 1}      # under the bound: one record, not an object


def test_an_oversize_parquet_value_is_a_counted_reject(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["中" * 100_000, "头痛三天"]}), f)
    rows = _docs(f, limit=100_000)
    assert [r["reject_reason"] for r in rows] == ["record_too_large", None]


def test_truncated_and_corrupt_gzip_keep_the_lines_read_before(tmp_path):
    import gzip

    whole = gzip.compress("".join(f'{{"id": "{i}", "text": "第{i}个病例，头痛。"}}\n' for i in range(2000)).encode())
    (tmp_path / "t.jsonl.gz").write_bytes(whole[: len(whole) // 2])          # truncated
    rows = _docs(tmp_path / "t.jsonl.gz")
    assert rows[-1]["reject_reason"] == "unreadable_file" and _reasons(rows)[None] == len(rows) - 1 > 0
    (tmp_path / "c.jsonl.gz").write_bytes(b"this is not gzip at all\n")       # corrupt
    assert _reasons(_docs(tmp_path / "c.jsonl.gz")) == {"unreadable_file": 1}
    bad = bytearray(whole)
    bad[len(bad) // 2: len(bad) // 2 + 64] = bytes(64)                       # damaged in the middle
    (tmp_path / "d.jsonl.gz").write_bytes(bytes(bad))
    rows = _docs(tmp_path / "d.jsonl.gz")
    assert rows[-1]["reject_reason"] in ("unreadable_file", "malformed_json", "undecodable")


def test_nul_bytes_and_mixed_encodings(tmp_path):
    from keplm.platform.text import clean_text

    f = tmp_path / "c.txt"
    f.write_bytes("头\x00痛\x00三天\n".encode() + "胃痛两周\n".encode("gbk") + "咳嗽\n".encode("utf-8-sig"))
    rows = _docs(f)
    assert [r["reject_reason"] for r in rows] == [None, "undecodable", None]
    assert clean_text(rows[0]["text"]) == "头痛三天"


# --- the KG: bad lines counted, a KG with nothing usable one line ------------------------------------------------

def _kg(d: Path, entities: str, triples: str, aliases: str | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "entities.tsv").write_text("name\ttype\n" + entities, encoding="utf-8")
    (d / "triples.tsv").write_text("head\trelation\ttail\n" + triples, encoding="utf-8")
    if aliases is not None:
        (d / "aliases.tsv").write_text("alias\tname\n" + aliases, encoding="utf-8")
    return d


GOOD_TRIPLES = "".join(f"e{i}\tr\te{i + 1}\n" for i in range(12))
GOOD_ENTITIES = "".join(f"e{i}\tT\n" for i in range(13))


@pytest.mark.parametrize("case,entities,triples,words", [
    ("every entity line bad", "no tab here\n\t\nx\ty\tz\n", GOOD_TRIPLES, "no usable entity"),
    ("every triple line bad", GOOD_ENTITIES, "a\tb\nnope\n\t\t\n", "no usable triple"),
    ("self loops only", GOOD_ENTITIES, "".join(f"e{i}\tr\te{i}\n" for i in range(13)), "self_loop"),
    ("unknown entities only", GOOD_ENTITIES, "x\tr\ty\n", "unknown_entity"),
])
def test_a_kg_with_nothing_usable_is_one_line_and_no_output(tmp_path, capsys, case, entities, triples, words):
    kg = _kg(tmp_path / "kg", entities, triples)
    rc, err = job("kg", ["build", "--kg", kg, "--output", tmp_path / "g"], capsys)
    assert rc == 2 and words in one_error_line(err, "kg build")
    assert not (tmp_path / "g" / "manifest.json").exists()


def test_duplicate_entities_with_other_types_and_bad_aliases_are_counted(tmp_path):
    from keplm.kg.graph import GraphConfig, build_graph
    from keplm.platform.manifest import read_manifest

    kg = _kg(tmp_path / "kg", GOOD_ENTITIES + "e0\tOther\ne1\tOther\n", GOOD_TRIPLES,
             aliases="a0\te0\nghost\tnobody\na1\tsynonym_of\te1\ne2\te2\n")
    counts = build_graph(kg, tmp_path / "g", GraphConfig(), {})
    m = read_manifest(tmp_path / "g", "kg_build")
    assert m["counts"]["entities"] == 13 and counts["entities_duplicate"] == 2
    import pyarrow.parquet as pq

    types = pq.read_table(tmp_path / "g" / "entities.parquet").column("type").to_pylist()
    assert types[:2] == ["T", "T"]                              # a repeated name keeps its first type
    assert counts["aliases_unknown_entity"] == 1 and counts["aliases_malformed"] == 1 and counts["aliases_self"] == 1


def test_a_truncated_gzipped_kg_is_one_line(tmp_path, capsys):
    import gzip

    kg = _kg(tmp_path / "kg", GOOD_ENTITIES, GOOD_TRIPLES)
    data = gzip.compress((kg / "triples.tsv").read_bytes() * 50)
    (kg / "triples.tsv").unlink()
    (kg / "triples.tsv.gz").write_bytes(data[: len(data) // 2])
    rc, err = job("kg", ["build", "--kg", kg, "--output", tmp_path / "g"], capsys)
    assert rc in (0, 2) and "Traceback" not in err           # the lines before the damage stand, or one line
    if rc == 2:
        one_error_line(err, "kg build")


# --- prepare on a real local Ray ------------------------------------------------------------------------------------

def _prepare(out, corpus, *overrides):
    from keplm import config
    from keplm.kg.prepare import run_prepare

    cfg = config.load(DEMO_CONFIG, [f"prepare.corpus={[str(c) for c in corpus]}", "prepare.num_workers=1",
                                    "prepare.vocab.vocab_size=500", *overrides])
    return run_prepare(cfg.prepare, out, {"prepare": config.dump(cfg)["prepare"]})


def test_duplicate_ids_are_counted_rejects_and_shard_names_never_collide(ray_local, tmp_path):
    import pyarrow.parquet as pq

    from keplm.platform.manifest import read_manifest

    src = REPO / "keplm" / "data" / "demo" / "corpus" / "demo_corpus.jsonl"
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)[:200]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.jsonl").write_text("".join(lines), encoding="utf-8")
    (tmp_path / "c" / "b.jsonl").write_text("".join(lines), encoding="utf-8")          # the same ids again
    (tmp_path / "c" / "c.jsonl").write_text("".join(lines[:10] * 2), encoding="utf-8")  # repeated inside a file
    counts = _prepare(tmp_path / "out", [tmp_path / "c"], "prepare.batch_size=50")
    assert counts["documents_in"] == 420 and counts["documents_rejected"]["duplicate_id"] == 220
    rows = pq.read_table(tmp_path / "out" / "shards").select(["doc_id", "segment"]).to_pylist()
    assert len(rows) == counts["segments"] == len({(r["doc_id"], r["segment"]) for r in rows})
    assert len(list((tmp_path / "out" / "shards").glob("*.parquet"))) == counts["shard_files"]
    assert read_manifest(tmp_path / "out", "prepare")["counts"] == counts


def test_a_failed_prepare_leaves_the_previous_output_whole_and_writes_no_manifest(ray_local, tmp_path):
    from keplm.platform.errors import KeplmError
    from keplm.platform.manifest import read_manifest

    src = REPO / "keplm" / "data" / "demo" / "corpus" / "demo_corpus.jsonl"
    (tmp_path / "good.jsonl").write_text("".join(src.read_text(encoding="utf-8").splitlines(True)[:100]))
    _prepare(tmp_path / "out", [tmp_path / "good.jsonl"])
    before = read_manifest(tmp_path / "out", "prepare")
    shards = sorted(p.name for p in (tmp_path / "out" / "shards").glob("*.parquet"))
    (tmp_path / "short.txt").write_text("短\n太短\n")
    with pytest.raises(KeplmError, match="all 2 documents were rejected"):
        _prepare(tmp_path / "out", [tmp_path / "short.txt"])
    assert read_manifest(tmp_path / "out", "prepare") == before
    assert sorted(p.name for p in (tmp_path / "out" / "shards").glob("*.parquet")) == shards
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".staging-")]


# --- credentials of a tracking URI are never written or printed ------------------------------------------------

SECRET_URI = "https://alice:s3cr3t-t0ken@mlflow.example.org:5000/path?access_token=qwerty&x=1"


def test_redact_uri():
    from keplm.platform.tracking import redact, redact_uri

    assert redact_uri(SECRET_URI) == "https://***@mlflow.example.org:5000/path?access_token=***&x=1"
    assert redact_uri("sqlite:////tmp/a@b/mlflow.db") == "sqlite:////tmp/a@b/mlflow.db"
    assert redact_uri("cannot reach http://u@h:1 now") == "cannot reach http://***@h:1 now"
    assert redact({"a": [SECRET_URI], "n": 3}) == {"a": [redact_uri(SECRET_URI)], "n": 3}


def test_no_credentials_in_manifests_params_markers_stdout_or_errors(tmp_path, capsys):
    from keplm import config
    from keplm.models.pipeline import config_params, keyed_run
    from keplm.platform import console
    from keplm.platform.errors import KeplmError
    from keplm.platform.manifest import write_manifest
    from keplm.platform.tracking import check_tracking, mlflow_ui_command

    cfg = config.load(DEMO_CONFIG, [f"tracking.uri={SECRET_URI}"])
    write_manifest(tmp_path, "pretrain", 1, config.dump(cfg), {}, {"tracking_uri": SECRET_URI}, cmd=SECRET_URI)
    keyed_run(None, cfg, tmp_path / "mlflow_run.json", "k", {}, SECRET_URI, job="pretrain", anew=str,
              start=lambda: "run-1")
    console.result('{"tracking_uri": "%s"}' % SECRET_URI)
    written = (tmp_path / "manifest.json").read_text() + (tmp_path / "mlflow_run.json").read_text()
    printed = capsys.readouterr().out + mlflow_ui_command(SECRET_URI) + "".join(config_params(cfg).values())
    with pytest.raises(KeplmError) as err:
        check_tracking("http://alice:s3cr3t-t0ken@127.0.0.1:1")
    for text in (written, printed, str(err.value)):
        assert "s3cr3t" not in text and "qwerty" not in text and "***" in text


def test_evaluate_uses_a_manifests_store_only_when_it_is_the_checkpoints_own(tmp_path):
    from keplm.jobs.evaluate import _own_store

    model = tmp_path / "run" / "model"
    model.mkdir(parents=True)
    own = f"sqlite:///{(tmp_path / 'run' / 'mlflow.db').resolve()}"
    assert _own_store(model, own) == own
    assert _own_store(model, "https://***@mlflow.example.org") is None          # someone's server: not unasked
    assert _own_store(model, f"sqlite:///{(tmp_path / 'other.db').resolve()}") is None


@pytest.mark.slow
def test_a_local_dashboard_asks_for_the_token_and_listens_on_localhost(tmp_path):
    """keplm's local Ray (sweeps start one with a dashboard): token auth on, the Jobs API refuses a request without
    the token, the dashboard bound to 127.0.0.1. A fresh process: Ray reads the auth mode when it is imported."""
    import os
    import subprocess
    import sys

    code = """
import json, os, urllib.request, urllib.error
from keplm.platform.ray_session import RayConfig, connect
connect(RayConfig(num_cpus=1, include_dashboard=True, object_store_memory_mb=100))
import ray
url = ray.get_runtime_context().worker.node.address_info["webui_url"]
try:
    urllib.request.urlopen(f"http://{url}/api/jobs/", timeout=10)
    status = 200
except urllib.error.HTTPError as exc:
    status = exc.code
print(json.dumps({"mode": os.environ.get("RAY_AUTH_MODE"), "url": url, "status": status}))
ray.shutdown()
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    import json

    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["mode"] == "token" and got["url"].startswith("127.0.0.1:") and got["status"] == 401


@pytest.mark.slow   # a fresh Python process; the quick tier runs the same mains in process
def test_the_command_line_gives_the_same_one_line(tmp_path):
    """The installed entry point, as a user runs it: a KG directory that does not exist."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "keplm.jobs.cli", "kg", "build", "--kg", str(tmp_path / "nokg"),
                        "--output", str(tmp_path / "g")], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    one_error_line(r.stderr, "kg build")
