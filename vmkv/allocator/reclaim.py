"""Giving pages back when the coordinator asks, cheapest first.

1. pooled pages: already unmapped, released at once;
2. empty mapped KV pages: unmapped (one batched call) into the pool, then released;
3. pages holding only cold blocks (cached by the engine, used by no request): their
   blocks are copied to the spill tier, dropped from the engine's cache and freed, which
   empties the pages. A later prefix hit reloads them from the host;
4. what is still owed: paid by the pool as the engine frees blocks; engines that must
   free memory on their own thread are told (``on_debt``) and pay it there. A debt
   left unpaid too long makes the engine preempt the running requests on the pages
   that the fewest of them share (``holders_to_preempt``), and ``pay`` again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from vmkv.allocator.block_allocator import BlockAllocator
from vmkv.allocator.page_pool import PagePool

log = logging.getLogger(__name__)

BlockHash = bytes | int | str
H = TypeVar("H")


class ColdCache(Protocol):
    """An engine's prefix cache as reclaim sees it. Both calls are made with the
    allocator's lock held; the engine layer holds the same lock while it changes which
    blocks are cached or referenced."""

    def cold_blocks(self) -> Sequence[tuple[int, BlockHash | None]]:
        """(block, hash) of cached blocks no request uses, coldest first. A None hash:
        the block may be dropped but not spilled (nothing could find it again)."""
        ...

    def evict(self, blocks: Sequence[int]) -> None:
        """Forget these blocks: they are freed right after, and their data goes."""
        ...


class Waitable(Protocol):
    def wait(self) -> None: ...


class Spill(Protocol):
    """Where cold blocks go before their pages are released (a SpillStore)."""

    def store(self, keys: Sequence[BlockHash], blocks: Sequence[int]) -> Waitable: ...


@dataclass
class ColdTier:
    """One allocator's cold blocks, and the spill store that keeps them (None: dropped)."""

    allocator: BlockAllocator
    cache: ColdCache
    spill: Spill | None = None


class Reclaimer:
    """Serves reclaim requests for one pool and the allocators drawing on it."""

    def __init__(
        self, pool: PagePool, allocators: Sequence[BlockAllocator] = (), cold: Sequence[ColdTier] = ()
    ) -> None:
        self.pool = pool
        self.allocators = list(allocators)
        self.cold = list(cold)
        self.spilled_blocks = 0
        self.dropped_blocks = 0  # cold blocks evicted without a copy (the tier was full)
        # Called when a reclaim leaves pages owed: for engines whose free memory and cold
        # cache only their own thread may touch (SGLang's scheduler); they pay it there.
        self.on_debt: list[Callable[[], None]] = []
        # What such an engine last said it could pay that way at once (physical pages).
        self.engine_reclaimable = 0

    def reclaimable(self) -> int:
        """Physical pages that could go back without touching a block a request uses:
        the coordinator lets any instance have them, whatever the shares."""
        empty = sum(a.num_empty_mapped_pages() * a.space.physical_per_page for a in self.allocators)
        cold = 0
        for tier in self.cold:
            with tier.allocator.lock:
                pages = tier.allocator.pages_only_holding(b for b, _ in tier.cache.cold_blocks())
            cold += len(pages) * tier.allocator.space.physical_per_page
        return self.pool.stats().pooled + empty + cold + self.engine_reclaimable

    def owed(self) -> int:
        return self.pool.stats().debt

    def payable(self) -> int:
        """Pages this instance could still promise: all it holds but what it owes already
        and each allocator's null-block page, which is never released. A promise beyond it
        could never be kept: the instance would owe forever, admitting nothing."""
        stats = self.pool.stats()
        pinned = sum(a.space.physical_per_page for a in self.allocators)
        return max(0, stats.held - pinned - stats.debt)

    def reclaim(self, pages: int) -> int:
        """Release up to ``pages`` now; what cannot go now is owed by the pool and paid as
        soon as blocks are freed, so the instance does not reuse pages others wait for.
        Returns how many pages went back during this call."""
        owed_before = self.pool.stats().debt
        self.pool.owe(pages)
        self.pay()
        if self.pool.stats().debt:
            for notify in self.on_debt:
                notify()
        return owed_before + pages - self.pool.stats().debt

    def pay(self) -> None:
        """Pay what is owed from what no running request uses: empty mapped pages, then
        pages of cold cached blocks (spilled first). Reclaim calls it when asked; an engine
        calls it again after preempting requests to pay (their blocks are cold then)."""
        for allocator in self.allocators:
            if (debt := self.pool.stats().debt) == 0:
                return
            allocator.trim(-(-debt // allocator.space.physical_per_page))  # unmapped pages pay it
        for tier in self.cold:
            if (debt := self.pool.stats().debt) == 0:
                return
            self._spill_cold_pages(tier, -(-debt // tier.allocator.space.physical_per_page))

    def _spill_cold_pages(self, tier: ColdTier, kv_pages: int) -> None:
        """Spill the cold blocks of ``kv_pages`` pages: first pages holding only cold blocks,
        coldest first (their pages go back at once), then the pages with the fewest live
        blocks. Those still hold blocks of running requests and cannot go yet; but with
        their cached blocks freed, the allocator's best fit (fullest page first) leaves them
        for last, and they empty as those requests finish. Without this, running requests
        keep reusing cached blocks all over the instance's pages, and no page ever empties
        to pay the debt."""
        allocator = tier.allocator
        with allocator.lock:
            cold = tier.cache.cold_blocks()
            by_page: dict[int, list[int]] = {}
            warmest: dict[int, int] = {}  # a page is as warm as its warmest cold block
            for rank, (block, _) in enumerate(cold):
                page = block // allocator.blocks_per_page
                by_page.setdefault(page, []).append(block)
                warmest[page] = rank
            live = {page: allocator.live_blocks(page) - len(blocks) for page, blocks in by_page.items()}
            victims = sorted(by_page, key=lambda page: (live[page], warmest[page]))[:kv_pages]
            self._spill(tier, [block for page in victims for block in by_page[page]], dict(cold))
            allocator.trim(sum(1 for page in victims if live[page] == 0))

    def _spill(self, tier: ColdTier, blocks: list[int], hashes: dict[int, BlockHash | None]) -> None:
        """Copy ``blocks`` (cold, with their ``hashes``) to the spill tier, then drop them
        from the engine's cache and free them. Called with the allocator's lock held."""
        if not blocks:
            return
        keyed = [b for b in blocks if hashes[b] is not None] if tier.spill is not None else []
        if keyed:
            # Kernels queued before a block was freed may still be writing it (its request's
            # last step, when the engine schedules ahead): copy what they leave.
            self.pool.vmm.synchronize()
            try:
                tier.spill.store([hashes[b] for b in keyed], keyed).wait()
                self.spilled_blocks += len(keyed)
            except RuntimeError as error:  # a full tier: the blocks are dropped, as without spill
                log.warning("spilling %d cold blocks failed (%s); dropping them", len(keyed), error)
                keyed = []
        self.dropped_blocks += len(blocks) - len(keyed)
        tier.cache.evict(blocks)
        tier.allocator.free(blocks)


def holders_to_preempt(
    allocator: BlockAllocator, holdings: Mapping[H, Collection[int]], cold: Collection[int], pages: int
) -> list[H]:
    """Which holders of blocks (an engine's running requests) to preempt so that ``pages``
    KV pages empty, the fewest holders first.

    An instance that owes pages pays as its blocks free, but its running requests' blocks
    lie on every page it holds: waiting for them to finish hands memory over only as
    fast as its longest requests. Preempting the requests on the pages that the fewest
    requests share empties those pages at once (their tokens are computed again later,
    and the cached ones come back from the spill tier). A page counts only if every
    allocated block on it belongs to the chosen holders or is ``cold`` (a cached block no
    request uses: reclaim spills those); the null block's page never does. Returns the
    holders in ``holdings``' order; fewer pages than asked when no more can be emptied."""
    if pages <= 0:
        return []
    holders_on: dict[int, set[H]] = {}
    for holder, blocks in holdings.items():
        for block in blocks:
            holders_on.setdefault(block // allocator.blocks_per_page, set()).add(holder)
    held = {block for blocks in holdings.values() for block in blocks}
    emptiable = allocator.pages_only_holding(held | set(cold))
    chosen: set[H] = set()
    remaining = {page: holders_on.get(page, set()) for page in emptiable}

    def emptied() -> int:
        return sum(1 for holders in remaining.values() if holders <= chosen)

    while emptied() < pages:
        open_pages = [page for page, holders in remaining.items() if not holders <= chosen]
        if not open_pages:
            break
        # The page that adds the fewest new victims, then the one with the fewest blocks.
        cheapest = min(open_pages, key=lambda p: (len(remaining[p] - chosen), len(emptiable[p]), p))
        chosen |= remaining[cheapest]
    return [holder for holder in holdings if holder in chosen]
