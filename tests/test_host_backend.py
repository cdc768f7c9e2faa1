"""Host-backend specifics: the mappings are real, so unmapped memory faults and released
memory really goes back to the OS."""

from __future__ import annotations

import signal
import textwrap

import pytest
from conftest import MiB, run_python

from vmkv.vmm_ops import open_vmm

FAULT_PROGRAM = textwrap.dedent(
    """
    import ctypes
    from vmkv.vmm_ops import open_vmm
    vmm = open_vmm("host", page_size=1 << 20)
    va = vmm.reserve(4 << 20)
    pages = vmm.create_pages(2)
    vmm.map([(va, pages[0]), (va + (1 << 20), pages[1])])
    ctypes.memset(va, 1, 2 << 20)          # mapped: fine
    vmm.unmap([va + (1 << 20)])
    print("before-touch", flush=True)
    ctypes.memset({target}, 1, 1)          # must fault
    print("no-fault", flush=True)
    """
)


@pytest.mark.parametrize("target", ["va + (1 << 20)", "va + (3 << 20)"], ids=["after-unmap", "never-mapped"])
def test_touching_unmapped_memory_faults(target):
    result = run_python(FAULT_PROGRAM.format(target=target))
    assert "before-touch" in result.stdout
    assert "no-fault" not in result.stdout
    assert result.returncode == -signal.SIGSEGV


def _rss_shmem_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssShmem:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssShmem in /proc/self/status")


def test_released_pages_go_back_to_the_os():
    import ctypes

    vmm = open_vmm("host", page_size=2 * MiB)
    count = 32  # 64 MiB
    va = vmm.reserve(count * 2 * MiB)
    rss_before = _rss_shmem_bytes()
    pages = vmm.create_pages(count)
    assert vmm.stats()["resident_bytes"] == count * 2 * MiB  # fallocate'd in the memfd
    vmm.map([(va + i * 2 * MiB, p) for i, p in enumerate(pages)])
    ctypes.memset(va, 7, count * 2 * MiB)
    assert _rss_shmem_bytes() - rss_before >= count * 2 * MiB * 0.9
    vmm.unmap([va + i * 2 * MiB for i in range(count)])
    assert _rss_shmem_bytes() - rss_before < 4 * MiB  # no longer in our page tables
    assert vmm.stats()["resident_bytes"] == count * 2 * MiB  # ...but still held, pooled
    vmm.release_pages(pages)
    assert vmm.stats()["resident_bytes"] == 0  # hole punched: the memory is the OS's again
    vmm.close()


def test_released_page_comes_back_zeroed():
    import ctypes

    vmm = open_vmm("host", page_size=1 * MiB)
    va = vmm.reserve(1 * MiB)
    (page,) = vmm.create_pages(1)
    vmm.map([(va, page)])
    ctypes.memset(va, 0xAB, 1 * MiB)
    vmm.unmap([va])
    vmm.release_pages([page])
    (page,) = vmm.create_pages(1)  # reuses the slot
    vmm.map([(va, page)])
    assert ctypes.string_at(va, 1 * MiB) == bytes(1 * MiB)
    vmm.close()


def test_host_argument_errors():
    with pytest.raises(ValueError, match="multiple of 4096"):
        open_vmm("host", page_size=1000)
    with pytest.raises(ValueError, match="one device"):
        open_vmm("host", device=1)
    with pytest.raises(ValueError, match="unknown backend"):
        open_vmm("tpu")
    for argument, value in (("page_size", -4096), ("device", -1), ("host_capacity", -1)):
        with pytest.raises(ValueError, match=f"{argument} must be >= 0, got {value}"):
            open_vmm("host", **{argument: value})
    capped = open_vmm("host", page_size=1 * MiB, host_capacity=3 * MiB)
    assert capped.mem_info() == (3 * MiB, 3 * MiB)
    capped.create_pages(3)
    assert capped.mem_info() == (0, 3 * MiB)
    capped.close()
