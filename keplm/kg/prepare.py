"""The corpus stage (`keplm prepare`): clean, segment, link and tokenise a corpus on Ray Data.

Pipeline (streaming; the corpus never gathers on the driver):
read files (one task per file) -> clean + segment (tasks) -> link + tokenise (actor pool of
``num_workers``) -> :class:`ShardSink`, which writes the Parquet shards and the quarantined records and
returns per-task counts and entity frequencies that the driver sums into the manifest.

Output directory (shard schema version 1)::

    shards/part-TTTTT-BBBB.parquet   doc_id: string, segment: int32, text: string (cleaned segment),
                                     input_ids: list<int32> (with [CLS]/[SEP]),
                                     mentions: list<struct<char_start, char_end, token_start,
                                               token_end, entity: int32>> (end-exclusive)
    rejected/part-TTTTT-BBBB.parquet doc_id: string, reason: string
    entities.parquet                 id, name, type (ids of the KG reader)
    entity_freq.parquet              entity: int32, count: int64 (linked mentions; entities seen >= 1)
    tokenizer/                       the tokenizer used (trained here when prepare.tokenizer is unset)
    manifest.json                    counts: documents_in, documents_kept, documents_rejected{reason},
                                     segments, mentions, entities_linked, ...
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from keplm.kg.linker import EntityLinker, LinkConfig
from keplm.kg.reader import Entities, read_aliases, read_entities, write_entities
from keplm.platform.config import Section, resolve_path
from keplm.platform.corpus_io import detect_format, expand_inputs, iter_documents
from keplm.platform.errors import KeplmError
from keplm.platform.manifest import hash_inputs, write_manifest
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
_DOC_SCHEMA = pa.schema([("doc_id", pa.string()), ("text", pa.string()), ("reject_reason", pa.string())])
_SEGMENT_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("segment", pa.int32()), ("text", pa.string()), ("reject_reason", pa.string()),
])
_LINKED_SCHEMA = pa.schema(list(_SEGMENT_SCHEMA) + [
    ("input_ids", pa.list_(pa.int32())), ("mentions", pa.list_(MENTION_TYPE)),
    ("mentions_dropped", pa.int32()),
])


class PrepareConfig(Section):
    corpus: list[str] = Field(default_factory=list)
    kg: str | None = None
    format: Literal["auto", "jsonl", "text", "parquet"] = "auto"
    text_field: str = "text"
    id_field: str = "id"
    min_chars: int = Field(256, ge=0, description="documents shorter than this after cleaning are rejected")
    max_seq_len: int = Field(512, ge=8)
    tokenizer: str | None = Field(None, description="vocab.txt or tokenizer dir; unset: train one")
    num_workers: int = Field(2, ge=1)
    batch_size: int = Field(256, ge=1)
    read_batch_rows: int = Field(1000, ge=1)
    block_kb: int = Field(1024, ge=1, description="target Ray Data block size between read and link")
    # Logical CPUs per stage. Linking actors hold their CPU for the whole run, so they ask for a little
    # less than one each to leave room for the light read and write tasks (else 2 actors on 2 CPUs starve them).
    read_num_cpus: float = Field(0.2, gt=0)
    write_num_cpus: float = Field(0.1, gt=0)
    actor_num_cpus: float = Field(0.8, gt=0)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    link: LinkConfig = Field(default_factory=LinkConfig)
    vocab: VocabConfig = Field(default_factory=VocabConfig)


# ---------------------------------------------------------------- pipeline stages (run on workers)

def read_files(batch: dict, fmt: str, text_field: str, id_field: str, rows: int):
    """One corpus file per call -> batches of document rows."""
    for path, name in zip(batch["path"], batch["name"]):
        buf: list[dict] = []
        for row in iter_documents(str(path), str(name), detect_format(str(path), fmt), text_field, id_field, rows):
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
    """Actor-pool UDF: clean + segment + link + tokenise; holds linker and tokenizer for the actor's life."""

    def __init__(self, linker: EntityLinker, tokenizer_json: str, max_seq_len: int, clean_kwargs: dict):
        import os

        # one core per worker: the Rust tokenizer would otherwise spread every batch over all cores
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        from tokenizers import Tokenizer

        self.linker = linker
        self.clean_kwargs = clean_kwargs
        # the same fast tokenizer transformers wraps (tokenizer.json written by run_prepare), without
        # importing transformers in every actor
        self.tokenizer = Tokenizer.from_file(tokenizer_json)
        self.tokenizer.enable_truncation(max_seq_len)
        self.tokenizer.no_padding()

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = clean_and_segment(table, **self.clean_kwargs).to_pylist()
        live = [i for i, r in enumerate(rows) if r["reject_reason"] is None]
        enc = self.tokenizer.encode_batch([rows[i]["text"] for i in live], add_special_tokens=True)
        for r in rows:
            r.update(input_ids=[], mentions=[], mentions_dropped=0)
        for k, i in enumerate(live):
            row = rows[i]
            links = self.linker.link(row["text"])
            spans = align_spans(enc[k].offsets, [(s, e) for s, e, _ in links])
            mentions = [
                {"char_start": s, "char_end": e, "token_start": ts[0], "token_end": ts[1], "entity": eid}
                for (s, e, eid), ts in zip(links, spans) if ts is not None
            ]
            row.update(input_ids=enc[k].ids, mentions=mentions, mentions_dropped=len(links) - len(mentions))
        return pa.Table.from_pylist(rows, schema=_LINKED_SCHEMA)


class ShardSink:
    """Ray Data datasink: shards + quarantine; each write task returns its counts (summed on the driver).

    File names derive from the write task index, so a retried task overwrites its own files and its
    counts are only reported once (by the attempt that succeeds).
    """

    def __new__(cls, out_dir: str):
        from ray.data.datasource import Datasink

        class _Sink(Datasink):
            def __init__(self, out: str):
                self.out = Path(out)
                self.result: dict | None = None

            def write(self, blocks, ctx):
                from ray.data.block import BlockAccessor

                c: Counter = Counter()
                freq: Counter = Counter()
                for b, block in enumerate(blocks):
                    t = BlockAccessor.for_block(block).to_arrow()
                    if t.num_rows == 0:
                        continue
                    reasons = t.column("reject_reason")
                    rejected = t.filter(reasons.is_valid())
                    kept = t.filter(reasons.is_null())
                    name = f"part-{ctx.task_idx:05d}-{b:04d}.parquet"
                    if rejected.num_rows:
                        rj = pa.table({"doc_id": rejected.column("doc_id"), "reason": rejected.column("reject_reason")},
                                      schema=REJECT_SCHEMA)
                        pq.write_table(rj, self.out / "rejected" / name)
                        for reason in rj.column("reason").to_pylist():
                            c[f"rejected:{reason}"] += 1
                    if kept.num_rows:
                        shard = kept.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)
                        pq.write_table(shard, self.out / "shards" / name)
                        c["segments"] += kept.num_rows
                        c["documents_kept"] += int(pc.sum(pc.equal(kept.column("segment"), 0)).as_py() or 0)
                        c["mentions_dropped"] += int(pc.sum(kept.column("mentions_dropped")).as_py() or 0)
                        c["tokens"] += int(pc.sum(pc.list_value_length(kept.column("input_ids"))).as_py() or 0)
                        entities = pc.list_flatten(kept.column("mentions")).combine_chunks().field("entity")
                        c["mentions"] += len(entities)
                        ids, n = np.unique(entities.to_numpy(zero_copy_only=False), return_counts=True)
                        freq.update(dict(zip(ids.tolist(), n.tolist())))
                        c["shard_files"] += 1
                return {"counts": dict(c), "freq": dict(freq)}

            def on_write_complete(self, write_result):
                counts: Counter = Counter()
                freq: Counter = Counter()
                for r in write_result.write_returns:
                    counts.update(r["counts"])
                    freq.update(r["freq"])
                self.result = {"counts": counts, "freq": freq}

        return _Sink(out_dir)


# ---------------------------------------------------------------- driver

def build_linker(kg_dir: str, cfg: PrepareConfig, counts: Counter) -> tuple[Entities, EntityLinker]:
    entities = read_entities(kg_dir, counts)
    aliases = read_aliases(kg_dir, entities, counts)
    linker = EntityLinker(entities, aliases, cfg.link, cfg.clean)
    counts.update({f"linker_{k}": v for k, v in linker.counts.items()})
    return entities, linker


def _documents(ds_files, cfg: PrepareConfig):
    # reading is light next to linking; a fractional CPU keeps it schedulable beside a full actor pool
    return ds_files.map_batches(
        read_files, batch_size=1, batch_format="numpy", num_cpus=cfg.read_num_cpus,
        fn_kwargs=dict(fmt=cfg.format, text_field=cfg.text_field, id_field=cfg.id_field, rows=cfg.read_batch_rows),
    )


def _clean_kwargs(cfg: PrepareConfig) -> dict:
    return dict(clean_cfg=cfg.clean, min_chars=cfg.min_chars, max_chars=cfg.max_seq_len - 2)


def _file_dataset(files: list[tuple[str, str]], block_kb: int):
    import ray

    # Ray coalesces a task's yielded batches into blocks of this size; small blocks let one big
    # corpus file fan out over the whole linking actor pool.
    ray.data.DataContext.get_current().target_max_block_size = block_kb * 1024

    return ray.data.from_items([{"path": p, "name": n} for p, n in files], override_num_blocks=len(files))


def train_vocab_from_corpus(cfg: PrepareConfig, out_dir: Path, files: list[tuple[str, str]] | None = None) -> Path:
    """Train a WordPiece vocab on the cleaned segments, streamed from Ray Data to the trainer."""
    files = files if files is not None else expand_inputs(cfg.corpus)
    segments = _documents(_file_dataset(files, cfg.block_kb), cfg).map_batches(
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
    """Run the corpus stage; returns the manifest counts. Ray must be connected."""
    out = Path(out_dir)
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
    for sub in ("shards", "rejected"):
        shutil.rmtree(out / sub, ignore_errors=True)
        (out / sub).mkdir(parents=True, exist_ok=True)

    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer, cfg.vocab.lowercase)  # validate on the driver
        tok_dir = out / "tokenizer"
        shutil.rmtree(tok_dir, ignore_errors=True)
        tok.save_pretrained(str(tok_dir))
        if Path(cfg.tokenizer).is_file():
            shutil.copy(cfg.tokenizer, tok_dir / "vocab.txt")
    else:
        log.info("prepare: training a WordPiece vocab on the cleaned corpus")
        tok_dir = train_vocab_from_corpus(cfg, out, files)

    import ray

    sink = ShardSink(str(out))
    _documents(_file_dataset(files, cfg.block_kb), cfg).map_batches(
        LinkAndTokenize, batch_format="pyarrow", batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.num_workers),
        num_cpus=cfg.actor_num_cpus,
        fn_constructor_kwargs=dict(linker=linker, tokenizer_json=str(tok_dir / "tokenizer.json"),
                                   max_seq_len=cfg.max_seq_len, clean_kwargs=_clean_kwargs(cfg)),
    ).write_datasink(sink, ray_remote_args={"num_cpus": cfg.write_num_cpus})
    result = sink.result or {"counts": Counter(), "freq": Counter()}
    c, freq = result["counts"], result["freq"]

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
    write_manifest(out, "prepare", SHARD_SCHEMA_VERSION, config_dump, inputs, manifest_counts)
    if manifest_counts["documents_in"] == 0:
        raise KeplmError(f"prepare: no documents found in {cfg.corpus}")
    if manifest_counts["documents_kept"] == 0:
        raise KeplmError(f"prepare: all {manifest_counts['documents_in']} documents were rejected "
                         f"({rejected}); see {out / 'manifest.json'}")
    return manifest_counts
