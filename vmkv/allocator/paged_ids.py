"""Engine ids handed out by the engine's own free list, backed a KV page at a time.

SGLang keeps its free token slots (or pages) in a device tensor and hands them out with
its own kernels; per-id bookkeeping in Python would cost more than its whole allocator.
So here the engine keeps its free list, and vmkv decides only which ids enter it and
which leave: id ``i`` is block ``i`` of the KV space, and ids enter and leave a whole KV
page at a time. The list grows by the ids of freshly mapped pages when the engine runs
short, and shrinks by the ids of pages whose every id is free when memory must go back.

Id 0 is the engine's padding slot and vmkv's null block: page 0 stays mapped, and its
other ids are free from the start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vmkv.allocator.block_allocator import BlockAllocator

if TYPE_CHECKING:
    import torch


class PagedIds:
    """Grows and shrinks an engine's free id list by whole KV pages of ``allocator``."""

    def __init__(self, allocator: BlockAllocator, device: torch.device | str) -> None:
        import torch

        self.allocator = allocator
        self.device = torch.device(device)
        self.ids_per_page = allocator.blocks_per_page
        self.num_pages = allocator.space.num_pages
        first = allocator.page_blocks(0)
        rest = allocator.alloc(len(first) - 1) if len(first) > 1 else []
        if rest is None or sorted(rest) != list(first)[1:]:
            raise RuntimeError("PagedIds needs a fresh allocator: page 0 was already in use")
        # ids per page, so that shrink can tell a wholly free page (the last may be short)
        sizes = [len(allocator.page_blocks(page)) for page in range(self.num_pages)]
        self._page_sizes = torch.tensor(sizes, dtype=torch.int64, device=self.device)
        self._page_sizes[0] = -1  # page 0 never leaves
        self._grown: set[int] = set()
        self._total_ids = sum(sizes) - 1  # all but id 0
        self._listed_ids = len(first) - 1  # in the engine's list or handed out

    def initial(self) -> torch.Tensor:
        """The free ids the engine starts with: page 0's, but for id 0."""
        import torch

        return torch.arange(1, len(self.allocator.page_blocks(0)), dtype=torch.int64, device=self.device)

    def grow(self, ids: int) -> torch.Tensor | None:
        """The ids of enough fresh KV pages to hold ``ids`` more, or None when the pages
        cannot be had (the lease is exhausted): a miss the engine handles."""
        import torch

        if ids <= 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        pages = self.allocator.alloc_pages(-(-ids // self.ids_per_page))
        if pages is None:
            return None
        self._grown.update(pages)
        blocks = [self.allocator.page_blocks(page) for page in pages]
        self._listed_ids += sum(len(b) for b in blocks)
        return torch.cat([torch.arange(b.start, b.stop, dtype=torch.int64) for b in blocks]).to(self.device)

    def shrink(self, free_ids: torch.Tensor) -> torch.Tensor:
        """Release the pages whose every id is in ``free_ids``; returns the free ids left.
        An id listed twice counts once: a page some of whose ids are still handed out
        never goes, whatever the list holds. ValueError for a list that is not ids."""
        import torch

        if free_ids.dtype.is_floating_point or free_ids.dtype.is_complex or free_ids.dim() != 1:
            raise ValueError(
                f"free ids must be a 1-D integer tensor, not {free_ids.dtype} {tuple(free_ids.shape)}"
            )
        if free_ids.numel():
            low, high = (int(bound) for bound in torch.aminmax(free_ids))
            if low < 0 or high > self._total_ids:
                raise ValueError(f"free ids run from {low} to {high}, outside 0..{self._total_ids}")
        distinct = torch.unique(free_ids)
        counts = torch.bincount(distinct // self.ids_per_page, minlength=self.num_pages)
        page_of = free_ids // self.ids_per_page
        whole = torch.nonzero(counts == self._page_sizes).flatten().tolist()
        if not whole:
            return free_ids
        released = torch.tensor(whole, dtype=torch.int64, device=free_ids.device)
        remaining = free_ids[~torch.isin(page_of, released)]
        self.allocator.free_pages(whole)
        self._grown.difference_update(whole)
        self._listed_ids -= int(self._page_sizes[released].sum())
        return remaining

    def release_all(self) -> None:
        """Release every page but page 0: for an engine whose ids are all free again (its
        free list is then :meth:`initial`)."""
        self.allocator.free_pages(sorted(self._grown))
        self._grown.clear()
        self._listed_ids = len(self.allocator.page_blocks(0)) - 1

    def unlisted(self) -> int:
        """How many ids are neither in the engine's list nor handed out: those of the
        pages vmkv has not given it (or took back)."""
        return self._total_ids - self._listed_ids
