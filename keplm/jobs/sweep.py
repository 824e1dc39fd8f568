"""`keplm sweep` and `keplm ablate`: Ray Tune over short Ray Train pretraining runs, logged to MLflow.

``keplm sweep --config configs/sweep-demo.yaml --output DIR`` searches ``sweep.space`` with OptunaSearch
(TPE, seeded) and ASHA; ``keplm ablate --model smedbert --config … --output DIR`` runs the model's ablation
grid x ``ablate.seeds`` as Tune grid trials. Both write ``trials.csv``, ``summary.json`` and (sweep and
ablate alike) ``best_config.yaml`` under DIR; rerunning the same command resumes the Tune experiment.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from keplm import config as keplm_config
from keplm.jobs.common import add_common_args, module_main
from keplm.platform import console
from keplm.platform.ray_session import connect
from keplm.platform.tracking import check_tracking, tracking_uri


def _setup(args):
    cfg = keplm_config.load(args.config, list(args.overrides))
    # Ray Train's placement-group cleaner asks the State API (the dashboard) whether a trial's Train
    # controller is alive; without it the workers of a trial ASHA stopped keep their CPUs forever
    cfg.ray.include_dashboard = True
    # Ray Train hands worker reports to Tune when it polls the workers (default every 2 s): poll faster,
    # so that ASHA's stop decision lands within a step or two of the report it is based on
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(cfg.tracking) or f"sqlite:///{(out / 'mlflow.db').resolve()}"
    check_tracking(uri)
    connect(cfg.ray, args.address)
    return cfg, out, uri


def run_sweep(args: argparse.Namespace) -> int:
    from keplm.tuning.sweep import sweep

    cfg, out, uri = _setup(args)
    summary = sweep(cfg, out, uri)
    console.result(json.dumps({"job": "sweep", "output": str(out), "tracking_uri": uri, **summary}, ensure_ascii=False,
                              default=str))
    return 0


def run_ablate(args: argparse.Namespace) -> int:
    from keplm.tuning.sweep import ablate

    cfg, out, uri = _setup(args)
    argv = sys.argv[2:] if sys.argv[1:2] == ["ablate"] else sys.argv[1:]   # `keplm ablate …` or `-m keplm.jobs.ablate …`
    command = shlex.join(["keplm", "ablate", *argv])
    summary = ablate(cfg, out, uri, args.model, command=command, config_path=args.config)
    if summary.get("report"):
        console.add_summary("report", summary["report"])
    console.result(json.dumps({"job": "ablate", "output": str(out), "tracking_uri": uri, **summary}, ensure_ascii=False,
                              default=str))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="hyper-parameter sweep: Ray Tune + OptunaSearch + ASHA over short pretraining runs")
    add_common_args(p)
    p.set_defaults(func=run_sweep)


def register_ablate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ablate", help="a paper's ablation grid x seeds as Tune grid trials")
    add_common_args(p)
    p.add_argument("--model", default="smedbert", help="whose grid: smedbert (SMedBERT Table 4 + baselines + none), "
                                                        "kebiolm (KeBioLM Tables 3-4) or embert (EMBERT Tables 4-5)")
    p.set_defaults(func=run_ablate)


def main(argv: list[str] | None = None) -> int:
    return module_main(register, argv)


if __name__ == "__main__":
    sys.exit(main())
