"""Fault injection for the tests of restarts: a process that dies once per run, where its stage says.

The stages' ``fault_at_*`` keys (``pepr.fault_at_call``, ``prepare.fault_at_batch``, ``train.fault_at_step``)
name the point; ``exit_once`` makes the first process that reaches it exit at once, as a crash does (no
cleanup, exit status 1), and lets every later one — the restarted actor or worker — go past it. Which process
came first is decided by creating a marker file atomically, so it holds across processes and nodes that
share the marker's directory."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def first_claim(marker: str | Path, note: str = "") -> bool:
    """Whether this call is the first to claim ``marker``: it creates the file (with ``note`` in it) only if
    no one has."""
    path = Path(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(note)
    return True


def exit_once(marker: str | Path, note: str = "", before_exit: Callable[[], None] | None = None) -> None:
    """Exit this process now if it is the first to get here with ``marker`` (``before_exit`` runs first);
    return otherwise."""
    if first_claim(marker, note):
        if before_exit is not None:
            before_exit()
        os._exit(1)
