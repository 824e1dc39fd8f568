"""`keplm vocab`: train a WordPiece vocab on the cleaned corpus (section `prepare`, keys `prepare.vocab.*`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from keplm import config as keplm_config
from keplm.jobs.common import add_common_args, module_main, split_overrides
from keplm.kg.prepare import train_vocab_from_corpus
from keplm.platform import console
from keplm.platform.config import resolve_path
from keplm.platform.errors import KeplmError
from keplm.platform.manifest import hash_inputs, write_manifest
from keplm.platform.corpus_io import expand_inputs


def run(args: argparse.Namespace) -> int:
    args.corpus, overrides = split_overrides(args.corpus, list(args.overrides))
    if args.corpus:
        overrides.append("prepare.corpus=" + json.dumps(args.corpus, ensure_ascii=False))
    cfg = keplm_config.load(args.config, overrides)
    if not cfg.prepare.corpus:
        raise KeplmError("vocab: no corpus given (--corpus PATH... or prepare.corpus)")
    from keplm.platform.outputs import guard_output, prepare_inputs

    guard_output("vocab", args.output, prepare_inputs(cfg.prepare))
    from keplm.platform.ray_session import connect

    connect(cfg.ray, args.address)
    prep = cfg.prepare.model_copy(update={"corpus": [str(resolve_path(c)) for c in cfg.prepare.corpus]})
    out = Path(args.output)
    from keplm.platform.outputs import staged

    with console.stage("vocab") as st, staged(out, "vocab") as stage:   # published into out, manifest last
        staged_tok = train_vocab_from_corpus(prep, stage)
        size = sum(1 for _ in open(staged_tok / "vocab.txt", encoding="utf-8"))
        st["counts"] = f"{size:,} WordPiece tokens"
        inputs = hash_inputs([p for p, _ in expand_inputs(prep.corpus)])
        dump = keplm_config.dump(cfg)["prepare"]
        write_manifest(stage, "vocab", 1, {"prepare": dump}, inputs, {"vocab_size": size})
    tok_dir = out / staged_tok.name
    console.add_summary("tokenizer", str(tok_dir))
    console.result(json.dumps({"job": "vocab", "tokenizer": str(tok_dir), "vocab_size": size}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vocab", help="train a WordPiece vocab (tokenizer dir) on the cleaned corpus")
    add_common_args(p)
    p.add_argument("--corpus", nargs="+", help="corpus files, directories or globs")
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    return module_main(register, argv)


if __name__ == "__main__":
    sys.exit(main())
