"""`keplm export`: a keplm checkpoint as a plain BERT checkpoint for stock transformers, with a model card.

``keplm export --checkpoint DIR/model --output OUT [--as bert-mlm|bert-encoder]`` writes OUT with the BERT trunk
(and, for ``bert-mlm``, the MLM head) in safetensors, a ``bert`` config.json, the tokenizer files and a
``README.md`` model card; the knowledge modules stay in the full checkpoint (``keplm.models.export``). No Ray,
no MLflow: it reads the checkpoint, the pretrain manifest beside it and any ``keplm evaluate`` output of it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from keplm import config as keplm_config
from keplm.jobs.common import module_main, split_overrides
from keplm.models.export import FORMATS


def run(args: argparse.Namespace) -> int:
    from keplm.models.export import export_bert
    from keplm.models.model_card import checkpoint_facts, pretrain_manifest_of, write_card

    args.evaluation, overrides = split_overrides(args.evaluation, list(args.overrides))
    cfg = keplm_config.load(args.config, overrides)
    fmt = args.fmt or cfg.export.format
    src, out = Path(args.checkpoint), Path(args.export_dir)
    from keplm.platform.outputs import guard_output

    # refuses an OUT that is a file, holds the checkpoint, lies inside it, or holds files keplm did not write
    guard_output("export", out, [src, args.tokenizer], lock=False)
    info = export_bert(src, out, fmt, args.tokenizer)
    command = ["keplm", "export", "--checkpoint", args.checkpoint, "--output", args.export_dir, "--as", fmt]
    if args.tokenizer:
        command += ["--tokenizer", args.tokenizer]
    pretrain = pretrain_manifest_of(src)
    config = (pretrain or {}).get("config")
    card = {"evaluations": args.evaluation or [], "language": cfg.export.language, "license": cfg.export.license}
    write_card(out, checkpoint_facts(src, export=info, exported_with=shlex.join(command), **card), config)
    if args.update_card:
        write_card(src, checkpoint_facts(src, bert_export=out, **card), config)
    print(json.dumps({"job": "export", "output": str(out), "format": fmt, "architecture": info["architecture"],
                      "parameters": info["parameters"], "dropped": info["dropped"]}, ensure_ascii=False))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="a keplm checkpoint as a plain BERT checkpoint (stock transformers) + model card")
    p.add_argument("--checkpoint", required=True, help="a full keplm checkpoint (a keplm pretrain output's model/)")
    # not args.output: the export is a model directory, replaced whole, not a job directory that gets logs/
    p.add_argument("--output", dest="export_dir", required=True, help="directory of the export (replaced if present)")
    p.add_argument("--as", dest="fmt", choices=sorted(FORMATS),
                   help="bert-mlm: BertForMaskedLM; bert-encoder: BertModel, the trunk alone (default: export.format)")
    p.add_argument("--tokenizer", help="tokenizer directory, when the checkpoint holds none")
    p.add_argument("--evaluation", nargs="+", help="keplm evaluate outputs of this checkpoint for the card (those "
                                                   "beside the checkpoint are found without it)")
    p.add_argument("--update-card", action="store_true", help="also (re)write the full checkpoint's README.md")
    p.add_argument("--config", help="YAML config file (its export section: language, license)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    return module_main(register, argv)


if __name__ == "__main__":
    sys.exit(main())
