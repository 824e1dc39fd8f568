"""keplm.platform.ray_session: the setup hook every session's workers run, and Ray Train's placement-group cleaner
kept quiet while the State API does not answer, on a local Ray or on a cluster keplm joins."""

import importlib
import json
import logging
import threading
import time

import pytest

from keplm.platform import ray_session


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def run_cleaner(monkeypatch, error: Exception, seconds: float = 0.4) -> list[str]:
    """Ray Train's own PlacementGroupCleaner loop, its controller query failing with ``error``, checking every 10 ms
    for ``seconds``: the messages it logged on its logger."""
    from ray.train.v2._internal.execution.controller import placement_group_cleaner as pgc

    def query(actor_id, timeout):
        raise error

    monkeypatch.setattr(pgc, "is_actor_alive", query)
    lg = logging.getLogger(ray_session.CLEANER_LOGGER)
    assert lg is pgc.logger   # the logger keplm's filter sits on is the one the cleaner logs through
    handler = Records()
    lg.addHandler(handler)
    try:
        cleaner = pgc.PlacementGroupCleaner("controller", check_interval_s=0.01, get_actor_timeout_s=1, stop_timeout=2)
        thread = threading.Thread(target=cleaner._monitor_loop, daemon=True)
        thread.start()
        time.sleep(seconds)
        cleaner._stop_event.set()
        thread.join(timeout=5)
    finally:
        lg.removeHandler(handler)
    return [r.getMessage() for r in handler.records]


@pytest.fixture
def cleaner_filters(monkeypatch):
    """The cleaner logger's filters as they were, restored after the test; the hooks' worker_logging (which turns
    the keplm logger into a worker's) off in this process."""
    from keplm.platform import console

    monkeypatch.setattr(console, "worker_logging", lambda: None)
    lg = logging.getLogger(ray_session.CLEANER_LOGGER)
    saved = list(lg.filters)
    lg.filters.clear()
    yield lg
    lg.filters[:] = saved


def failures(messages: list[str]) -> int:
    return sum(m.startswith(ray_session.CLEANER_QUERY_FAILED) for m in messages)


def test_cleaner_is_quiet_while_the_state_api_is_unreachable_on_any_ray(monkeypatch, cleaner_filters):
    from ray.util.state.exception import ServerUnavailable

    unreachable = ServerUnavailable("Failed to make request to http://10.0.0.1:8265/api/v0/actors.")
    # Ray's cleaner, unfiltered: the line every check (here every 10 ms; every second in Ray Train)
    assert failures(run_cleaner(monkeypatch, unreachable)) >= 5
    # the hook a cluster's workers run (keplm joined it: no knowledge of a dashboard) asks the State API itself
    probes = []
    monkeypatch.setattr(ray_session, "state_api_reachable", lambda: probes.append(1) or False)
    ray_session.worker_setup()
    assert failures(run_cleaner(monkeypatch, unreachable)) == 0
    assert len(probes) == 1   # asked once; the "unreachable" answer holds for recheck_s (60 s)
    ray_session.worker_setup()   # a second call adds no second filter
    assert len(cleaner_filters.filters) == 1


def test_cleaner_still_warns_when_the_state_api_answers_with_an_error(monkeypatch, cleaner_filters):
    from ray.util.state.exception import RayStateApiException

    # e.g. a dashboard that refuses the token: someone should see that
    monkeypatch.setattr(ray_session, "state_api_reachable", lambda: True)
    ray_session.worker_setup()
    assert failures(run_cleaner(monkeypatch, RayStateApiException("Response(status=401)"))) >= 5


def test_local_ray_without_a_dashboard_never_probes(monkeypatch, cleaner_filters):
    from ray.util.state.exception import ServerUnavailable

    monkeypatch.setattr(ray_session, "state_api_reachable", lambda: pytest.fail("probed a known-absent State API"))
    ray_session.quiet_placement_group_cleaner()
    assert failures(run_cleaner(monkeypatch, ServerUnavailable("no dashboard"))) == 0


def test_filter_asks_again_after_recheck_s_and_passes_other_lines():
    answers = iter([False, True])
    f = ray_session.QuietWhileStateApiUnreachable(lambda: next(answers), recheck_s=0.05)

    def record(msg):
        return logging.LogRecord(ray_session.CLEANER_LOGGER, logging.WARNING, __file__, 1, msg, None, None)

    query_failed = ray_session.CLEANER_QUERY_FAILED + ". State API may be temporarily unavailable."
    assert not f.filter(record(query_failed))
    assert not f.filter(record(query_failed))   # within recheck_s: no second probe (next() would give True)
    assert f.filter(record("Detected that the Ray Train controller actor (x) is dead."))
    time.sleep(0.06)
    assert f.filter(record(query_failed))   # asked again: the API answers now


def test_state_api_reachable_counts_an_error_answer_as_reachable(monkeypatch):
    import ray.util.state as state
    from ray.util.state.exception import RayStateApiException, ServerUnavailable

    def raising(error):
        def list_nodes(**kw):
            raise error
        return list_nodes

    monkeypatch.setattr(state, "list_nodes", raising(ServerUnavailable("connection refused")))
    assert ray_session.state_api_reachable() is False
    monkeypatch.setattr(state, "list_nodes", raising(ValueError("Couldn't obtain the API server address from GCS")))
    assert ray_session.state_api_reachable() is False
    monkeypatch.setattr(state, "list_nodes", raising(RayStateApiException("Response(status=401)")))
    assert ray_session.state_api_reachable() is True
    monkeypatch.setattr(state, "list_nodes", lambda **kw: [])
    assert ray_session.state_api_reachable() is True


@pytest.fixture
def fake_init(monkeypatch):
    """``connect`` with ray.init recorded instead of run."""
    import ray

    from keplm.platform import console

    class Calls(list):
        marked: list

    calls = Calls()
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(console, "capture_worker_lines", lambda: True)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    calls.marked = []
    monkeypatch.setattr(ray_session, "mark_no_state_api", lambda: calls.marked.append(len(calls)))
    return calls


def hook(kw: dict):
    name = (kw.get("runtime_env") or {}).get("worker_process_setup_hook")
    if name is None:
        return None
    module, attr = name.rsplit(".", 1)
    return getattr(importlib.import_module(module), attr)   # the name Ray imports in each worker resolves


def test_joining_a_cluster_installs_the_quieting_hook(fake_init, monkeypatch):
    ray_session.connect(address="10.0.0.1:6379")
    assert fake_init[-1]["address"] == "10.0.0.1:6379"
    assert hook(fake_init[-1]) is ray_session.worker_setup
    # a job submitted with its own setup hook keeps it: Ray would refuse to merge a second one
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"worker_process_setup_hook": "theirs.setup"}, "metadata": {}}))
    ray_session.connect(address="10.0.0.1:6379")
    assert "runtime_env" not in fake_init[-1]


def test_local_ray_hooks(fake_init):
    ray_session.connect(ray_session.RayConfig(num_cpus=1))
    assert hook(fake_init[-1]) is ray_session.quiet_placement_group_cleaner
    assert fake_init.marked == [1]        # marked as having no State API of its own
    assert fake_init[-1]["address"] == "local"   # never the `ray start` cluster a bare ray.init() would join
    ray_session.connect(ray_session.RayConfig(num_cpus=1, include_dashboard=True))
    assert hook(fake_init[-1]) is ray_session.worker_setup
    assert fake_init.marked == [1]
    assert fake_init[-1]["dashboard_host"] == "127.0.0.1"


def test_a_ray_without_a_state_api_of_its_own_trains_without_the_placement_group_cleaner(ray_local):
    """Ray registers 127.0.0.1:8265 as its dashboard even when it starts none, so the cleaner of a local Ray would
    ask another Ray's dashboard whether the train controller lives, hear "no such actor" and remove the live run's
    placement group. keplm's local Ray (marked at start) leaves the cleaner out; a Ray that is not marked keeps it."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from keplm.platform.train_loop import drop_placement_group_cleaner

    def cleaners(trainer):
        return [c for c in trainer._create_default_callbacks() if isinstance(c, PlacementGroupCleanerCallback)]

    assert ray_session.without_state_api()          # the session's Ray, marked as keplm's connect marks its own
    trainer = TorchTrainer(lambda: None)
    assert len(cleaners(trainer)) == 1
    drop_placement_group_cleaner(trainer)
    assert cleaners(trainer) == [] and trainer._create_default_callbacks()   # the other callbacks stay

    @ray_local.remote(num_cpus=0)
    def seen_by_a_worker():   # a Tune trial builds its Ray Train run inside a worker
        return ray_session.without_state_api()

    assert ray_local.get(seen_by_a_worker.remote())
