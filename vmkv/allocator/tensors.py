"""Torch tensors over raw device addresses, without copying and without linking torch
into the C++ core. torch is imported lazily: the rest of vmkv works without it."""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class _CudaRegion:
    """Describes device memory through ``__cuda_array_interface__`` (as bytes)."""

    def __init__(self, address: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (address, False),
            "version": 3,
            "strides": None,
            "stream": None,
        }


def _host_bytes(address: int, nbytes: int) -> torch.Tensor:
    import torch

    # frombuffer keeps the ctypes array alive; the array does not own the memory.
    return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(address), dtype=torch.uint8)


def _cuda_bytes(address: int, nbytes: int, device: int) -> torch.Tensor:
    import torch

    return torch.as_tensor(_CudaRegion(address, nbytes), device=torch.device("cuda", device))


def _npu_bytes(address: int, nbytes: int, device: int) -> torch.Tensor:
    import torch
    import torch_npu

    storage = torch_npu._C._construct_storage_from_data_pointer(address, torch.device("npu", device), nbytes)
    metadata = {"dtype": torch.uint8, "size": (nbytes,), "stride": (1,), "storage_offset": 0}
    return torch_npu._C._construct_NPU_Tensor_From_Storage_And_Metadata(metadata, storage)


def tensor_at(kind: str, device: int, address: int, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """A contiguous ``dtype`` tensor of ``shape`` over memory at ``address`` on a
    backend's device (host: CPU memory; cuda: a CUDA device; acl: an Ascend NPU)."""
    import torch

    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if kind == "host":
        raw = _host_bytes(address, nbytes)
    elif kind == "cuda":
        raw = _cuda_bytes(address, nbytes, device)
    elif kind == "acl":
        raw = _npu_bytes(address, nbytes, device)
    else:
        raise ValueError(f"unknown backend {kind!r}")
    return raw.view(dtype).view(tuple(shape))


def torch_device(name: str, index: int | None = None) -> torch.device:
    """The torch device an engine names ("cpu", "cuda", "cuda:1", "npu"): the host as
    plain "cpu"; an accelerator at ``index``, else at the index in ``name``, else at the
    current one."""
    import torch

    device = torch.device(name)
    if device.type == "cpu":
        return torch.device("cpu")
    if index is None:
        index = device.index if device.index is not None else torch.get_device_module(device).current_device()
    return torch.device(device.type, index)
