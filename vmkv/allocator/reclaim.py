"""Giving pages back when the coordinator asks, cheapest first.

1. pooled pages: already unmapped, released at once;
2. empty mapped KV pages: unmapped (one batched call) into the pool, then released;
3. cold cached blocks: through the spill tier, once the engine layer provides one.
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
        released = self._trim_pool(pages)
        for allocator in self.allocators:
            if released >= pages:
                break
            per_page = allocator.space.physical_per_page
            allocator.trim(-(-(pages - released) // per_page))
            released += self._trim_pool(pages - released)
        return released

    def _trim_pool(self, pages: int) -> int:
        pooled = self.pool.stats().pooled
        return self.pool.trim(keep=max(pooled - pages, 0))
