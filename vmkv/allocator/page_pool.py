"""Physical page pool: pages are created once and then recycled.

kvcached creates a fresh physical handle on every map (~190 µs of cuMemCreate on an A100)
and releases it on every unmap. Here a page that leaves a KV space goes back to this pool
and the next map reuses it, so the hot path is only map + access. The pool grows on demand
and gives memory back to the device only when asked to trim.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from vmkv.vmm_ops import OutOfDeviceMemory, Vmm

DEBT_RESPITE_S = 1.0  # a debt that comes back sooner after being paid continues the old one


@dataclass(frozen=True)
class PoolStats:
    page_size: int
    in_use: int
    pooled: int
    created: int
    misses: int
    debt: int  # pages promised back to the coordinator, paid as pages return to the pool

    @property
    def held(self) -> int:
        """Pages this pool holds from the device, in use or pooled."""
        return self.in_use + self.pooled


class Lease(Protocol):
    """Permission to hold physical pages, granted by the coordinator. Every page the pool
    holds, mapped or pooled, is covered by the lease."""

    def acquire(self, pages: int) -> bool: ...

    def release(self, pages: int, held: int, mapped: int) -> None: ...

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
        self._debt = 0
        self._debt_since = 0.0  # when the debt in progress began (see debt_age)
        self._debt_paid_at = float("-inf")  # when the last debt was paid off
        # Bumped (under the lock) whenever the pages held, in use or owed change, mapping
        # and unmapping included: readers cache what they derive from the pool until it
        # moves. A plain attribute, as it is read for every request of every engine step.
        self.changes = 0

    @property
    def page_size(self) -> int:
        return self.vmm.page_size

    # Lock-free reads for an engine's hot path: each is one read of an int or a list's
    # length, never torn, only possibly a moment old.
    @property
    def debt(self) -> int:
        """Pages promised back and not yet paid."""
        return self._debt

    def debt_age(self) -> float:
        """Seconds this instance has owed pages; 0 while nothing is owed. A debt that
        comes back within DEBT_RESPITE_S of being paid continues the one before: an
        instance that is asked for a page at a time (as a requester leases them) has had
        its grace period once, not once per page."""
        return time.monotonic() - self._debt_since if self._debt else 0.0

    @property
    def pooled(self) -> int:
        """Pages held but not in use."""
        return len(self._pooled)

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
        return self._create_leased(count)

    def _create_leased(self, count: int) -> bool:
        """Create ``count`` pages the lease already covers into the pool (under the pool
        lock); on device exhaustion the lease goes back."""
        try:
            self._pooled.extend(self.vmm.create_pages(count))
        except OutOfDeviceMemory:
            if self.lease is not None:
                held = len(self._pooled) + len(self._in_use)
                self.lease.release(count, held, len(self._in_use))
            return False
        self._created += count
        return True

    def reserve(self, count: int) -> bool:
        """Lease and create ``count`` pages into the pool ahead of need. The lease may wait
        for other instances to give pages back; that wait happens outside the pool lock,
        so this instance's own allocations and frees go on meanwhile. False is a miss."""
        if count <= 0:
            raise ValueError(f"page count must be positive, got {count}")
        if self.lease is not None and not self.lease.acquire(count):
            with self._lock:
                self._misses += 1
            return False
        with self._lock:
            held = len(self._pooled) + len(self._in_use)
            if self.max_pages is not None and held + count > self.max_pages:
                if self.lease is not None:
                    self.lease.release(count, held, len(self._in_use))
                created = False
            else:
                created = self._create_leased(count)
            if not created:
                self._misses += 1
                return False
            self._pay_debt()
            self._report()
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
            self._pay_debt()
            self._report()

    def trim(self, keep: int = 0) -> int:
        """Give pooled pages beyond ``keep`` back to the device; returns how many."""
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        with self._lock:
            released = self._give_back(len(self._pooled) - keep)
            self._report()
        return released

    def owe(self, pages: int) -> int:
        """Promise ``pages`` back: pooled pages go at once, the rest as soon as they return
        to the pool (instead of being reused). Returns how many went at once."""
        if pages < 0:
            raise ValueError(f"pages must be >= 0, got {pages}")
        with self._lock:
            now = time.monotonic()
            if self._debt == 0 and now - self._debt_paid_at > DEBT_RESPITE_S:
                self._debt_since = now
            self._debt += pages
            paid = self._pay_debt()
            self._report()
        return paid

    def _pay_debt(self) -> int:
        paid = self._give_back(min(self._debt, len(self._pooled)))
        self._debt -= paid
        if paid and self._debt == 0:
            self._debt_paid_at = time.monotonic()
        return paid

    def _give_back(self, count: int) -> int:
        if count <= 0:
            return 0
        victims = self._pooled[-count:]
        self.vmm.release_pages(victims)
        del self._pooled[-count:]
        if self.lease is not None:
            self.lease.release(count, len(self._pooled) + len(self._in_use), len(self._in_use))
        return count

    def _report(self) -> None:
        """Tell the lease what is held. Called under the pool lock, so reports and lease
        releases reach the coordinator in the order they happened."""
        self.changes += 1
        if self.lease is not None:
            self.lease.report(len(self._pooled) + len(self._in_use), len(self._in_use))

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(
                self.page_size, len(self._in_use), len(self._pooled), self._created, self._misses, self._debt
            )
