"""Arguments every job takes, and the one-line error handling every job shares."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable

from keplm.platform.errors import KeplmError


def add_common_args(parser: argparse.ArgumentParser, output: bool = True) -> None:
    parser.add_argument("--config", help="YAML config file (keplm://... for files shipped with keplm)")
    if output:
        parser.add_argument("--output", required=True, help="output directory of this job")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")


def split_overrides(paths: list[str] | None, overrides: list[str]) -> tuple[list[str], list[str]]:
    """`--corpus a b ray.num_cpus=1`: argparse gives the trailing override to the nargs='+' flag."""
    paths = paths or []
    return [p for p in paths if not _OVERRIDE.match(p)], overrides + [p for p in paths if _OVERRIDE.match(p)]


def run_job(fn: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a job; user errors become one line on stderr and their exit code (2 unless the error says)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return fn(args) or 0
    except KeplmError as exc:
        print(f"keplm {args.job}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"keplm {args.job}: interrupted", file=sys.stderr)
        return 130


def module_main(register: Callable[[argparse._SubParsersAction], None], argv: list[str] | None = None) -> int:
    """`python -m keplm.jobs.X ARGS` == `keplm X ARGS`."""
    parser = argparse.ArgumentParser(prog="keplm")
    sub = parser.add_subparsers(dest="job", required=True)
    register(sub)
    name = next(iter(sub.choices))
    args = parser.parse_args([name, *(sys.argv[1:] if argv is None else argv)])
    return run_job(args.func, args)
