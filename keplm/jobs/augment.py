"""`keplm augment`: MLM data augmentation of an NER training set (seed 003 §3.1).

``keplm augment --checkpoint M --data train.txt --output DIR [--rate 0.15] [--copies 1]`` writes
``DIR/train.txt`` (char-label lines: the original sentences, then the generated ones) and a manifest with
counts; ``keplm finetune --augmented-train DIR/train.txt`` trains on it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from keplm.jobs.common import add_verbose_arg, module_main
from keplm.platform import console
from keplm.platform.errors import KeplmError
from keplm.platform.manifest import hash_inputs, write_manifest

AUGMENT_SCHEMA_VERSION = 1


def run(args: argparse.Namespace) -> int:
    from keplm.models.downstream.augment import augment_ner, write_conll
    from keplm.models.downstream.data import read_ner

    out = Path(args.output)
    if not 0 < args.rate <= 1 or args.copies < 1:
        raise KeplmError(f"--rate must be in (0, 1] and --copies >= 1 (got {args.rate}, {args.copies})")
    from keplm.platform.outputs import guard_output, staged

    guard_output("augment", out, [args.data, args.checkpoint])
    ds = read_ner(args.data, args.format)
    aug = augment_ner(ds, args.checkpoint, rate=args.rate, copies=args.copies, seed=args.seed)
    counts = dict(aug.counts)
    with staged(out, "augment") as stage:   # published into out, manifest last, on success
        write_conll(aug, stage / "train.txt")
        write_manifest(stage, "augment", AUGMENT_SCHEMA_VERSION, {"rate": args.rate, "copies": args.copies,
                       "seed": args.seed, "checkpoint": str(args.checkpoint)},
                       hash_inputs([args.data, args.checkpoint]), counts)
    console.add_summary("training set", str(out / "train.txt"))
    console.result(json.dumps({"job": "augment", "output": str(out), "counts": counts}, ensure_ascii=False))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("augment", help="MLM data augmentation of an NER training set (entity tokens never change)")
    p.add_argument("--checkpoint", required=True, help="masked-LM model directory")
    p.add_argument("--data", required=True, help="NER training file (conll, tsv or spans)")
    p.add_argument("--format", choices=["conll", "tsv", "spans"])
    p.add_argument("--output", required=True)
    p.add_argument("--rate", type=float, default=0.15, help="share of eligible (non-entity) words masked")
    p.add_argument("--copies", type=int, default=1, help="generated versions per sentence")
    p.add_argument("--seed", type=int, default=0)
    add_verbose_arg(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    return module_main(register, argv)


if __name__ == "__main__":
    sys.exit(main())
