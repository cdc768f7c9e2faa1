"""Shared fixtures. The ACL shim (tests/acl_shim) is compiled once per session and
registered before anything probes the ACL backend, so the real ACL backend code runs
against it in the same backend suite as the host backend."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from vmkv.vmm_ops import open_vmm, probe

HERE = Path(__file__).parent
SHIM_SOURCE = HERE / "acl_shim" / "acl_shim.c"
SHIM_HBM_BYTES = 128 << 20
HOST_CAPACITY = 64 << 20
MiB = 1 << 20


def pytest_configure(config: pytest.Config) -> None:
    out_dir = Path(tempfile.gettempdir()) / f"vmkv-acl-shim-{os.getuid()}"
    out_dir.mkdir(mode=0o700, exist_ok=True)
    library = out_dir / "libascendcl.so"
    if not library.exists() or library.stat().st_mtime < SHIM_SOURCE.stat().st_mtime:
        subprocess.run(
            ["cc", "-O2", "-Wall", "-shared", "-fPIC", "-o", str(library), str(SHIM_SOURCE), "-lpthread"],
            check=True,
        )
    os.environ["VMKV_ACL_LIBRARY"] = str(library)
    os.environ["VMKV_SHIM_HBM_BYTES"] = str(SHIM_HBM_BYTES)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cuda = probe("cuda")
    if cuda["available"]:
        return
    skip = pytest.mark.skip(reason=f"no CUDA GPU: {cuda['reason']}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


BACKEND_PARAMS = ["host", "acl", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=BACKEND_PARAMS)
def vmm(request: pytest.FixtureRequest):
    """A fresh backend. host and acl are bounded (64 / 128 MiB) so out-of-memory is
    reachable; cuda is the real device."""
    kind = request.param
    handle = open_vmm(kind, host_capacity=HOST_CAPACITY) if kind == "host" else open_vmm(kind)
    yield handle
    handle.close()


def write_bytes(vmm, address: int, data: bytes) -> None:
    """Write through the backend's own memory (host memory for host/acl, device for cuda)."""
    if vmm.kind == "cuda":
        import torch

        from vmkv.allocator.tensors import tensor_at

        tensor_at("cuda", vmm.device, address, torch.uint8, (len(data),)).copy_(
            torch.frombuffer(bytearray(data), dtype=torch.uint8)
        )
        torch.cuda.synchronize()
    else:
        ctypes.memmove(address, data, len(data))


def read_bytes(vmm, address: int, size: int) -> bytes:
    if vmm.kind == "cuda":
        import torch

        from vmkv.allocator.tensors import tensor_at

        return bytes(tensor_at("cuda", vmm.device, address, torch.uint8, (size,)).cpu().numpy().tobytes())
    return ctypes.string_at(address, size)


def run_python(code: str) -> subprocess.CompletedProcess:
    """Run a snippet in a fresh interpreter (for faults and process-level effects)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
