"""Physical page pool: pages are created once and then recycled.

kvcached creates a fresh physical handle on every map (~190 µs of cuMemCreate on an A100)
and releases it on every unmap. Here a page that leaves a KV space goes back to this pool
and the next map reuses it, so the hot path is only map + access. The pool grows on demand
and gives memory back to the device only when asked to trim.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from vmkv.vmm_ops import OutOfDeviceMemory, Vmm


@dataclass(frozen=True)
class PoolStats:
    page_size: int
    in_use: int
    pooled: int
    created: int
    misses: int

    @property
    def held(self) -> int:
        """Pages this pool holds from the device, in use or pooled."""
        return self.in_use + self.pooled


class Lease(Protocol):
    """Permission to hold physical pages, granted by the coordinator. Every page the pool
    holds, mapped or pooled, is covered by the lease."""

    def acquire(self, pages: int) -> bool: ...

    def release(self, pages: int) -> None: ...

    def report(self, held: int, mapped: int) -> None: ...


class PagePool:
    """Recycles the physical pages of one :class:`Vmm`.

    ``max_pages`` caps how many pages the pool may hold at once (None: the device's
    memory is the only limit); a ``lease`` must grant every page before it is created.
    Running out is a miss (``acquire`` returns None), never an exception, so the layer
    above can wait, reclaim or preempt.
    """

    def __init__(self, vmm: Vmm, max_pages: int | None = None, lease: Lease | None = None) -> None:
        if max_pages is not None and max_pages < 0:
            raise ValueError(f"max_pages must be >= 0, got {max_pages}")
        self.vmm = vmm
        self.max_pages = max_pages
        self.lease = lease
        self._lock = threading.Lock()
        self._pooled: list[int] = []
        self._in_use: set[int] = set()
        self._created = 0
        self._misses = 0

    @property
    def page_size(self) -> int:
        return self.vmm.page_size

    def acquire(self, count: int) -> list[int] | None:
        """Take ``count`` pages, creating (and leasing) what the pool lacks. All or nothing."""
        if count <= 0:
            raise ValueError(f"page count must be positive, got {count}")
        with self._lock:
            shortfall = count - len(self._pooled)
            if shortfall > 0 and not self._grow(shortfall):
                self._misses += 1
                return None
            pages = self._pooled[-count:]
            del self._pooled[-count:]
            self._in_use.update(pages)
        self._report()
        return pages

    def _grow(self, count: int) -> bool:
        held = len(self._pooled) + len(self._in_use)
        if self.max_pages is not None and held + count > self.max_pages:
            return False
        if self.lease is not None and not self.lease.acquire(count):
            return False
        try:
            self._pooled.extend(self.vmm.create_pages(count))
        except OutOfDeviceMemory:
            if self.lease is not None:
                self.lease.release(count)
            return False
        self._created += count
        return True

    def release(self, pages: Sequence[int]) -> None:
        """Return pages taken with :meth:`acquire` (they must be unmapped)."""
        with self._lock:
            unique = set(pages)
            if len(unique) != len(pages):
                raise ValueError("a page is listed twice")
            stray = unique - self._in_use
            if stray:
                raise ValueError(f"page {min(stray)} was not acquired from this pool")
            self._in_use -= unique
            self._pooled.extend(pages)
        self._report()

    def trim(self, keep: int = 0) -> int:
        """Give pooled pages beyond ``keep`` back to the device; returns how many."""
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        with self._lock:
            excess = len(self._pooled) - keep
            if excess <= 0:
                return 0
            victims = self._pooled[-excess:]
            self.vmm.release_pages(victims)
            del self._pooled[-excess:]
            if self.lease is not None:
                self.lease.release(excess)
        self._report()
        return excess

    def _report(self) -> None:
        if self.lease is not None:
            stats = self.stats()
            self.lease.report(stats.held, stats.in_use)

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(
                self.page_size, len(self._in_use), len(self._pooled), self._created, self._misses
            )
