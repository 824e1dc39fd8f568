"""`keplm prepare`: corpus + KG -> cleaned, entity-linked, tokenised Parquet shards (Ray Data)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from keplm import config as keplm_config
from keplm.jobs.common import add_common_args, module_main, split_overrides
from keplm.kg.prepare import run_prepare
from keplm.platform import console
from keplm.platform.manifest import describe_counts
from keplm.platform.outputs import guard_output, prepare_inputs
from keplm.platform.ray_session import connect


def run(args: argparse.Namespace) -> int:
    args.corpus, overrides = split_overrides(args.corpus, list(args.overrides))
    if args.corpus:
        overrides.append("prepare.corpus=" + json.dumps(args.corpus, ensure_ascii=False))
    if args.kg:
        overrides.append("prepare.kg=" + json.dumps(args.kg, ensure_ascii=False))
    cfg = keplm_config.load(args.config, overrides)
    guard_output("prepare", args.output, prepare_inputs(cfg.prepare))
    connect(cfg.ray, args.address)
    with console.stage("prepare") as st:
        counts = run_prepare(cfg.prepare, args.output, {"prepare": keplm_config.dump(cfg)["prepare"]})
        st["counts"] = describe_counts("prepare", counts)
    console.add_summary("shards", str(Path(args.output) / "shards"))
    console.result(json.dumps({"job": "prepare", "output": args.output, "counts": counts}, ensure_ascii=False))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="clean, link and tokenise a corpus into training shards")
    add_common_args(p)
    p.add_argument("--corpus", nargs="+", help="corpus files, directories or globs")
    p.add_argument("--kg", help="KG directory (entities.tsv, triples.tsv, aliases.tsv)")
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    return module_main(register, argv)


if __name__ == "__main__":
    sys.exit(main())
