"""Builds the torch-free C++17 cores: vmkv.vmm_ops._C (virtual memory) and
vmkv.coordinator._table (the shared lease table). Driver libraries are opened at run
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

coordinator = Pybind11Extension(
    "vmkv.coordinator._table",
    [f"vmkv/coordinator/csrc/{name}" for name in ("bindings.cpp", "table.cpp")],
    include_dirs=["vmkv/coordinator/csrc"],
    cxx_std=17,
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-fvisibility=hidden"],
    libraries=["pthread"],
)

setup(ext_modules=[extension, coordinator], cmdclass={"build_ext": build_ext})
