import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from keplm.platform.corpus_io import detect_format, expand_inputs, iter_documents
from keplm.platform.errors import KeplmError


def reasons(rows):
    return [r["reject_reason"] for r in rows]


def test_jsonl_accounting_on_corrupted_input(tmp_path):
    p = tmp_path / "c.jsonl"
    lines = [
        json.dumps({"id": "a", "text": "正常文本"}, ensure_ascii=False).encode(),
        b'{"id": "b", "text": "\xff\xfe broken utf8"}',
        b"{not json",
        json.dumps({"id": "d", "body": "no text field"}).encode(),
        json.dumps({"text": "没有id"}, ensure_ascii=False).encode(),
        b"",
        json.dumps({"id": "g", "text": 42}).encode(),
        json.dumps(["a", "list"]).encode(),
        json.dumps({"id": "i", "text": "   "}).encode(),
        json.dumps({"id": "j", "text": "长" * 100_000}, ensure_ascii=False).encode(),
    ]
    p.write_bytes(b"\n".join(lines) + b"\n")
    rows = list(iter_documents(str(p), "c.jsonl", "jsonl"))
    assert len(rows) == len(lines)
    assert reasons(rows) == [None, "undecodable", "malformed_json", "missing_field", None, "empty",
                             "not_text", "malformed_json", "empty", None]
    assert rows[0]["doc_id"] == "a" and rows[4]["doc_id"] == "c.jsonl:5"
    assert len(rows[9]["text"]) == 100_000


def test_plain_text_gz_and_truncated_gz(tmp_path):
    p = tmp_path / "docs.txt.gz"
    with gzip.open(p, "wb") as f:
        f.write("第一篇\n\n第三篇\n".encode())
    rows = list(iter_documents(str(p), "docs.txt.gz", detect_format(str(p))))
    assert [r["doc_id"] for r in rows] == ["docs.txt.gz:1", "docs.txt.gz:2", "docs.txt.gz:3"]
    assert reasons(rows) == [None, "empty", None]
    broken = tmp_path / "broken.txt.gz"
    data = gzip.compress(("行\n" * 5000).encode())
    broken.write_bytes(data[: len(data) // 2])
    rows = list(iter_documents(str(broken), "broken.txt.gz", "text"))
    assert rows[-1]["reject_reason"] == "unreadable_file"
    assert all(r["reject_reason"] is None for r in rows[:-1])


def test_parquet_with_and_without_fields(tmp_path):
    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": ["x", None], "text": ["文本", None]}), p)
    rows = list(iter_documents(str(p), "c.parquet", "parquet"))
    assert [r["doc_id"] for r in rows] == ["x", "c.parquet:2"] and reasons(rows) == [None, "not_text"]
    rows = list(iter_documents(str(p), "c.parquet", "parquet", text_field="content"))
    assert reasons(rows) == ["missing_field", "missing_field"]
    (tmp_path / "fake.parquet").write_bytes(b"not parquet")
    assert reasons(iter_documents(str(tmp_path / "fake.parquet"), "fake.parquet", "parquet")) == ["unreadable_file"]


def test_expand_inputs_dirs_globs_and_errors(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.jsonl").write_text("")
    (tmp_path / "d" / "sub" / "b.txt").write_text("")
    files = expand_inputs([str(tmp_path / "d"), str(tmp_path / "d" / "*.jsonl")])
    assert [n for _, n in files] == ["a.jsonl", "sub/b.txt"]
    with pytest.raises(KeplmError, match="not found"):
        expand_inputs([str(tmp_path / "nothing*.jsonl")])
    with pytest.raises(KeplmError, match="cannot tell the format"):
        detect_format("corpus.csv")
