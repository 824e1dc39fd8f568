"""`keplm kg build|neighbours|embed`: KG ingestion, PEPR top-K neighbours, TransR/TransE embeddings."""

from __future__ import annotations

import argparse
import json
import sys

from keplm import config as keplm_config
from keplm.jobs.common import add_common_args, module_main
from keplm.platform import console
from keplm.platform.manifest import describe_counts
from keplm.platform.outputs import guard_output
from keplm.platform.ray_session import connect


def _dump(cfg, *sections: str) -> dict:
    full = keplm_config.dump(cfg)
    return {s: full[s] for s in sections}


def build(args: argparse.Namespace) -> int:
    from keplm.kg.graph import build_graph

    from keplm.platform.config import resolve_path
    from keplm.platform.errors import KeplmError

    cfg = keplm_config.load(args.config, list(args.overrides))
    kg = args.kg or cfg.prepare.kg  # default: the KG the corpus was prepared with
    if not kg:
        raise KeplmError("kg build: no KG given (--kg DIR or prepare.kg in the config)")
    guard_output("kg build", args.output, [resolve_path(kg), args.corpus])
    with console.stage("graph") as st:
        counts = build_graph(resolve_path(kg), args.output, cfg.graph, _dump(cfg, "graph") | {"kg": str(kg)},
                             corpus_dir=args.corpus)
        st["counts"] = describe_counts("kg_build", counts)
    console.add_summary("output", args.output)
    console.result(json.dumps({"job": "kg build", "output": args.output, "counts": counts}, ensure_ascii=False))
    return 0


def neighbours(args: argparse.Namespace) -> int:
    from keplm.kg.pepr import run_neighbours

    cfg = keplm_config.load(args.config, list(args.overrides))
    guard_output("kg neighbours", args.output, [args.graph])
    connect(cfg.ray, args.address)
    with console.stage("neighbours") as st:
        counts = run_neighbours(args.graph, args.output, cfg.pepr, _dump(cfg, "pepr"))
        st["counts"] = describe_counts("kg_neighbours", counts)
    console.add_summary("output", args.output)
    console.result(json.dumps({"job": "kg neighbours", "output": args.output, "counts": counts}, ensure_ascii=False))
    return 0


def embed(args: argparse.Namespace) -> int:
    from keplm.kg.embed import run_embed

    overrides = list(args.overrides) + ([f"embed.model={args.model}"] if args.model else [])
    cfg = keplm_config.load(args.config, overrides)
    guard_output("kg embed", args.output, [args.graph])
    connect(cfg.ray, args.address)
    with console.stage(f"embed-{cfg.embed.model}") as st:
        counts = run_embed(args.graph, args.output, cfg.embed, _dump(cfg, "embed"), cfg.tracking)
        st["counts"] = describe_counts("kg_embed", counts)
    console.add_summary("output", args.output)
    console.result(json.dumps({"job": "kg embed", "output": args.output, "counts": counts}, ensure_ascii=False))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kg", help="KG stage: build the graph, PEPR neighbours, TransR/TransE embeddings")
    kg_sub = p.add_subparsers(dest="kg_job", required=True, metavar="STEP")
    b = kg_sub.add_parser("build", help="KG TSVs -> id tables + PPR adjacency (GRAPH_DIR)")
    add_common_args(b)
    b.add_argument("--kg", help="KG directory (entities.tsv, triples.tsv, aliases.tsv); default prepare.kg")
    b.add_argument("--corpus", help="a keplm prepare output: adds corpus entity frequencies (PEPR eq. 1)")
    b.set_defaults(func=build)
    n = kg_sub.add_parser("neighbours", help="PEPR top-K neighbours of every (linked) entity")
    add_common_args(n)
    n.add_argument("--graph", required=True, help="a keplm kg build output")
    n.set_defaults(func=neighbours)
    e = kg_sub.add_parser("embed", help="TransR / TransE embeddings with PyKEEN")
    add_common_args(e)
    e.add_argument("--graph", required=True, help="a keplm kg build output")
    e.add_argument("--model", choices=["transr", "transe"], help="overrides embed.model")
    e.set_defaults(func=embed)


def main(argv: list[str] | None = None) -> int:
    return module_main(register, argv)


if __name__ == "__main__":
    sys.exit(main())
