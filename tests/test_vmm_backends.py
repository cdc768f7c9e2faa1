"""The backend suite: every backend (host, the ACL backend over the shim, and CUDA on a
GPU machine) must pass the same tests."""

from __future__ import annotations

import ctypes
import os
import threading

import pytest
from conftest import read_bytes, write_bytes

from vmkv.vmm_ops import DriverError, OutOfDeviceMemory, open_vmm


def test_page_size_is_a_multiple_of_granularity(vmm):
    assert vmm.page_size > 0
    assert vmm.page_size % vmm.granularity() == 0
    with pytest.raises(ValueError, match="page_size"):
        open_vmm(vmm.kind, page_size=vmm.granularity() + 1)


def test_map_write_unmap_remap_keeps_page_contents(vmm):
    size = vmm.page_size
    va = vmm.reserve(4 * size)
    pages = vmm.create_pages(2)
    vmm.map([(va, pages[0]), (va + 2 * size, pages[1])])
    payload = os.urandom(4096)
    write_bytes(vmm, va + size - 4096, payload)
    write_bytes(vmm, va + 2 * size, payload[::-1])
    assert vmm.unmap([va]) == [pages[0]]
    # The same physical page shows the same bytes at a new address.
    vmm.map([(va + 3 * size, pages[0])])
    assert read_bytes(vmm, va + 4 * size - 4096, 4096) == payload
    assert read_bytes(vmm, va + 2 * size, 4096) == payload[::-1]
    assert sorted(vmm.unmap([va + 2 * size, va + 3 * size])) == sorted(pages)
    vmm.release_pages(pages)
    vmm.release_reservation(va)
    stats = vmm.stats()
    assert (stats["pages"], stats["mapped"], stats["reservations"]) == (0, 0, 0)


def test_one_batch_is_one_call_and_all_or_nothing(vmm):
    size = vmm.page_size
    va = vmm.reserve(8 * size)
    pages = vmm.create_pages(6)
    before = vmm.stats()["map_calls"]
    # Two contiguous runs and one lone page, in shuffled order.
    vmm.map([(va + 5 * size, pages[3]), (va, pages[0]), (va + size, pages[1]), (va + 4 * size, pages[2])])
    assert vmm.stats()["map_calls"] == before + 1
    assert vmm.stats()["mapped"] == 4
    # A batch with one bad pair maps nothing.
    with pytest.raises(ValueError, match="already mapped"):
        vmm.map([(va + 7 * size, pages[4]), (va + 5 * size, pages[5])])
    assert vmm.stats()["mapped"] == 4
    vmm.map([(va + 7 * size, pages[4])])
    assert vmm.stats()["mapped"] == 5


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unaligned", "not page-aligned"),
        ("outside", "not inside a reservation"),
        ("top_of_memory", "not inside a reservation"),  # an address whose page end wraps
        ("unknown_page", "does not exist"),
        ("page_twice", "already mapped"),
        ("address_twice", "already mapped"),
    ],
)
def test_bad_map_requests_raise_and_change_nothing(vmm, case, message):
    size = vmm.page_size
    va = vmm.reserve(4 * size)
    other = vmm.reserve(size)
    vmm.release_reservation(other)
    pages = vmm.create_pages(2)
    pairs = {
        "unaligned": [(va + 64, pages[0])],
        "outside": [(other, pages[0])],
        "top_of_memory": [(2**64 - size, pages[0])],
        "unknown_page": [(va, 10**9)],
        "page_twice": [(va, pages[0]), (va + size, pages[0])],
        "address_twice": [(va, pages[0]), (va, pages[1])],
    }[case]
    before = vmm.stats()
    with pytest.raises(ValueError, match=message):
        vmm.map(pairs)
    assert vmm.stats() == before


def test_bad_unmap_release_and_reservation_requests(vmm):
    size = vmm.page_size
    va = vmm.reserve(2 * size)
    (page,) = vmm.create_pages(1)
    with pytest.raises(ValueError, match="nothing is mapped"):
        vmm.unmap([va])
    vmm.map([(va, page)])
    with pytest.raises(ValueError, match="listed twice"):
        vmm.unmap([va, va])
    with pytest.raises(ValueError, match="still mapped"):
        vmm.release_pages([page])
    with pytest.raises(ValueError, match="still has a page mapped"):
        vmm.release_reservation(va)
    with pytest.raises(ValueError, match="no reservation"):
        vmm.release_reservation(va + size)
    with pytest.raises(ValueError, match="not a positive multiple"):
        vmm.reserve(size + 1)
    with pytest.raises(ValueError, match="size must be >= 0, got -1"):
        vmm.reserve(-1)
    with pytest.raises(ValueError, match="count must be >= 0, got -2"):
        vmm.create_pages(-2)
    assert vmm.stats()["mapped"] == 1 and vmm.stats()["pages"] == 1


def test_out_of_memory_is_an_exception_with_the_driver_name(vmm):
    pages: list[int] = []
    batch = 512 if vmm.kind == "cuda" else 8
    with pytest.raises(OutOfDeviceMemory) as info:
        while True:
            pages += vmm.create_pages(batch)
    assert isinstance(info.value, DriverError)
    assert info.value.name in {
        "HOST_ERROR_OUT_OF_MEMORY",
        "ACL_ERROR_RT_MEMORY_ALLOCATION",
        "CUDA_ERROR_OUT_OF_MEMORY",
    }
    assert info.value.name in str(info.value)
    # The failed batch left nothing behind, and releasing makes room again.
    assert vmm.stats()["pages"] == len(pages)
    with pytest.raises(OutOfDeviceMemory, match="exceed the whole device"):
        vmm.create_pages(2**60 // vmm.page_size)  # refused before any page is made
    assert vmm.stats()["pages"] == len(pages)
    vmm.release_pages(pages)
    assert len(vmm.create_pages(batch)) == batch


def test_concurrent_batches_from_threads(vmm):
    size = vmm.page_size
    threads, rounds, per_thread = 4, 50, 2
    va = vmm.reserve(threads * per_thread * size)
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            pages = vmm.create_pages(per_thread)
            base = va + index * per_thread * size
            addresses = [base + i * size for i in range(per_thread)]
            for _ in range(rounds):
                vmm.map(list(zip(addresses, pages, strict=True)))
                assert sorted(vmm.unmap(addresses)) == sorted(pages)
            vmm.release_pages(pages)
        except BaseException as error:  # surfaced below
            errors.append(error)

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []
    assert vmm.stats()["mapped"] == 0
    assert vmm.stats()["pages"] == 0


def test_close_releases_everything_and_later_calls_fail(vmm):
    kind, page_size = vmm.kind, vmm.page_size
    free_before, _ = vmm.mem_info()
    va = vmm.reserve(4 * vmm.page_size)
    pages = vmm.create_pages(4)
    vmm.map([(va + i * vmm.page_size, p) for i, p in enumerate(pages)])
    # A second handle on the same device observes the device memory coming back.
    observer = open_vmm(kind, device=vmm.device, page_size=vmm.page_size)
    if kind != "host":  # each host handle models a device of its own
        assert observer.mem_info()[0] <= free_before - 4 * vmm.page_size
    vmm.close()
    assert vmm.closed
    with pytest.raises(ValueError, match="closed"):
        vmm.stats()
    if kind != "host":
        assert observer.mem_info()[0] >= free_before - page_size  # driver bookkeeping may move a little
    observer.close()


def test_host_registration_is_validated_and_undone(vmm):
    import mmap

    buffer = mmap.mmap(-1, 8 * 4096)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    with pytest.raises(ValueError, match="4 KiB aligned"):
        vmm.register_host(address + 8, 4096)
    with pytest.raises(ValueError, match="not registered"):
        vmm.unregister_host(address)
    vmm.register_host(address, 4 * 4096)
    with pytest.raises(ValueError, match="overlaps"):
        vmm.register_host(address + 4096, 4096)
    vmm.register_host(address + 4 * 4096, 4 * 4096)  # adjacent is fine
    vmm.unregister_host(address)
    vmm.unregister_host(address + 4 * 4096)
    vmm.register_host(address, 8 * 4096)  # left registered: close() must undo it


def test_each_unmap_batch_first_waits_for_the_device_once():
    """Unmapping does not wait for device work still using the range (CUDA's and ACL's
    both), so the backend synchronizes the device once per unmap batch, never per page,
    and not at all for an empty batch. The ACL shim counts its synchronizations; CUDA's
    ordering is tested on the GPU (test_gpu_cuda)."""
    shim = ctypes.CDLL(os.environ["VMKV_ACL_LIBRARY"])
    vmm = open_vmm("acl")
    try:
        size = vmm.page_size
        va = vmm.reserve(4 * size)
        pages = vmm.create_pages(3)
        vmm.map([(va + i * size, page) for i, page in enumerate(pages)])
        before = shim.vmkv_shim_device_syncs()
        assert vmm.unmap([]) == [] and shim.vmkv_shim_device_syncs() == before
        assert sorted(vmm.unmap([va, va + size, va + 2 * size])) == sorted(pages)
        assert shim.vmkv_shim_device_syncs() == before + 1
        vmm.synchronize()  # what copies out of pages that kernels may still write wait for
        assert shim.vmkv_shim_device_syncs() == before + 2
    finally:
        vmm.close()
