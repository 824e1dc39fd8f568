"""A sweep's or an ablation's console: one line per trial event, a closing table of the best trials.

``TrialEvents`` is a Tune callback on the driver: a trial started (or resumed), reported its objective, was
stopped early by the scheduler, finished, or failed; Tune's own status tables are off (``verbose=0``) and its
log lines go to the job's log file with Ray's. The line texts are the functions below, so they are tested
without Tune.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.tune import Callback

log = logging.getLogger(__name__)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def config_text(config: dict[str, Any]) -> str:
    """A trial's point of the search space: ``K=10 lr=0.0003``."""
    return " ".join(f"{k}={_value(v)}" for k, v in config.items())


def trial_line(event: str, trial_id: str, *, config: dict | None = None, step: int | None = None,
               metric: str | None = None, value: float | None = None, error: str | None = None) -> str:
    """The console line of a trial event: ``started``, ``resumed``, ``reported``, ``stopped early``, ``finished``
    or ``failed``."""
    at = f" at step {step}" if step is not None else ""
    objective = f": {metric} {value:.4f}" if metric and isinstance(value, (int, float)) else ""
    if event in ("started", "resumed"):
        return f"trial {trial_id} {event}{at if event == 'resumed' else ''}: {config_text(config or {})}"
    if event == "reported":
        return f"trial {trial_id} step {step}{objective}"
    if event == "failed":
        return f"trial {trial_id} failed{at}: {error or 'see the log file'}"
    return f"trial {trial_id} {event}{at}{objective}"


def best_table(trials: list[dict], metric: str, mode: str, n: int = 5) -> list[str]:
    """The best ``n`` trials by ``metric`` (finished or stopped early, with a value) as aligned lines: trial,
    steps, the metric, the trial's point."""
    ok = [t for t in trials if t.get("error") is None and isinstance(t.get(metric), (int, float))]
    ok.sort(key=lambda t: t[metric], reverse=mode == "max")
    if not ok:
        return []
    rows = [("trial", "steps", metric, "config")] + [
        (t["trial_id"], str(t.get("steps", "")), f"{t[metric]:.4f}", config_text(t.get("config") or {}))
        for t in ok[:n]]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    order = "lowest" if mode == "min" else "highest"
    head = f"best {min(n, len(ok))} of {len(trials)} trials by {metric} ({order} first):"
    return [head] + ["  " + "  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]


class TrialEvents(Callback):
    """Logs ``trial_line`` for each trial event (keplm's logger: the console). Module-level, so the Tune experiment
    state that holds it unpickles on a resume."""

    def __init__(self, metric: str, max_steps: int | None, can_stop_early: bool):
        self.metric, self.max_steps, self.can_stop_early = metric, max_steps, can_stop_early

    def on_trial_start(self, iteration, trials, trial, **info):
        step = (trial.last_result or {}).get("step")
        log.info(trial_line("resumed" if step is not None else "started", trial.trial_id, config=trial.config,
                            step=step))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("done") or result.get("final"):
            return   # its end line says it
        log.info(trial_line("reported", trial.trial_id, step=result.get("step"), metric=self.metric,
                            value=result.get(self.metric)))

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        step = last.get("step")
        early = (self.can_stop_early and not last.get("final") and self.max_steps is not None
                 and isinstance(step, int) and step < self.max_steps)
        log.info(trial_line("stopped early" if early else "finished", trial.trial_id, step=step, metric=self.metric,
                            value=last.get(self.metric)))

    def on_trial_error(self, iteration, trials, trial, **info):
        error = None
        try:
            exc = trial.get_error()
            text = str(exc).strip() if exc is not None else ""
            error = text.splitlines()[-1][:300] if text else None
        except Exception:  # noqa: BLE001 - the line matters more than its detail
            pass
        log.warning(trial_line("failed", trial.trial_id, step=(trial.last_result or {}).get("step"), error=error))
