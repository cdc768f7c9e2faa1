"""From physical pages to KV tensors and block ids: a page pool per device, KV spaces
(per-layer virtual buffers backed on demand) and a page-aware block allocator."""

from vmkv.allocator.block_allocator import NULL_BLOCK, AllocatorStats, BlockAllocator
from vmkv.allocator.kv_space import KVSpace
from vmkv.allocator.page_pool import PagePool, PoolStats

__all__ = ["NULL_BLOCK", "AllocatorStats", "BlockAllocator", "KVSpace", "PagePool", "PoolStats"]
