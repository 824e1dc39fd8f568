"""Synchronous successive halving (Jamieson & Talwalkar 2016) as a Ray Tune scheduler.

ASHA's rungs, decided the synchronous way: a trial that reaches a rung is PAUSED (checkpointed, its
resources given back) until every trial of the rung has reported there; then the best
``max(1, n // reduction_factor)`` of the ``n`` go on and the rest are stopped. ASHA decides on the trials
that reached a rung *so far*, so what it stops depends on the order they arrive in; here the cut is made
on the whole population, so the steps spent and the survivors do not.

Rungs: ``grace, grace * rf, grace * rf**2, ...`` below ``max_t`` (in ``time_attr`` units). Rung 0 holds
all ``num_samples`` trials, so it is complete only once the searcher has produced all of them. A trial that
errors or finishes leaves its rung, which may complete it.

Concurrency: a paused trial still counts as live for Tune's ``ConcurrencyLimiter`` (it has not completed),
which would deadlock the sweep once ``max_concurrent`` trials wait at a rung. So the limiter is given to
the scheduler (``limit``), which keeps its cap at ``max_concurrent`` + the trials it has paused, and resumes
a paused survivor only while fewer than ``max_concurrent`` trials are running or starting.

After ``Tuner.restore`` the rung records start empty: each unfinished trial is entered at the first rung
its next report reaches (a trial restored from its rung checkpoint is ranked there on the report after it),
and trials that had ended are counted as having left.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

log = logging.getLogger(__name__)

# TuneController's (private) hook that puts a trial's current status into the saved experiment state
MARK_FOR_STATE = "_mark_trial_to_checkpoint"


def rung_milestones(grace: int, reduction_factor: int, max_t: int) -> list[int]:
    """grace * rf**k for every k with a milestone below max_t (a rung at max_t would decide nothing)."""
    out, m = [], grace
    while m < max_t:
        out.append(m)
        m *= reduction_factor
    return out


def planned_steps(num_samples: int, milestones: list[int], reduction_factor: int, max_t: int) -> int:
    """The optimizer steps a synchronous-halving sweep runs: every rung's population trains up to it, and
    the max(1, n // rf) it keeps go on to the next rung (the last ones to ``max_t``)."""
    n, steps, prev = num_samples, 0, 0
    for m in milestones:
        steps += n * (m - prev)
        n, prev = max(1, n // reduction_factor), m
    return steps + n * (max_t - prev)


def survivors(values: dict[Any, float], reduction_factor: int, mode: str) -> set:
    """The best max(1, n // rf) keys of ``values``; NaN ranks last; ties go to the earlier key."""
    keep = max(1, len(values) // reduction_factor)
    sign = 1.0 if mode == "min" else -1.0
    order = sorted(values, key=lambda k: (math.isnan(values[k]), sign * values[k] if not math.isnan(values[k]) else 0.0))
    return set(order[:keep])


class SynchronousHalving(TrialScheduler):
    def __init__(self, *, time_attr: str, metric: str, mode: str, max_t: int, grace_period: int,
                 reduction_factor: int, num_samples: int, max_concurrent: int):
        super().__init__()
        self._time_attr, self._metric, self._mode = time_attr, metric, mode
        self._rf, self._num_samples, self._max_concurrent = reduction_factor, num_samples, max_concurrent
        self.milestones = rung_milestones(grace_period, reduction_factor, max_t)
        self._level: dict[Trial, int] = {}                 # rungs passed
        self._record: dict[Trial, dict[int, float]] = {}   # rung -> metric there
        self._live: list[Trial] = []                       # added, not finished/stopped/errored (in add order)
        self._added = 0
        self._paused: set[Trial] = set()
        self.limiter = None                                # a ConcurrencyLimiter: its cap follows the pauses
        self.stopped: list[str] = []                       # trial ids cut at a rung

    def limit(self, limiter) -> "SynchronousHalving":
        self.limiter = limiter
        self._sync_limit()
        return self

    def set_search_properties(self, metric, mode, **spec) -> bool:
        self._metric = self._metric or metric
        self._mode = self._mode or mode
        return True

    def _sync_limit(self) -> None:
        if self.limiter is not None:
            self.limiter.max_concurrent = self._max_concurrent + len(self._paused)

    # --- trial lifecycle -------------------------------------------------------------------------------
    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        self._added += 1      # a restored trial that already ended still counts toward num_samples
        if trial.status in (Trial.TERMINATED, Trial.ERROR):
            return
        self._level.setdefault(trial, 0)
        self._record.setdefault(trial, {})
        self._live.append(trial)
        if trial.status == Trial.PAUSED:        # restored from an experiment checkpoint
            self._paused.add(trial)
            self._sync_limit()

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        level = self._level.get(trial, 0)
        if level >= len(self.milestones) or result.get(self._time_attr, 0) < self.milestones[level]:
            return TrialScheduler.CONTINUE
        if result.get("final"):                 # reached max_t anyway: nothing left to decide for it
            return TrialScheduler.CONTINUE
        if level in self._record[trial]:        # already waiting at this rung (a late report): keep waiting
            return TrialScheduler.PAUSE
        value = result.get(self._metric)
        self._record[trial][level] = float("nan") if value is None else float(value)
        decided = self._decide(tune_controller, level, current=trial)
        if decided is not None:
            return decided
        self._paused.add(trial)
        self._sync_limit()
        return TrialScheduler.PAUSE

    def _leave(self, tune_controller, trial: Trial) -> None:
        if trial not in self._live:
            return
        self._live.remove(trial)
        self._paused.discard(trial)
        self._sync_limit()
        level = self._level.get(trial, 0)
        if level < len(self.milestones):
            self._decide(tune_controller, level, current=None)

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self._leave(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._leave(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self._leave(tune_controller, trial)

    # --- the rung decision -----------------------------------------------------------------------------
    def _decide(self, tune_controller, rung: int, current: Trial | None) -> str | None:
        """If every live trial of ``rung`` has reported there, keep the best and stop the rest.
        -> CONTINUE/STOP for ``current`` when it was decided, else None."""
        if rung == 0 and self._added < self._num_samples:
            return None
        members = [t for t in self._live if self._level[t] == rung]
        if not members or any(rung not in self._record[t] for t in members):
            return None
        keep = survivors({t: self._record[t][rung] for t in members}, self._rf, self._mode)
        action = None
        for t in members:
            if t in keep:
                self._level[t] = rung + 1
                if t is current:
                    action = TrialScheduler.CONTINUE
                continue
            self.stopped.append(t.trial_id)
            self._live.remove(t)
            self._paused.discard(t)
            if t is current:
                action = TrialScheduler.STOP
            elif t.status in (Trial.PAUSED, Trial.PENDING) or t.is_saving:
                tune_controller.stop_trial(t)
                # Tune rewrites a trial's saved state only when it stopped the trial's actor; one stopped
                # while PAUSED would stay PAUSED in the experiment state, so Tuner.restore would resume it
                # and the sweep's end would count it unfinished
                mark = getattr(tune_controller, MARK_FOR_STATE, None)
                if mark is not None:
                    mark(t)
                else:
                    log.warning("this Ray's TuneController has no %s: trial %s, stopped while paused, stays "
                                "PAUSED in the saved experiment state, so the sweep will end as interrupted",
                                MARK_FOR_STATE, t.trial_id)
        self._sync_limit()
        return action

    # --- what runs next --------------------------------------------------------------------------------
    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        trials = tune_controller.get_trials()
        for t in trials:
            if t.status == Trial.PENDING:
                return t
        if sum(t.status == Trial.RUNNING for t in trials) >= self._max_concurrent:
            return None
        for t in self._live:   # a paused survivor whose next rung is open
            if t.status == Trial.PAUSED and t in self._paused and self._level[t] not in self._record[t]:
                self._paused.discard(t)
                self._sync_limit()
                return t
        return None

    def debug_string(self) -> str:
        waiting = {r: sum(1 for t in self._live if self._level[t] == r and r in self._record[t])
                   for r in range(len(self.milestones))}
        return (f"SynchronousHalving: rungs at {self._time_attr} {self.milestones}, waiting per rung {waiting}, "
                f"stopped {len(self.stopped)}")
