"""Which bytes make up one block, across every layer of an engine's KV cache.

Engines differ: vLLM keeps a layer's K and V as ``(2, num_blocks, block_size, heads,
head_dim)`` (flash-attn) or separate tensors, SGLang keeps per-layer K and V buffers
indexed by token. A :class:`BlockLayout` reduces them all to a list of *parts*, each a
view whose first dimension is the block id. A spilled block is the concatenation of its
row in every part, each part at a 64-byte aligned offset of the host slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmkv.allocator.block_allocator import check_block_ids

if TYPE_CHECKING:
    import torch

PART_ALIGN = 64


@dataclass(frozen=True)
class Part:
    view: torch.Tensor  # (num_blocks, *block_shape), reinterpreted as same-size integers
    dtype: torch.dtype  # the engine's dtype, for the signature
    offset: int  # in the host slot
    nbytes: int  # of one block


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

    def signature(self) -> str:
        """Shapes and dtypes of one block in every part: equal signatures mean blocks can
        move between two engines' caches byte for byte."""
        return ";".join(f"{p.dtype}{list(p.view.shape[1:])}" for p in self.parts)

    def check_blocks(self, blocks: Sequence[int]) -> None:
        check_block_ids(blocks, self.num_blocks)
