"""The one place that connects to Ray.

`--address` or RAY_ADDRESS (set by `ray job submit`) -> join that cluster; otherwise start a local
Ray sized for a small machine (bounded object store, no dashboard unless asked).
"""

from __future__ import annotations

import logging
import os

from keplm.platform.config import Section

log = logging.getLogger(__name__)


class RayConfig(Section):
    address: str | None = None
    num_cpus: int | None = None
    object_store_memory_mb: int = 500
    include_dashboard: bool = False
    show_progress: bool = False


def connect(cfg: RayConfig | None = None, address: str | None = None) -> None:
    import ray

    cfg = cfg or RayConfig()
    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or cfg.address
    if target:
        log.info("connecting to Ray at %s", target)
        ray.init(address=target, log_to_driver=True)
    else:
        ray.init(
            num_cpus=cfg.num_cpus,
            object_store_memory=cfg.object_store_memory_mb * 1024 * 1024,
            include_dashboard=cfg.include_dashboard,
            log_to_driver=True,
        )
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = cfg.show_progress
