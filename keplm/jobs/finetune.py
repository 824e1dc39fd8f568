"""`keplm finetune`: fine-tune (or feature-extract) one checkpoint on one task given by its files, N seeds.

The same machinery as ``keplm evaluate`` (Ray tasks, MLflow runs linked to the pretraining run), with the
task built from the command line: ``keplm finetune --checkpoint M --kind ner --train F --dev F --test F
--output DIR [--head crf] [--mode feature] [--seeds 5] [finetune.lr=3e-5 ...]``.
"""

from __future__ import annotations

import argparse
import json
import sys

from keplm import config as keplm_config
from keplm.jobs.common import add_common_args, module_main
from keplm.jobs.evaluate import add_checkpoint_args, add_run_summary, evaluate_checkpoint, print_summary
from keplm.models.downstream.tasks import TaskSpec
from keplm.platform import console
from keplm.platform.errors import ConfigError


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.seeds:
        overrides.append(f"evaluate.seeds={args.seeds}")
    if args.head:
        overrides.append(f"finetune.head={args.head}")
    if args.mode:
        overrides.append(f"finetune.mode={args.mode}")
    cfg = keplm_config.load(args.config, overrides)
    try:
        spec = TaskSpec(kind=args.kind, train=args.train, dev=args.dev, test=args.test, format=args.format,
                        augmented_train=args.augmented_train)
    except ValueError as exc:
        raise ConfigError(str(exc).splitlines()[-1].strip()) from None
    cfg.evaluate.tasks = {args.name or args.kind: spec}
    from keplm.platform.outputs import guard_output

    guard_output("finetune", args.output, [args.checkpoint, args.train, args.dev, args.test, args.augmented_train])
    res = evaluate_checkpoint(cfg, args.checkpoint, args.output, args.address, args.parent_run)
    print_summary(res["summary"])
    add_run_summary(args.output, res)
    console.result(json.dumps({"job": "finetune", "output": args.output, **res}, ensure_ascii=False))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a checkpoint on one NER or sentence-pair task (N seeds)")
    add_common_args(p)
    add_checkpoint_args(p)
    p.add_argument("--kind", choices=["ner", "pair"], default="ner")
    p.add_argument("--train", required=True)
    p.add_argument("--dev", required=True)
    p.add_argument("--test")
    p.add_argument("--augmented-train", help="train on this keplm augment output instead of --train")
    p.add_argument("--format", choices=["conll", "tsv", "spans"], help="NER file format (default: from suffix)")
    p.add_argument("--head", choices=["fc", "crf", "lstm-crf", "bilstm-crf"])
    p.add_argument("--mode", choices=["finetune", "feature"])
    p.add_argument("--name", help="task name in results and MLflow (default: the kind)")
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    return module_main(register, argv)


if __name__ == "__main__":
    sys.exit(main())
