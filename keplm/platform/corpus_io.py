"""Reading raw corpus files into documents, with per-record accounting.

Formats: JSON lines (a configurable text field and optional id field), plain text (one document per
line) and Parquet; ``.gz`` for the line formats. A record's id field becomes its ``doc_id``; without
one the id is ``<file>:<line>`` (``<file>:<row>`` for Parquet, 1-based), ``<file>`` being the path
relative to the directory it was found in, or the file name.

Every record becomes one row ``{doc_id, text, reject_reason}``: ``text`` for a usable record, else
``reject_reason`` in {empty, undecodable, malformed_json, missing_field, not_text, unreadable_file,
record_too_large}.

Sizes are bounded: a line is read at most ``max_record_bytes`` (+1) bytes at a time, so a file without newlines or
a minified ``.json`` array is never read into memory whole; a line (or a Parquet text value) longer than that is
one ``record_too_large`` reject, its rest skipped in 1 MiB reads, and the lines after it are read as usual.
Nothing raises for a bad record; a file that cannot be opened at all becomes one ``unreadable_file``
row. Only "no input files at all" is an error.
"""

from __future__ import annotations

import glob
import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

from keplm.platform.errors import KeplmError

FORMATS = ("jsonl", "text", "parquet")
MAX_RECORD_BYTES = 8 << 20   # default bound of one record (a line, or a Parquet text value), in bytes
_SKIP_CHUNK = 1 << 20


def read_lines(f, limit: int) -> Iterator[bytes | None]:
    """The lines of binary file ``f`` (newline kept), or None for a line longer than ``limit`` bytes (newline not
    counted), of which at most ``limit + 1`` bytes are ever held."""
    while raw := f.readline(limit + 1):
        if len(raw) > limit and not raw.endswith(b"\n"):
            while (chunk := f.readline(_SKIP_CHUNK)) and not chunk.endswith(b"\n"):
                pass
            yield None
        else:
            yield raw


def expand_inputs(patterns: list[str]) -> list[tuple[str, str]]:
    """Files, directories (recursively) and globs -> sorted unique (path, display name) pairs."""
    seen: dict[str, str] = {}
    for pattern in patterns:
        p = Path(pattern).expanduser()
        if p.is_dir():
            for f in sorted(x for x in p.rglob("*") if x.is_file() and not x.name.startswith(".")):
                seen.setdefault(str(f), str(f.relative_to(p)))
        elif p.is_file():
            seen.setdefault(str(p), p.name)
        else:
            matches = sorted(glob.glob(str(p), recursive=True))
            files = [m for m in matches if Path(m).is_file()]
            if not files:
                raise KeplmError(f"corpus input not found: {pattern}")
            for f in files:
                seen.setdefault(f, Path(f).name)
    if not seen:
        raise KeplmError(f"no corpus files in {patterns}")
    return sorted(seen.items())


def detect_format(path: str, forced: str = "auto") -> str:
    if forced != "auto":
        return forced
    name = path.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith((".txt", ".text")):
        return "text"
    if name.endswith(".parquet"):
        return "parquet"
    raise KeplmError(f"cannot tell the format of {path}; set prepare.format to one of {FORMATS}")


def _row(doc_id: str, text: str | None = None, reason: str | None = None) -> dict:
    return {"doc_id": doc_id, "text": text, "reject_reason": reason}


def _from_value(doc_id: str, value) -> dict:
    if not isinstance(value, str):
        return _row(doc_id, reason="not_text")
    if not value.strip():
        return _row(doc_id, reason="empty")
    return _row(doc_id, value)


def _iter_lines(path: str, name: str, fmt: str, text_field: str, id_field: str,
                max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(read_lines(f, max_record_bytes), start=1):
                fallback_id = f"{name}:{lineno}"
                if raw is None:
                    yield _row(fallback_id, reason="record_too_large")
                    continue
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError:
                    yield _row(fallback_id, reason="undecodable")
                    continue
                if fmt == "text":
                    yield _from_value(fallback_id, line)
                    continue
                if not line.strip():
                    yield _row(fallback_id, reason="empty")
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    yield _row(fallback_id, reason="malformed_json")
                    continue
                if not isinstance(record, dict):
                    yield _row(fallback_id, reason="malformed_json")
                    continue
                rid = record.get(id_field)
                doc_id = str(rid) if rid not in (None, "") else fallback_id
                if text_field not in record:
                    yield _row(doc_id, reason="missing_field")
                    continue
                yield _from_value(doc_id, record[text_field])
    except (OSError, EOFError, zlib.error):
        # a truncated/corrupt file: the lines already read stand, the rest is one counted record
        yield _row(f"{name}:{lineno + 1}", reason="unreadable_file")


def _iter_parquet(path: str, name: str, text_field: str, id_field: str, batch_rows: int,
                  max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception:  # pyarrow raises several types for a non-Parquet file
        yield _row(f"{name}:1", reason="unreadable_file")
        return
    names = set(pf.schema_arrow.names)
    columns = [c for c in (text_field, id_field) if c in names]
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=columns or None):
        data = batch.to_pydict()
        for i in range(batch.num_rows):
            row += 1
            rid = data[id_field][i] if id_field in data else None
            doc_id = str(rid) if rid not in (None, "") else f"{name}:{row}"
            if text_field not in data:
                yield _row(doc_id, reason="missing_field")
            elif isinstance(data[text_field][i], str) and len(data[text_field][i]) * 4 > max_record_bytes \
                    and len(data[text_field][i].encode("utf-8")) > max_record_bytes:
                yield _row(doc_id, reason="record_too_large")
            else:
                yield _from_value(doc_id, data[text_field][i])


def iter_documents(path: str, name: str, fmt: str, text_field: str = "text", id_field: str = "id",
                   batch_rows: int = 1000, max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[dict]:
    if fmt == "parquet":
        yield from _iter_parquet(path, name, text_field, id_field, batch_rows, max_record_bytes)
    else:
        yield from _iter_lines(path, name, fmt, text_field, id_field, max_record_bytes)
