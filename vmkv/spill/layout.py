"""Which bytes make up one block, across every layer of an engine's KV cache.

Engines differ: vLLM keeps a layer's K and V as ``(2, num_blocks, block_size, heads,
head_dim)`` (flash-attn) or separate tensors, SGLang keeps per-layer K and V buffers
indexed by token. A :class:`BlockLayout` reduces them all to a list of *parts*, each a
view whose first dimension is the block id. A spilled block is the concatenation of its
row in every part, each part at a 64-byte aligned offset of the host slot.

Most real layouts are regular: every block is the same few byte ranges at fixed offsets
from one base, shifted by a fixed stride per block. A :class:`RowGrid` describes that, so
that the mover gathers all of a chunk's parts with one indexed copy instead of one kernel
launch per part (64 for Llama-3-8B), which would dominate the transfer time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PART_ALIGN = 64
MAX_GRID_ROWS_PER_BLOCK = 1 << 14  # finer grids cost more index math than they save


def check_block_ids(blocks: Iterable[object], num_blocks: int) -> None:
    """ValueError naming the first id that is not an int in [0, num_blocks) or repeats."""
    seen: set[int] = set()
    for block in blocks:
        if isinstance(block, bool) or not isinstance(block, int):
            raise ValueError(f"block id {block!r} is not an integer")
        if not 0 <= block < num_blocks:
            raise ValueError(f"block id {block} out of range [0, {num_blocks})")
        if block in seen:
            raise ValueError(f"block {block} is listed twice")
        seen.add(block)


@dataclass(frozen=True)
class Part:
    view: torch.Tensor  # (num_blocks, *block_shape), reinterpreted as same-size integers
    dtype: torch.dtype  # the engine's dtype, for the signature
    offset: int  # in the host slot
    nbytes: int  # of one block


@dataclass(frozen=True)
class RowGrid:
    """Every block as ``len(first_rows)`` rows of ``row_bytes``, numbered from ``address``.

    Row ``i`` of block ``b``'s slot is memory row ``first_rows[i] + b * block_strides[i]``;
    the slot is those rows back to back. The rows between parts belong to nobody and are
    never touched: only rows of the blocks being moved are read or written.
    """

    address: int
    span_rows: int
    row_bytes: int
    first_rows: tuple[int, ...]
    block_strides: tuple[int, ...]


@dataclass(frozen=True)
class _Segments:
    """One part's block as contiguous byte segments (in its C order)."""

    address: int  # of block 0
    block_stride: int  # bytes
    offsets: tuple[int, ...]  # of each segment, from the block's address
    length: int  # bytes of each segment
    extent: int  # bytes from block 0's address to the last block's last byte


def _segments(view: torch.Tensor) -> _Segments | None:
    """``view`` (blocks first) as segments, or None if a stride is negative or zero."""
    size = view.element_size()
    dims = [(n, s * size) for n, s in zip(view.shape[1:], view.stride()[1:], strict=True) if n != 1]
    length = size
    while dims and dims[-1][1] == length:  # the contiguous tail of a block
        length *= dims.pop()[0]
    offsets = [0]
    for count, stride in dims:
        if stride <= 0:
            return None
        offsets = [o + i * stride for o in offsets for i in range(count)]
    block_stride = view.stride()[0] * size
    if block_stride <= 0 and view.shape[0] > 1:
        return None
    extent = (view.shape[0] - 1) * block_stride + max(offsets) + length
    return _Segments(view.data_ptr(), block_stride, tuple(offsets), length, extent)


def row_grid(views: Sequence[torch.Tensor]) -> RowGrid | None:
    """The grid of ``views`` (parts, blocks first), or None where their slots would need
    padding between parts or their rows would be too small to be worth indexing."""
    segments = [_segments(view) for view in views]
    if any(s is None for s in segments):
        return None
    parts = [s for s in segments if s is not None]
    if any(len(p.offsets) * p.length % PART_ALIGN for p in parts):
        return None
    address = min(p.address for p in parts)
    row_bytes = math.gcd(
        *(p.length for p in parts),
        *(p.address - address for p in parts),
        *(p.block_stride for p in parts),
        *(o for p in parts for o in p.offsets),
    )
    first_rows: list[int] = []
    block_strides: list[int] = []
    for p in parts:
        for offset in p.offsets:
            start = (p.address - address + offset) // row_bytes
            first_rows.extend(range(start, start + p.length // row_bytes))
            block_strides.extend([p.block_stride // row_bytes] * (p.length // row_bytes))
    if len(first_rows) > MAX_GRID_ROWS_PER_BLOCK:
        return None
    span_rows = max(p.address - address + p.extent for p in parts) // row_bytes
    return RowGrid(address, span_rows, row_bytes, tuple(first_rows), tuple(block_strides))


def _as_integers(tensor: torch.Tensor) -> torch.Tensor:
    """The same memory as integers of the same width: moving blocks copies bits, and
    integer kernels exist for every width (index_copy has none for float8, for one)."""
    import torch

    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(tensor.element_size())
    if width is None:
        raise ValueError(f"KV dtype {tensor.dtype} has an unsupported element size {tensor.element_size()}")
    return tensor.view(width)


class BlockLayout:
    """The per-block parts of an engine's KV tensors.

    ``tensors`` are the engine's KV tensors (one per layer, or per layer and K/V) and
    ``block_dim`` the dimension that indexes blocks in each (1 for vLLM's
    ``(2, num_blocks, ...)`` layout: a block's part is then its K and V rows together).
    """

    def __init__(self, tensors: Sequence[torch.Tensor], block_dim: int = 0) -> None:
        if not tensors:
            raise ValueError("a block layout needs at least one KV tensor")
        views: list[torch.Tensor] = []
        for i, tensor in enumerate(tensors):
            if not -tensor.dim() <= block_dim < tensor.dim():
                raise ValueError(
                    f"KV tensor {i} has {tensor.dim()} dims; block_dim {block_dim} is out of range"
                )
            views.append(tensor.movedim(block_dim, 0))
        first = views[0]
        self.device = first.device
        self.num_blocks = first.shape[0]
        parts: list[Part] = []
        offset = 0
        for i, view in enumerate(views):
            if view.device != self.device:
                raise ValueError(f"KV part {i} is on {view.device}, the others on {self.device}")
            if view.shape[0] != self.num_blocks:
                raise ValueError(f"KV part {i} has {view.shape[0]} blocks, the first has {self.num_blocks}")
            nbytes = view[0].numel() * view.element_size()
            if nbytes == 0:
                raise ValueError(f"KV part {i} has empty blocks")
            parts.append(Part(_as_integers(view), view.dtype, offset, nbytes))
            offset += -(-nbytes // PART_ALIGN) * PART_ALIGN
        self.parts = parts
        self.slot_bytes = offset
        self.grid = row_grid(views)

    def signature(self) -> str:
        """Shapes and dtypes of one block in every part: equal signatures mean blocks can
        move between two engines' caches byte for byte."""
        return ";".join(f"{p.dtype}{list(p.view.shape[1:])}" for p in self.parts)

    def check_blocks(self, blocks: Sequence[int]) -> None:
        check_block_ids(blocks, self.num_blocks)
