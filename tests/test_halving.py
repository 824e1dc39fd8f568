"""Synchronous successive halving: rung arithmetic, the cut, and a simulated sweep driven through the
scheduler's Tune hooks (statuses, pauses, stops, the concurrency cap) in many arrival orders."""

import random

from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from keplm.tuning.halving import SynchronousHalving, planned_steps, rung_milestones, survivors


def test_rungs_are_grace_times_powers_of_rf_below_max_t():
    assert rung_milestones(3, 3, 24) == [3, 9]
    assert rung_milestones(1, 2, 8) == [1, 2, 4]
    assert rung_milestones(3, 3, 27) == [3, 9]          # a rung at max_t would decide nothing
    assert rung_milestones(5, 3, 5) == []


def test_planned_steps_charge_each_rung_population_up_to_it():
    assert planned_steps(16, [3, 9], 3, 24) == 16 * 3 + 5 * (9 - 3) + 1 * (24 - 9)
    assert planned_steps(4, [1, 3, 9], 3, 27) == 4 * 1 + 1 * 2 + 1 * 6 + 1 * 18   # n // rf floors at one trial
    assert planned_steps(5, [], 3, 12) == 5 * 12                                 # no rung: FIFO


def test_survivors_keep_the_best_n_over_rf():
    vals = {"a": 3.0, "b": 1.0, "c": 2.0, "d": float("nan"), "e": 0.5, "f": 4.0, "g": 2.5}
    assert survivors(vals, 3, "min") == {"e", "b"}                 # 7 // 3 = 2
    assert survivors(vals, 3, "max") == {"f", "a"}                 # NaN is last either way
    assert survivors({"x": float("nan"), "y": 9.0}, 4, "min") == {"y"}   # at least one goes on
    assert survivors({"x": 1.0, "y": 1.0}, 2, "min") == {"x"}      # ties: the earlier


class FakeTrial:
    def __init__(self, trial_id):
        self.trial_id, self.status, self.is_saving = trial_id, Trial.PENDING, False

    def __repr__(self):
        return self.trial_id


class FakeController:
    """The part of TuneController a scheduler calls: get_trials, and stop_trial, which (like Tune's)
    tells the scheduler through on_trial_remove when the trial was PAUSED/PENDING and, having no actor
    to stop then, does not mark it for the experiment state (``saved_stale``) until
    ``_mark_trial_to_checkpoint``."""

    def __init__(self, scheduler):
        self.trials, self.scheduler, self.saved_stale = [], scheduler, set()

    def get_trials(self):
        return self.trials

    def stop_trial(self, trial):
        if trial.status in (Trial.PAUSED, Trial.PENDING):
            self.scheduler.on_trial_remove(self, trial)
            self.saved_stale.add(trial)
        trial.status = Trial.TERMINATED

    def _mark_trial_to_checkpoint(self, trial):
        self.saved_stale.discard(trial)


class Limiter:
    max_concurrent = 0


def curve(i: int, step: int) -> float:
    """A trial's validation loss: a per-trial level plus a decay, so rankings shift a little over steps."""
    return 6.0 + ((i * 7919) % 13) / 10 + 1.0 / (step + i % 3)


def simulate(order: list[int], *, n: int, max_t: int, every: int, grace: int, rf: int, conc: int, fail: int | None = None):
    """Run ``n`` trials (ids in arrival ``order``) through the scheduler as Tune would, one report every
    ``every`` steps. -> (steps run per trial, trials that reached max_t, highest number running at once)."""
    sched = SynchronousHalving(time_attr="step", metric="loss", mode="min", max_t=max_t, grace_period=grace * every,
                               reduction_factor=rf, num_samples=n, max_concurrent=conc)
    lim = Limiter()
    sched.limit(lim)
    ctl = FakeController(sched)
    step = {i: 0 for i in order}
    trial = {i: FakeTrial(f"t{i}") for i in order}
    index = {t: i for i, t in trial.items()}
    queue, peak = list(order), 0
    for _ in range(10_000):
        live = [t for t in ctl.trials if t.status not in (Trial.TERMINATED, Trial.ERROR)]
        if queue and len(live) < lim.max_concurrent:          # what the ConcurrencyLimiter admits
            t = trial[queue.pop(0)]
            ctl.trials.append(t)
            sched.on_trial_add(ctl, t)
            t.status = Trial.RUNNING
            continue
        chosen = sched.choose_trial_to_run(ctl)
        if chosen is not None and chosen.status == Trial.PAUSED:
            chosen.status = Trial.RUNNING
            continue
        running = [t for t in ctl.trials if t.status == Trial.RUNNING]
        peak = max(peak, len(running))
        if not running:
            break
        t = running[0]
        i = index[t]
        step[i] += every
        if i == fail:                                          # raises before its first report
            t.status = Trial.ERROR
            sched.on_trial_error(ctl, t)
            continue
        res = {"step": step[i], "loss": curve(i, step[i]), "final": step[i] >= max_t}
        action = sched.on_trial_result(ctl, t, res)
        if action == TrialScheduler.PAUSE:
            t.status = Trial.PAUSED
        elif action == TrialScheduler.STOP or res["final"]:
            sched.on_trial_complete(ctl, t, res)
            t.status = Trial.TERMINATED
    else:
        raise AssertionError("the simulated sweep did not end")
    assert all(t.status in (Trial.TERMINATED, Trial.ERROR) for t in ctl.trials), "a trial was left paused"
    assert not ctl.saved_stale, "a trial stopped while paused would stay PAUSED in Tune's saved state"
    return step, {i for i in order if step[i] >= max_t}, peak


def test_the_cut_and_the_steps_do_not_depend_on_arrival_order():
    n, max_t, every, grace, rf = 16, 24, 3, 1, 3            # the bench's settings: rungs at 3 and 9
    rng = random.Random(0)
    results = []
    for _ in range(25):
        order = list(range(n))
        rng.shuffle(order)
        results.append(simulate(order, n=n, max_t=max_t, every=every, grace=grace, rf=rf, conc=2))
    steps0, done0, _ = results[0]
    # rung 3: all 16; rung 9: the best 16 // 3 = 5 by their loss at step 3; then the best 5 // 3 = 1 to 24
    at3 = sorted(range(n), key=lambda i: curve(i, 3))[:5]
    winner = min(at3, key=lambda i: curve(i, 9))
    assert done0 == {winner}
    assert sum(steps0.values()) == 16 * 3 + 5 * 6 + 1 * 15 == planned_steps(n, [3, 9], rf, max_t) == 93
    assert {i for i in range(n) if steps0[i] == 9} == set(at3) - {winner}
    for steps, done, peak in results:
        assert steps == steps0 and done == done0
        assert peak <= 2                                     # never more than max_concurrent at once


def test_a_rung_waits_for_the_whole_population_and_pauses_release_the_cap():
    sched = SynchronousHalving(time_attr="step", metric="loss", mode="min", max_t=12, grace_period=3,
                               reduction_factor=2, num_samples=3, max_concurrent=1)
    lim = Limiter()
    sched.limit(lim)
    ctl = FakeController(sched)
    a, b, c = (FakeTrial(x) for x in "abc")
    ctl.trials += [a, b]
    for t in (a, b):
        sched.on_trial_add(ctl, t)
        t.status = Trial.RUNNING
    assert sched.on_trial_result(ctl, a, {"step": 2, "loss": 9.0}) == TrialScheduler.CONTINUE   # below the rung
    assert sched.on_trial_result(ctl, a, {"step": 3, "loss": 5.0}) == TrialScheduler.PAUSE
    a.status = Trial.PAUSED
    assert lim.max_concurrent == 2                         # a paused trial no longer takes a slot
    assert sched.on_trial_result(ctl, b, {"step": 3, "loss": 1.0}) == TrialScheduler.PAUSE     # c has not come yet
    b.status = Trial.PAUSED
    assert sched.choose_trial_to_run(ctl) is None          # both wait at the rung
    ctl.trials.append(c)
    sched.on_trial_add(ctl, c)
    c.status = Trial.RUNNING
    # c completes the rung: 3 // 2 = 1 survivor, b; c itself is cut, and so is a (paused: stopped)
    assert sched.on_trial_result(ctl, c, {"step": 3, "loss": 7.0}) == TrialScheduler.STOP
    assert a.status == Trial.TERMINATED and sched.stopped == ["a", "c"]
    c.status = Trial.TERMINATED
    assert sched.choose_trial_to_run(ctl) is b and lim.max_concurrent == 1
    b.status = Trial.RUNNING
    assert sched.on_trial_result(ctl, b, {"step": 6, "loss": 0.5}) == TrialScheduler.CONTINUE  # past the last rung


def test_a_trial_that_fails_leaves_its_rung():
    order = list(range(6))
    steps, done, _ = simulate(order, n=6, max_t=12, every=3, grace=1, rf=3, conc=2, fail=order[0])
    # the rung at 3 is decided on the 5 that reported there (without waiting for the failed one): 5 // 3 = 1
    assert len(done) == 1 and order[0] not in done
    assert sum(steps.values()) == 3 + 5 * 3 + 1 * 9


def test_after_a_restore_ended_trials_count_toward_the_population():
    """Tuner.restore re-adds every trial; those a rung had already cut come back TERMINATED. The paused ones
    must still be able to complete the rung (a population short of num_samples would wait for ever)."""
    sched = SynchronousHalving(time_attr="step", metric="loss", mode="min", max_t=12, grace_period=3,
                               reduction_factor=2, num_samples=4, max_concurrent=2)
    ctl = FakeController(sched)
    trials = [FakeTrial(x) for x in "abcd"]
    for t, status in zip(trials, (Trial.TERMINATED, Trial.PAUSED, Trial.PAUSED, Trial.PAUSED)):
        t.status = status
        ctl.trials.append(t)
        sched.on_trial_add(ctl, t)
    resumed = []
    while (t := sched.choose_trial_to_run(ctl)) is not None and len(resumed) < 3:
        t.status = Trial.RUNNING
        resumed.append(t)
    assert resumed == trials[1:3]                           # two at a time: max_concurrent
    assert sched.on_trial_result(ctl, trials[1], {"step": 6, "loss": 2.0}) == TrialScheduler.PAUSE
    trials[1].status = Trial.PAUSED
    assert sched.on_trial_result(ctl, trials[2], {"step": 6, "loss": 3.0}) == TrialScheduler.PAUSE
    trials[2].status = Trial.PAUSED
    d = sched.choose_trial_to_run(ctl)
    assert d is trials[3]
    d.status = Trial.RUNNING
    # the last of the three live trials completes the rung: 3 // 2 = 1 goes on (d, the lowest); b, c stop
    assert sched.on_trial_result(ctl, d, {"step": 6, "loss": 1.5}) == TrialScheduler.CONTINUE
    assert trials[1].status == Trial.TERMINATED and trials[2].status == Trial.TERMINATED


def test_tunes_controller_still_has_the_hook_that_saves_a_stopped_paused_trial():
    """SynchronousHalving calls TuneController's private hook after stopping a PAUSED trial (see
    FakeController); a Ray upgrade that renames it would bring the stale PAUSED state back."""
    from ray.tune.execution.tune_controller import TuneController

    from keplm.tuning.halving import MARK_FOR_STATE

    assert callable(getattr(TuneController, MARK_FOR_STATE, None))
    assert hasattr(FakeController, MARK_FOR_STATE)
