"""The one place that connects to Ray.

`--address` or RAY_ADDRESS (set by `ray job submit`) -> join that cluster; otherwise start a local
Ray sized for a small machine (bounded object store, no dashboard unless asked).

A local Ray starts with token auth (``RAY_AUTH_MODE=token`` unless the environment sets another mode: Ray
generates the token, in ``~/.ray/auth_token``) and its dashboard, when there is one, listens on
``ray.dashboard_host`` (127.0.0.1): the Jobs API runs whatever it is sent, so it is never open to the network
unasked.
"""

from __future__ import annotations

import logging
import os

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


def worker_setup() -> None:
    """Each Ray worker of a local session runs this at start-up (``worker_process_setup_hook``): keplm's log lines
    marked for the driver's console (``console.worker_logging``)."""
    from keplm.platform.console import worker_logging

    worker_logging()


def quiet_placement_group_cleaner() -> None:
    """Each Ray worker of a local session without a dashboard runs this at start-up (``worker_process_setup_hook``):
    Ray Train's cleaner of a crashed controller's placement group polls the State API, which such a session does not
    serve, and would warn every second (a controller that ends normally removes its placement group itself)."""
    worker_setup()
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


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
        ray.init(address=target, log_to_driver=True)
    else:
        ray.init(
            num_cpus=cfg.num_cpus,
            object_store_memory=cfg.object_store_memory_mb * 1024 * 1024,
            include_dashboard=cfg.include_dashboard,
            dashboard_host=cfg.dashboard_host,
            log_to_driver=True,
            # without a dashboard Ray's state API is absent, and Ray Train's PlacementGroupCleaner, which asks
            # it every second whether the train controller still lives, logs a warning each time it cannot
            runtime_env={"worker_process_setup_hook": WORKER_HOOK if cfg.include_dashboard else QUIET_HOOK},
        )
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
