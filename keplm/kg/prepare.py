"""The corpus stage (`keplm prepare`): clean, segment, link and tokenise a corpus on Ray Data.

Pipeline (streaming; the corpus never gathers on the driver):
read files (tasks, one per file, yielding small blocks) -> :class:`LinkAndTokenize` actor pool of
``num_workers`` (clean + segment + link + tokenise, then writes that batch's shard and quarantine files)
-> one row of counts and entity frequencies per batch, which the driver sums into the manifest.

Document ids are unique in the output: before any cleaning or linking, one light pass reads every record's id
(:func:`find_duplicate_ids`), and a record whose id an earlier record already has (files in sorted path order,
records in file order) is rejected as ``duplicate_id``; the first keeps the id. This holds for the fallback
ids ``<file>:<line>`` too (two inputs with the same relative name and no id field).

Output directory (shard schema version 1)::

    shards/<batch-hash>.parquet      doc_id: string, segment: int32, text: string (cleaned segment),
                                     input_ids: list<int32> (with [CLS]/[SEP]),
                                     mentions: list<struct<char_start, char_end, token_start,
                                               token_end, entity: int32>> (end-exclusive)
    rejected/<batch-hash>.parquet    doc_id: string, reason: string
    entities.parquet                 id, name, type (ids of the KG reader)
    entity_freq.parquet              entity: int32, count: int64 (linked mentions; entities seen >= 1)
    tokenizer/                       the tokenizer used (trained here when prepare.tokenizer is unset)
    manifest.json                    counts: documents_in, documents_kept, documents_rejected{reason},
                                     segments, mentions, entities_linked, ...
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from keplm.kg.linker import EntityLinker, LinkConfig
from keplm.kg.reader import Entities, read_aliases, read_entities, write_entities
from keplm.platform.config import Section, resolve_path
from keplm.platform.faults import exit_once
from keplm.platform.corpus_io import MAX_RECORD_BYTES, detect_format, expand_inputs, iter_documents
from keplm.platform.errors import KeplmError
from keplm.platform.manifest import hash_inputs, write_manifest
from keplm.platform.outputs import staged
from keplm.platform.text import CleanConfig, clean_text, segment_text
from keplm.platform.tokenizer import VocabConfig, align_spans, load_tokenizer, train_wordpiece

log = logging.getLogger(__name__)

SHARD_SCHEMA_VERSION = 1

MENTION_TYPE = pa.struct([
    ("char_start", pa.int32()), ("char_end", pa.int32()),
    ("token_start", pa.int32()), ("token_end", pa.int32()), ("entity", pa.int32()),
])
SHARD_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("segment", pa.int32()), ("text", pa.string()),
    ("input_ids", pa.list_(pa.int32())), ("mentions", pa.list_(MENTION_TYPE)),
])
REJECT_SCHEMA = pa.schema([("doc_id", pa.string()), ("reason", pa.string())])
# source: "<path>#<record index>", unique per record (what shard file names hash)
_DOC_SCHEMA = pa.schema([("doc_id", pa.string()), ("text", pa.string()), ("reject_reason", pa.string()),
                         ("source", pa.string())])
_SEGMENT_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("segment", pa.int32()), ("text", pa.string()), ("reject_reason", pa.string()),
])


class PrepareConfig(Section):
    corpus: list[str] = Field(default_factory=list, description="corpus files, directories or globs (--corpus "
                                                                "overrides)")
    kg: str | None = Field(None, description="KG directory: entities.tsv, triples.tsv, optional aliases.tsv (--kg "
                                             "overrides)")
    format: Literal["auto", "jsonl", "text", "parquet"] = Field("auto", description="corpus file format; auto: "
                                                                "from the file suffix")
    text_field: str = Field("text", description="JSON-lines / Parquet field holding a document's text")
    id_field: str = Field("id", description="field holding a document's id; absent: <file>:<line>")
    max_record_mb: float = Field(8, gt=0, description="a corpus record (a line, a Parquet text value) larger than "
                                 "this many MiB is rejected as record_too_large, never read whole")
    min_chars: int = Field(256, ge=0, description="documents shorter than this after cleaning are rejected")
    max_seq_len: int = Field(512, ge=8, description="tokens per segment with [CLS]/[SEP]; longer documents are "
                                                    "split at sentence ends")
    tokenizer: str | None = Field(None, description="vocab.txt or tokenizer dir; unset: train one")
    num_workers: int = Field(2, ge=1, description="actors that clean, link, tokenise and write the shards")
    fault_at_batch: int | None = Field(None, ge=1, description="fault injection (tests): the linking actor serving "
                                                               "its N-th batch exits once, after writing its files "
                                                               "and before reporting them")
    batch_size: int = Field(256, ge=1, description="documents per linking-actor batch; each batch writes one shard file")
    read_batch_rows: int = Field(1000, ge=1, description="documents per batch a read task yields")
    block_kb: int = Field(1024, ge=1, description="target Ray Data block size between read and link")
    # Logical CPUs per stage. Linking actors hold their CPU for the whole run, so they ask for a little
    # less than one each to leave room for the light read tasks (else 2 actors on 2 CPUs starve them).
    read_num_cpus: float = Field(0.2, gt=0, description="logical CPUs each read task asks Ray for")
    actor_num_cpus: float = Field(0.8, gt=0, description="logical CPUs each linking actor asks Ray for")
    clean: CleanConfig = Field(default_factory=CleanConfig, description="text cleaning rules (SMedBERT App. A.1.1)")
    link: LinkConfig = Field(default_factory=LinkConfig, description="exact-match entity linking rules")
    vocab: VocabConfig = Field(default_factory=VocabConfig, description="WordPiece training when no tokenizer is "
                                                                        "given (also keplm vocab)")


# ---------------------------------------------------------------- pipeline stages (run on workers)

def read_files(batch: dict, fmt: str, text_field: str, id_field: str, rows: int,
               max_record_bytes: int = MAX_RECORD_BYTES, duplicates: dict | None = None):
    """One corpus file per call -> batches of document rows; the records ``duplicates`` lists for the file (record
    indexes) are ``duplicate_id`` rejects."""
    for path, name in zip(batch["path"], batch["name"]):
        buf: list[dict] = []
        dup = (duplicates or {}).get(str(path), frozenset())
        for i, row in enumerate(iter_documents(str(path), str(name), detect_format(str(path), fmt), text_field,
                                               id_field, rows, max_record_bytes)):
            row["source"] = f"{path}#{i}"
            if i in dup:
                row["text"], row["reject_reason"] = None, "duplicate_id"
            buf.append(row)
            if len(buf) >= rows:
                yield pa.Table.from_pylist(buf, schema=_DOC_SCHEMA)
                buf = []
        if buf:
            yield pa.Table.from_pylist(buf, schema=_DOC_SCHEMA)


def clean_and_segment(table: pa.Table, clean_cfg: CleanConfig, min_chars: int, max_chars: int) -> pa.Table:
    out: list[dict] = []
    for row in table.to_pylist():
        if row["reject_reason"] is not None:
            out.append({**row, "segment": -1})
            continue
        text = clean_text(row["text"], clean_cfg)
        reason = "empty_after_cleaning" if not text else ("too_short" if len(text) < min_chars else None)
        if reason:
            out.append({"doc_id": row["doc_id"], "segment": -1, "text": None, "reject_reason": reason})
            continue
        for i, seg in enumerate(segment_text(text, max_chars)):
            out.append({"doc_id": row["doc_id"], "segment": i, "text": seg, "reject_reason": None})
    return pa.Table.from_pylist(out, schema=_SEGMENT_SCHEMA)


class LinkAndTokenize:
    """Actor-pool UDF: clean + segment + link + tokenise + write, holding linker and tokenizer for life.

    Each call writes its batch's shard and quarantine files itself and returns one small row of counts,
    so the big linked tables never travel through the object store to separate write tasks (that hop
    cost more than the linking on 2 cores). File names are a hash of the batch's record sources (file path and
    record index, unique per record): two batches never share a name, and a retried batch overwrites its own
    files instead of duplicating them.
    """

    def __init__(self, linker: EntityLinker, tokenizer_json: str, max_seq_len: int, clean_kwargs: dict,
                 out_dir: str, fault_at_batch: int | None = None, fault_marker: str | None = None):
        import os

        self.fault_at_batch, self.fault_marker, self.batches = fault_at_batch, fault_marker, 0

        # one core per worker: the Rust tokenizer would otherwise spread every batch over all cores
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        from tokenizers import Tokenizer

        self.linker = linker
        self.clean_kwargs = clean_kwargs
        self.out = Path(out_dir)
        # the same fast tokenizer transformers wraps (tokenizer.json written by run_prepare), without
        # importing transformers in every actor
        self.tokenizer = Tokenizer.from_file(tokenizer_json)
        self.tokenizer.enable_truncation(max_seq_len)
        self.tokenizer.no_padding()

    def link_batch(self, table: pa.Table) -> tuple[list[dict], list[dict], int]:
        """-> (shard rows, rejected rows, mentions dropped because no token covers them)."""
        rows = clean_and_segment(table, **self.clean_kwargs).to_pylist()
        kept = [r for r in rows if r["reject_reason"] is None]
        rejected = [{"doc_id": r["doc_id"], "reason": r["reject_reason"]} for r in rows if r["reject_reason"] is not None]
        enc = self.tokenizer.encode_batch([r["text"] for r in kept], add_special_tokens=True)
        dropped = 0
        for row, e in zip(kept, enc):
            links = self.linker.link(row["text"])
            spans = align_spans(e.offsets, [(s, t) for s, t, _ in links])
            row["input_ids"] = e.ids
            row["mentions"] = [
                {"char_start": s, "char_end": t, "token_start": ts[0], "token_end": ts[1], "entity": eid}
                for (s, t, eid), ts in zip(links, spans) if ts is not None
            ]
            dropped += len(links) - len(row["mentions"])
            del row["reject_reason"]
        return kept, rejected, dropped

    def __call__(self, table: pa.Table) -> pa.Table:
        import hashlib

        kept, rejected, dropped = self.link_batch(table)
        # the hash of the batch's record sources (path#index): unique per batch, the same when a batch is retried
        name = hashlib.sha1("\n".join(table.column("source").to_pylist()).encode()).hexdigest()[:20] + ".parquet"
        c: Counter = Counter()
        freq: Counter = Counter()
        if rejected:
            pq.write_table(pa.Table.from_pylist(rejected, schema=REJECT_SCHEMA), self.out / "rejected" / name)
            c.update(f"rejected:{r['reason']}" for r in rejected)
        if kept:
            pq.write_table(pa.Table.from_pylist(kept, schema=SHARD_SCHEMA), self.out / "shards" / name)
            c["segments"] = len(kept)
            c["documents_kept"] = sum(r["segment"] == 0 for r in kept)
            c["mentions_dropped"] = dropped
            c["tokens"] = sum(len(r["input_ids"]) for r in kept)
            freq.update(m["entity"] for r in kept for m in r["mentions"])
            c["mentions"] = sum(freq.values())
            c["shard_files"] = 1
        self.batches += 1
        if self.fault_marker and self.batches == self.fault_at_batch:
            # the batch's files are written, its counts never reported; Ray Data retries it
            exit_once(self.fault_marker)
        return pa.table({
            "counts": [json.dumps(c)],
            "freq_entity": pa.array([list(freq)], pa.list_(pa.int32())),
            "freq_count": pa.array([list(freq.values())], pa.list_(pa.int64())),
        })


# ---------------------------------------------------------------- driver

def build_linker(kg_dir: str, cfg: PrepareConfig, counts: Counter) -> tuple[Entities, EntityLinker]:
    entities = read_entities(kg_dir, counts)
    aliases = read_aliases(kg_dir, entities, counts)
    linker = EntityLinker(entities, aliases, cfg.link, cfg.clean)
    counts.update({f"linker_{k}": v for k, v in linker.counts.items()})
    return entities, linker


def _documents(ds_files, cfg: PrepareConfig, duplicates: dict | None = None):
    # reading is light next to linking; a fractional CPU keeps it schedulable beside a full actor pool
    return ds_files.map_batches(
        read_files, batch_size=1, batch_format="numpy", num_cpus=cfg.read_num_cpus,
        fn_kwargs=dict(fmt=cfg.format, text_field=cfg.text_field, id_field=cfg.id_field, rows=cfg.read_batch_rows,
                       max_record_bytes=_max_record_bytes(cfg), duplicates=duplicates),
    )


def _max_record_bytes(cfg: PrepareConfig) -> int:
    return int(cfg.max_record_mb * (1 << 20))


def _file_id_digests(path: str, name: str, fmt: str, cfg: PrepareConfig):
    """A 16-byte digest of each record's doc id, in reading order (numpy 'V16')."""
    import hashlib

    import numpy as np

    digests = b"".join(hashlib.blake2b(row["doc_id"].encode("utf-8", "surrogatepass"), digest_size=16).digest()
                       for row in iter_documents(path, name, fmt, cfg.text_field, cfg.id_field, cfg.read_batch_rows,
                                                 _max_record_bytes(cfg)))
    return np.frombuffer(digests, dtype="V16")


def find_duplicate_ids(files: list[tuple[str, str]], cfg: PrepareConfig) -> dict[str, frozenset[int]]:
    """Before any cleaning or linking: path -> indexes of the records whose doc id an earlier record has (files in
    their sorted order, records in file order). One light Ray task per file reads only the ids' digests; the
    driver keeps 16 bytes per record."""
    import numpy as np
    import ray

    task = ray.remote(num_cpus=cfg.read_num_cpus)(_file_id_digests)
    per_file = ray.get([task.remote(p, n, detect_format(p, cfg.format), cfg) for p, n in files])
    every = np.concatenate(per_file) if per_file else np.empty(0, "V16")
    if len(every) == 0:
        return {}
    _, first = np.unique(every, return_index=True)   # a stable sort: the first occurrence of each id
    repeated = np.ones(len(every), bool)
    repeated[first] = False
    out: dict[str, frozenset[int]] = {}
    start = 0
    for (path, _), digests in zip(files, per_file):
        idx = np.flatnonzero(repeated[start:start + len(digests)])
        if len(idx):
            out[path] = frozenset(idx.tolist())
        start += len(digests)
    return out


def _clean_kwargs(cfg: PrepareConfig) -> dict:
    return dict(clean_cfg=cfg.clean, min_chars=cfg.min_chars, max_chars=cfg.max_seq_len - 2)


def _file_dataset(files: list[tuple[str, str]], block_kb: int):
    import ray

    ds = ray.data.from_items([{"path": p, "name": n} for p, n in files], override_num_blocks=len(files))
    # Ray coalesces a task's yielded batches into blocks of this size; small blocks let one big
    # corpus file fan out over the whole linking actor pool. Set on this dataset (its steps inherit
    # it), not on the process's DataContext, which later stages' datasets would inherit.
    ds.context.target_max_block_size = block_kb * 1024
    return ds


def train_vocab_from_corpus(cfg: PrepareConfig, out_dir: Path, files: list[tuple[str, str]] | None = None,
                            duplicates: dict | None = None) -> Path:
    """Train a WordPiece vocab on the cleaned segments, streamed from Ray Data to the trainer."""
    files = files if files is not None else expand_inputs(cfg.corpus)
    segments = _documents(_file_dataset(files, cfg.block_kb), cfg, duplicates).map_batches(
        clean_and_segment, batch_format="pyarrow", fn_kwargs=_clean_kwargs(cfg))

    def texts():
        for batch in segments.iter_batches(batch_size=1024, batch_format="pyarrow"):
            for t, reason in zip(batch.column("text").to_pylist(), batch.column("reject_reason").to_pylist()):
                if reason is None:
                    yield t

    tok_dir = out_dir / "tokenizer"
    train_wordpiece(texts(), tok_dir, cfg.vocab)
    return tok_dir


def run_prepare(cfg: PrepareConfig, out_dir: str | Path, config_dump: dict) -> dict:
    """Run the corpus stage; returns the manifest counts. Ray must be connected. Everything is written into a
    staging directory and published into ``out_dir`` (manifest last) only when the stage has succeeded
    (:func:`keplm.platform.outputs.staged`): a failed run leaves the previous output, and no manifest of its own."""
    with staged(out_dir, "prepare") as stage:
        return _run_prepare(cfg, stage, config_dump)


def _run_prepare(cfg: PrepareConfig, out: Path, config_dump: dict) -> dict:
    if not cfg.corpus:
        raise KeplmError("prepare: no corpus given (--corpus PATH... or prepare.corpus)")
    if not cfg.kg:
        raise KeplmError("prepare: no KG given (--kg DIR or prepare.kg)")
    cfg = cfg.model_copy(update={
        "corpus": [str(resolve_path(c)) for c in cfg.corpus], "kg": str(resolve_path(cfg.kg)),
        "tokenizer": str(resolve_path(cfg.tokenizer)) if cfg.tokenizer else None,
    })
    files = expand_inputs(cfg.corpus)
    for path, _ in files:
        detect_format(path, cfg.format)  # fail now, not inside a worker
    counts: Counter = Counter()
    entities, linker = build_linker(cfg.kg, cfg, counts)
    duplicates = find_duplicate_ids(files, cfg)   # before the long work: a repeated id is a duplicate_id reject
    if duplicates:
        log.warning("prepare: %d records repeat the id of an earlier record: rejected as duplicate_id (the first "
                    "record with an id is kept)", sum(len(v) for v in duplicates.values()))
    for sub in ("shards", "rejected"):
        (out / sub).mkdir(parents=True, exist_ok=True)   # in the fresh staging directory

    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer, cfg.vocab.lowercase)  # validate on the driver
        tok_dir = out / "tokenizer"
        tok.save_pretrained(str(tok_dir))
        if Path(cfg.tokenizer).is_file():
            shutil.copy(cfg.tokenizer, tok_dir / "vocab.txt")
    else:
        log.info("prepare: training a WordPiece vocab on the cleaned corpus")
        tok_dir = train_vocab_from_corpus(cfg, out, files, duplicates)

    import ray

    ds = _documents(_file_dataset(files, cfg.block_kb), cfg, duplicates).map_batches(
        LinkAndTokenize, batch_format="pyarrow", batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.num_workers),
        num_cpus=cfg.actor_num_cpus,
        fn_constructor_kwargs=dict(linker=linker, tokenizer_json=str(tok_dir / "tokenizer.json"),
                                   max_seq_len=cfg.max_seq_len, clean_kwargs=_clean_kwargs(cfg), out_dir=str(out),
                                   fault_at_batch=cfg.fault_at_batch,
                                   fault_marker=str(out / "fault_injected") if cfg.fault_at_batch else None),
    )
    c: Counter = Counter()
    freq: Counter = Counter()
    # one tiny row per linked batch: the driver only ever sees counts
    import time

    t0, first = time.perf_counter(), None
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        first = first or time.perf_counter() - t0
        for counts_json, ents, ns in zip(batch.column("counts").to_pylist(), batch.column("freq_entity").to_pylist(),
                                         batch.column("freq_count").to_pylist()):
            c.update(json.loads(counts_json))
            freq.update(dict(zip(ents, ns)))
    log.info("prepare: first linked batch after %.1fs, all after %.1fs", first or 0, time.perf_counter() - t0)
    if cfg.fault_at_batch and (out / "fault_injected").exists():
        (out / "fault_injected").unlink()   # not part of the output
        log.warning("prepare: fault injection: a linking actor exited after batch %d; its batch was retried",
                    cfg.fault_at_batch)

    written = sum(pq.read_metadata(f).num_rows for f in (out / "shards").glob("*.parquet"))
    if written != c["segments"]:  # two batches with the same doc ids (e.g. one file given twice)
        raise KeplmError(f"prepare: {c['segments']} segments linked but {written} written; are some "
                         f"documents (same ids) given twice in {cfg.corpus}?")
    rejected = {k.split(":", 1)[1]: v for k, v in sorted(c.items()) if k.startswith("rejected:")}
    freq_table = pa.table({
        "entity": pa.array(sorted(freq), pa.int32()),
        "count": pa.array([freq[e] for e in sorted(freq)], pa.int64()),
    })
    pq.write_table(freq_table, out / "entity_freq.parquet")
    write_entities(entities, out)
    manifest_counts = {
        "documents_in": c["documents_kept"] + sum(rejected.values()),
        "documents_kept": c["documents_kept"],
        "documents_rejected": rejected,
        "segments": c["segments"],
        "tokens": c["tokens"],
        "mentions": c["mentions"],
        "mentions_dropped_untokenizable": c["mentions_dropped"],
        "entities_linked": len(freq),
        "shard_files": c["shard_files"],
        "input_files": len(files),
        "kg": dict(sorted(counts.items())),
    }
    inputs = hash_inputs([p for p, _ in files])
    inputs.update(hash_inputs([cfg.kg]))
    if cfg.tokenizer:
        inputs.update(hash_inputs([cfg.tokenizer]))
    if manifest_counts["documents_in"] == 0:   # a failed prepare writes no manifest
        raise KeplmError(f"prepare: no documents found in {cfg.corpus}")
    if manifest_counts["documents_kept"] == 0:
        raise KeplmError(f"prepare: all {manifest_counts['documents_in']} documents were rejected ({rejected})")
    write_manifest(out, "prepare", SHARD_SCHEMA_VERSION, config_dump, inputs, manifest_counts)
    return manifest_counts
