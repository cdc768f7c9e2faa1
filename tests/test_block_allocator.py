from __future__ import annotations

import ctypes
import os
import threading

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vmkv.allocator import NULL_BLOCK, BlockAllocator, KVSpace, PagePool
from vmkv.allocator.kv_space import blocks_are_outermost
from vmkv.vmm_ops import DriverError, open_vmm

PAGE = 64 * 1024
BLOCK_BYTES = 16 * 1024  # 4 blocks per page in each of the two buffers
NUM_BLOCKS = 40  # 10 KV pages
PHYSICAL_PAGES = 12  # room for 6 KV pages: misses happen


def make_allocator(keep_free_pages: int = 0, capacity_pages: int = PHYSICAL_PAGES):
    vmm = open_vmm("host", page_size=PAGE, host_capacity=capacity_pages * PAGE)
    space = KVSpace(PagePool(vmm), [BLOCK_BYTES, BLOCK_BYTES], NUM_BLOCKS)
    return vmm, space, BlockAllocator(space, keep_free_pages=keep_free_pages)


class AllocatorMachine(RuleBasedStateMachine):
    """The allocator against a set of owned ids, with each live block's bytes checked."""

    @initialize()
    def setup(self):
        self.vmm, self.space, self.allocator = make_allocator()
        self.views = [self.space.tensor(i, torch.int64, (NUM_BLOCKS, BLOCK_BYTES // 8)) for i in range(2)]
        self.owned: set[int] = set()
        self.serial = 0
        self.stamp: dict[int, int] = {}

    def teardown(self):
        if hasattr(self, "vmm"):
            self.views = []
            self.vmm.close()

    def snapshot(self):
        return (self.allocator.stats(), self.vmm.stats(), self.allocator.num_free_blocks())

    def free_mapped_in_model(self) -> int:
        mapped = sum(self.space.is_mapped(p) for p in range(self.space.num_pages))
        return mapped * self.space.blocks_per_page - len(self.owned) - 1

    @rule(count=st.integers(1, 12))
    def alloc(self, count):
        free_mapped = self.free_mapped_in_model()
        before = self.snapshot()
        blocks = self.allocator.alloc(count)
        if blocks is None:
            assert count > free_mapped, "missed although mapped pages had room"
            after = self.snapshot()
            assert after[0].misses == before[0].misses + 1
            assert (after[0].used_blocks, after[0].mapped_pages) == (
                before[0].used_blocks,
                before[0].mapped_pages,
            )
            return
        assert len(blocks) == count == len(set(blocks))
        assert NULL_BLOCK not in blocks
        assert not self.owned & set(blocks)
        for block in blocks:
            self.serial += 1
            self.stamp[block] = self.serial
            for view in self.views:
                view[block] = self.serial
        self.owned |= set(blocks)

    @precondition(lambda self: self.owned)
    @rule(data=st.data())
    def free(self, data):
        victims = data.draw(st.lists(st.sampled_from(sorted(self.owned)), min_size=1, unique=True))
        self.allocator.free(victims)
        self.owned -= set(victims)

    @rule(data=st.data())
    def bad_free(self, data):
        never = [b for b in range(NUM_BLOCKS) if b not in self.owned and b != NULL_BLOCK]
        choices = [[NULL_BLOCK], [NUM_BLOCKS], [-1], ["3"]]
        if never:
            choices.append([data.draw(st.sampled_from(never))])
        if self.owned:
            some = data.draw(st.sampled_from(sorted(self.owned)))
            choices.append([some, some])
            if never:  # a good id first, then a bad one: nothing may be freed
                choices.append([some, never[0]])
        bad = data.draw(st.sampled_from(choices))
        before = self.snapshot()
        with pytest.raises(ValueError):
            self.allocator.free(bad)
        assert self.snapshot() == before

    @rule(count=st.sampled_from([0, -3, True, 2.5]))
    def bad_alloc(self, count):
        before = self.snapshot()
        with pytest.raises(ValueError):
            self.allocator.alloc(count)
        assert self.snapshot() == before

    @invariant()
    def accounting_matches_model(self):
        if not hasattr(self, "allocator"):
            return
        stats = self.allocator.stats()
        assert stats.used_blocks == len(self.owned)
        bpp = self.space.blocks_per_page
        expected_pages = {0} | {b // bpp for b in self.owned}
        mapped = {p for p in range(self.space.num_pages) if self.space.is_mapped(p)}
        assert mapped == expected_pages  # a page goes back exactly when all its blocks are free
        assert self.vmm.stats()["mapped"] == len(mapped) * self.space.physical_per_page
        assert stats.free_mapped_blocks == len(mapped) * bpp - len(self.owned) - 1
        for block in range(NUM_BLOCKS):
            assert self.allocator.is_allocated(block) == (block in self.owned or block == NULL_BLOCK)

    @invariant()
    def live_data_intact(self):
        if not hasattr(self, "allocator"):
            return
        for block in self.owned:
            for view in self.views:
                assert int(view[block, 0]) == self.stamp[block]
                assert int(view[block, -1]) == self.stamp[block]


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_best_fit_fills_the_fullest_page_first():
    vmm, _space, allocator = make_allocator(capacity_pages=20)
    blocks = allocator.alloc(15)  # pages 0..3 (block 0 is the null block)
    assert sorted(blocks) == list(range(1, 16))
    allocator.free([13, 14, 15])  # page 3: 1 used, 3 free
    allocator.free([6])  # page 1: 1 free
    assert allocator.alloc(1) == [6]
    assert allocator.alloc(2) == [13, 14]
    vmm.close()


def test_pages_return_only_when_empty_and_spares_are_kept():
    vmm, space, allocator = make_allocator(keep_free_pages=1, capacity_pages=20)
    blocks = allocator.alloc(11)  # pages 0, 1, 2
    assert space.mapped_pages == 3
    allocator.free(blocks[3:10])  # page 1 empty; page 2 keeps block 11
    assert space.mapped_pages == 3  # page 1 is the one spare
    allocator.free([blocks[10]])
    assert space.mapped_pages == 2  # page 2 went back, page 1 stays as the spare
    assert allocator.trim() == 1
    assert space.mapped_pages == 1
    stats = allocator.stats()
    assert (stats.used_blocks, stats.free_mapped_blocks) == (3, 0)
    assert stats.fragmentation == 0.0
    vmm.close()


def test_pages_freed_with_a_retirement_hook_unmap_only_when_asked_and_off_the_lock():
    """With ``on_retired`` set (a device stack: an unmap waits for the device), a page
    that empties leaves the free lists at once but is unmapped only by unmap_retired,
    which holds the allocator's lock only around its bookkeeping."""
    vmm, space, allocator = make_allocator(capacity_pages=20)
    calls = []
    allocator.on_retired = lambda: calls.append(allocator.stats().mapped_pages)
    blocks = allocator.alloc(8)  # pages 0, 1, 2
    free_before = allocator.num_free_blocks()
    allocator.free(blocks[3:7])  # page 1 empties
    assert calls == [3] and space.mapped_pages == 3  # told, not yet unmapped
    assert allocator.num_free_blocks() == free_before  # not free while on its way out
    assert allocator.alloc(1) == [blocks[7] + 1]  # new blocks go elsewhere
    unmap, lock_free = space.unmap_pages, []

    def take_and_release() -> None:
        if allocator.lock.acquire(timeout=2):
            allocator.lock.release()
            lock_free.append(True)

    def unmap_probing_the_lock(pages):  # can another thread (the engine) take the lock now?
        probe = threading.Thread(target=take_and_release)
        probe.start()
        probe.join()
        unmap(pages)

    space.unmap_pages = unmap_probing_the_lock
    allocator.unmap_retired()
    assert lock_free == [True]
    assert space.mapped_pages == 2 and not space.is_mapped(1)
    assert allocator.num_free_blocks() == free_before - 1 + 4
    assert allocator.alloc(4) is not None and space.mapped_pages == 3  # page 1 maps again
    vmm.close()


def test_pages_an_unmap_failed_to_free_are_retried_and_the_rest_can_map_again():
    """Over the ACL shim, whose unmaps fail on request: a driver error part-way through
    unmapping retired pages leaves the ones it unmapped ready to map again and the rest
    retiring, and the next unmap_retired finishes them; no page is lost."""
    shim = ctypes.CDLL(os.environ["VMKV_ACL_LIBRARY"])
    vmm = open_vmm("acl", page_size=2 << 20)
    try:
        space = KVSpace(PagePool(vmm), [512 << 10, 512 << 10], 16)  # 4 blocks a page, 2 physical
        allocator = BlockAllocator(space)
        allocator.on_retired = lambda: None  # unmap only when the test says
        blocks = allocator.alloc(15)  # every page
        free_blocks = allocator.num_free_blocks()
        allocator.free(blocks[3:15])  # pages 1, 2, 3 retire
        shim.vmkv_shim_fail_unmaps_after(3)  # page 1, half of page 2
        with pytest.raises(DriverError, match="injected"):
            allocator.unmap_retired()
        shim.vmkv_shim_fail_unmaps_after(-1)
        assert [space.is_mapped(page) for page in range(4)] == [True, False, True, True]
        assert allocator.num_free_blocks() == free_blocks + 4  # page 1 can be had again
        allocator.unmap_retired()
        assert space.mapped_pages == 1 and allocator.num_free_blocks() == free_blocks + 12
        assert vmm.stats()["mapped"] == 2
        assert allocator.alloc(12) is not None and space.mapped_pages == 4
    finally:
        shim.vmkv_shim_fail_unmaps_after(-1)
        vmm.close()


def test_pages_a_map_failed_to_back_are_not_lost():
    """Over the ACL shim, whose maps fail on request: a driver error while mapping a page
    (for an allocation, or ahead of one) leaves it unmapped and free to map again."""
    shim = ctypes.CDLL(os.environ["VMKV_ACL_LIBRARY"])
    vmm = open_vmm("acl", page_size=2 << 20)
    try:
        space = KVSpace(PagePool(vmm), [512 << 10, 512 << 10], 16)  # 4 blocks a page, 2 physical
        allocator = BlockAllocator(space)
        free_blocks = allocator.num_free_blocks()
        for fail in (lambda: allocator.alloc(4), lambda: allocator.map_ahead(2)):
            shim.vmkv_shim_fail_maps_after(1)  # the second physical page of the first KV page
            with pytest.raises(DriverError, match="injected"):
                fail()
            shim.vmkv_shim_fail_maps_after(-1)
            assert space.mapped_pages == 1 and allocator.num_free_blocks() == free_blocks
        assert allocator.alloc(15) is not None and space.mapped_pages == 4  # every page maps again
    finally:
        shim.vmkv_shim_fail_maps_after(-1)
        vmm.close()


def test_map_ahead_maps_pages_while_the_engine_keeps_allocating():
    """The driver calls of a map ahead run without the allocator's lock: the engine
    allocates from mapped pages meanwhile, and the pages then serve allocations as they are."""
    vmm, space, allocator = make_allocator(capacity_pages=20)
    original = space.map_pages
    seen_during_map: list[list[int] | None] = []

    def map_pages_watched(pages):
        # Another thread (the engine) allocates while this map is in flight.
        result: list = []
        engine = threading.Thread(target=lambda: result.append(allocator.alloc(2)))
        engine.start()
        engine.join(timeout=5)
        seen_during_map.append(result[0] if result else None)
        return original(pages)

    space.map_pages = map_pages_watched
    assert allocator.map_ahead(3) == 3
    space.map_pages = original
    assert seen_during_map[0] is not None and len(seen_during_map[0]) == 2  # not blocked by the map
    assert space.mapped_pages == 4 and allocator.num_empty_mapped_pages() == 3
    mapped = space.mapped_pages
    more = allocator.alloc(3 * 4)  # three pages' worth: served by the pages mapped ahead
    assert more is not None and space.mapped_pages == mapped
    allocator.free(more + seen_during_map[0])
    assert space.mapped_pages == 1  # keep_free_pages=0: the empty pages went back
    assert allocator.map_ahead(100) == 9 and space.mapped_pages == 10  # every page there is
    assert allocator.map_ahead(1) == 0
    vmm.close()


def test_a_map_ahead_past_the_memory_there_is_maps_nothing():
    vmm, space, allocator = make_allocator()  # memory for 6 of the 10 KV pages
    assert allocator.map_ahead(6) == 0 and space.mapped_pages == 1
    assert allocator.num_free_blocks() == NUM_BLOCKS - 1  # the pages went back to the heap
    assert allocator.map_ahead(5) == 5
    assert allocator.alloc(4 * 5 + 3) is not None and space.mapped_pages == 6
    vmm.close()


def test_held_spares_stay_mapped_until_the_hold_ends():
    vmm, space, allocator = make_allocator(capacity_pages=20)
    assert allocator.spares_wanted() == 0
    allocator.hold_spares(2, 60.0)
    assert allocator.spares_wanted() == 2
    blocks = allocator.alloc(12)  # pages 0 (with the null block), 1, 2 and one block of 3
    allocator.free(blocks)
    assert allocator.num_empty_mapped_pages() == 2  # the hold keeps two of the three
    assert allocator.spares_wanted() == 0
    allocator.hold_spares(1, 60.0)  # a smaller hold while one runs does not shrink it
    allocator.free(allocator.alloc(1))
    assert allocator.num_empty_mapped_pages() == 2
    allocator.hold_spares(0, 0.0)  # the hold ends: back to keep_free_pages (0)
    allocator.free(allocator.alloc(1))
    assert allocator.num_empty_mapped_pages() == 0 and space.mapped_pages == 1
    vmm.close()


def test_free_capacity_and_null_block():
    vmm, _space, allocator = make_allocator(capacity_pages=40)
    assert allocator.num_free_blocks() == NUM_BLOCKS - 1
    assert allocator.is_allocated(NULL_BLOCK)
    assert allocator.alloc(NUM_BLOCKS) is None
    everything = allocator.alloc(NUM_BLOCKS - 1)
    assert sorted(everything) == list(range(1, NUM_BLOCKS))
    assert allocator.alloc(1) is None
    assert allocator.stats().misses == 2
    with pytest.raises(ValueError, match="null block"):
        allocator.free([NULL_BLOCK])
    vmm.close()


def test_an_engine_block_count_short_of_whole_pages_is_never_exceeded():
    # vLLM picks its block count before vmkv rounds the space up to whole pages.
    vmm = open_vmm("host", page_size=PAGE, host_capacity=64 * PAGE)
    try:
        space = KVSpace(PagePool(vmm), [BLOCK_BYTES, BLOCK_BYTES], 38)
        assert space.capacity_blocks == 40
        allocator = BlockAllocator(space, num_blocks=38)
        assert allocator.num_free_blocks() == 37  # all but the null block
        blocks = allocator.alloc(37)
        assert blocks is not None and max(blocks) == 37 and len(set(blocks)) == 37
        assert allocator.alloc(1) is None  # a miss, not block 38
        allocator.free(blocks)
        assert allocator.num_free_blocks() == 37
        assert allocator.stats().mapped_pages == 1  # the short last page went back too
        with pytest.raises(ValueError, match=r"num_blocks must be in \[1, 40\], got 41"):
            BlockAllocator(space, num_blocks=41)
    finally:
        vmm.close()


def test_alloc_up_to_takes_what_mapped_pages_hold_when_no_page_can_be_mapped():
    vmm, _space, allocator = make_allocator(capacity_pages=4)  # room for 2 KV pages
    try:
        first = allocator.alloc(5)  # pages 0 and 1: 2 blocks left on them
        assert first is not None
        assert allocator.alloc(3) is None  # would need a third KV page
        more = allocator.alloc_up_to(3)
        assert len(more) == 2 and not set(more) & set(first)
        assert allocator.alloc_up_to(1) == []
        assert allocator.stats().misses == 3  # each failed attempt to map counts
    finally:
        vmm.close()


def test_take_pages_maps_the_pages_named_and_gives_them_back():
    vmm, space, allocator = make_allocator(capacity_pages=6)  # room for 3 KV pages
    try:
        assert allocator.take_pages([2, 1]) == [1, 2]
        assert all(allocator.is_allocated(b) for b in range(4, 12)) and space.mapped_pages == 3
        before = allocator.stats()
        for bad, message in [
            ([0], "out of range"),
            ([10], "out of range"),
            (["3"], "not an integer"),
        ]:
            with pytest.raises(ValueError, match=message):
                allocator.take_pages(bad)
        assert allocator.take_pages([1]) == []  # taken already: its blocks live, it is left as it is
        assert allocator.take_pages([3]) is None  # no memory left: a miss, nothing changed
        after = allocator.stats()
        assert (after.mapped_pages, after.used_blocks, after.misses) == (
            3,
            before.used_blocks,
            before.misses + 1,
        )
        assert allocator.alloc(3) == [1, 2, 3]  # the null block's page, then nothing else was free
        allocator.free_pages([1, 2])
        assert space.mapped_pages == 1
        assert sorted(allocator.alloc(4)) == [4, 5, 6, 7]  # page 1 is mapped again from the heap
    finally:
        vmm.close()


def test_blocks_are_outermost_tells_page_mappable_layouts():
    raw = torch.zeros(8 * 4 * 16 * 32, dtype=torch.bfloat16)  # 8 blocks
    # FlashAttention 3 on vLLM 0.26: logical (B, H, N, 2D), stored as (B, N, H, 2D)
    fa = raw.view(8, 16, 4, 32).permute(0, 2, 1, 3)
    assert blocks_are_outermost(fa, 8)
    assert blocks_are_outermost(raw.view(16, 4, 16, 16), 8)  # a kernel splitting blocks in two
    assert not blocks_are_outermost(raw.view(2, 8, 16, 4, 16), 8)  # K and V halves: (2, B, ...)
    assert not blocks_are_outermost(raw.view(8, 4, 16, 32)[:4], 4)  # a view of part of the buffer


def test_a_block_named_twice_never_makes_a_page_look_emptiable():
    _, _, allocator = make_allocator()
    blocks = allocator.alloc(3)  # blocks 1, 2, 3 on page 0, with the null block
    more = allocator.alloc(2)  # on page 1, with room for two more
    assert blocks is not None and more is not None
    page = more[0] // allocator.blocks_per_page
    assert allocator.pages_only_holding([more[0], more[0]]) == {}  # the other block lives there
    assert allocator.pages_only_holding([more[0], more[1], more[0]]) == {page: sorted(more)}


def test_paged_ids_shrink_by_distinct_free_ids_and_refuse_what_is_not_an_id():
    """An engine's free list (SGLang's) is its own; vmkv releases a page only when every
    one of its ids is free, however often the list names one."""
    from vmkv.allocator.paged_ids import PagedIds

    _, space, allocator = make_allocator()
    ids = PagedIds(allocator, "cpu")
    fresh = ids.grow(2 * ids.ids_per_page)  # two KV pages of ids: 4..11
    assert fresh is not None and fresh.tolist() == list(range(4, 12))
    view = space.tensor(0, torch.uint8, (NUM_BLOCKS, BLOCK_BYTES))
    handed_out = [5, 6, 7]  # page 1 is in use but for id 4, named four times
    left = ids.shrink(torch.tensor([4, 4, 4, 4, 8, 9, 10, 11]))
    assert left.tolist() == [4, 4, 4, 4] and space.mapped_pages == 2  # page 2 went, page 1 stays
    for block in handed_out:
        view[block].fill_(block)  # an unmapped page would kill the process here
    assert all(int(view[block][0]) == block for block in handed_out)
    for bad, message in (
        (torch.tensor([4.0, 5.0]), "1-D integer tensor"),
        (torch.tensor([[4, 5]]), "1-D integer tensor"),
        (torch.tensor([4, -1]), r"from -1 to 4, outside 0\.\.39"),
        (torch.tensor([4, NUM_BLOCKS]), r"from 4 to 40, outside 0\.\.39"),
    ):
        with pytest.raises(ValueError, match=message):
            ids.shrink(bad)
    assert space.mapped_pages == 2
    assert ids.shrink(torch.tensor([4, 5, 6, 7])).tolist() == [] and space.mapped_pages == 1


def test_take_pages_takes_an_empty_page_kept_mapped_so_nothing_hands_it_out_or_unmaps_it():
    """A page emptied but kept mapped (keep_free_pages) still belongs to the allocator:
    blocks written outside it there must not be handed out, nor their page unmapped."""
    vmm, space, allocator = make_allocator(keep_free_pages=2)
    try:
        blocks = allocator.alloc(8)  # pages 0 and 1 (the null block's page holds 3 more)
        assert blocks is not None and space.mapped_pages >= 2
        allocator.free([b for b in blocks if b >= 4])  # page 1 empties and stays mapped
        assert space.is_mapped(1) and allocator.live_blocks(1) == 0
        assert allocator.take_pages([1]) == [1]
        view = space.tensor(0, torch.uint8, (NUM_BLOCKS, BLOCK_BYTES))
        view[4:8].fill_(9)  # the engine writes blocks 4..7
        assert not set(allocator.alloc(4) or []) & {4, 5, 6, 7}
        allocator.trim()
        assert space.is_mapped(1) and int(view[4:8].min()) == 9  # still mapped, still written
        allocator.free_pages([1])
    finally:
        vmm.close()
