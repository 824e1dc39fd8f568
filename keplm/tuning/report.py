"""Paper-style comparison of MLflow runs: variants x metrics, mean ± std over seeds, best per column.

Which runs: the children of ``parent`` (a sweep's or an ablation's run), by default the experiment's
latest such parent; with no sweep or ablation in the experiment, every run of it. Variants are the
``keplm.variant`` tag (ablations), else the run name (sweep trials: one row each). FAILED runs are left
out and counted; runs a scheduler stopped early (KILLED) are kept with the metrics they reached, and so
are runs an interrupted sweep cut off (``keplm.interrupted``), counted and warned about.
Best per column: lowest for a ``*loss*`` metric, highest otherwise.

Plots (PNG, matplotlib): a bar chart with ±std error bars per metric; for sweeps also the objective
against each searched knob, Optuna's parameter importances (fANOVA on the trials rebuilt as an
in-memory Optuna study) and Optuna's parallel-coordinates plot.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np

from keplm.platform.errors import KeplmError
from keplm.tuning.space import config_key

log = logging.getLogger(__name__)

METRICS = ("objective", "val_mlm_loss", "proxy_f1", "test_f1", "dev_f1", "acc_at_1", "loss", "mlm_loss", "sop_loss",
           "mnem_loss", "mmem_loss", "ed_loss", "el_loss", "cecp_loss", "est_loss", "bem_loss")


def find_runs(client, experiment: str, parent: str | None = None):
    """-> (parent run or None, the runs to compare)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise KeplmError(f"no MLflow experiment named {experiment!r} at this tracking URI")
    if parent is None:
        parents = [r for job in ("sweep", "ablate") for r in client.search_runs(
            [exp.experiment_id], f"tags.`keplm.job` = '{job}'", order_by=["attributes.start_time DESC"], max_results=1)]
        parent = max(parents, key=lambda r: r.info.start_time).info.run_id if parents else None
    if parent is None:
        return None, client.search_runs([exp.experiment_id], max_results=5000)
    return client.get_run(parent), client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'",
                                                      max_results=5000)


def lower_is_better(metric: str) -> bool:
    return "loss" in metric


def comparison_table(runs, metrics: list[str] | None = None) -> tuple[list[dict], list[str], int]:
    """-> (rows sorted by variant: {variant, n, <metric>: (mean, std)}, metric names, failed runs left out)."""
    kept = [r for r in runs if r.info.status != "FAILED"]
    failed = len(runs) - len(kept)
    if metrics is None:
        metrics = [m for m in METRICS if any(m in r.data.metrics for r in kept)]
    groups: dict[str, list] = {}
    for r in kept:
        groups.setdefault(r.data.tags.get("keplm.variant") or r.info.run_name, []).append(r)
    rows = []
    for variant in sorted(groups):
        row: dict[str, Any] = {"variant": variant, "n": len(groups[variant])}
        for m in metrics:
            vals = [r.data.metrics[m] for r in groups[variant] if m in r.data.metrics]
            if vals:
                arr = np.asarray(vals, float)
                row[m] = (float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0)
        rows.append(row)
    return rows, metrics, failed


def best_per_column(rows: list[dict], metrics: list[str]) -> dict[str, str]:
    best = {}
    for m in metrics:
        have = [r for r in rows if m in r]
        if have:
            pick = (min if lower_is_better(m) else max)(have, key=lambda r: r[m][0])
            best[m] = pick["variant"]
    return best


def write_tables(rows: list[dict], metrics: list[str], out: Path) -> tuple[Path, Path, str]:
    best = best_per_column(rows, metrics)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "comparison.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["variant", "n", *[x for m in metrics for x in (f"{m}_mean", f"{m}_std")], "best_in"])
        for r in rows:
            cells = [x for m in metrics for x in ((f"{r[m][0]:.6g}", f"{r[m][1]:.6g}") if m in r else ("", ""))]
            w.writerow([r["variant"], r["n"], *cells, ";".join(m for m in metrics if best.get(m) == r["variant"])])
    lines = ["| variant | n | " + " | ".join(f"{m} {'↓' if lower_is_better(m) else '↑'}" for m in metrics) + " |",
             "| --- | --- | " + " | ".join("---" for _ in metrics) + " |"]
    for r in rows:
        cells = []
        for m in metrics:
            if m not in r:
                cells.append("")
                continue
            text = f"{r[m][0]:.4f} ± {r[m][1]:.4f}"
            cells.append(f"**{text}**" if best.get(m) == r["variant"] else text)
        lines.append(f"| {r['variant']} | {r['n']} | " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    md_path = out / "comparison.md"
    md_path.write_text(md, encoding="utf-8")
    return csv_path, md_path, md


def plot_bars(rows: list[dict], metrics: list[str], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for m in metrics:
        have = [r for r in rows if m in r]
        if not have:
            continue
        fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(have) + 2), 3.5))
        ax.bar([r["variant"] for r in have], [r[m][0] for r in have], yerr=[r[m][1] for r in have], capsize=4,
               color="#4c72b0")
        ax.set_ylabel(m)
        ax.set_title(f"{m} (mean ± std over seeds)")
        ax.tick_params(axis="x", labelrotation=30)
        fig.tight_layout()
        p = out / f"bars_{m}.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


def sweep_points(parent, runs, objective: str) -> tuple[list[str], list[dict], list[float]]:
    """Searched knobs (from the parent's ``tune.param_space.*`` params) and each finished trial's values."""
    knobs = [k.removeprefix("tune.param_space.") for k in parent.data.params if k.startswith("tune.param_space.")]
    points, values = [], []
    for r in runs:
        if r.info.status == "FAILED" or objective not in r.data.metrics:
            continue
        pt = {}
        for k in knobs:
            raw = r.data.params.get(config_key(k))
            if raw is None:
                break
            try:
                pt[k] = float(raw)
            except ValueError:
                pt[k] = raw
        else:
            points.append(pt)
            values.append(float(r.data.metrics[objective]))
    return knobs, points, values


def optuna_study(knobs: list[str], points: list[dict], values: list[float], minimize: bool):
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    dists = {}
    for k in knobs:
        vals = [p[k] for p in points]
        numeric = all(isinstance(v, float) for v in vals)
        if numeric and len(set(vals)) > 4 or (numeric and not all(float(v).is_integer() for v in vals)):
            lo, hi = min(vals), max(vals)
            dists[k] = FloatDistribution(lo, hi if hi > lo else lo + 1e-12)
        else:
            dists[k] = CategoricalDistribution(sorted(set(vals), key=str))
    study = optuna.create_study(direction="minimize" if minimize else "maximize")
    for p, v in zip(points, values):
        study.add_trial(optuna.trial.create_trial(params=p, distributions=dists, value=v))
    return study


def plot_sweep(parent, runs, objective: str, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    knobs, points, values = sweep_points(parent, runs, objective)
    paths: list[Path] = []
    if len(points) < 2:
        return paths
    for k in knobs:
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        xs = [p[k] for p in points]
        ax.scatter([str(x) for x in xs] if any(isinstance(x, str) for x in xs) else xs, values, color="#dd8452")
        ax.set_xlabel(f"{k} ({config_key(k)})")
        ax.set_ylabel(objective)
        fig.tight_layout()
        paths.append(out / f"sweep_{k}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna_study(knobs, points, values, lower_is_better(objective))
    try:
        importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):   # too few distinct trials for fANOVA
        importances = {}
    if importances:
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names], color="#55a868")
        ax.set_xlabel("importance (fANOVA)")
        ax.set_title(f"parameter importance for {objective}")
        fig.tight_layout()
        paths.append(out / "sweep_importance.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # optuna marks its matplotlib plots experimental
        ax = optuna.visualization.matplotlib.plot_parallel_coordinate(study)
    paths.append(out / "sweep_parallel_coordinates.png")
    ax.figure.set_size_inches(7, 4)
    ax.figure.tight_layout()
    ax.figure.savefig(paths[-1], dpi=100)
    plt.close(ax.figure)
    return paths


def compare(client, experiment: str, out: Path, parent_id: str | None = None, metrics: list[str] | None = None) -> dict:
    parent, runs = find_runs(client, experiment, parent_id)
    if not runs:
        raise KeplmError(f"experiment {experiment!r}: no runs to compare")
    rows, metrics, failed = comparison_table(runs, metrics)
    cut = sum("keplm.interrupted" in r.data.tags for r in runs)
    if cut:
        log.warning("compare: %d run(s) were cut off by an interrupted sweep and hold partial metrics; "
                    "run the sweep's command again to finish them", cut)
    csv_path, md_path, md = write_tables(rows, metrics, out)
    plots = plot_bars(rows, metrics, out)
    job = parent.data.tags.get("keplm.job") if parent else None
    if job == "sweep":
        objective = parent.data.params.get("tune.metric", "objective")
        plots += plot_sweep(parent, runs, objective, out)
    if parent is not None:
        for p in (csv_path, md_path, *plots):
            client.log_artifact(parent.info.run_id, str(p), artifact_path="compare")
    return {"parent_run": parent.info.run_id if parent else None, "job": job, "runs": len(runs), "failed_left_out": failed,
            "interrupted_runs": cut,
            "rows": rows, "metrics": metrics, "markdown": md, "files": [str(p) for p in (csv_path, md_path, *plots)],
            "best": best_per_column(rows, metrics)}
