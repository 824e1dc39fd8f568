"""The one place that connects to Ray.

`--address` or RAY_ADDRESS (set by `ray job submit`) -> join that cluster; otherwise start a local
Ray sized for a small machine (bounded object store, no dashboard unless asked).

A local Ray starts with token auth (``RAY_AUTH_MODE=token`` unless the environment sets another mode: Ray
generates the token, in ``~/.ray/auth_token``) and its dashboard, when there is one, listens on
``ray.dashboard_host`` (127.0.0.1): the Jobs API runs whatever it is sent, so it is never open to the network
unasked.

Every Ray worker of a session keplm starts or joins runs a setup hook (``worker_process_setup_hook``) that marks
keplm's log lines for the driver's console and quiets Ray Train's placement-group cleaner while the State API
does not answer (``QuietWhileStateApiUnreachable``).
"""

from __future__ import annotations

import json
import logging
import os
import time

from pydantic import Field

from keplm.platform.config import Section

log = logging.getLogger(__name__)


class RayConfig(Section):
    address: str | None = Field(None, description="Ray cluster to join; --address and RAY_ADDRESS take precedence; "
                                                  "unset: start a local Ray")
    # 0 CPUs would start a Ray on which no task ever runs: the job would wait forever
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray; unset: all of the machine's")
    object_store_memory_mb: int = Field(500, description="object store size of the local Ray, in MiB")
    include_dashboard: bool = Field(False, description="start the local Ray with its dashboard (and State API); "
                                                       "sweeps start it regardless")
    show_progress: bool = Field(False, description="show Ray Data's progress bars")
    dashboard_host: str = Field("127.0.0.1", description="address the local Ray's dashboard listens on (with token "
                                                         "auth); 0.0.0.0 opens it to the network")


QUIET_HOOK = f"{__name__}.quiet_placement_group_cleaner"


WORKER_HOOK = f"{__name__}.worker_setup"

# Ray Train's cleaner of a crashed controller's placement group: a detached actor on the head, one per Train run,
# that asks the State API every second whether the run's controller still lives and warns each time it gets no answer
CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
CLEANER_QUERY_FAILED = "Failed to query Ray Train Controller actor state"


def state_api_reachable(timeout_s: int = 5) -> bool:
    """Whether this process's Ray State API (served by the head's dashboard) answers. An answer that is an error
    (a refused token, a server error) counts as reachable; no dashboard, a dashboard that is down or listens where
    this process cannot connect, or no API server address at all does not."""
    try:
        from ray.util.state import list_nodes
        from ray.util.state.exception import RayStateApiException, ServerUnavailable
    except ImportError:   # Ray without its dashboard dependencies (ray[default]) has no State API
        return False
    try:
        list_nodes(limit=1, timeout=timeout_s, raise_on_missing_output=False)
    except ServerUnavailable:
        return False
    except RayStateApiException:
        return True
    except Exception:  # noqa: BLE001 - no API server address (e.g. the GCS does not answer either)
        return False
    return True


class QuietWhileStateApiUnreachable(logging.Filter):
    """On the cleaner's logger: drops its once-a-second "Failed to query Ray Train Controller actor state" while the
    State API does not answer, whatever the Ray — keplm's local one without a dashboard, a cluster started with
    ``--include-dashboard=false``, a dashboard that is down — and lets it through while the API answers with an error
    (a refused token, a server error), which someone should see. The filter asks the State API itself, from the
    cleaner's own process (on the head), when a failure comes; while the answer is "unreachable" it asks again at most
    every ``recheck_s``. ``reachable``: the probe; ``lambda: False`` where the API is known to be absent. The cleaner's
    other lines (a dead controller's placement group removed) always pass."""

    def __init__(self, reachable=state_api_reachable, recheck_s: float = 60.0):
        super().__init__()
        self.reachable, self.recheck_s = reachable, recheck_s
        self._unreachable_since_check: float | None = None   # monotonic time of the last "unreachable" answer

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(CLEANER_QUERY_FAILED):
            return True
        now = time.monotonic()
        if self._unreachable_since_check is not None and now - self._unreachable_since_check < self.recheck_s:
            return False
        if self.reachable():
            self._unreachable_since_check = None
            return True
        self._unreachable_since_check = now
        return False


def _quiet_cleaner(reachable) -> None:
    lg = logging.getLogger(CLEANER_LOGGER)
    if not any(isinstance(f, QuietWhileStateApiUnreachable) for f in lg.filters):
        lg.addFilter(QuietWhileStateApiUnreachable(reachable))


def worker_setup() -> None:
    """Each Ray worker of a session with a State API, or of a cluster keplm joins, runs this at start-up
    (``worker_process_setup_hook``): keplm's log lines marked for the driver's console (``console.worker_logging``),
    and the placement-group cleaner quiet while the State API does not answer (a cluster without a dashboard, or
    one whose dashboard is down)."""
    from keplm.platform.console import worker_logging

    worker_logging()
    _quiet_cleaner(state_api_reachable)


def quiet_placement_group_cleaner() -> None:
    """Each Ray worker of a local session without a dashboard runs this at start-up (``worker_process_setup_hook``):
    as ``worker_setup``, with the State API known to be absent (no probe: whatever answers at the default dashboard
    address on this host is another Ray's)."""
    from keplm.platform.console import worker_logging

    worker_logging()
    _quiet_cleaner(lambda: False)


# set in the GCS of a local Ray keplm started without a dashboard: read by every process of that Ray (a Tune trial
# builds its Ray Train run inside a worker) to leave out Ray Train's placement-group cleaner (``without_state_api``)
NO_STATE_API_KEY, KEPLM_KV_NAMESPACE = b"no_state_api", b"keplm"


def mark_no_state_api() -> None:
    """Record in this Ray's GCS that it serves no State API (a local Ray started without a dashboard)."""
    _gcs().internal_kv_put(NO_STATE_API_KEY, b"1", True, KEPLM_KV_NAMESPACE)


def without_state_api() -> bool:
    """Whether the Ray this process is connected to was marked by ``mark_no_state_api``. Ray registers its default
    dashboard address (127.0.0.1:8265) even when it starts none, so its State API client would ask whatever Ray
    listens there on this host: a second Ray's dashboard answers that the train controller does not exist, and
    Ray Train's placement-group cleaner then removes a live run's placement group (its workers die). Only keplm
    knows that its own local Ray has no dashboard."""
    return _gcs().internal_kv_get(NO_STATE_API_KEY, KEPLM_KV_NAMESPACE) is not None


def _gcs():
    """This process's own GCS client. Not ``ray.experimental.internal_kv``'s module-wide one, which a
    ``ray.cluster_utils.Cluster`` shut down in the same process resets while this process stays connected."""
    import ray._private.worker

    return ray._private.worker.global_worker.gcs_client


def _job_setup_hook() -> str | None:
    """The setup hook of the Ray job this driver runs in (``ray job submit --runtime-env``), if it has one: Ray refuses
    to merge a second one into it."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    try:
        job = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR) or "{}")
    except ValueError:
        return None
    return ((job or {}).get("runtime_env") or {}).get("worker_process_setup_hook")


def connect(cfg: RayConfig | None = None, address: str | None = None) -> None:
    """Join or start Ray. Worker lines still come to the driver (``log_to_driver``), where the job's console sends
    them to its log file, bar keplm's own (``console.capture_worker_lines``)."""
    import sys

    cfg = cfg or RayConfig()
    target = address or os.environ.get("RAY_ADDRESS") or cfg.address
    if not target and "ray" not in sys.modules:
        # a local Ray with token auth: Ray reads the mode when it is imported, so before the import; an explicit
        # RAY_AUTH_MODE in the environment wins
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    from keplm.platform.console import capture_worker_lines

    if ray.is_initialized():
        return
    if target:
        log.info("connecting to Ray at %s", target)
        # the cluster's State API may be unreachable (no dashboard, or one that is down): every worker of this job
        # quiets the placement-group cleaner while it is, as on a local Ray; a job submitted with its own setup
        # hook keeps it (Ray merges no second one) and Ray's lines as they are
        own = _job_setup_hook()
        if own:
            log.debug("the job has its own worker_process_setup_hook (%s); keplm's is not added", own)
        ray.init(address=target, log_to_driver=True,
                 **({} if own else {"runtime_env": {"worker_process_setup_hook": WORKER_HOOK}}))
    else:
        ray.init(
            # "local": a new Ray of our own, even where `ray start` (or a test's ray.cluster_utils.Cluster) left its
            # address in /tmp/ray/ray_current_cluster, which a bare ray.init() would join (and then refuse num_cpus)
            address="local",
            num_cpus=cfg.num_cpus,
            object_store_memory=cfg.object_store_memory_mb * 1024 * 1024,
            include_dashboard=cfg.include_dashboard,
            dashboard_host=cfg.dashboard_host,
            log_to_driver=True,
            # without a dashboard Ray's State API is absent, and Ray Train's PlacementGroupCleaner, which asks
            # it every second whether the train controller still lives, would log a warning each time it cannot
            runtime_env={"worker_process_setup_hook": WORKER_HOOK if cfg.include_dashboard else QUIET_HOOK},
        )
        if not cfg.include_dashboard:
            mark_no_state_api()
    capture_worker_lines()
    resources = ray.cluster_resources()
    log.info("Ray: %s, %g CPUs%s", f"the cluster at {target}" if target else "a local instance",
             resources.get("CPU", 0), f", {resources['GPU']:g} GPUs" if resources.get("GPU") else "")
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = cfg.show_progress


def pipelined_calls(actors: list, call, items, depth: int = 4):
    """Yield ``ray.get(call(actor, item))`` for every item, in completion order, keeping up to ``depth`` calls
    queued on each actor. ``ray.util.ActorPool`` keeps one per actor, so an actor idles for the round trip
    to the driver after each call: on the real KG's PEPR, 618 short calls per run, that was about 3 s of a
    14 s run on 2 cores. An actor that runs faster still takes more items, as with the pool."""
    import ray

    items = iter(items)
    pending = {}

    def submit(actor) -> None:
        for item in items:
            pending[call(actor, item)] = actor
            return

    for actor in actors:
        for _ in range(depth):
            submit(actor)
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        submit(pending.pop(ref))
        yield ray.get(ref)
