"""Paper-style comparison of MLflow runs: variants x metrics, mean ± std over seeds, best per column.

Which runs: the children of ``parent`` (a sweep's or an ablation's run), by default the experiment's
latest such parent; with no sweep or ablation in the experiment, every run of it. Variants are the
``keplm.variant`` tag (ablations), else the run name (sweep trials: one row each). FAILED runs are left
out and counted; runs a scheduler stopped early (KILLED, ``keplm.stopped_early``) are kept with the metrics
they reached, and so are runs an interrupted sweep cut off (``keplm.interrupted``), counted and warned about.

The objective: the metric the sweep/ablation optimised (the parent's ``tune.metric`` param; the trials log
its final value as ``objective``) and its direction, the parent's ``tune.mode`` (else the trials'
``sweep.mode``, else the metric's name). Other columns' direction comes from their names: lower is better
for a loss (``*loss*``, perplexity, error, time), higher otherwise (F1, ``acc_at_1``, ``recall_at_5``, ...).
A stopped or cut-off run has no final objective: its objective cell holds the last value it reported (of
``objective``, else of the objective metric, from the metric history) and the step, e.g.
``6.6100 @ step 9 (stopped)``; such partial values are ranked after the complete ones and never bolded.
Rows are sorted best first by the objective (its mean over seeds). A sweep's table has one column per
searched knob (``tune.param_space.*`` on the parent), read from each trial's config params.
Cells: the value for n = 1, mean ± sample std for n >= 2.

Files (in ``out``, also logged to the parent run under ``compare/``): ``comparison.csv``, ``comparison.md``
(the table), ``report.md`` (a results page: metadata, the table, the plots linked by relative path) and PNG
plots (matplotlib): a dot plot per metric (mean, ±std error bars, one row per variant in the table's order,
the x axis on the data's range); for sweeps also the objective against each searched knob, Optuna's
parameter importances (fANOVA on the trials rebuilt as an in-memory Optuna study) and Optuna's
parallel-coordinates plot.
"""

from __future__ import annotations

import csv
import logging
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from keplm.platform.errors import KeplmError
from keplm.tuning.space import config_key

log = logging.getLogger(__name__)

METRICS = ("objective", "val_mlm_loss", "proxy_f1", "test_f1", "dev_f1", "acc_at_1", "recall_at_5", "loss", "mlm_loss",
           "sop_loss", "mnem_loss", "mmem_loss", "ed_loss", "el_loss", "cecp_loss", "est_loss", "bem_loss")
LOWER_BETTER = ("loss", "perplexity", "ppl", "error", "seconds", "wall_s", "time")
HIGHER_BETTER = ("f1", "acc", "recall", "precision", "auc", "mrr", "hits")


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


def lower_is_better(metric: str, mode: str | None = None) -> bool:
    """``mode`` ("min"/"max", a sweep's) decides when given; else the name: a loss (error, time) is lower-better,
    F1 / accuracy / recall and anything else higher-better."""
    if mode in ("min", "max"):
        return mode == "min"
    name = metric_base(metric).lower()
    if any(t in name for t in LOWER_BETTER):
        return True
    return False   # HIGHER_BETTER, and by default


def metric_base(metric: str) -> str:
    """``cmedqaner.test_f1`` -> ``test_f1``: a task's metric as an ablation's trials log it (``<task>.<metric>``);
    other names (``data.*``, ``time.*``, ``recall_at_5.<relation>``) as they are."""
    base = metric.rsplit(".", 1)[-1]
    return base if base in METRICS and not metric.startswith(("data.", "time.")) else metric


def default_metrics(runs) -> list[str]:
    """The known metrics (METRICS, also as ``<task>.<metric>``) that some run has, in METRICS' order."""
    present = {m for r in runs for m in r.data.metrics if metric_base(m) in METRICS}
    return sorted(present, key=lambda m: (METRICS.index(metric_base(m)), m))


class Objective(NamedTuple):
    metric: str     # what was optimised (e.g. val_mlm_loss); the trials log its final value as `objective`
    mode: str       # "min" | "max"
    source: str     # where the mode came from, for the report


def objective_of(parent, runs) -> Objective | None:
    """The optimised metric and its direction: the parent's ``tune.metric``/``tune.mode`` params (logged by the
    sweep/ablate driver), else the trials' config params (``sweep.objective``/``ablate.objective``,
    ``sweep.mode``), else the metric's name. None when nothing names one."""
    pp = parent.data.params if parent is not None else {}
    job = (parent.data.tags.get("keplm.job") if parent is not None else None) or next(
        (r.data.tags.get("keplm.job", "").removesuffix("-trial") for r in runs if r.data.tags.get("keplm.job")), None)
    child = next((r.data.params for r in runs if r.data.params), {})
    metric = pp.get("tune.metric") or (child.get(f"{job}.objective") if job in ("sweep", "ablate") else None)
    if not metric:
        return None
    if pp.get("tune.mode") in ("min", "max"):
        return Objective(metric, pp["tune.mode"], "the parent run's tune.mode")
    if job == "sweep" and child.get("sweep.mode") in ("min", "max") and child.get("sweep.objective") == metric:
        return Objective(metric, child["sweep.mode"], "the trials' sweep.mode")
    return Objective(metric, "min" if lower_is_better(metric) else "max", f"the name {metric!r}")


def directions(metrics: list[str], objective: Objective | None) -> dict[str, bool]:
    """metric -> lower is better."""
    out = {m: lower_is_better(m) for m in metrics}
    if objective is not None:
        for m in ("objective", objective.metric):
            if m in out:
                out[m] = objective.mode == "min"
    return out


class Cell(NamedTuple):
    """One table cell: mean and sample std (None for n = 1) of a variant's runs; ``partial`` of them were
    stopped or cut off, their value the last one they reported (``step``: the latest step among those, ``why``)."""
    mean: float
    std: float | None
    n: int
    partial: int = 0
    step: int | None = None
    why: str = ""

    def text(self, digits: int = 4) -> str:
        s = f"{self.mean:.{digits}f}" if self.std is None else f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"
        if self.partial:
            s += f" @ step {self.step} ({self.why})" if self.n == 1 else f" ({self.partial} {self.why})"
        return s


def partial_why(run) -> str | None:
    """Why a run holds no final metrics: stopped early by the scheduler, cut off by an interrupt, else None."""
    tags = run.data.tags
    if "keplm.interrupted" in tags:
        return "interrupted"
    if "keplm.stopped_early" in tags or run.info.status == "KILLED":
        return "stopped"
    if run.info.status == "RUNNING":
        return "running"
    return None


def last_reported(client, run, names: tuple[str, ...]) -> tuple[float, int] | None:
    """The latest (value, step) of the first of ``names`` in the run's metric history."""
    for name in names:
        hist = client.get_metric_history(run.info.run_id, name) if client is not None else []
        if hist:
            m = max(hist, key=lambda m: (m.step, m.timestamp))
            return float(m.value), int(m.step)
    return None


def sweep_knobs(parent) -> list[str]:
    """The searched knobs of a sweep (the parent's ``tune.param_space.*`` params), less an ablation's grid axes."""
    if parent is None:
        return []
    return [k for k in (p.removeprefix("tune.param_space.") for p in parent.data.params
                        if p.startswith("tune.param_space.")) if k not in ("variant", "seed")]


def _fmt_param(raw: str) -> str:
    try:
        x = float(raw)
    except ValueError:
        return raw
    return str(int(x)) if x.is_integer() and "e" not in raw.lower() and "." not in raw else f"{x:.4g}"


def comparison_table(runs, metrics: list[str] | None = None, *, client=None, objective: Objective | None = None,
                     knobs: list[str] | None = None) -> tuple[list[dict], list[str], int]:
    """-> (rows best first: {variant, n, params: {knob: value}, partial: {...}|None, <metric>: Cell},
    metric names, failed runs left out).

    The objective column (``objective``, else the objective metric) of a stopped / cut-off run holds its last
    reported value from the metric history (``client`` needed); the other columns hold each run's latest values."""
    kept = [r for r in runs if r.info.status != "FAILED"]
    failed = len(runs) - len(kept)
    if metrics is None:
        metrics = default_metrics(kept)
        if objective is not None and objective.metric not in metrics and any(
                objective.metric in r.data.metrics for r in kept):
            metrics.insert(0, objective.metric)
    obj_col = objective_column(metrics, objective)
    lower = directions(metrics, objective)
    groups: dict[str, list] = {}
    for r in kept:
        groups.setdefault(r.data.tags.get("keplm.variant") or r.info.run_name, []).append(r)
    rows = []
    for variant, group in groups.items():
        row: dict[str, Any] = {"variant": variant, "n": len(group), "params": {}, "partial": None}
        for k in knobs or ():
            vals = sorted({_fmt_param(r.data.params[config_key(k)]) for r in group if config_key(k) in r.data.params})
            if vals:
                row["params"][k] = ", ".join(vals)
        stopped = [(r, why) for r in group if (why := partial_why(r))]
        if stopped:
            row["partial"] = {"runs": len(stopped), "why": ", ".join(sorted({w for _, w in stopped})),
                              "step": max(int(r.data.metrics.get("step", 0)) for r, _ in stopped)}
        for m in metrics:
            vals, steps, whys = [], [], set()
            for r in group:
                why = partial_why(r)
                if m == obj_col and why:
                    got = last_reported(client, r, ("objective", objective.metric) if m == "objective" else (m,))
                    if got is None and client is None and m in r.data.metrics:
                        got = (r.data.metrics[m], int(r.data.metrics.get("step", 0)))
                    if got is not None:
                        vals.append(got[0])
                        steps.append(got[1])
                        whys.add(why)
                elif m in r.data.metrics:
                    vals.append(r.data.metrics[m])
            if vals:
                arr = np.asarray(vals, float)
                row[m] = Cell(float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else None, len(arr),
                              len(steps), max(steps) if steps else None, ", ".join(sorted(whys)))
        rows.append(row)
    sort_col = obj_col or (metrics[0] if metrics else None)

    def rank(row):
        cell = row.get(sort_col) if sort_col else None
        if cell is None:
            return (2, 0.0, row["variant"])
        return (1 if cell.partial else 0, cell.mean if lower.get(sort_col, False) else -cell.mean, row["variant"])

    rows.sort(key=rank)
    return rows, metrics, failed


def objective_column(metrics: list[str], objective: Objective | None) -> str | None:
    if "objective" in metrics:
        return "objective"
    if objective is not None and objective.metric in metrics:
        return objective.metric
    return None


def best_per_column(rows: list[dict], metrics: list[str], lower: dict[str, bool] | None = None) -> dict[str, str]:
    """metric -> the variant with the best value; rows holding a stopped or cut-off run do not compete (their
    values are from an earlier step than the others')."""
    best = {}
    for m in metrics:
        have = [r for r in rows if m in r and not r[m].partial and not r.get("partial")]
        if have:
            low = lower[m] if lower and m in lower else lower_is_better(m)
            best[m] = (min if low else max)(have, key=lambda r: r[m].mean)["variant"]
    return best


def _header(m: str, lower: dict[str, bool], objective: Objective | None) -> str:
    name = f"objective ({objective.metric})" if m == "objective" and objective is not None else m
    return f"{name} {'↓' if lower.get(m, lower_is_better(m)) else '↑'}"


def markdown_table(rows: list[dict], metrics: list[str], lower: dict[str, bool], knobs: list[str],
                   objective: Objective | None, label: str = "variant") -> str:
    best = best_per_column(rows, metrics, lower)
    obj_col = objective_column(metrics, objective)
    heads = [label, "n", *knobs, *(_header(m, lower, objective) for m in metrics)]
    lines = ["| " + " | ".join(heads) + " |", "| " + " | ".join("---" for _ in heads) + " |"]
    for r in rows:
        cells = [str(r["variant"]), str(r["n"]), *(r["params"].get(k, "") for k in knobs)]
        for m in metrics:
            if m not in r:
                p = r.get("partial")
                cells.append(f"— ({p['why']} @ step {p['step']})" if m == obj_col and p and r["n"] == 1 else "")
                continue
            text = r[m].text()
            cells.append(f"**{text}**" if best.get(m) == r["variant"] else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(rows: list[dict], metrics: list[str], out: Path, lower: dict[str, bool] | None = None,
                 knobs: list[str] | None = None, objective: Objective | None = None,
                 label: str = "variant") -> tuple[Path, Path, str]:
    """comparison.csv and comparison.md; -> (their paths, the Markdown table)."""
    lower = lower or directions(metrics, objective)
    knobs = knobs or []
    best = best_per_column(rows, metrics, lower)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "comparison.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["variant", "n", *knobs, *[x for m in metrics for x in (f"{m}_mean", f"{m}_std")], "best_in",
                    "note"])
        for r in rows:
            cells = [x for m in metrics for x in ((f"{r[m].mean:.6g}", "" if r[m].std is None else f"{r[m].std:.6g}")
                                                  if m in r else ("", ""))]
            notes = [f"{m}: last value at step {r[m].step} ({r[m].why}, {r[m].partial} of {r[m].n})"
                     for m in metrics if m in r and r[m].partial]
            if not notes and r.get("partial"):
                notes = [f"{r['partial']['runs']} run(s) {r['partial']['why']} at step {r['partial']['step']}"]
            w.writerow([r["variant"], r["n"], *(r["params"].get(k, "") for k in knobs), *cells,
                        ";".join(m for m in metrics if best.get(m) == r["variant"]), "; ".join(notes)])
    md = markdown_table(rows, metrics, lower, knobs, objective, label)
    md_path = out / "comparison.md"
    md_path.write_text(md, encoding="utf-8")
    return csv_path, md_path, md


def plot_dots(rows: list[dict], metrics: list[str], out: Path, lower: dict[str, bool] | None = None,
              objective: Objective | None = None) -> list[Path]:
    """Per metric, ``dots_<metric>.png``: each variant's mean as a dot with ±std error bars, one row per variant
    in the table's order (best on top), the x axis on the data's range (with a margin) so the differences
    show; a stopped run's partial value is a hollow dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lower = lower or {}
    paths = []
    for m in metrics:
        have = [r for r in rows if m in r]
        if not have:
            continue
        means = np.array([r[m].mean for r in have])
        stds = np.array([r[m].std or 0.0 for r in have])
        lo, hi = float((means - stds).min()), float((means + stds).max())
        span = hi - lo or abs(hi) * 0.05 or 1.0
        fig, ax = plt.subplots(figsize=(6, 0.4 * len(have) + 1.4))
        ys = np.arange(len(have))[::-1]
        for y, r, mu, sd in zip(ys, have, means, stds):
            c = r[m]
            ax.errorbar([mu], [y], xerr=[[sd], [sd]] if c.std is not None else None, fmt="o", capsize=4,
                        color="#4c72b0", mfc="white" if c.partial else "#4c72b0", ms=6)
        ax.set_yticks(ys, [f"{r['variant']} (step {r[m].step}, {r[m].why})" if r[m].partial and r[m].n == 1
                           else f"{r['variant']} (n={r[m].n})" for r in have])
        ax.set_xlim(lo - 0.1 * span, hi + 0.1 * span)
        ax.set_ylim(-0.6, len(have) - 0.4)
        ax.grid(axis="x", alpha=0.3)
        arrow = "lower" if lower.get(m, lower_is_better(m)) else "higher"
        name = f"objective ({objective.metric})" if m == "objective" and objective is not None else m
        ax.set_xlabel(f"{name} ({arrow} is better)")
        ax.set_title(f"{name}: mean ± std over seeds", fontsize=10)
        fig.tight_layout()
        p = out / f"dots_{m}.png"
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


def plot_sweep(parent, runs, objective: str, out: Path, minimize: bool | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    knobs, points, values = sweep_points(parent, runs, objective)
    paths: list[Path] = []
    if len(points) < 2:
        return paths
    minimize = lower_is_better(objective) if minimize is None else minimize
    for k in knobs:
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        xs = [p[k] for p in points]
        ax.scatter([str(x) for x in xs] if any(isinstance(x, str) for x in xs) else xs, values, color="#dd8452")
        ax.set_xlabel(f"{k} ({config_key(k)})")
        ax.set_ylabel(f"{objective} ({'lower' if minimize else 'higher'} is better)")
        fig.tight_layout()
        paths.append(out / f"sweep_{k}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna_study(knobs, points, values, minimize)
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


# ------------------------------------------------------------------ report.md

def _when(ms: int | None) -> str | None:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if ms else None


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s" if m else f"{seconds:.1f}s"


def checkout_sha() -> str | None:
    """The git commit of the checkout keplm runs from (None outside a git checkout)."""
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                           text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


def _stage_times(parent) -> list[str]:
    """Wall times the parent run records: metrics named like ``*_seconds`` / ``*wall_s`` / ``*time_s`` and tags
    ``keplm.wall.<stage>`` / ``keplm.time.<stage>``."""
    out = [f"{_stage_name(k)}: {_duration(float(v))}" for k, v in sorted(parent.data.metrics.items()) if _is_time(k)]
    for k, v in sorted(parent.data.tags.items()):
        if k.startswith(("keplm.wall.", "keplm.time.")):
            out.append(f"{k.split('.', 2)[2]}: {v}")
    return out


def _is_time(metric: str) -> bool:
    return metric.endswith(("_seconds", "wall_s", "time_s")) or metric.startswith(("wall.", "time."))


def _stage_name(metric: str) -> str:
    """``time.stages_smedbert_s`` -> ``stages_smedbert``; other names as they are."""
    if metric.startswith(("wall.", "time.")):
        return metric.split(".", 1)[1].removesuffix("_s")
    return metric


def _trial_stage_times(runs) -> list[str]:
    """Per stage the trials time (``time.pretrain_s``, ``time.eval_<task>_s`` on the trials' runs): summed."""
    sums: dict[str, list[float]] = {}
    for r in runs:
        for k, v in r.data.metrics.items():
            if _is_time(k):
                sums.setdefault(k, []).append(float(v))
    return [f"{_stage_name(k)} {_duration(sum(v))} summed over {len(v)} trials" for k, v in sorted(sums.items())]


def metadata(parent, runs, experiment: str, objective: Objective | None, failed: int, *, command: str | None = None,
             config_path: str | None = None, meta: dict | None = None) -> list[tuple[str, str]]:
    """(label, value) pairs for the report's metadata list."""
    items: list[tuple[str, str]] = [("experiment", f"`{experiment}`")]
    if parent is not None:
        items.append(("parent run", f"`{parent.info.run_id}` ({parent.info.run_name}, "
                                    f"{parent.data.tags.get('keplm.job', '?')}, {parent.info.status})"))
    if command:
        items.append(("command", f"`{command}`"))
    if config_path:
        items.append(("config", f"`{config_path}`"))
    tags = parent.data.tags if parent is not None else {}
    sha = next((tags[t] for t in ("mlflow.source.git.commit", "keplm.git_sha", "keplm.git_commit") if tags.get(t)),
               None)
    if sha:
        items.append(("git SHA", f"`{sha}`"))
    elif (sha := checkout_sha()) is not None:
        items.append(("git SHA", f"`{sha}` (the checkout that ran compare; the parent run records none)"))
    if parent is not None:
        start, end = parent.info.start_time, parent.info.end_time
        items.append(("date", f"{_when(start)}" + (f" – {_when(end)}" if end else " (still running)")))
        walls = [f"{parent.data.tags.get('keplm.job', 'parent')} run {_duration((end - start) / 1000)}"] if end else []
        trial_s = [(r.info.end_time - r.info.start_time) / 1000 for r in runs if r.info.end_time and r.info.start_time]
        if trial_s:
            walls.append(f"trials {_duration(sum(trial_s))} summed over {len(trial_s)} runs "
                         f"(longest {_duration(max(trial_s))})")
        walls += _stage_times(parent) + _trial_stage_times(runs)
        if walls:
            items.append(("wall time", "; ".join(walls)))
    items.append(("report written", _when(int(datetime.now(timezone.utc).timestamp() * 1000))))
    if objective is not None:
        items.append(("objective", f"`{objective.metric}`, {'lower' if objective.mode == 'min' else 'higher'} is "
                                   f"better ({objective.mode}, from {objective.source})"))
    if parent is not None:
        pp = parent.data.params
        space = [f"{k.split('.')[2]}: {k.split('.')[3]} {v}" for k, v in sorted(pp.items())
                 if k.startswith("sweep.space.") and k.count(".") == 3 and v not in ("", "None")]
        if space and tags.get("keplm.job") == "sweep":
            items.append(("search space", "; ".join(space)))
        shown = {"sweep": ("tune.num_samples", "sweep.scheduler", "model.kind"),
                 "ablate": ("ablate.seeds", "ablate.variants", "model.kind")}.get(tags.get("keplm.job"), ())
        items += [(key, f"`{pp[key]}`") for key in shown if pp.get(key) not in (None, "", "None")]
    stopped = sum(partial_why(r) == "stopped" for r in runs if r.info.status != "FAILED")
    cut = sum(partial_why(r) == "interrupted" for r in runs if r.info.status != "FAILED")
    items.append(("runs", f"{len(runs)} ({failed} FAILED, left out; {stopped} stopped early by the scheduler; "
                          f"{cut} cut off by an interrupt)"))
    for k, v in (meta or {}).items():   # an entry named like one of the above replaces it
        at = next((i for i, (label, _) in enumerate(items) if label == str(k)), None)
        if at is None:
            items.append((str(k), str(v)))
        else:
            items[at] = (str(k), str(v))
    return items


def write_report(out: Path, title: str, items: list[tuple[str, str]], table: str, plots: list[Path],
                 csv_path: Path, label: str) -> Path:
    lines = [f"# {title}", "", "## Setup", ""]
    lines += [f"- **{k}**: {v}" for k, v in items]
    lines += ["", "## Results", "", table.rstrip("\n"), "",
              f"One row per {label}, best first by the objective; ↓ lower / ↑ higher is better; the best complete "
              "value per column in bold. n = 1: the value; n ≥ 2: mean ± sample std over seeds. "
              "`@ step N (stopped)`: the last value of a run stopped early by the scheduler (or cut off), reached at "
              f"step N; such values rank after the complete ones. Data: [{csv_path.name}]({csv_path.name}).", ""]
    if plots:
        lines += ["## Plots", ""]
        for p in plots:
            lines += [f"![{p.stem}]({p.relative_to(out).as_posix()})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def compare(client, experiment: str, out: Path, parent_id: str | None = None, metrics: list[str] | None = None, *,
            meta: dict | None = None, command: str | None = None, config_path: str | None = None) -> dict:
    """The comparison of a sweep's / ablation's runs, written to ``out`` (comparison.csv, comparison.md,
    report.md, dots_<metric>.png, for a sweep sweep_<knob>.png, sweep_importance.png,
    sweep_parallel_coordinates.png) and logged to the parent run under ``compare/``. ``command``,
    ``config_path`` and ``meta`` (extra label -> value) go into report.md's metadata list."""
    parent, runs = find_runs(client, experiment, parent_id)
    if not runs:
        raise KeplmError(f"experiment {experiment!r}: no runs to compare")
    job = parent.data.tags.get("keplm.job") if parent else None
    objective = objective_of(parent, runs)
    knobs = sweep_knobs(parent) if job == "sweep" else []
    rows, metrics, failed = comparison_table(runs, metrics, client=client, objective=objective, knobs=knobs)
    lower = directions(metrics, objective)
    cut = sum("keplm.interrupted" in r.data.tags for r in runs)
    if cut:
        log.warning("compare: %d run(s) were cut off by an interrupted sweep and hold partial metrics; "
                    "run the sweep's command again to finish them", cut)
    label = "trial" if job == "sweep" else "variant"
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, md = write_tables(rows, metrics, out, lower, knobs, objective, label)
    plots = plot_dots(rows, metrics, out, lower, objective)
    if job == "sweep":
        plots += plot_sweep(parent, runs, objective.metric if objective else "objective", out,
                            minimize=objective.mode == "min" if objective else None)
    items = metadata(parent, runs, experiment, objective, failed, command=command, config_path=config_path, meta=meta)
    title = (f"{job} {parent.info.run_name}" if parent is not None else f"runs of {experiment}")
    report = write_report(out, title, items, md, plots, csv_path, label)
    files = [csv_path, md_path, report, *plots]
    if parent is not None:
        for p in files:
            client.log_artifact(parent.info.run_id, str(p), artifact_path="compare")
    stopped = sum(partial_why(r) == "stopped" for r in runs if r.info.status != "FAILED")
    return {"parent_run": parent.info.run_id if parent else None, "job": job, "runs": len(runs),
            "failed_left_out": failed, "interrupted_runs": cut, "stopped_runs": stopped,
            "objective": objective._asdict() if objective else None, "knobs": knobs,
            "rows": rows, "metrics": metrics, "markdown": md, "report": str(report), "files": [str(p) for p in files],
            "best": best_per_column(rows, metrics, lower)}
