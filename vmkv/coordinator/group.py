"""One lease over several devices, for an engine whose KV page is a page on each of its ranks.

A tensor-parallel engine maps the same KV pages on every rank, so one of its pages is
``ranks`` physical pages: one on each rank's device. Ranks on different devices are
counted in each device's segment; ranks sharing a device (the host, on the CPU) are
counted together in its one segment. The scheduler's process holds every lease (a lease
is bookkeeping and needs no memory of the device), one :class:`Instance` per segment,
and this class makes them one :class:`~vmkv.allocator.page_pool.Lease` in pages of the
engine: a grant is whole only when every segment grants, and a partial grant goes back.
Reclaim asked by any segment is served in the engine's pages, which frees memory on
every device at once.
"""

from __future__ import annotations

from vmkv.coordinator.instance import Instance, Reclaimer


class ScaledReclaimer:
    """A reclaimer in the engine's pages, seen by one segment in its own pages: each
    engine page is ``ranks`` of that segment's pages."""

    def __init__(self, inner: Reclaimer, ranks: int) -> None:
        self.inner, self.ranks = inner, ranks

    def reclaim(self, pages: int) -> int:
        return self.inner.reclaim(-(-pages // self.ranks)) * self.ranks

    def reclaimable(self) -> int:
        return self.inner.reclaimable() * self.ranks

    def owed(self) -> int:
        return self.inner.owed() * self.ranks

    def payable(self) -> int:
        return self.inner.payable() * self.ranks


class GroupLease:
    """Leases ``ranks`` pages of each member's segment per page of the engine."""

    def __init__(self, members: list[tuple[Instance, int]]) -> None:
        if not members or any(ranks <= 0 for _, ranks in members):
            raise ValueError("a group lease needs members with a positive number of ranks each")
        self.members = members
        self._held, self._mapped = 0, 0  # the engine's pages, as last reported
        self._reclaimer: Reclaimer | None = None

    @property
    def reclaimer(self) -> Reclaimer | None:
        return self._reclaimer

    @reclaimer.setter
    def reclaimer(self, reclaimer: Reclaimer) -> None:
        self._reclaimer = reclaimer
        for instance, ranks in self.members:
            instance.reclaimer = ScaledReclaimer(reclaimer, ranks)

    def acquire(self, pages: int) -> bool:
        granted: list[tuple[Instance, int]] = []
        for instance, ranks in self.members:
            if not instance.acquire(pages * ranks):
                for done, done_ranks in granted:
                    done.release(pages * done_ranks, self._held * done_ranks, self._mapped * done_ranks)
                return False
            granted.append((instance, ranks))
        return True

    def headroom(self) -> int:
        return min(instance.headroom() // ranks for instance, ranks in self.members)

    def release(self, pages: int, held: int, mapped: int) -> None:
        self._held, self._mapped = held, mapped
        for instance, ranks in self.members:
            instance.release(pages * ranks, held * ranks, mapped * ranks)

    def report(self, held: int, mapped: int) -> None:
        self._held, self._mapped = held, mapped
        for instance, ranks in self.members:
            instance.report(held * ranks, mapped * ranks)

    def close(self) -> None:
        for instance, _ in self.members:
            instance.close()
