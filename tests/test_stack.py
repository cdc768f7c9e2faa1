"""The engine-agnostic stack built from VMKV_* settings (what every engine layer uses)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from vmkv.allocator.reclaim import holders_to_preempt
from vmkv.coordinator import Segment
from vmkv.coordinator.segment import remove_segment
from vmkv.stack import KVStack, StackSettings, open_backend


@contextlib.contextmanager
def two_stacks(monkeypatch, tag: str, budget: str) -> Iterator[tuple[KVStack, KVStack]]:
    """Instances a and b, each 64 MiB of virtual KV space in 4 MiB KV pages (1 MiB
    physical pages), sharing ``budget`` on a segment of their own."""
    segment = f"/vmkv-{os.getuid()}-{tag}{os.getpid()}"
    monkeypatch.setenv("VMKV_SEGMENT", segment)
    monkeypatch.setenv("VMKV_BUDGET", budget)
    monkeypatch.setenv("VMKV_PAGE_BYTES", "1M")
    stacks: list[KVStack] = []
    try:
        for name in ("a", "b"):
            settings = StackSettings(name, "test", "tiny", spill=False, keep_free_pages=0)
            stacks.append(KVStack(torch.device("cpu"), [64 << 10] * 4, 256, settings))
        yield stacks[0], stacks[1]
    finally:
        for stack in stacks:
            stack.close()
        remove_segment(segment)


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("VMKV_NAME", "llama-a")
    monkeypatch.setenv("VMKV_MAX", "1%")
    monkeypatch.setenv("VMKV_WEIGHT", "3")
    monkeypatch.setenv("VMKV_SPILL", "0")
    settings = StackSettings.from_env("vllm", "llama", default_name="served")
    assert (settings.name, settings.max_size, settings.weight, settings.spill) == ("llama-a", "1%", 3, False)
    monkeypatch.setenv("VMKV_WEIGHT", "0")
    with pytest.raises(ValueError, match="VMKV_WEIGHT must be a positive integer"):
        StackSettings.from_env("vllm", "llama", default_name="served")
    monkeypatch.setenv("VMKV_WEIGHT", "1")
    monkeypatch.setenv("VMKV_KEEP_FREE_PAGES", "-1")
    with pytest.raises(ValueError, match="VMKV_KEEP_FREE_PAGES"):
        StackSettings.from_env("vllm", "llama", default_name="served")
    monkeypatch.setenv("VMKV_KEEP_FREE_PAGES", "2")
    for grace, seconds in (("0.5", 0.5), ("inf", float("inf"))):
        monkeypatch.setenv("VMKV_DEBT_GRACE_S", grace)
        assert StackSettings.from_env("vllm", "llama", default_name="served").debt_grace_s == seconds
    for bad in ("-1", "soon", "nan"):
        monkeypatch.setenv("VMKV_DEBT_GRACE_S", bad)
        with pytest.raises(ValueError, match=f"VMKV_DEBT_GRACE_S must be .*{bad!r}"):
            StackSettings.from_env("vllm", "llama", default_name="served")
    monkeypatch.setenv("VMKV_DEBT_GRACE_S", "0.5")
    for name, bad, message in (
        ("VMKV_WEIGHT", "\u00b2", "VMKV_WEIGHT must be a positive integer"),  # isdigit() says yes
        ("VMKV_WEIGHT", "99999999999", "VMKV_WEIGHT must be a positive integer up to 1000000"),
        ("VMKV_SPILL", "maybe", "VMKV_SPILL must be 1 or 0"),
        ("VMKV_MIN", "4X", "VMKV_MIN: '4X' is not a size"),
        ("VMKV_MAX", "200%", "VMKV_MAX: '200%': a percentage must be in"),
    ):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=message):
            StackSettings.from_env("vllm", "llama", default_name="served")
        monkeypatch.delenv(name)
    for word, spill in (("no", False), ("off", False), ("yes", True), ("1", True)):
        monkeypatch.setenv("VMKV_SPILL", word)
        assert StackSettings.from_env("vllm", "llama", default_name="served").spill is spill
    monkeypatch.setenv("VMKV_PAGE_BYTES", "2X")
    with pytest.raises(ValueError, match="VMKV_PAGE_BYTES: '2X' is not a size"):
        open_backend(torch.device("cpu"))


def test_stack_joins_with_limits_resolved_against_the_device(monkeypatch):
    segment = f"/vmkv-{os.getuid()}-stacktest{os.getpid()}"
    monkeypatch.setenv("VMKV_SEGMENT", segment)
    monkeypatch.setenv("VMKV_BUDGET", "64M")
    settings = StackSettings("s", "test", "tiny", min_size="4M", max_size="32M", weight=2, spill=False)
    stack = KVStack(torch.device("cpu"), [32 << 10] * 4, 512, settings)  # 64 MiB of space
    try:
        (row,) = Segment.attach(segment).table.snapshot()
        page = stack.vmm.page_size
        assert (row["name"], row["min_pages"], row["max_pages"], row["weight"]) == (
            "s",
            (4 << 20) // page,
            (32 << 20) // page,
            2,
        )
        unmapped = stack.allocator.num_free_blocks() - stack.allocator.num_free_mapped_blocks()
        assert 0 < stack.grantable_blocks() < unmapped  # the lease stops at the 32M max
        # Taking what is grantable shows at once, however long the coordinator's answer is
        # reused: a stale count would promise the engine blocks that no one can give.
        monkeypatch.setattr("vmkv.stack.GRANTABLE_TTL_S", 60.0)
        taken = stack.allocator.alloc(stack.grantable_blocks() + stack.allocator.num_free_mapped_blocks())
        assert taken is not None and stack.grantable_blocks() == 0
        assert stack.allocator.alloc(stack.allocator.blocks_per_page) is None
        stack.allocator.free(taken)
        with pytest.raises(ValueError, match="no backend for meta"):
            KVStack(torch.device("meta"), [1024], 16, settings)
    finally:
        stack.close()
        remove_segment(segment)


def test_prefetch_takes_idle_pages_another_instance_holds(monkeypatch):
    """An engine admits a request only when its free count covers it; when another
    instance holds the whole budget idle, that count is 0 and nothing would ever ask for
    the pages. prefetch() leases them (reclaiming) so they show as free."""
    with two_stacks(monkeypatch, "prefetch", "16M") as (a, b):
        blocks = a.allocator.alloc(a.grantable_blocks())
        assert blocks is not None and b.grantable_blocks() == 0
        a.allocator.free(blocks)  # a is idle now, but still holds all but b's null-block page
        idle = a.pool.stats().pooled
        assert idle > 0 and a.pool.stats().held + b.pool.stats().held == 16 and b.grantable_blocks() == 0
        wanted = idle // b.space.physical_per_page * b.allocator.blocks_per_page
        deadline = time.monotonic() + 10
        while b.grantable_blocks() < wanted and time.monotonic() < deadline:
            b.prefetch(wanted)  # as an engine does at every step a request does not fit
            time.sleep(0.01)
        assert b.grantable_blocks() >= wanted, "prefetch did not take a's idle pages"
        assert a.pool.stats().pooled == 0 and b.pool.stats().pooled == idle
        assert b.allocator.alloc(wanted) is not None


def test_an_allocation_waits_for_pages_a_busy_neighbour_frees_and_misses_past_its_deadline(monkeypatch):
    """Budget an engine counted as free can go to a neighbour first. alloc_waiting asks
    again until the neighbour pays (its requests finish) and is a plain miss, with
    nothing taken, once its time is up."""
    with two_stacks(monkeypatch, "waiting", "16M") as (a, b):
        held = a.allocator.alloc(a.grantable_blocks())  # in use: nothing a can give at once
        assert held is not None and b.grantable_blocks() == 0
        wanted = b.allocator.num_free_mapped_blocks() + 1  # one more than its null block's page holds
        assert b.alloc_waiting(wanted, 0.05) is None
        assert b.allocator.stats().used_blocks == 0 and b.space.mapped_pages == 1 and a.owes()  # asked
        finish = threading.Timer(0.1, a.allocator.free, args=(held,))  # a's requests finish
        finish.start()
        try:
            got = b.alloc_waiting(wanted, 10)
        finally:
            finish.join()
        assert got is not None and len(got) == wanted and not a.owes()


def test_a_step_that_took_pages_gets_as_many_mapped_ahead_from_free_budget_only(monkeypatch):
    """After a scheduling step that took N pages' worth of new blocks, the stack maps N
    pages ahead on its own thread, so that the next such step maps nothing itself. It
    takes only free budget, never another instance's pages, and the spares it holds go
    back at once when another instance asks."""
    with two_stacks(monkeypatch, "ahead", "32M") as (a, b):
        bpp = a.allocator.blocks_per_page
        step = a.allocator.alloc(2 * bpp)  # a step that took two pages' worth
        assert step is not None
        a.map_ahead(2 * bpp)
        assert a._mapper.wait_idle(timeout=10)
        assert a.allocator.num_empty_mapped_pages() == 2
        mapped = a.space.mapped_pages
        again = a.allocator.alloc(2 * bpp)  # the next such step maps nothing
        assert again is not None and a.space.mapped_pages == mapped
        a.allocator.free(again)
        assert a.allocator.num_empty_mapped_pages() == 2  # held for the next step

        rest = b.allocator.alloc(b.grantable_blocks())  # b takes the free budget
        assert rest is not None and b.grantable_blocks() == 0
        b_held = b.pool.stats().held
        a.map_ahead(4 * bpp)  # wants more spares: only b's pages are left, and it takes none
        assert a._mapper.wait_idle(timeout=10)
        assert a.space.mapped_pages == mapped and b.pool.stats().held == b_held

        deadline = time.monotonic() + 10  # b asks (as its engine does on a shortfall): a's spares go
        while b.grantable_blocks() < 2 * bpp and time.monotonic() < deadline:
            b.prefetch(2 * bpp)
            time.sleep(0.01)
        more = b.allocator.alloc(2 * bpp)
        assert more is not None
        assert a.allocator.num_empty_mapped_pages() == 0 and b.pool.stats().held == b_held + 8
        a.allocator.free(step)
        b.allocator.free(rest + more)


def test_an_overdue_debt_names_the_requests_on_the_pages_fewest_of_them_share(monkeypatch):
    """Owed pages held by running requests: after the grace period the stack names the
    requests to preempt, the fewest that empty enough pages (a page shared with a request
    not chosen, or holding the null block, never counts), and once their blocks are free
    (cached ones spilled) paying takes the pages at once."""
    segment = f"/vmkv-{os.getuid()}-overdue{os.getpid()}"
    monkeypatch.setenv("VMKV_SEGMENT", segment)
    monkeypatch.setenv("VMKV_BUDGET", "32M")
    monkeypatch.setenv("VMKV_PAGE_BYTES", "1M")
    settings = StackSettings("a", "test", "tiny", spill=False, keep_free_pages=0, debt_grace_s=0.2)
    stack = KVStack(torch.device("cpu"), [64 << 10] * 4, 256, settings)  # 4 physical pages per KV page
    try:
        allocator, per_page = stack.allocator, stack.space.physical_per_page
        bpp = allocator.blocks_per_page
        on_page = {page: list(range(page * bpp, (page + 1) * bpp)) for page in range(4)}
        assert allocator.alloc(4 * bpp - 1) == [b for page in range(4) for b in on_page[page]][1:]
        holdings = {
            "head": on_page[0][1:4],  # beside the null block: its page never empties
            "a": on_page[1],
            "b": on_page[2][:3] + on_page[3][:-2],
            "c": on_page[2][3:],
        }
        cold = on_page[3][-2:] + on_page[0][4:]  # cached blocks no request uses
        stack.reclaimer.reclaim(2 * per_page)  # nothing idle: all of it is owed
        assert stack.pool.debt == 2 * per_page
        assert stack.overdue_kv_pages() == 0  # the requests may still finish on their own
        time.sleep(0.25)
        assert stack.overdue_kv_pages() == 2
        # Page 1 costs one request (a); page 3 one more (b, its cold blocks spill); page 2
        # would take b and c.
        assert holders_to_preempt(allocator, holdings, cold, 2) == ["a", "b"]
        assert holders_to_preempt(allocator, holdings, cold, 3) == ["a", "b", "c"]
        assert holders_to_preempt(allocator, holdings, cold, 4) == ["a", "b", "c"]  # page 0 cannot go
        assert holders_to_preempt(allocator, holdings, cold, 0) == []
        allocator.free(holdings["a"] + holdings["b"] + cold[:2])  # preempted; page 3's cold ones dropped
        stack.pay()
        assert stack.pool.debt == 0 and stack.overdue_kv_pages() == 0
        assert stack.space.mapped_pages == 2
    finally:
        stack.close()
        remove_segment(segment)


def test_a_shortfall_is_asked_for_in_one_go_so_the_holder_owes_it_at_once(monkeypatch):
    """b lacks three KV pages that a's running requests hold: one ask makes a owe all it
    holds above its fair share at once (one grace period, one preemption), not a page per
    ask."""
    with two_stacks(monkeypatch, "oneask", "32M") as (a, b):  # 8 KV pages; a fair share is 4
        per_page, bpp = a.space.physical_per_page, a.allocator.blocks_per_page
        running = a.allocator.alloc(a.grantable_blocks())  # a: 7 KV pages, all in use
        assert running is not None and a.pool.stats().held == 7 * per_page
        b.prefetch(3 * bpp)
        assert b._prefetcher.wait_idle(timeout=10)
        assert a.pool.debt == 3 * per_page  # what a holds above its fair share of 4
        a.allocator.free(running)


def test_on_a_device_backend_pages_emptied_by_the_engine_are_unmapped_on_the_stacks_thread(monkeypatch):
    """A device unmap waits for the device's queued work (counted by the ACL shim), so
    the stack does it on its own thread, never on the thread that freed the blocks."""
    segment = f"/vmkv-{os.getuid()}-unmapper{os.getpid()}"
    monkeypatch.setenv("VMKV_SEGMENT", segment)
    monkeypatch.setenv("VMKV_BACKEND", "acl")
    monkeypatch.setenv("VMKV_BUDGET", "64M")
    shim = ctypes.CDLL(os.environ["VMKV_ACL_LIBRARY"])
    settings = StackSettings("a", "test", "tiny", spill=False, keep_free_pages=0)
    stack = KVStack(torch.device("cpu"), [64 << 10] * 4, 2048, settings)
    try:
        allocator = stack.allocator
        blocks = allocator.alloc(2 * allocator.blocks_per_page)
        assert blocks is not None and stack.space.mapped_pages == 3
        threads, syncs = [], shim.vmkv_shim_device_syncs()
        unmap = stack.space.unmap_pages

        def recording_unmap(pages):
            threads.append(threading.current_thread().name)
            unmap(pages)

        stack.space.unmap_pages = recording_unmap
        allocator.free(blocks)
        deadline = time.monotonic() + 10
        while stack.space.mapped_pages > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stack.space.mapped_pages == 1 and threads == ["vmkv-unmapper"]
        assert shim.vmkv_shim_device_syncs() == syncs + 1  # one wait for the whole batch
        assert stack.pool.stats().in_use == stack.space.physical_per_page  # the memory went back
    finally:
        stack.close()
        remove_segment(segment)


def test_a_stack_that_cannot_be_built_leaves_no_instance_registered(monkeypatch):
    segment = f"/vmkv-{os.getuid()}-failstack{os.getpid()}"
    monkeypatch.setenv("VMKV_SEGMENT", segment)
    monkeypatch.setenv("VMKV_BUDGET", "8M")
    monkeypatch.setenv("VMKV_PAGE_BYTES", "1M")
    try:
        small = StackSettings("small", "test", "tiny", max_size="1K", spill=False)
        with pytest.raises(ValueError, match=r"a max of 1K is less than one KV page \(4194304 bytes\)"):
            KVStack(torch.device("cpu"), [64 << 10] * 4, 256, small)
        first = KVStack(
            torch.device("cpu"), [64 << 10] * 4, 256, StackSettings("a", "test", "tiny", spill=False)
        )
        try:  # b joins, then its allocator refuses a setting: its lease must go
            bad = StackSettings("b", "test", "tiny", spill=False, keep_free_pages=-1)
            with pytest.raises(ValueError, match="keep_free_pages must be >= 0"):
                KVStack(torch.device("cpu"), [64 << 10] * 4, 256, bad)
            assert [row["name"] for row in Segment.attach(segment).table.snapshot()] == ["a"]
            retry = KVStack(
                torch.device("cpu"), [64 << 10] * 4, 256, StackSettings("b", "test", "tiny", spill=False)
            )
            retry.close()
        finally:
            first.close()
    finally:
        remove_segment(segment)


def test_blocks_written_outside_the_allocator_get_their_pages_and_give_them_back(monkeypatch):
    """vLLM 0.26's warmup writes blocks no allocation handed out: map_blocks maps their
    pages from the budget, return_pages gives them back, and a budget that cannot hold
    them is a clear error with nothing taken."""
    with two_stacks(monkeypatch, "outside", "16M") as (a, b):
        bpp = a.allocator.blocks_per_page
        taken = a.map_blocks([1, bpp + 1, 2 * bpp])  # page 0 is mapped already
        assert taken == [1, 2] and a.space.mapped_pages == 3
        held = a.pool.stats().held
        with pytest.raises(RuntimeError, match="could not map the 1 KV pages that the engine writes"):
            b.map_blocks([bpp])  # the budget is full: both null pages and a's two
        assert b.space.mapped_pages == 1 and a.pool.stats().held == held
        a.return_pages(taken)
        assert a.space.mapped_pages == 1 and a.pool.stats().held == a.space.physical_per_page
        assert b.map_blocks([bpp]) == [1]


def test_an_idle_engines_free_blocks_count_as_reclaimable_but_its_pinned_pages(monkeypatch):
    with two_stacks(monkeypatch, "idle", "32M") as (a, _):
        bpp = a.allocator.blocks_per_page
        a.map_blocks(range(4 * bpp))  # four KV pages mapped, as an engine's free list holds
        a.report_reclaimable(10 * bpp, pinned_pages=1)  # more free than mapped: all but page 0
        assert a.reclaimer.engine_reclaimable == 3 * a.space.physical_per_page
        a.report_reclaimable(2 * bpp + bpp // 2)  # whole pages only
        assert a.reclaimer.engine_reclaimable == 2 * a.space.physical_per_page
        a.report_reclaimable(0)  # busy again
        assert a.reclaimer.engine_reclaimable == 0


def test_reclaiming_cold_blocks_while_the_engine_gives_pages_back_does_not_deadlock(monkeypatch):
    """Reclaim frees cold blocks with the allocator's lock held, which unmaps the pages
    they empty; the engine meanwhile gives empty pages back. Neither may wait for the
    other's lock while holding its own."""
    from vmkv.allocator.reclaim import ColdTier

    class SlowColdCache:  # an engine's prefix cache whose cold list takes a while
        def __init__(self, blocks: list[int]) -> None:
            self.blocks = blocks

        def cold_blocks(self) -> list[tuple[int, bytes | None]]:
            time.sleep(0.2)
            return [(block, None) for block in self.blocks]

        def evict(self, blocks) -> None:
            self.blocks = [block for block in self.blocks if block not in set(blocks)]

    with two_stacks(monkeypatch, "coldlock", "32M") as (a, _):
        bpp = a.allocator.blocks_per_page
        taken = a.allocator.alloc(3 * bpp)  # pages 0 to 2, and a block of page 3
        assert taken is not None
        cold = [block for block in taken if block // bpp == 2]  # page 2 holds only cold blocks
        a.reclaimer.cold.append(ColdTier(a.allocator, SlowColdCache(cold), None))
        reclaim = threading.Thread(target=a.reclaimer.reclaim, args=(a.space.physical_per_page,))
        reclaim.start()
        time.sleep(0.05)  # reclaim now holds the allocator's lock, reading the cold list
        engine = threading.Thread(target=a.give_back)
        engine.start()
        reclaim.join(timeout=10)
        engine.join(timeout=10)
        assert not reclaim.is_alive() and not engine.is_alive(), "reclaim and give_back deadlocked"
        assert not a.space.is_mapped(2) and a.pool.stats().debt == 0
