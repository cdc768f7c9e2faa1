"""KV layouts and deterministic block contents shared by the spill tests and workers."""

from __future__ import annotations

import torch

# name -> (tensor shapes given num_blocks, block_dim)
LAYOUTS = {
    # one tensor, blocks first (SGLang's per-layer token buffers viewed as pages)
    "flat": (lambda n: [(n, 16, 4, 32)], 0),
    # vLLM flash-attn: per layer (2, num_blocks, block_size, heads, head_dim)
    "vllm": (lambda n: [(2, n, 16, 2, 16)] * 3, 1),
    # separate K and V per layer, odd sizes so parts need alignment padding
    "split": (lambda n: [(n, 3, 5)] * 4, 0),
    # blocks last: a block is strided across the whole tensor
    "strided": (lambda n: [(8, 4, n)] * 2, 2),
}

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.float8_e4m3fn]


def make_kv(
    layout: str, num_blocks: int, dtype: torch.dtype, device: str = "cpu"
) -> tuple[list[torch.Tensor], int]:
    shapes, block_dim = LAYOUTS[layout]
    return [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes(num_blocks)], block_dim


def block_rows(tensors: list[torch.Tensor], block_dim: int, block: int) -> list[torch.Tensor]:
    return [t.select(block_dim, block) for t in tensors]


def expected_rows(rows: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """The random contents ``seed`` gives to a block's rows (on the CPU)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for row in rows:
        noise = torch.randint(
            0, 256, (row.numel() * row.element_size(),), dtype=torch.uint8, generator=generator
        )
        out.append(noise.view(row.dtype).view(row.shape))
    return out


def fill_block(tensors: list[torch.Tensor], block_dim: int, block: int, seed: int) -> None:
    """Random bytes derived from ``seed`` in every part of ``block``."""
    rows = block_rows(tensors, block_dim, block)
    for row, value in zip(rows, expected_rows(rows, seed), strict=True):
        row.copy_(value.to(row.device))


def block_matches(tensors: list[torch.Tensor], block_dim: int, block: int, seed: int) -> bool:
    """Bit for bit what fill_block(seed) wrote; reads only this block."""
    rows = block_rows(tensors, block_dim, block)
    return all(
        torch.equal(got.cpu().contiguous().view(torch.uint8), want.contiguous().view(torch.uint8))
        for got, want in zip(rows, expected_rows(rows, seed), strict=True)
    )
