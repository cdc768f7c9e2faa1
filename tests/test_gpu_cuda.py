"""CUDA-only behaviour, run on the GPU machine by scripts/gpu_check.sh. The backend suite
in test_vmm_backends.py also runs against CUDA there (its `cuda` parameter)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from vmkv.allocator import BlockAllocator, KVSpace, PagePool
from vmkv.vmm_ops import open_vmm

pytestmark = pytest.mark.gpu

LAYERS, NUM_BLOCKS = 4, 1024
BLOCK_SHAPE = (16, 8, 128)
BLOCK_BYTES = 16 * 8 * 128 * 2


@pytest.fixture
def space():
    vmm = open_vmm("cuda")
    pool = PagePool(vmm)
    kv = KVSpace(pool, [BLOCK_BYTES] * (2 * LAYERS), NUM_BLOCKS)
    yield kv
    torch.cuda.synchronize()
    kv.close()
    pool.trim()
    vmm.close()


def layer_views(space: KVSpace) -> list[torch.Tensor]:
    return [
        space.tensor(2 * i, torch.bfloat16, (2, space.capacity_blocks, *BLOCK_SHAPE)) for i in range(LAYERS)
    ]


def page_blocks(space: KVSpace, page: int) -> slice:
    bpp = space.blocks_per_page
    return slice(page * bpp, (page + 1) * bpp)


def test_tensors_read_back_what_was_written(space):
    caches = layer_views(space)
    assert caches[0].device.type == "cuda"
    assert space.map_pages([0, 3])
    for page in (0, 3):
        for cache in caches:
            data = torch.randn((2, space.blocks_per_page, *BLOCK_SHAPE), device="cuda").to(torch.bfloat16)
            cache[:, page_blocks(space, page)] = data
            assert torch.equal(cache[:, page_blocks(space, page)], data)


def test_live_data_intact_across_other_maps_and_unmaps(space):
    caches = layer_views(space)
    assert space.map_pages([1])
    expected = []
    for cache in caches:
        data = torch.randn((2, space.blocks_per_page, *BLOCK_SHAPE), device="cuda").to(torch.bfloat16)
        cache[:, page_blocks(space, 1)] = data
        expected.append(data.clone())
    for _ in range(20):
        assert space.map_pages([0, 2, 5])
        for cache in caches:
            cache[:, page_blocks(space, 2)].fill_(3.0)
        torch.cuda.synchronize()
        space.unmap_pages([5, 0, 2])
    for cache, data in zip(caches, expected, strict=True):
        assert torch.equal(cache[:, page_blocks(space, 1)], data)


def test_cuda_graph_reads_current_data_after_later_maps_and_unmaps(space):
    caches = layer_views(space)
    assert space.map_pages([0, 1])
    blocks = page_blocks(space, 1)
    out = torch.empty((LAYERS,), device="cuda", dtype=torch.float32)
    for cache in caches:
        cache[:, blocks].normal_()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        for i, cache in enumerate(caches):
            out[i] = cache[:, blocks].float().sum()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    # Remap page 1 with (possibly) different physical pages at the same addresses,
    # churn other pages, write new data: the captured graph must see the new data.
    space.unmap_pages([1])
    assert space.map_pages([2, 3])
    assert space.map_pages([1])
    space.unmap_pages([2])
    for cache in caches:
        cache[:, blocks].normal_()
    reference = torch.stack([cache[:, blocks].float().sum() for cache in caches])
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, reference)


def test_virtual_capacity_beyond_device_memory_maps_until_a_miss():
    vmm = open_vmm("cuda")
    _, total = vmm.mem_info()
    pool = PagePool(vmm)
    # Twice the device's memory of virtual KV: mapping must stop with a miss, not a crash.
    space = KVSpace(pool, [2 << 20] * 2, 2 * total // (4 << 20))
    allocator = BlockAllocator(space)
    got = 0
    while (blocks := allocator.alloc(512)) is not None:
        got += len(blocks)
    assert allocator.stats().misses == 1
    assert got * (4 << 20) < total
    space.close()
    pool.trim()
    vmm.close()


def test_no_leak_after_ten_thousand_map_unmap_cycles(space):
    vmm = space.vmm
    torch.cuda.synchronize()
    assert space.map_pages([0])
    space.unmap_pages([0])
    free_before, _ = vmm.mem_info()
    created_before = vmm.stats()["pages_created"]
    for cycle in range(10_000):
        page = cycle % space.num_pages
        assert space.map_pages([page])
        space.unmap_pages([page])
    stats = vmm.stats()
    assert stats["pages_created"] == created_before  # recycled, never recreated
    assert stats["mapped"] == 0
    assert stats["pages"] == space.physical_per_page
    free_after, _ = vmm.mem_info()
    assert abs(free_after - free_before) <= 2 << 20


def test_unmapping_waits_for_kernels_still_writing_the_page():
    """cuMemUnmap does not wait for queued kernels that use the range: an engine freeing a
    block while its last step still runs (asynchronous scheduling, preemption) would fault
    the device. vmkv waits for the device before each unmap batch. Run in a child process:
    a fault poisons the CUDA context for good."""
    code = (
        "import torch\n"
        "from vmkv.allocator import KVSpace, PagePool\n"
        "from vmkv.vmm_ops import open_vmm\n"
        "vmm = open_vmm('cuda')\n"
        "kv = KVSpace(PagePool(vmm), [1 << 20], 64)\n"
        "blocks = kv.tensor(0, torch.uint8, (kv.capacity_blocks, 1 << 20))\n"
        "assert kv.map_pages([0])\n"
        "torch.cuda._sleep(2_000_000_000)  # the stream spins for about a second first\n"
        "blocks[: kv.blocks_per_page].fill_(7)  # queued behind it, still to run\n"
        "kv.unmap_pages([0])\n"
        "torch.cuda.synchronize()\n"
        "print('clean')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "clean", done.stderr[-2000:]
