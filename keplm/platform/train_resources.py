"""A fixed-size training run that loses a node: one line that says so, a bounded wait, then a clean failure.

Ray Train restarts a failed worker group (``FailureConfig(max_failures)``) by placing a new one of the same
size. When a node is gone for good, that placement never succeeds: the controller waits
``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (60 s) for the placement group, counts a
``WorkerGroupStartupTimeoutError`` as a controller failure, and retries; ``FailureConfig.controller_failure_limit``
is unbounded by default, so it retries forever, with a traceback in the log each minute and nothing on the console.

``keplm pretrain`` bounds that wait by ``train.resources_timeout_s``:

- ``bounded_start_wait`` sets ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (Ray Train passes it on to its
  controller) to that many seconds for the run, and ``run_training`` sets ``controller_failure_limit=0``: one
  start attempt of at most that long, then the run fails instead of retrying. (A worker group whose workers die
  while starting counts as the same kind of failure: it ends the run too.)
- ``ResourceWaitNotice``, a worker-group callback that runs in Ray Train's controller, remembers the node of each
  worker; when a worker group starts again it names the nodes of the last group that the cluster reports dead,
  and the resources the new group waits for, in one keplm line on the console (as soon as the GCS reports the
  node dead, which can be a few seconds after the group failed). It says the same at any start the cluster's
  live nodes cannot hold, lost node or not.
- ``explain_start_failure`` turns the controller's error into one line (``ClusterResourcesError``, exit code 3:
  a state of the cluster, not of the input, so rerunning later is the remedy), naming the nodes lost during
  the run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator

from ray.train.v2._internal.execution.callback import WorkerGroupCallback

from keplm.platform.errors import KeplmError

log = logging.getLogger(__name__)

START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


class ClusterResourcesError(KeplmError):
    """The cluster could not give a training run its workers within ``train.resources_timeout_s``: rerunning the
    same command once it can resumes from the latest checkpoint."""

    exit_code = 3


def describe_group(num_workers: int, resources: dict[str, float]) -> str:
    """``2 workers x 0.9 CPU``, ``4 workers x 1 GPU + 8 CPU``."""
    parts = [f"{amount:g} {name}" for name, amount in sorted(resources.items(), key=lambda kv: kv[0] != "GPU")
             if amount]
    return f"{num_workers} worker{'s' if num_workers != 1 else ''} x {' + '.join(parts) or 'no resources'}"


def describe_node(node_id: str, ip: str | None) -> str:
    """``node ID (IP)``."""
    return f"node {node_id} ({ip or 'address unknown'})"


def cluster_nodes() -> list[dict]:
    """The GCS's node table (``ray.nodes()``): alive and dead nodes, with their total resources."""
    import ray

    return ray.nodes()


def dead_node_ids(nodes: list[dict] | None = None) -> set[str]:
    return {n["NodeID"] for n in (cluster_nodes() if nodes is None else nodes) if not n.get("Alive")}


def workers_that_fit(resources: dict[str, float], nodes: list[dict]) -> int:
    """How many workers of ``resources`` the live nodes hold, by their total resources (whatever runs there now)."""
    fit = 0
    for node in nodes:
        if not node.get("Alive"):
            continue
        total = node.get("Resources") or {}
        per_node = [math.floor(total.get(name, 0.0) / amount + 1e-9)
                    for name, amount in resources.items() if amount > 0]
        fit += min(per_node) if per_node else 0
    return fit


class ResourceWaitNotice(WorkerGroupCallback):
    """In Ray Train's controller: one keplm line when a worker group is to start and a node of the previous group is
    gone, or the live nodes cannot hold the group, naming the nodes and what the group waits for, and for how long.

    The cluster learns of a node's death from the GCS's health checks: a node whose processes were killed outright
    can fail the worker group (its peers' connections reset) seconds before the GCS reports it dead. So on a
    restart that finds nothing amiss yet, a thread keeps looking, once a second, until the group has started or
    the wait is over. The notice never fails a start: a look-up that fails is logged at debug level and skipped."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._worker_nodes: dict[int, tuple[str, str]] = {}   # rank -> (node id, ip) of the last group
        self._started = None   # a threading.Event per start (made in the controller: events do not pickle)

    def after_worker_group_start(self, worker_group) -> None:
        if self._started is not None:
            self._started.set()
        try:
            self._worker_nodes = {rank: (w.metadata.node_id, w.metadata.node_ip)
                                  for rank, w in enumerate(worker_group.get_workers())}
        except Exception:  # noqa: BLE001 - a notice must never fail the group
            log.debug("could not record the workers' nodes", exc_info=True)

    def before_worker_group_start(self, worker_group_context) -> None:
        import threading

        if self._started is not None:
            self._started.set()   # a watch of an earlier start, if any, ends
        self._started = threading.Event()
        group = (worker_group_context.num_workers, dict(worker_group_context.resources_per_worker))
        if not self._say(*group) and self._worker_nodes:
            threading.Thread(target=self._watch, args=(*group, self._started), daemon=True,
                             name="keplm-resource-wait").start()

    def _watch(self, num_workers: int, resources: dict[str, float], started) -> None:
        end = time.monotonic() + self.timeout_s
        while not started.wait(1.0) and time.monotonic() < end:
            if self._say(num_workers, resources):
                return

    def _say(self, num_workers: int, resources: dict[str, float]) -> bool:
        """Log the notice if there is one; -> whether there was."""
        try:
            line = self.notice(num_workers, resources, cluster_nodes())
        except Exception:  # noqa: BLE001
            log.debug("could not check the cluster's nodes", exc_info=True)
            return False
        if line:
            from keplm.platform.console import worker_logging

            worker_logging()   # this runs in the controller's process: keplm's lines marked for the driver's console
            log.warning("%s", line)
        return bool(line)

    def notice(self, num_workers: int, resources: dict[str, float], nodes: list[dict]) -> str | None:
        """The line for a start of ``num_workers`` x ``resources`` on a cluster of ``nodes``, or None."""
        dead = dead_node_ids(nodes)
        gone: dict[str, list] = {}
        for rank, (node_id, ip) in sorted(self._worker_nodes.items()):
            if node_id in dead:
                gone.setdefault(node_id, [ip, []])[1].append(rank)
        fit = workers_that_fit(resources, nodes)
        if not gone and fit >= num_workers:
            return None
        group = describe_group(num_workers, resources)
        wait = f"waiting up to {self.timeout_s:g} s (train.resources_timeout_s) for {group}"
        if gone:
            ranks = sorted(r for _, rs in gone.values() for r in rs)
            what = (f"{', '.join(describe_node(n, ip) for n, (ip, _) in gone.items())} "
                    f"{'is' if len(gone) == 1 else 'are'} gone, with worker rank{'s' if len(ranks) > 1 else ''} "
                    f"{', '.join(map(str, ranks))}")
            return f"train: {what}; {wait}" + (f" (the live nodes hold {fit})" if fit < num_workers else "")
        return f"train: {wait}: the live nodes hold {fit}"


@contextlib.contextmanager
def bounded_start_wait(timeout_s: float) -> Iterator[None]:
    """For the block, Ray Train's wait for a worker group's placement (``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``,
    read in this process when the trainer starts its controller and passed on to it) is ``timeout_s``."""
    before = os.environ.get(START_TIMEOUT_ENV)
    os.environ[START_TIMEOUT_ENV] = f"{timeout_s:g}"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(START_TIMEOUT_ENV, None)
        else:
            os.environ[START_TIMEOUT_ENV] = before


def explain_start_failure(exc: BaseException, num_workers: int, resources: dict[str, float], timeout_s: float,
                          dead_before: set[str]) -> ClusterResourcesError | None:
    """A ``ClusterResourcesError`` for Ray Train's error when a worker group could not start (its placement timed
    out, or its workers died while starting), naming the nodes that died since ``dead_before``; else None."""
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError

    cause = getattr(exc, "controller_failure", None) if isinstance(exc, ControllerError) else None
    if not isinstance(cause, (WorkerGroupStartupTimeoutError, WorkerGroupStartupFailedError)):
        return None
    try:
        nodes = cluster_nodes()
        lost = [n for n in nodes if not n.get("Alive") and n["NodeID"] not in dead_before]
    except Exception:  # noqa: BLE001 - the line without the nodes
        lost = []
    group = describe_group(num_workers, resources)
    if isinstance(cause, WorkerGroupStartupTimeoutError):
        what = f"{group} could not be placed within train.resources_timeout_s ({timeout_s:g} s)"
    else:
        what = f"the workers of {group} died while starting"
    if lost:
        what += ("; lost during the run: " + ", ".join(describe_node(n["NodeID"], n.get("NodeManagerAddress"))
                                                       for n in lost))
    return ClusterResourcesError(f"training stopped: {what}. Rerun the same command to resume from the latest "
                                 "checkpoint once the cluster has the resources")

