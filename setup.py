"""Builds the torch-free C++17 cores: vmkv.vmm_ops._C (virtual memory),
vmkv.allocator._book (the block allocator's bookkeeping), vmkv.coordinator._table (the
shared lease table) and vmkv.spill._index (the shared index of the host spill tier).
Driver libraries are opened at run
time, so the build needs neither CUDA nor CANN; when cuda.h is found it is only used to
check our ABI declarations at compile time."""

import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

CSRC = "vmkv/vmm_ops/csrc"
SOURCES = ["bindings.cpp", "vmm.cpp", "host_driver.cpp", "cuda_driver.cpp", "acl_driver.cpp"]
CUDA_INCLUDE = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")

extension = Pybind11Extension(
    "vmkv.vmm_ops._C",
    [f"{CSRC}/{name}" for name in SOURCES],
    include_dirs=[CSRC] + ([CUDA_INCLUDE] if os.path.isfile(os.path.join(CUDA_INCLUDE, "cuda.h")) else []),
    cxx_std=17,
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-fvisibility=hidden"],
    libraries=["dl"],
)

BOOK = "vmkv/allocator/csrc"
block_book = Pybind11Extension(
    "vmkv.allocator._book",
    [f"{BOOK}/bindings.cpp", f"{BOOK}/block_book.cpp"],
    include_dirs=[BOOK],
    cxx_std=17,
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-fvisibility=hidden"],
)

# Robust process-shared locking and process liveness, shared by the two shared-memory tables.
COMMON = "vmkv/common/csrc"


def shared_table(name: str, csrc: str, sources: tuple[str, ...]) -> Pybind11Extension:
    return Pybind11Extension(
        name,
        [f"{csrc}/{source}" for source in sources] + [f"{COMMON}/process.cpp", f"{COMMON}/robust_lock.cpp"],
        include_dirs=[csrc, COMMON],
        cxx_std=17,
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-fvisibility=hidden"],
        libraries=["pthread"],
    )


coordinator = shared_table("vmkv.coordinator._table", "vmkv/coordinator/csrc", ("bindings.cpp", "table.cpp"))
spill_index = shared_table(
    "vmkv.spill._index", "vmkv/spill/csrc", ("bindings.cpp", "index.cpp", "blake2b.cpp")
)

setup(ext_modules=[extension, block_book, coordinator, spill_index], cmdclass={"build_ext": build_ext})
