"""Shared-memory arbitration of physical pages among co-located instances: leases with
per-instance min, max and weight, reclaim pushed to holders through doorbells, and crash
safety through a robust lock and pid + start-time liveness. No daemon is involved."""

from __future__ import annotations

import os

from vmkv.coordinator._table import Outcome, SegmentError
from vmkv.coordinator.instance import UNLIMITED, Instance, Reclaimer
from vmkv.coordinator.segment import Segment, segment_name, user_segments
from vmkv.coordinator.units import budget_bytes, parse_size
from vmkv.vmm_ops import Vmm


def open_segment(vmm: Vmm, segment: str | None = None) -> Segment:
    """The coordinator segment of ``vmm``'s device, created if needed.

    The segment is ``segment``, else $VMKV_SEGMENT, else /vmkv-<uid>-<backend><device>.
    Its budget is fixed by whoever creates it: $VMKV_BUDGET (a size, or a percentage of
    the device's memory), or else 90% of the device memory free at that moment.
    """
    free, total = vmm.mem_info()
    name = segment or os.environ.get("VMKV_SEGMENT") or segment_name(vmm.kind, vmm.device)
    return Segment.open_or_create(
        name, vmm.page_size, lambda: budget_bytes(os.environ.get("VMKV_BUDGET"), total, free)
    )


def join(
    vmm: Vmm,
    name: str,
    engine: str = "vmkv",
    model: str = "-",
    min_bytes: int = 0,
    max_bytes: int | None = None,
    weight: int = 1,
    segment: str | None = None,
    wait_s: float = 0.05,
) -> Instance:
    """Register an instance on ``vmm``'s device, in its segment (see open_segment)."""
    shared = open_segment(vmm, segment)
    page = vmm.page_size
    max_pages = UNLIMITED if max_bytes is None else max_bytes // page
    return Instance(shared, name, engine, model, -(-min_bytes // page), max_pages, weight, wait_s=wait_s)


__all__ = [
    "UNLIMITED",
    "Instance",
    "Outcome",
    "Reclaimer",
    "Segment",
    "SegmentError",
    "budget_bytes",
    "join",
    "open_segment",
    "parse_size",
    "segment_name",
    "user_segments",
]
