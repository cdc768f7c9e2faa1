"""Torch-free virtual-memory operations: reserve address space, create physical pages,
and map or unmap them in batches, on the host (memfd), CUDA or AscendCL.

The C++ core lives in ``_C``; this module picks a backend and gives the errors their
Python names. Driver errors carry the driver's own error name in ``.name``; running out
of device memory raises :class:`OutOfDeviceMemory` so callers can turn it into a miss.
"""

from __future__ import annotations

from vmkv.vmm_ops import _C
from vmkv.vmm_ops._C import DriverError, OutOfDeviceMemory, Vmm, probe

BACKENDS = ("host", "cuda", "acl")
# "auto" prefers real accelerators and falls back to the host backend.
AUTO_ORDER = ("cuda", "acl", "host")


def resolve_backend(kind: str) -> str:
    """Return the concrete backend for ``kind`` ("auto" picks the first available)."""
    if kind == "auto":
        return next(name for name in AUTO_ORDER if probe(name)["available"])
    if kind not in BACKENDS:
        raise ValueError(f"unknown backend {kind!r}; expected one of {', '.join(BACKENDS)} or 'auto'")
    return kind


def open_vmm(kind: str = "auto", device: int = 0, page_size: int = 0, host_capacity: int = 0) -> Vmm:
    """Open a backend on one device. ``page_size`` 0 means the backend's granularity
    (2 MiB for the host backend); ``host_capacity`` bounds the host backend's memory."""
    return _C.open(resolve_backend(kind), device, page_size, host_capacity)


__all__ = ["BACKENDS", "DriverError", "OutOfDeviceMemory", "Vmm", "open_vmm", "probe", "resolve_backend"]
