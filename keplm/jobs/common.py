"""Arguments every job takes, its console (``keplm.platform.console``), and the one-line error handling every job
shares."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

from keplm.platform import console
from keplm.platform.errors import KeplmError


def add_common_args(parser: argparse.ArgumentParser, output: bool = True) -> None:
    parser.add_argument("--config", help="YAML config file (keplm://... for files shipped with keplm)")
    if output:
        parser.add_argument("--output", required=True, help="output directory of this job")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    add_verbose_arg(parser)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def add_verbose_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Ray's, the libraries' and the workers' log lines on the console too "
                             "(always in OUTPUT/logs/keplm.log)")


_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")


def split_overrides(paths: list[str] | None, overrides: list[str]) -> tuple[list[str], list[str]]:
    """`--corpus a b ray.num_cpus=1`: argparse gives the trailing override to the nargs='+' flag."""
    paths = paths or []
    return [p for p in paths if not _OVERRIDE.match(p)], overrides + [p for p in paths if _OVERRIDE.match(p)]


def job_name(args: argparse.Namespace) -> str:
    """``pretrain``, ``kg build``: the words of the command after ``keplm``."""
    return " ".join(w for w in (args.job, getattr(args, "kg_job", None)) if w)


def run_job(fn: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a job in its console session: keplm's lines on stderr, the rest in OUTPUT/logs/keplm.log (``-v``: on
    stderr too), a closing summary, the job's JSON result last on stdout. User errors become one line on stderr
    and their exit code (2 unless the error says)."""
    name = job_name(args)
    output = getattr(args, "output", None)
    try:
        if output and Path(output).exists() and not Path(output).is_dir():
            raise KeplmError(f"--output {output} is an existing file, not a directory")
        with console.Session(name, output, verbose=getattr(args, "verbose", False)) as session:
            rc = fn(args) or 0
            session.finish()
        if session.result_line is not None:
            print(session.result_line, flush=True)
        return rc
    except KeplmError as exc:
        print(f"keplm {name}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"keplm {name}: interrupted", file=sys.stderr)
        return 130
    except USER_INPUT_ERRORS as exc:   # what a user's files or config cause; a bug of keplm stays a traceback
        print(f"keplm {name}: error: {describe_user_error(exc)}", file=sys.stderr)
        return 2


def _user_input_errors() -> tuple[type[BaseException], ...]:
    import gzip
    import json
    import zlib

    import yaml
    from pydantic import ValidationError

    return (ValidationError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
            UnicodeDecodeError, gzip.BadGzipFile, EOFError, zlib.error, json.JSONDecodeError, yaml.YAMLError)


# The one place where the exceptions a user's input or config can cause (beyond keplm's own KeplmError) become the
# one-line error and exit code 2: invalid config values met outside the config loader, missing or unreadable
# paths, undecodable, truncated or corrupt files, malformed JSON/YAML. Anything else is a bug and keeps its
# traceback.
USER_INPUT_ERRORS = _user_input_errors()


def describe_user_error(exc: BaseException) -> str:
    """One line for an exception of ``USER_INPUT_ERRORS``: what happened, to which file."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        from keplm.platform.config import format_validation_error

        return format_validation_error(exc)
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.strerror or exc.__class__.__name__}: {exc.filename}"
    text = " ".join(str(exc).split())
    kind = {"BadGzipFile": "not a gzip file", "EOFError": "a compressed file ends early (truncated)",
            "error": "corrupt compressed data"}.get(exc.__class__.__name__, exc.__class__.__name__)
    return f"{kind}: {text}" if text else kind


def module_main(register: Callable[[argparse._SubParsersAction], None], argv: list[str] | None = None) -> int:
    """`python -m keplm.jobs.X ARGS` == `keplm X ARGS`."""
    parser = argparse.ArgumentParser(prog="keplm")
    sub = parser.add_subparsers(dest="job", required=True)
    register(sub)
    name = next(iter(sub.choices))
    args = parser.parse_args([name, *(sys.argv[1:] if argv is None else argv)])
    return run_job(args.func, args)
