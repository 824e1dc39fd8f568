"""The `keplm` command: one subcommand per job module."""

from __future__ import annotations

import argparse
import sys

from keplm import __version__
from keplm.jobs import ablate, augment, compare, evaluate, export, finetune, kg, prepare, pretrain, sweep, vocab
from keplm.jobs.common import run_job

JOBS = [pretrain, prepare, vocab, kg, finetune, evaluate, augment, sweep, ablate, compare, export]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keplm", description="Knowledge-enhanced medical LM pretraining on Ray.")
    parser.add_argument("--version", action="version", version=f"keplm {__version__}")
    sub = parser.add_subparsers(dest="job", required=True, metavar="JOB")
    for job in JOBS:
        job.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_job(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
