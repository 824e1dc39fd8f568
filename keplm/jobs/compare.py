"""`keplm compare --experiment NAME --output DIR`: the paper-style table of a sweep's or an ablation's runs
(best first by the objective, mean ± std over seeds, best per column), as comparison.csv, comparison.md, a
results page report.md (metadata: ``--command``, ``--config``, ``--meta KEY=VALUE``, the parent run's dates,
wall times and git SHA; the table; the plots) and PNG dot plots, also logged to the parent run.
Works against any MLflow tracking URI (``--tracking-uri``, ``tracking.uri``, $MLFLOW_TRACKING_URI): a file
store, sqlite, or an ``mlflow server``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from keplm import config as keplm_config
from keplm.jobs.common import add_verbose_arg, module_main
from keplm.platform import console
from keplm.platform.errors import KeplmError
from keplm.platform.tracking import check_tracking, tracking_uri


def run(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from keplm.tuning.report import compare

    cfg = keplm_config.load(args.config, list(args.overrides))
    uri = args.tracking_uri or tracking_uri(cfg.tracking)
    if not uri:
        raise KeplmError("no tracking URI: pass --tracking-uri, set tracking.uri or MLFLOW_TRACKING_URI")
    check_tracking(uri)
    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
    meta = {}
    for item in args.meta or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise KeplmError(f"--meta {item!r}: expected KEY=VALUE")
        meta[key.strip()] = value.strip()
    res = compare(MlflowClient(uri), args.experiment or cfg.tracking.experiment, Path(args.output), args.parent, metrics,
                  meta=meta or None, command=args.command, config_path=args.config)
    console.echo(res["markdown"])
    res["rows"] = [{k: (v._asdict() if hasattr(v, "_asdict") else v) for k, v in r.items()} for r in res["rows"]]
    console.add_summary("report", str(Path(args.output) / "report.md"))
    console.result(json.dumps({"job": "compare", "output": args.output,
                               **{k: v for k, v in res.items() if k != "markdown"}}, ensure_ascii=False, default=str))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="paper-style table + plots of a sweep's / ablation's MLflow runs")
    p.add_argument("--config", help="YAML config (for tracking.*)")
    p.add_argument("--experiment", help="MLflow experiment (default: tracking.experiment)")
    p.add_argument("--parent", help="the sweep/ablation run id (default: the experiment's latest)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI")
    p.add_argument("--metrics", help="comma-separated metric names (default: the known ones present)")
    p.add_argument("--command", help="the command that ran the sweep/ablation, for report.md's metadata")
    p.add_argument("--meta", action="append", metavar="KEY=VALUE", help="an extra line of report.md's metadata "
                   "(repeatable)")
    p.add_argument("--output", required=True)
    add_verbose_arg(p)
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    return module_main(register, argv)


if __name__ == "__main__":
    sys.exit(main())
