from __future__ import annotations

import pytest
from conftest import MiB

from vmkv.allocator import PagePool
from vmkv.vmm_ops import open_vmm


@pytest.fixture
def host():
    vmm = open_vmm("host", page_size=1 * MiB, host_capacity=16 * MiB)
    yield vmm
    vmm.close()


def test_pages_are_recycled_not_recreated(host):
    pool = PagePool(host)
    first = pool.acquire(4)
    pool.release(first)
    again = pool.acquire(4)
    assert sorted(again) == sorted(first)
    assert pool.stats().created == 4
    assert host.stats()["pages_created"] == 4


def test_grows_on_demand_and_trims_on_request(host):
    pool = PagePool(host)
    pool.release(pool.acquire(6))
    assert host.stats()["resident_bytes"] == 6 * MiB
    assert pool.trim(keep=2) == 4
    assert host.stats()["resident_bytes"] == 2 * MiB
    assert pool.stats().pooled == 2
    assert pool.trim() == 2
    assert host.stats()["pages"] == 0


def test_device_exhaustion_and_max_pages_are_misses(host):
    capped = PagePool(host, max_pages=3)
    assert capped.acquire(4) is None
    assert capped.acquire(3) is not None
    assert capped.acquire(1) is None
    assert capped.stats().misses == 2

    pool = PagePool(host)  # the device has 16 MiB, 3 of which `capped` holds
    assert pool.acquire(14) is None
    assert pool.stats().held == 0
    assert pool.acquire(13) is not None


def test_misuse(host):
    pool = PagePool(host)
    pages = pool.acquire(2)
    with pytest.raises(ValueError, match="positive"):
        pool.acquire(0)
    with pytest.raises(ValueError, match="listed twice"):
        pool.release([pages[0], pages[0]])
    with pytest.raises(ValueError, match="not acquired"):
        pool.release([10**6])
    assert pool.stats().in_use == 2
    pool.release(pages)
    with pytest.raises(ValueError, match="not acquired"):
        pool.release(pages)
    with pytest.raises(ValueError, match="max_pages"):
        PagePool(host, max_pages=-1)


class CountingLease:
    """A lease of ``budget`` pages that records what the pool holds."""

    def __init__(self, budget: int) -> None:
        self.budget, self.leased, self.held = budget, 0, 0

    def acquire(self, pages: int) -> bool:
        if self.leased + pages > self.budget:
            return False
        self.leased += pages
        return True

    def release(self, pages: int, held: int, mapped: int) -> None:
        self.leased -= pages
        self.held = held

    def report(self, held: int, mapped: int) -> None:
        self.held = held


def test_reserve_pools_leased_pages_ahead_of_need(host):
    lease = CountingLease(budget=6)
    pool = PagePool(host, max_pages=5, lease=lease)
    assert pool.reserve(3)
    assert (pool.stats().pooled, pool.stats().in_use, lease.leased, lease.held) == (3, 0, 3, 3)
    assert host.stats()["resident_bytes"] == 3 * MiB
    assert pool.acquire(3) is not None and pool.stats().created == 3  # no new page: reserved ones
    assert not pool.reserve(3)  # max_pages: the lease it took goes back
    assert lease.leased == 3 and pool.stats().misses == 1
    lease.budget = 4
    assert not pool.reserve(2)  # the lease refuses
    assert lease.leased == 3 and pool.stats().misses == 2
    with pytest.raises(ValueError, match="positive"):
        pool.reserve(0)


def test_a_debt_ages_from_when_it_began_and_one_asked_again_at_once_continues(host, monkeypatch):
    """How long pages have been owed decides when an engine preempts to pay; a requester
    that leases a page at a time must not restart that clock with every page."""
    clock = [100.0]
    monkeypatch.setattr("vmkv.allocator.page_pool.time.monotonic", lambda: clock[0])
    pool = PagePool(host)
    held = pool.acquire(3)
    assert pool.debt_age() == 0.0
    assert pool.owe(1) == 0  # nothing pooled: owed
    clock[0] += 0.4
    assert pool.debt_age() == pytest.approx(0.4)
    pool.release(held[:1])  # paid off
    assert pool.debt == 0 and pool.debt_age() == 0.0
    clock[0] += 0.3  # asked again right away: the same debt goes on
    pool.owe(1)
    assert pool.debt_age() == pytest.approx(0.7)
    pool.release(held[1:2])
    clock[0] += 5.0  # asked again much later: a new debt
    pool.owe(1)
    assert pool.debt_age() == 0.0
