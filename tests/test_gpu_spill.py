"""The spill tier on a CUDA device: pinned shared tier, staged asynchronous transfers on
dedicated streams, bit-exact round trips, and ordering against the compute stream."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from spill_helpers import DTYPES, LAYOUTS, block_matches, fill_block, make_kv

from vmkv.allocator import BlockAllocator, KVSpace, PagePool
from vmkv.spill import Namespace, SpillStore
from vmkv.vmm_ops import open_vmm

pytestmark = pytest.mark.gpu


@pytest.fixture
def vmm():
    handle = open_vmm("cuda")
    yield handle
    handle.close()


def namespace(tag: str) -> Namespace:
    return Namespace(f"gpu-{tag}-{os.getpid()}", "auto", 16)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_on_cuda_is_bit_exact(layout, dtype, vmm):
    tensors, block_dim = make_kv(layout, 64, dtype, device="cuda")
    for block in range(1, 64):
        fill_block(tensors, block_dim, block, seed=block)
    store = SpillStore(tensors, namespace(f"{layout}{dtype}"), block_dim, capacity_bytes=256 << 20, vmm=vmm)
    try:
        stored = list(range(1, 31))
        store.store([f"h{b}" for b in stored], stored).wait()
        for t in tensors:
            t.view(torch.uint8).zero_()  # bytes: not every kernel exists for float8
        store.retrieve([f"h{b}" for b in stored], list(range(33, 63))).wait()
        assert all(block_matches(tensors, block_dim, 32 + b, seed=b) for b in stored)
        assert not tensors[0].view(torch.uint8).select(block_dim, 1).any()
    finally:
        store.close()


def test_many_chunks_through_vmm_backed_kv_space(vmm):
    """Llama-like layers in a VMM KV space; more blocks than one staging chunk."""
    layers, block_shape = 4, (16, 8, 128)
    block_bytes = 16 * 8 * 128 * 2
    pool = PagePool(vmm)
    space = KVSpace(pool, [block_bytes] * (2 * layers), 1024)
    allocator = BlockAllocator(space)
    shape = (2, space.capacity_blocks, *block_shape)
    kv = [space.tensor(2 * i, torch.bfloat16, shape) for i in range(layers)]
    store = SpillStore(kv, namespace("space"), 1, capacity_bytes=1 << 30, vmm=vmm)
    try:
        blocks = allocator.alloc(600)
        for block in blocks[:300]:
            fill_block(kv, 1, block, seed=block)
        assert store._mover.chunk_blocks < 300  # the copy needs several chunks
        sources, targets = blocks[:300], blocks[300:]
        store.store([f"b{b}" for b in sources], sources).wait()
        store.retrieve([f"b{b}" for b in sources], targets).wait()
        assert all(block_matches(kv, 1, dst, seed=src) for src, dst in zip(sources, targets, strict=True))
    finally:
        store.close()
        torch.cuda.synchronize()
        space.close()
        pool.trim()


def test_transfers_are_ordered_with_the_compute_stream(vmm):
    """A store sees writes still queued on the compute stream; a fenced kernel sees a
    retrieve, and neither needs the host to wait."""
    tensors, _ = make_kv("flat", 64, torch.float32, device="cuda")
    store = SpillStore(tensors, namespace("order"), capacity_bytes=64 << 20, vmm=vmm)
    try:
        big = torch.randn(4096, 4096, device="cuda")
        for _ in range(20):  # keep the compute stream busy so the fill below is still queued
            big = big @ big / 64
        tensors[0][1].fill_(7.0)
        first = store.store(["seven"], [1])
        first.wait()
        tensors[0][1].fill_(0.0)
        retrieved = store.retrieve(["seven"], [2])
        retrieved.fence()
        total = tensors[0][2].sum()  # queued after the fence on the compute stream
        assert total.item() == 7.0 * tensors[0][2].numel()
    finally:
        store.close()


def test_the_tier_is_page_locked_and_shared_across_processes(vmm, tmp_path):
    tensors, block_dim = make_kv("flat", 8, torch.float16, device="cuda")
    fill_block(tensors, block_dim, 1, seed=11)
    ns = namespace("shared")
    store = SpillStore(tensors, ns, capacity_bytes=16 << 20, vmm=vmm)
    try:
        assert store.tier.slots.is_pinned()
        store.store(["x"], [1]).wait()
        script = tmp_path / "reader.py"
        script.write_text(
            "import sys, torch\n"
            f"sys.path.insert(0, {str(os.path.dirname(__file__))!r})\n"
            "from spill_helpers import block_matches\n"
            "from vmkv.spill import Namespace, SpillStore\n"
            "from vmkv.vmm_ops import open_vmm\n"
            "kv = [torch.zeros(8, 16, 4, 32, dtype=torch.float16, device='cuda')]\n"
            f"ns = Namespace({ns.model!r}, 'auto', 16)\n"
            "s = SpillStore(kv, ns, capacity_bytes=16 << 20, vmm=open_vmm('cuda'))\n"
            "s.retrieve(['x'], [3]).wait()\n"
            "print(block_matches(kv, 0, 3, seed=11))\n"
            "s.close()\n"
        )
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == "True", out.stderr
    finally:
        store.close()
