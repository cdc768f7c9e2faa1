"""One serving instance's membership in the coordinator: its lease and its doorbell.

The lease protocol, from the requester's side (``acquire``):
  1. grant at once from free budget;
  2. otherwise, if below its fair share (budget x weight / total weight, clipped to
     [min, max]), the table asks instances above theirs for pages and we ring their
     doorbells; below its min, instances above their min are asked too;
  3. wait, bounded by ``wait_s``, for the pages to come back; then a grant or a miss.
A miss is an ordinary allocation failure: the engine waits or preempts.

From the holder's side, a background thread sleeps on the instance's doorbell (a POSIX
semaphore) and wakes at least every ``heartbeat_s`` to heartbeat, sweep dead instances,
and serve what was asked of it through its :class:`Reclaimer`: pooled pages first, then
empty mapped pages, then (with the spill tier) cold cached blocks. A lowered max is
served the same way, so limits reach idle instances too. What cannot go at once is owed:
the table keeps the request open until releases pay it, so nobody asks for the same
pages twice, and while the instance owes, its thread wakes every ``DEBT_POLL_S`` to pay
from blocks that have gone cold since (a finished request's cached prefix).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Protocol

import posix_ipc

from vmkv.coordinator._table import Outcome
from vmkv.coordinator.segment import Segment, doorbell_name

log = logging.getLogger(__name__)

UNLIMITED = (1 << 63) - 1
POLL_S = 0.0002
DEBT_POLL_S = 0.02
# How often an instance alone on its device counts what it could give back: only `vmkv ls`
# reads that count then, and it walks every cold cached block under the allocator's lock.
ALONE_COUNT_S = 1.0


def ring(segment: Segment, slot: int) -> None:
    """Wake the instance in ``slot``; a missing doorbell means it is gone (the sweep
    takes its lease back)."""
    try:
        bell = posix_ipc.Semaphore(doorbell_name(segment.name, slot))
    except posix_ipc.ExistentialError:
        return
    bell.release()
    bell.close()


class Reclaimer(Protocol):
    """What the allocator layer offers the coordinator."""

    def reclaim(self, pages: int) -> int:
        """Give back up to ``pages`` physical pages (releasing their lease); return how many."""
        ...

    def reclaimable(self) -> int:
        """Pages that could be given back without touching live data."""
        ...

    def owed(self) -> int:
        """Pages promised back by earlier reclaims and not yet released."""
        ...

    def payable(self) -> int:
        """Pages it could still promise back (the rest of an ask is refused)."""
        ...


class Instance:
    """Registers an instance and implements the page pool's lease (``acquire``/``release``)."""

    def __init__(
        self,
        segment: Segment,
        name: str,
        engine: str = "vmkv",
        model: str = "-",
        min_pages: int = 0,
        max_pages: int = UNLIMITED,
        weight: int = 1,
        wait_s: float = 0.05,
        heartbeat_s: float = 0.25,
    ) -> None:
        if wait_s < 0 or heartbeat_s <= 0:
            raise ValueError("wait_s must be >= 0 and heartbeat_s > 0")
        self.segment = segment
        self.table = segment.table
        self.name = name
        self.wait_s = wait_s
        self.heartbeat_s = heartbeat_s
        self.reclaimer: Reclaimer | None = None
        self.slot, self.generation = self.table.register(
            name, engine, model, min_pages, min(max_pages, UNLIMITED), weight, os.getpid()
        )
        self._doorbell = posix_ipc.Semaphore(
            doorbell_name(segment.name, self.slot), posix_ipc.O_CREAT, mode=0o600
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"vmkv-lease-{name}", daemon=True)
        self._thread.start()

    # -- the lease ---------------------------------------------------------------------

    def acquire(self, pages: int) -> bool:
        """Lease ``pages`` more pages; False is a miss."""
        started = time.perf_counter_ns()
        outcome, victims = self.table.request(self.slot, self.generation, pages)
        if outcome == Outcome.GRANTED:
            return True
        if outcome != Outcome.RECLAIMING:
            return False
        for slot in victims:
            ring(self.segment, slot)
        deadline = started + int(self.wait_s * 1e9)
        while (now := time.perf_counter_ns()) < deadline:
            time.sleep(POLL_S)
            if self.table.try_grant(self.slot, self.generation, pages, time.perf_counter_ns() - started):
                return True
        self.table.note_miss(self.slot, self.generation, now - started)
        return False

    def headroom(self) -> int:
        """Pages ``acquire`` would grant now from free budget, without reclaiming."""
        return self.table.headroom(self.slot, self.generation)

    def release(self, pages: int, held: int, mapped: int) -> None:
        """Give back ``pages`` of lease; ``held``/``mapped`` are what the pool keeps."""
        self.table.release(self.slot, self.generation, pages, held, mapped)

    def report(self, held: int, mapped: int) -> None:
        self.table.report(self.slot, self.generation, held, mapped)

    # -- the holder's side -------------------------------------------------------------

    def _serve(self) -> None:
        reclaimable, counted_at = 0, float("-inf")
        while not self._stop.is_set():
            owed = self.reclaimer.owed() if self.reclaimer is not None else 0
            with contextlib.suppress(posix_ipc.BusyError):  # a timeout is the heartbeat tick
                self._doorbell.acquire(DEBT_POLL_S if owed else self.heartbeat_s)
            if self._stop.is_set():
                return
            try:
                if self.reclaimer is None:
                    self.table.heartbeat(self.slot, self.generation, 0)
                    continue
                if self._count_due(time.monotonic() - counted_at, owed):  # walks the cache
                    reclaimable, counted_at = self.reclaimer.reclaimable(), time.monotonic()
                owed = self.reclaimer.owed()
                asked = self.table.heartbeat(self.slot, self.generation, reclaimable, owed)
                refused = asked - min(asked, self.reclaimer.payable())
                if asked - refused or owed:
                    released = self.reclaimer.reclaim(asked - refused)
                    self.table.finish_reclaim(self.slot, self.generation, released, refused)
                elif refused:
                    self.table.finish_reclaim(self.slot, self.generation, 0, refused)
            except Exception:  # the thread must survive; the error is logged and retried
                log.exception("vmkv lease thread of %s", self.name)
                time.sleep(self.heartbeat_s)

    def _count_due(self, since: float, owed: int) -> bool:
        """Whether to count again what this instance could give back, ``since`` seconds
        after the last count. Other instances decide whom to ask by that count, so it is
        fresh at every heartbeat while there are any (and while this one owes); alone, it
        is only shown, and counted every ALONE_COUNT_S."""
        if since < DEBT_POLL_S:
            return False
        if since >= ALONE_COUNT_S or owed:
            return True
        return any(row["slot"] != self.slot for row in self.table.snapshot())

    def close(self) -> None:
        """Stop serving and leave the table (the lease goes back to the budget)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._doorbell.release()
        self._thread.join()
        self.table.deregister(self.slot, self.generation)
        self._doorbell.close()
        with contextlib.suppress(posix_ipc.ExistentialError):  # already removed by a reset
            self._doorbell.unlink()
