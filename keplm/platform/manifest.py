"""Manifests: every job writes DIR/manifest.json describing what it read, did and wrote.

Schema (version 1): job, schema_version, created (UTC ISO-8601), config (the job's resolved config),
inputs (path -> sha256 of the file, or of the upstream manifest for a stage directory), counts.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from keplm.platform.errors import KeplmError

MANIFEST = "manifest.json"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def hash_inputs(paths: list[str | Path]) -> dict[str, str]:
    """path -> sha256; a directory holding a manifest is hashed by that manifest."""
    out: dict[str, str] = {}
    for p in paths:
        p = Path(p)
        if p.is_dir() and (p / MANIFEST).is_file():
            out[str(p)] = "manifest:" + sha256_file(p / MANIFEST)
        elif p.is_dir():
            # keplm's own bookkeeping (.keplm-output marker, .keplm-lock, .staging-* directories) is no content
            for f in sorted(x for x in p.rglob("*") if x.is_file() and not _bookkeeping(x.relative_to(p))):
                out[str(f)] = sha256_file(f)
        else:
            out[str(p)] = sha256_file(p)
    return out


def _bookkeeping(rel: Path) -> bool:
    return rel.name in (".keplm-output", ".keplm-lock") or any(part.startswith(".staging-") for part in rel.parts)


def write_manifest(out_dir: str | Path, job: str, schema_version: int, config: dict,
                   inputs: dict[str, str], counts: dict[str, Any], **extra: Any) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from keplm.platform.tracking import redact

    doc = redact({   # no credentials of a tracking URI (or any URI) in a manifest
        "job": job,
        "schema_version": schema_version,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "inputs": inputs,
        "counts": counts,
        **extra,
    })
    path = out / MANIFEST
    tmp = out / f".{MANIFEST}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"   # unique: two writers never share it
    tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False, sort_keys=False), encoding="utf-8")
    tmp.replace(path)
    return path


def read_manifest(stage_dir: str | Path, job: str | None = None) -> dict:
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        raise KeplmError(f"{stage_dir}: no {MANIFEST} (not the output of a finished keplm job)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise KeplmError(f"{path}: not valid JSON") from None
    if job is not None and doc.get("job") != job:
        raise KeplmError(f"{stage_dir}: manifest is from job {doc.get('job')!r}, expected {job!r}")
    return doc


# what a stage's end line says, from its manifest's counts: (count, how it reads), those present
STAGE_COUNTS = {
    "prepare": [("documents_kept", "{:,} documents"), ("segments", "{:,} segments"), ("tokens", "{:,} tokens"),
                ("mentions", "{:,} mentions"), ("entities_linked", "{:,} entities linked"),
                ("shard_files", "{} shards")],
    "kg_build": [("entities", "{:,} entities"), ("relations", "{:,} relations"), ("triples_kept", "{:,} triples"),
                 ("edges", "{:,} edges")],
    "kg_neighbours": [("seeds", "{:,} seed entities"), ("rows", "{:,} neighbours"),
                      ("seeds_without_neighbours", "{:,} seeds without any")],
    "kg_embed": [("triples_train", "{:,} training triples"), ("epochs", "{} epochs"), ("final_loss", "loss {:.4f}"),
                 ("mrr", "MRR {:.3f}"), ("hits_at_10", "hits@10 {:.3f}"), ("random_hits_at_10", "(random {:.3f})")],
}


def describe_counts(job: str, counts: dict) -> str:
    """A stage's counts as the few words its end line shows (``STAGE_COUNTS``)."""
    return ", ".join(text.format(counts[k]) for k, text in STAGE_COUNTS.get(job, ())
                     if isinstance(counts.get(k), (int, float)) and not isinstance(counts.get(k), bool)
                     ).replace(", (random", " (random")
