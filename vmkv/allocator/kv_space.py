"""KV space: one engine's KV buffers in a single virtual reservation, backed page by page.

Layout is per buffer (e.g. per layer × {K, V}): buffer ``i`` is a contiguous array of
``capacity_blocks`` blocks of ``block_bytes[i]`` bytes, exactly the array the engine
would have allocated itself, so attention kernels see the shapes and strides they expect.
kvcached's compound layout (one page spanning all layers) costs 31% throughput because
consecutive blocks of one layer land on different pages; here a layer's blocks are
contiguous.

A *KV page* is the unit of backing: KV page ``p`` covers blocks
``[p * blocks_per_page, (p + 1) * blocks_per_page)`` in every buffer, i.e. one chunk of
each buffer at the same block offset. Mapping it takes one physical page per
granularity-sized piece of every chunk, all in one batched driver call.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmkv.allocator.page_pool import PagePool
from vmkv.allocator.tensors import tensor_at

if TYPE_CHECKING:
    import torch


def blocks_are_outermost(tensor: torch.Tensor, num_blocks: int) -> bool:
    """Whether every block of ``tensor``, a view of one whole KV buffer, is one contiguous
    slice of it, as page-wise mapping requires: the dimension with the largest stride
    indexes blocks (``num_blocks`` or a multiple, for kernels that split blocks) and spans
    the buffer."""
    if tensor.dim() == 0:
        return False
    dim = max(range(tensor.dim()), key=tensor.stride)
    blocks, stride = tensor.shape[dim], tensor.stride(dim) * tensor.element_size()
    return blocks % num_blocks == 0 and blocks * stride == tensor.untyped_storage().nbytes()


@dataclass(frozen=True)
class KVLayout:
    """Where each buffer and each KV page lies in a KV space's reservation: the same for
    every process that maps the space (each tensor-parallel rank reserves its own)."""

    block_bytes: tuple[int, ...]
    page_size: int
    blocks_per_page: int
    num_pages: int
    buffer_offsets: tuple[int, ...]
    nbytes: int

    @classmethod
    def of(cls, block_bytes: Sequence[int], num_blocks: int, page_size: int) -> KVLayout:
        if not block_bytes:
            raise ValueError("a KV space needs at least one buffer")
        bad = [b for b in block_bytes if b <= 0]
        if bad:
            raise ValueError(f"block sizes must be positive, got {bad[0]}")
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        # The fewest blocks whose chunk is a whole number of physical pages in every buffer.
        blocks_per_page = math.lcm(*(page_size // math.gcd(page_size, b) for b in block_bytes))
        num_pages = -(-num_blocks // blocks_per_page)
        sizes = [num_pages * blocks_per_page * b for b in block_bytes]
        offsets = tuple(sum(sizes[:i]) for i in range(len(sizes)))
        return cls(tuple(block_bytes), page_size, blocks_per_page, num_pages, offsets, sum(sizes))

    @property
    def capacity_blocks(self) -> int:
        return self.num_pages * self.blocks_per_page

    @property
    def physical_per_page(self) -> int:
        """Physical pages behind one KV page, over all buffers."""
        return sum(self.blocks_per_page * b // self.page_size for b in self.block_bytes)

    def page_offsets(self, page: int) -> list[int]:
        """Offsets in the reservation of the physical pages that back KV page ``page``."""
        out: list[int] = []
        for offset, block in zip(self.buffer_offsets, self.block_bytes, strict=True):
            chunk = self.blocks_per_page * block
            out.extend(range(offset + page * chunk, offset + (page + 1) * chunk, self.page_size))
        return out


class KVSpace:
    """Virtual KV buffers of fixed capacity whose pages are mapped on demand."""

    def __init__(self, pool: PagePool, block_bytes: Sequence[int], num_blocks: int) -> None:
        self.layout = layout = KVLayout.of(block_bytes, num_blocks, pool.page_size)
        self.pool = pool
        self.vmm = pool.vmm
        self.block_bytes = layout.block_bytes
        self.blocks_per_page = layout.blocks_per_page
        self.num_pages = layout.num_pages
        self.capacity_blocks = layout.capacity_blocks
        self.physical_per_page = layout.physical_per_page
        self.nbytes = layout.nbytes
        self.base = self.vmm.reserve(self.nbytes)
        self._lock = threading.Lock()
        self._mapped: dict[int, list[int]] = {}
        # Mapped pages whose last unmap failed part-way: the addresses already unmapped.
        # Such a page still counts as mapped and keeps all its physical pages (none may
        # be mapped twice), and the next unmap of it takes only what is left.
        self._unmapped_part: dict[int, set[int]] = {}

    @property
    def mapped_pages(self) -> int:
        return len(self._mapped)

    def is_mapped(self, page: int) -> bool:
        return page in self._mapped

    def buffer_address(self, buffer: int) -> int:
        self._check_buffer(buffer)
        return self.base + self.layout.buffer_offsets[buffer]

    def _check_buffer(self, buffer: int) -> None:
        if not 0 <= buffer < len(self.block_bytes):
            raise ValueError(f"buffer {buffer} out of range [0, {len(self.block_bytes)})")

    def _addresses(self, page: int) -> list[int]:
        return [self.base + offset for offset in self.layout.page_offsets(page)]

    def _mapped_addresses(self, page: int) -> list[int]:
        gone = self._unmapped_part.get(page, ())
        return [a for a in self._addresses(page) if a not in gone]

    def _check_pages(self, pages: Sequence[int], want_mapped: bool) -> None:
        if len(set(pages)) != len(pages):
            raise ValueError("a KV page is listed twice")
        for page in pages:
            if not isinstance(page, int) or isinstance(page, bool):
                raise ValueError(f"KV page {page!r} is not an integer page id")
            if not 0 <= page < self.num_pages:
                raise ValueError(f"KV page {page} out of range [0, {self.num_pages})")
            if (page in self._mapped) != want_mapped:
                raise ValueError(f"KV page {page} is {'not ' if want_mapped else ''}mapped")

    def map_pages(self, pages: Sequence[int]) -> bool:
        """Back KV pages with physical memory in one batched call. Returns False, with
        nothing changed, when the pool cannot supply the physical pages; raises the
        driver's error, with nothing changed, when the driver fails (see
        _follow_driver_error for a rollback that fails too).

        The driver call runs outside the lock (on CUDA it costs milliseconds for a page
        across many layers), so that a map ahead on another thread does not hold up the
        engine mapping or unmapping other pages; a page being mapped counts as mapped."""
        if not pages:
            return True
        with self._lock:
            self._check_pages(pages, want_mapped=False)
            physical = self.pool.acquire(len(pages) * self.physical_per_page)
            if physical is None:
                return False
            per_page = self.physical_per_page
            for i, page in enumerate(pages):
                self._mapped[page] = physical[i * per_page : (i + 1) * per_page]
        addresses = {page: self._addresses(page) for page in pages}
        try:
            self.vmm.map(list(zip([a for page in pages for a in addresses[page]], physical, strict=True)))
        except BaseException:
            with self._lock:
                held = {page: self._mapped.pop(page) for page in pages}
            self._follow_driver_error(held, addresses)
            raise
        return True

    def unmap_pages(self, pages: Sequence[int]) -> None:
        """Unmap KV pages in one batched call and return their memory to the pool.

        The driver call runs outside the lock, as in map_pages: on a device it first
        waits for the work queued there. A page being unmapped counts as unmapped; the
        caller must not map it again before this returns. If the driver fails part-way,
        the error is raised after the bookkeeping follows what the driver did: pages it
        unmapped wholly return their memory, the others stay mapped (see _unmapped_part)."""
        if not pages:
            return
        with self._lock:
            self._check_pages(pages, want_mapped=True)
            physical = {page: self._mapped.pop(page) for page in pages}
            addresses = {page: self._mapped_addresses(page) for page in pages}
        try:
            self.vmm.unmap([a for page in pages for a in addresses[page]])
        except BaseException:
            self._follow_driver_error(physical, addresses)
            raise
        with self._lock:
            for page, held in physical.items():
                self._unmapped_part.pop(page, None)
                self.pool.release(held)

    def _follow_driver_error(self, physical: dict[int, list[int]], addresses: dict[int, list[int]]) -> None:
        """After a map or unmap batch failed: each page of it counts as mapped again
        unless the driver left none of its ``addresses`` mapped, in which case its
        ``physical`` pages go back to the pool. (A map rolls back what it mapped, but a
        rollback that fails leaves pages mapped, and those must not be handed out.)"""
        listed = [a for page in physical for a in addresses[page]]
        still = dict(zip(listed, self.vmm.mapped(listed), strict=True))
        with self._lock:
            for page, held in physical.items():
                gone = {a for a in addresses[page] if not still[a]}
                if len(gone) == len(addresses[page]):
                    self._unmapped_part.pop(page, None)
                    self.pool.release(held)
                    continue
                self._mapped[page] = held
                if gone:
                    self._unmapped_part.setdefault(page, set()).update(gone)

    def tensor(self, buffer: int, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
        """A tensor view starting at ``buffer``. It may span the following buffers (e.g.
        a layer's K and V as one ``(2, num_blocks, ...)`` tensor) but not the end of the
        space. Touching unmapped blocks faults on the host and is invalid on devices."""
        import torch

        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype must be a torch.dtype, not {dtype!r}")
        if not shape or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
            raise ValueError(f"shape must be positive integers, not {tuple(shape)!r}")
        start = self.buffer_address(buffer)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if start + nbytes > self.base + self.nbytes:
            raise ValueError(f"a {tuple(shape)} {dtype} view at buffer {buffer} runs past the KV space")
        return tensor_at(self.vmm.kind, self.vmm.device, start, dtype, shape)

    def close(self) -> None:
        """Unmap everything and give the address range back. Views must be dropped first."""
        with self._lock:
            if self._mapped:
                pages = sorted(self._mapped)
                self.vmm.unmap([a for page in pages for a in self._mapped_addresses(page)])
                self._unmapped_part.clear()
                for page in pages:
                    self.pool.release(self._mapped.pop(page))
            self.vmm.release_reservation(self.base)
