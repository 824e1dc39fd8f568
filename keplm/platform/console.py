"""A job's console: keplm's own lines on stderr, everything else in ``OUTPUT/logs/keplm.log``.

At default verbosity the console carries a header (before its first line), one line when a stage starts and
one when it ends (``stage``), training progress, keplm's warnings, and a closing summary (``add_summary``), all
through one handler on the root logger that passes only the ``keplm`` loggers. The job's result stays the last line on
stdout, as JSON (``result``). Ray's, MLflow's, PyTorch's and PyKEEN's log lines and warnings, and what Ray's
workers print, go to the log file; ``-v`` shows them on the console too.

How they get there: for the length of the job, file descriptor 2 of the job's process points at the log file
and the console handler writes to a duplicate of the original stderr, so log handlers the libraries set up
themselves, Python warnings and the C++ log lines of Ray's core all land in the file. Ray workers' output
reaches the driver through Ray's log_to_driver stream, whose printer ``capture_worker_lines`` replaces: worker
lines go to the log file (logger ``workers``), except those keplm's own loggers wrote in a worker
(``worker_logging`` marks them), which are logged again in the driver, so a worker's progress is one plain line
on the console. No ANSI colour codes: keplm writes none, and Ray's are switched off.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("keplm")
worker_output = logging.getLogger("workers")   # what Ray's workers print: the log file (and -v's console)

LOG_FILE = Path("logs") / "keplm.log"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
WORKER_MARK = "[keplm] "
_TQDM_MAGIC = "__ray_tqdm_magic_token__"
_MARKED = re.compile(r"^\[keplm\] (DEBUG|INFO|WARNING|ERROR|CRITICAL) ([\w.]+): (.*)$")

_session: Session | None = None
# worker records below this level go to the log file only: a sweep's trials would otherwise fill the console
# with every trial's training progress (it prints trial events instead)
_worker_console_level = logging.INFO
_last_worker_line = 0.0


def is_keplm(record: logging.LogRecord) -> bool:
    return record.name == "keplm" or record.name.startswith("keplm.")


class ConsoleFormatter(logging.Formatter):
    """keplm's lines as ``HH:MM:SS message`` (``warning: `` / ``error: `` before the message at those levels),
    summary lines (``extra={"plain": True}``) as they are, others (``-v``) with their level and logger."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            msg = f"{msg}\n{record.exc_text}"
        if getattr(record, "plain", False):
            return msg
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        if not is_keplm(record):
            return f"{stamp} {record.levelname} {record.name}: {msg}"
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return f"{stamp} {level}{msg}"


class Session:
    """One job's console and log file (see the module docstring); ``run_job`` enters it around the job."""

    def __init__(self, job: str, output: str | Path | None, verbose: bool = False):
        self.job, self.verbose = job, verbose
        self.log_file = (Path(output) / LOG_FILE) if output else None
        self.summary: list[tuple[str, str]] = []
        self.result_line: str | None = None
        self._saved_fd: int | None = None
        self._handlers: list[logging.Handler] = []

    def __enter__(self) -> Session:
        global _session
        set_worker_console_level(logging.INFO)
        self.started = time.perf_counter()
        root = logging.getLogger()
        self._root_level = root.level
        root.setLevel(logging.INFO)
        self.console = sys.stderr
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            file_handler = logging.FileHandler(self.log_file, encoding="utf-8")
            file_handler.setFormatter(logging.Formatter(FILE_FORMAT))
            self._handlers.append(file_handler)
            if not self.verbose and _real_stderr():
                sys.stderr.flush()
                self._saved_fd = os.dup(2)
                fd = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 2)
                os.close(fd)
                self.console = open(self._saved_fd, "w", buffering=1, encoding=sys.stderr.encoding or "utf-8",
                                    errors="backslashreplace", closefd=False)
        if not _isatty(self.console):
            os.environ.setdefault("RAY_COLOR_PREFIX", "0")   # Ray's own printer of worker lines, should it run
        console_handler = _ConsoleHandler(self)
        console_handler.setFormatter(ConsoleFormatter())
        if not self.verbose:
            console_handler.addFilter(is_keplm)
        self._handlers.insert(0, console_handler)   # first: its header precedes the first line in the file too
        for h in self._handlers:
            root.addHandler(h)
        logging.captureWarnings(True)
        _session = self
        return self

    def __exit__(self, *exc) -> None:
        global _session
        _session = None
        logging.captureWarnings(False)
        root = logging.getLogger()
        for h in self._handlers:
            root.removeHandler(h)
            h.close()
        root.setLevel(self._root_level)
        if self._saved_fd is not None:
            sys.stderr.flush()
            self.console.flush()
            os.dup2(self._saved_fd, 2)
            os.close(self._saved_fd)
            self._saved_fd = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def finish(self) -> None:
        """The closing summary (the rows jobs added, then the log file); the result line goes out after the session."""
        log.info("keplm %s: done in %s", self.job, seconds(self.elapsed()))
        rows = self.summary + ([("log file", str(self.log_file))] if self.log_file else [])
        width = max((len(k) for k, _ in rows), default=0)
        for label, value in rows:
            log.info("  %s  %s", label.ljust(width), value, extra={"plain": True})


def _real_stderr() -> bool:
    """The process's own stderr (not a test's capture), which a job may point elsewhere for its length."""
    try:
        return sys.stderr is sys.__stderr__ and sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(round(s), 60)
    return f"{m} min {s} s" if m < 60 else f"{m // 60} h {m % 60} min"


def placement(count: int, what: str, nodes) -> str:
    """Where a group of processes runs, as the jobs say it: ``2 workers on 1 node``."""
    n = len(set(nodes))
    return f"{count} {what}{'s' * (count != 1)} on {n} node{'s' * (n != 1)}"


class _ConsoleHandler(logging.StreamHandler):
    """The session's console handler: before the first line it shows, the header (where the output and the full
    log go), so that a job that fails before saying anything (a config error) prints its error line alone."""

    def __init__(self, session: Session):
        super().__init__(session.console)
        self.session = session
        self.header_due = session.log_file is not None

    def emit(self, record: logging.LogRecord) -> None:
        if self.header_due:
            self.header_due = False
            s = self.session
            log.info("keplm %s: output %s, full log %s%s", s.job, s.log_file.parent.parent, s.log_file,
                     "" if s.verbose else " (-v: on the console too)")
        super().emit(record)


@contextmanager
def stage(name: str, detail: str = "") -> Iterator[dict]:
    """``running stage NAME[: detail]`` ... ``stage NAME done in S s[: counts]``, where the block may set the
    yielded dict's ``"counts"`` (a short text); no end line when the block raises (the error says what happened)."""
    log.info("running stage %s%s", name, f": {detail}" if detail else "")
    t = time.perf_counter()
    info: dict = {}
    yield info
    counts = info.get("counts")
    log.info("stage %s done in %s%s", name, seconds(time.perf_counter() - t), f": {counts}" if counts else "")


@contextmanager
def stdout_to_log_file() -> Iterator[None]:
    """For the block, what Python code prints to stdout (Tune's experiment tables) goes to the log file, unless
    ``-v`` or no session; keplm's own lines are on stderr and its result is printed after the session."""
    import contextlib

    s = _session
    if s is None or s.log_file is None or s.verbose:
        yield
        return
    with open(s.log_file, "a", encoding="utf-8", buffering=1) as f, contextlib.redirect_stdout(f):
        yield


def add_summary(label: str, value: str) -> None:
    """A row of the job's closing summary (model dir, MLflow run, the command to look at it)."""
    from keplm.platform.tracking import redact_uri

    if _session is not None:
        _session.summary.append((label, redact_uri(value)))


def result(line: str) -> None:
    """The job's result (one JSON line): printed on stdout after the closing summary, so it is the last line. No
    credentials of a URI in it (``keplm.platform.tracking.redact_uri``)."""
    from keplm.platform.tracking import redact_uri

    line = redact_uri(line)
    if _session is not None:
        _session.result_line = line
    else:
        print(line, flush=True)


def echo(text: str) -> None:
    """Lines of the job's own output (a table) on the console as they are, and in the log file."""
    for line in text.splitlines():
        log.info("%s", line, extra={"plain": True})


def set_worker_console_level(level: int) -> None:
    """Worker records below ``level`` go to the log file only (a sweep: its trials' progress)."""
    global _worker_console_level
    _worker_console_level = level


def worker_lines(data: dict) -> None:
    """Ray's log_to_driver handler (``capture_worker_lines``): a batch of lines one worker printed."""
    global _last_worker_line
    try:
        _last_worker_line = time.monotonic()
        lines = data.get("lines", ())
        if data.get("pid") == "autoscaler":   # its status every few seconds: only its events, as Ray prints them
            from ray._private.worker import filter_autoscaler_events

            lines = list(filter_autoscaler_events(lines))
        who = data.get("actor_name") or data.get("task_name") or ("" if data.get("pid") in ("autoscaler", "raylet")
                                                                    else "worker")
        ip = "" if data.get("ip") == data.get("localhost") else f", ip={data.get('ip')}"
        prefix = f"({who + ' ' if who else ''}pid={data.get('pid')}{ip})"
        for line in lines:
            if _TQDM_MAGIC in line:   # ray.experimental.tqdm_ray's state updates, not text
                continue
            m = _MARKED.match(line)
            level = logging.getLevelName(m.group(1)) if m else logging.INFO
            if m and level >= _worker_console_level:
                logging.getLogger(m.group(2)).log(level, "%s", m.group(3), extra={"worker": prefix})
            else:
                worker_output.log(level, "%s %s", prefix, line)
    except Exception:  # noqa: BLE001 - never break Ray's log thread
        pass


def capture_worker_lines() -> bool:
    """Replace Ray's printer of worker lines (log_to_driver) by ``worker_lines``; False when this Ray has no such
    dispatcher (its own printer then stays, and worker lines reach the console as Ray prints them)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    if not hasattr(dispatcher, "remove_handler") or not hasattr(dispatcher, "add_handler"):
        return False
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("keplm_worker_lines")
    dispatcher.add_handler("keplm_worker_lines", worker_lines)
    # the raylet's messages to the driver (e.g. "WARNING: 8 PYTHON worker processes have been started") come by
    # another thread, which calls the module's print_to_stdstream (to stdout) directly
    import ray._private.worker as ray_worker

    if hasattr(ray_worker, "print_to_stdstream"):
        ray_worker.print_to_stdstream = _print_to_stdstream
    return True


def _print_to_stdstream(data: dict, ignore_prefix: bool = False) -> None:
    worker_lines(data)


def wait_for_worker_lines(quiet_s: float = 1.0, timeout_s: float = 5.0) -> None:
    """After Ray work that printed, wait until no worker line has come for ``quiet_s`` (at most ``timeout_s``): Ray
    forwards them with a delay, and a last progress line should precede the line that ends its stage."""
    if not _last_worker_line:
        return
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and time.monotonic() - _last_worker_line < quiet_s:
        time.sleep(0.1)


def worker_logging() -> None:
    """In a Ray worker: keplm's loggers at INFO to the worker's stderr, each line marked for ``worker_lines``.
    Not in the driver, whose keplm lines the session's handlers take."""
    lg = logging.getLogger("keplm")
    if getattr(lg, "_keplm_worker", False):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(WORKER_MARK + "%(levelname)s %(name)s: %(message)s"))
    lg.addHandler(handler)
    lg.setLevel(logging.INFO)
    lg.propagate = False
    lg._keplm_worker = True  # type: ignore[attr-defined]
