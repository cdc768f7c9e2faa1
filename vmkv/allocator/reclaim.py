"""Giving pages back when the coordinator asks, cheapest first.

1. pooled pages: already unmapped, released at once;
2. empty mapped KV pages: unmapped (one batched call) into the pool, then released;
3. what is still owed: paid by the pool as the engine frees blocks;
4. cold cached blocks: through the spill tier, once the engine layer provides one.
"""

from __future__ import annotations

from collections.abc import Sequence

from vmkv.allocator.block_allocator import BlockAllocator
from vmkv.allocator.page_pool import PagePool


class Reclaimer:
    """Serves reclaim requests for one pool and the allocators drawing on it."""

    def __init__(self, pool: PagePool, allocators: Sequence[BlockAllocator] = ()) -> None:
        self.pool = pool
        self.allocators = list(allocators)

    def reclaimable(self) -> int:
        """Physical pages that could go back without touching a live block."""
        empty = sum(a.num_empty_mapped_pages() * a.space.physical_per_page for a in self.allocators)
        return self.pool.stats().pooled + empty

    def reclaim(self, pages: int) -> int:
        """Release up to ``pages`` now; what cannot go now is owed by the pool and paid as
        soon as blocks are freed, so the instance does not reuse pages others wait for.
        Returns how many pages went back during this call."""
        owed_before = self.pool.stats().debt
        self.pool.owe(pages)
        for allocator in self.allocators:
            debt = self.pool.stats().debt
            if debt == 0:
                break
            allocator.trim(-(-debt // allocator.space.physical_per_page))  # unmapped pages pay it
        return owed_before + pages - self.pool.stats().debt
