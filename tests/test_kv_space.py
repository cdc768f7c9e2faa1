from __future__ import annotations

import ctypes
import os

import pytest
import torch
from conftest import MiB

from vmkv.allocator import KVSpace, PagePool
from vmkv.vmm_ops import DriverError, open_vmm


@pytest.fixture
def pool():
    vmm = open_vmm("host", page_size=2 * MiB, host_capacity=256 * MiB)
    yield PagePool(vmm)
    vmm.close()


def vllm_like_space(
    pool: PagePool, layers: int = 4, num_blocks: int = 256
) -> tuple[KVSpace, tuple[int, ...]]:
    """Per layer a (2, num_blocks, block_size, heads, head_dim) bf16 tensor, as vLLM's
    FlashAttention backend allocates it: K and V are two adjacent buffers."""
    block_shape = (16, 8, 128)  # 16 tokens x 8 KV heads x 128 dims
    block_bytes = 16 * 8 * 128 * 2
    return KVSpace(pool, [block_bytes] * (2 * layers), num_blocks), block_shape


def test_geometry(pool):
    space, _ = vllm_like_space(pool)
    assert space.blocks_per_page == 64  # 2 MiB / 32 KiB
    assert space.num_pages == 4
    assert space.physical_per_page == 8  # one physical page per layer x {K, V}
    odd = KVSpace(pool, [3 * 4096, 4096], 10)  # chunks must be whole pages in both buffers
    assert odd.blocks_per_page == 512
    assert odd.physical_per_page == 3 + 1
    assert odd.capacity_blocks == 512


def test_a_page_maps_every_buffer_in_one_call(pool):
    space, _ = vllm_like_space(pool)
    calls = pool.vmm.stats()["map_calls"]
    assert space.map_pages([2, 0])
    assert pool.vmm.stats()["map_calls"] == calls + 1
    assert pool.vmm.stats()["mapped"] == 2 * space.physical_per_page
    space.unmap_pages([0, 2])
    assert pool.vmm.stats()["unmap_calls"] == 1
    assert pool.stats().in_use == 0 and pool.stats().pooled == 2 * space.physical_per_page


def test_views_match_what_the_engine_would_allocate(pool):
    layers, num_blocks = 4, 256
    space, block_shape = vllm_like_space(pool, layers, num_blocks)
    reference = torch.empty((2, num_blocks, *block_shape), dtype=torch.bfloat16)
    for layer in range(layers):
        view = space.tensor(2 * layer, torch.bfloat16, (2, num_blocks, *block_shape))
        assert view.shape == reference.shape
        assert view.stride() == reference.stride()
        assert view.dtype == reference.dtype
        assert view.is_contiguous()
    with pytest.raises(ValueError, match="runs past"):
        space.tensor(2 * layers - 1, torch.bfloat16, (2, num_blocks, *block_shape))
    with pytest.raises(ValueError, match="out of range"):
        space.tensor(2 * layers, torch.bfloat16, (1,))


def test_live_data_survives_other_maps_and_unmaps(pool):
    layers, num_blocks = 4, 256
    space, block_shape = vllm_like_space(pool, layers, num_blocks)
    caches = [space.tensor(2 * i, torch.bfloat16, (2, num_blocks, *block_shape)) for i in range(layers)]
    assert space.map_pages([1])
    live = list(range(64, 128))  # page 1
    expected = [torch.randn((2, len(live), *block_shape)).to(torch.bfloat16) for _ in range(layers)]
    for cache, data in zip(caches, expected, strict=True):
        cache[:, live] = data
    for _ in range(3):
        assert space.map_pages([0, 2, 3])
        for cache in caches:
            cache[:, 128:192] = 1.0  # other pages see writes
        space.unmap_pages([3, 0, 2])
    for cache, data in zip(caches, expected, strict=True):
        assert torch.equal(cache[:, live], data)


def test_pool_miss_is_false_and_changes_nothing():
    vmm = open_vmm("host", page_size=2 * MiB, host_capacity=40 * MiB)
    space, _ = vllm_like_space(PagePool(vmm))  # 8 physical pages per KV page
    assert space.map_pages([0])
    assert not space.map_pages([1, 2])
    assert space.mapped_pages == 1
    assert space.map_pages([1])
    vmm.close()


def test_page_misuse(pool):
    space, _ = vllm_like_space(pool)
    with pytest.raises(ValueError, match="out of range"):
        space.map_pages([space.num_pages])
    assert space.map_pages([0])
    with pytest.raises(ValueError, match="is mapped"):
        space.map_pages([0])
    with pytest.raises(ValueError, match="listed twice"):
        space.unmap_pages([0, 0])
    with pytest.raises(ValueError, match="not mapped"):
        space.unmap_pages([1])
    in_use = pool.stats().in_use
    for bad in (1.0, 1.5, "1", True):
        with pytest.raises(ValueError, match=f"KV page {bad!r} is not an integer page id"):
            space.map_pages([bad])
        with pytest.raises(ValueError, match=f"KV page {bad!r} is not an integer page id"):
            space.unmap_pages([bad])
    assert pool.stats().in_use == in_use and space.mapped_pages == 1  # nothing taken, nothing lost
    for dtype, shape, message in (
        ("float16", (4,), "dtype must be a torch.dtype"),
        (torch.float16, (4, -1), "shape must be positive integers"),
        (torch.float16, (), "shape must be positive integers"),
        (torch.float16, (1.5,), "shape must be positive integers"),
    ):
        with pytest.raises(ValueError, match=message):
            space.tensor(0, dtype, shape)
    with pytest.raises(ValueError, match="positive"):
        KVSpace(pool, [0], 1)
    with pytest.raises(ValueError, match="num_blocks"):
        KVSpace(pool, [4096], 0)


def test_an_unmap_that_fails_part_way_leaves_the_bookkeeping_true():
    """A driver error in the middle of a batched unmap (injected in the ACL shim): the
    page the driver unmapped wholly gives its memory back, the others stay mapped and
    keep theirs (none is handed out twice), and once the driver works again, unmapping
    them finishes the job; the half-unmapped page unmaps only what it has left."""
    shim = ctypes.CDLL(os.environ["VMKV_ACL_LIBRARY"])
    vmm = open_vmm("acl", page_size=2 * MiB)
    try:
        pool = PagePool(vmm)
        space, _ = vllm_like_space(pool, layers=2)  # 4 buffers: 4 physical pages per KV page
        assert space.map_pages([0, 1, 2])
        shim.vmkv_shim_fail_unmaps_after(6)  # all of page 0, half of page 1
        with pytest.raises(DriverError, match="injected"):
            space.unmap_pages([0, 1, 2])
        shim.vmkv_shim_fail_unmaps_after(-1)
        assert [space.is_mapped(page) for page in (0, 1, 2)] == [False, True, True]
        assert pool.stats().in_use == 8 and vmm.stats()["mapped"] == 6
        with pytest.raises(ValueError, match="not mapped"):
            space.unmap_pages([0])
        space.unmap_pages([1, 2])
        assert (space.mapped_pages, pool.stats().in_use, vmm.stats()["mapped"]) == (0, 0, 0)
        assert space.map_pages([0, 1, 2])
        space.close()
        assert vmm.stats()["mapped"] == 0
    finally:
        shim.vmkv_shim_fail_unmaps_after(-1)
        vmm.close()


def test_a_map_whose_rollback_fails_keeps_what_stayed_mapped_out_of_the_pool():
    """A driver error part-way through a batched map is rolled back; if the rollback
    fails too (both injected in the ACL shim), the pages it left mapped stay counted as
    mapped with all their physical pages, so none is handed out while still mapped, and
    a later unmap finishes them."""
    shim = ctypes.CDLL(os.environ["VMKV_ACL_LIBRARY"])
    vmm = open_vmm("acl", page_size=2 * MiB)
    try:
        pool = PagePool(vmm)
        space, _ = vllm_like_space(pool, layers=2)  # 4 buffers: 4 physical pages per KV page
        shim.vmkv_shim_fail_maps_after(1)
        with pytest.raises(DriverError, match="injected"):
            space.map_pages([0, 1])
        assert (space.mapped_pages, vmm.stats()["mapped"]) == (0, 0)  # a clean rollback
        # The driver maps in address order (buffer by buffer): five maps, then a failure;
        # the rollback unmaps two and fails on the other three (buffer 1 of both pages
        # and buffer 2 of page 0).
        shim.vmkv_shim_fail_maps_after(5)
        shim.vmkv_shim_fail_unmaps_after(2)
        with pytest.raises(DriverError, match="injected"):
            space.map_pages([0, 1])
        shim.vmkv_shim_fail_maps_after(-1)
        shim.vmkv_shim_fail_unmaps_after(-1)
        assert space.is_mapped(0) and space.is_mapped(1)
        assert vmm.stats()["mapped"] == 3 and pool.stats().in_use == 8
        space.unmap_pages([0, 1])
        assert (space.mapped_pages, pool.stats().in_use, vmm.stats()["mapped"]) == (0, 0, 0)
        assert space.map_pages([0, 1]) and vmm.stats()["mapped"] == 8
        space.close()
    finally:
        shim.vmkv_shim_fail_maps_after(-1)
        shim.vmkv_shim_fail_unmaps_after(-1)
        vmm.close()


def test_close_returns_everything(pool):
    space, _ = vllm_like_space(pool)
    assert space.map_pages([0, 1])
    space.close()
    stats = pool.vmm.stats()
    assert (stats["mapped"], stats["reservations"]) == (0, 0)
    assert pool.stats().in_use == 0
