"""Scheduling policies behind one interface; :func:`make_scheduler` builds one by name."""

from __future__ import annotations

from typing import Literal, get_args

from .baselines import FCFSScheduler, RPMScheduler
from .interface import TIERS, Job, Prices, QueueRejected, Scheduler, TenantStats
from .vtc import LCFScheduler, VTCPredictScheduler, VTCScheduler

#: Scheduling policies by name (``scheduler.policy``), as :func:`make_scheduler` builds them.
Policy = Literal["vtc", "vtc-predict", "fcfs", "lcf", "rpm"]
POLICIES: tuple[Policy, ...] = get_args(Policy)
#: The policies that order tenants by a counter: only their order can be shared across
#: replicas (a ``cluster:`` section), and only they serve nested tenants and
#: ``batch_min_share``.
CLUSTER_POLICIES: tuple[Policy, ...] = ("vtc", "vtc-predict", "lcf")


def make_scheduler(policy: str, prices: Prices | None = None, rpm_limit: int = 60) -> Scheduler:
    """Build a scheduler for ``policy`` (one of :data:`POLICIES`)."""
    if policy == "vtc":
        return VTCScheduler(prices)
    if policy == "vtc-predict":
        return VTCPredictScheduler(prices)
    if policy == "lcf":
        return LCFScheduler(prices)
    if policy == "fcfs":
        return FCFSScheduler(prices)
    if policy == "rpm":
        return RPMScheduler(prices, rpm_limit=rpm_limit)
    raise ValueError(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")


__all__ = [
    "CLUSTER_POLICIES",
    "POLICIES",
    "TIERS",
    "FCFSScheduler",
    "Job",
    "LCFScheduler",
    "Policy",
    "Prices",
    "QueueRejected",
    "RPMScheduler",
    "Scheduler",
    "TenantStats",
    "VTCPredictScheduler",
    "VTCScheduler",
    "make_scheduler",
]
