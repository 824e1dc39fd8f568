"""Output directories: what a job may write and delete, and how it publishes what it wrote.

One guard, :func:`guard_output`, runs at the start of every job that writes a directory, before any long work:

- ``--output`` must not be an existing file;
- no input of the job may lie inside a path the job writes (``prepare.tokenizer=OUT/tokenizer/vocab.txt
  --output OUT``, ``augment --data DIR/train.txt --output DIR``, ``kg neighbours --graph G --output G``), and no
  path the job writes may lie inside an input directory (``kg build --corpus P --output P`` would overwrite P's
  manifest; an output inside a corpus directory would be read back as corpus);
- an existing ``--output`` must be empty (a ``logs/`` folder aside) or a keplm output: one holding the marker file
  ``.keplm-output`` (written in every directory keplm creates for its outputs) or, for outputs written before
  markers existed, a keplm ``manifest.json``;
- a second job on the same output while one runs is refused (an exclusive lock on ``OUT/.keplm-lock``).

Refusals are one line and exit code 2 (:class:`~keplm.platform.errors.KeplmError`).

keplm only ever deletes what it created (:func:`remove_owned`): a directory holding the marker, or an entry of a
keplm output directory that the job is replacing with its own. Everything else is refused, never deleted.

Publishing (:func:`staged`): a job writes its files into a staging directory beside them
(``OUT/.staging-<job>-<id>/``), and only when it has finished are they moved into ``OUT``: the old
``manifest.json`` is removed first, each written entry replaces its old version, and the new manifest is moved in
last. A job that fails or is killed leaves the previous output as it was, or (killed during the moves) an
output without a manifest, which no later job reuses: a stage is reused only when its manifest is present and
its key matches.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from keplm.platform.errors import KeplmError

MARKER = ".keplm-output"
LOCK = ".keplm-lock"
MANIFEST = "manifest.json"
STAGING_PREFIX = ".staging-"
IGNORED_WHEN_EMPTY = {"logs", MARKER, LOCK}   # what a fresh job's console and guard put there first

_locks: dict[str, int] = {}   # resolved output -> open fd holding the lock (one per process and output)


def _resolve(p: str | Path) -> Path:
    return Path(p).expanduser().resolve()


def mark(directory: str | Path, job: str = "") -> None:
    """Say that keplm created ``directory`` (its contents are keplm's to replace)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if not (d / MARKER).is_file():
        (d / MARKER).write_text(json.dumps({"keplm": True, "job": job}) + "\n", encoding="utf-8")


def is_owned(directory: str | Path) -> bool:
    """Whether ``directory`` is a keplm output: the marker, or (written before markers) a keplm manifest."""
    d = Path(directory)
    if (d / MARKER).is_file():
        return True
    try:
        doc = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and "job" in doc and "schema_version" in doc


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def guard_output(job: str, output: str | Path, inputs: Iterable[str | Path | None] = (),
                 writes: Iterable[str | Path] | None = None, lock: bool = True) -> Path:
    """Check ``output`` against the job's ``inputs`` and take it (see the module doc); -> the output path.

    ``writes``: the paths the job writes or replaces (default: the whole output directory); an input inside
    ``output`` but outside every one of them is fine (``pretrain --prepared OUT/prepare --output OUT``)."""
    out = _resolve(output)
    if out.exists() and not out.is_dir():
        raise KeplmError(f"--output {output} is an existing file, not a directory")
    written = [_resolve(w) for w in writes] if writes is not None else [out]
    for raw in inputs:
        if raw in (None, ""):
            continue
        p = _resolve(raw)
        for w in written:
            if _inside(p, w):
                raise KeplmError(f"input {raw} lies inside {w}, which this job writes: it would be overwritten; "
                                 f"choose another --output")
            if p.is_dir() and _inside(w, p):
                raise KeplmError(f"--output {output} lies inside the input directory {raw}: this job would write "
                                 f"into its own input; choose another --output")
    if out.is_dir() and not is_owned(out):
        foreign = sorted(e.name for e in out.iterdir()
                         if e.name not in IGNORED_WHEN_EMPTY and not (e.is_dir() and is_owned(e)))
        if foreign:
            raise KeplmError(f"--output {output} already holds files keplm did not write ({', '.join(foreign[:3])}"
                             f"{', …' if len(foreign) > 3 else ''}; no {MARKER}); choose a new or empty directory")
    mark(out, job)
    if lock:
        _lock(out, job)
    return out


def _lock(out: Path, job: str) -> None:
    import fcntl

    key = str(out)
    if key in _locks:
        return
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip()
        os.close(fd)
        raise KeplmError(f"another keplm job is writing to {out} ({holder or 'a running process'}); wait for it or "
                         f"choose another --output") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"keplm {job}, pid {os.getpid()}".encode())
    _locks[key] = fd


def release(output: str | Path) -> None:
    """Let another job write to ``output`` (this process's lock on it, if any)."""
    fd = _locks.pop(str(_resolve(output)), None)
    if fd is not None:
        os.close(fd)


def remove_owned(path: str | Path) -> None:
    """Delete ``path`` if keplm created it: a directory holding the marker, or any entry of a keplm output
    directory. Anything else is refused (one line), never deleted."""
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        return
    if p.is_dir() and not p.is_symlink():
        if (p / MARKER).is_file() or is_owned(p.parent) or p.name.startswith(STAGING_PREFIX):
            shutil.rmtree(p)
            return
    elif is_owned(p.parent):
        p.unlink()
        return
    raise KeplmError(f"refusing to delete {p}: keplm did not create it (no {MARKER}); move it away or choose another "
                     f"--output")


@contextmanager
def staged(output: str | Path, job: str) -> Iterator[Path]:
    """Write a job's files into a staging directory, published into ``output`` (manifest last) on success and
    discarded on failure; yields the staging directory."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise KeplmError(f"--output {output} is an existing file, not a directory")
    if out.is_dir() and not is_owned(out):
        foreign = [e.name for e in out.iterdir() if e.name not in IGNORED_WHEN_EMPTY]
        if foreign:
            raise KeplmError(f"{output} already holds files keplm did not write ({', '.join(sorted(foreign)[:3])}); "
                             f"choose a new or empty directory")
    mark(out, job)
    stage = out / f"{STAGING_PREFIX}{job}-{uuid.uuid4().hex[:12]}"
    mark(stage, job)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    publish(stage, out)


def publish(stage: Path, out: Path) -> None:
    """Move ``stage``'s entries into ``out``: the old manifest out first, the new one in last."""
    entries = [e for e in stage.iterdir() if e.name not in (MARKER, MANIFEST)]
    (out / MANIFEST).unlink(missing_ok=True)   # from here until the end, ``out`` is no finished output
    for e in entries:
        target = out / e.name
        remove_owned(target)
        os.replace(e, target)
        if target.is_dir():
            mark(target)
    if (stage / MANIFEST).is_file():
        os.replace(stage / MANIFEST, out / MANIFEST)
    shutil.rmtree(stage, ignore_errors=True)


def write_json_atomic(path: str | Path, data) -> None:
    """``path`` holds either its old content or all of ``data``, never a part (a unique temporary, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def prepare_inputs(prepare_cfg) -> list[Path]:
    """The paths a ``prepare`` section reads: corpus files/directories/globs, the KG, the tokenizer."""
    from keplm.platform.config import resolve_path

    paths = [resolve_path(c) for c in prepare_cfg.corpus]
    return paths + [resolve_path(p) for p in (prepare_cfg.kg, prepare_cfg.tokenizer) if p]
