"""Worker side: vLLM's KV cache tensors, backed by a vmkv KV space.

vLLM 0.32 allocates one zero-filled backing buffer and views it per layer; block ``b``
of layer ``l`` sits at ``offset + l * layer_stride + b * block_stride``. Here each layer
is a buffer of a KV space instead, and vLLM's own ``create_kv_cache_views`` makes the
per-layer views, so shapes, strides and dtypes are exactly vanilla's (a layer's view
does not show the distance between layers). Nothing is zero-filled: pages are mapped
when the block pool hands their blocks out.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vmkv.allocator.tensors import tensor_at
from vmkv.stack import KVStack, StackSettings

if TYPE_CHECKING:
    import torch
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.kv_cache_layout import KVCacheLayout


@dataclasses.dataclass
class WorkerKV:
    stack: KVStack
    layer_views: list[torch.Tensor]  # in layer order: what the spill tier copies
    block_pool: Any = None  # the scheduler's VmkvBlockPool over this cache, once built


_worker: WorkerKV | None = None
_profiling = False  # inside a profiling-only KV allocation (vLLM's minimal CUDA-graph cache)


class UnsupportedKVLayout(RuntimeError):
    pass


def current_worker() -> WorkerKV:
    """The KV cache of this process's worker (the scheduler shares its process at TP=1)."""
    if _worker is None:
        raise RuntimeError(
            "vmkv's block pool found no vmkv KV cache in this process: vmkv needs the "
            "scheduler and the worker in one process: tensor parallel size 1 with "
            "--distributed-executor-backend uni (on the CPU, vLLM also needs "
            "VLLM_ENABLE_V1_MULTIPROCESSING=0 to keep the uni executor)"
        )
    return _worker


def allocate_kv_cache(
    kv_cache_config: KVCacheConfig,
    device: torch.device,
    layout: KVCacheLayout,
    kernel_block_sizes: list[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Drop-in for ``vllm.v1.worker.utils.allocate_kv_cache`` over a vmkv KV space."""
    import torch
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs, create_kv_cache_views
    from vllm.v1.worker import utils

    global _worker
    if _profiling:  # a throwaway cache for profiling: vanilla, never leased
        return utils.allocate_kv_cache(kv_cache_config, device, layout, kernel_block_sizes)
    tensors = kv_cache_config.kv_cache_tensors
    if not tensors:
        return {}
    if len({(t.size, t.layer_stride, t.block_stride, t.offset) for t in tensors}) != 1:
        raise UnsupportedKVLayout("vmkv supports KV cache tensors that share one placement")
    first = tensors[0]
    num_blocks = kv_cache_config.num_blocks_of(first)
    num_layers = len(first.layers)
    if (
        not layout.is_layer_compact
        or first.offset != 0
        or first.layer_stride != num_blocks * first.block_stride
    ):
        raise UnsupportedKVLayout(
            f"vmkv needs a layer-outermost KV layout with contiguous blocks; got {layout.name} "
            f"(layer stride {first.layer_stride}, block stride {first.block_stride}). "
            "Set VLLM_KV_CACHE_LAYOUT=LBNHC or LBHNC, or unset VMKV"
        )
    if _worker is not None:
        raise RuntimeError("vmkv allocates one KV cache per process; this one already has it")
    settings = _settings()
    stack = KVStack(device, [first.block_stride] * num_layers, num_blocks, settings)
    space = stack.space
    raw = tensor_at(stack.vmm.kind, device.index or 0, space.base, torch.int8, (space.nbytes,))
    placed = dataclasses.replace(
        first, size=space.nbytes, layer_stride=space.capacity_blocks * first.block_stride
    )
    kv_caches: dict[str, torch.Tensor] = {}
    for tensor in tensors:
        group_id, group = next(
            (i, g) for i, g in enumerate(kv_cache_config.kv_cache_groups) if tensor.layers[0] in g.layer_names
        )
        spec = group.kv_cache_spec
        if isinstance(spec, UniformTypeKVCacheSpecs):
            spec = spec.kv_cache_specs[tensor.layers[0]]
        kernel_block_size = None
        if kernel_block_sizes is not None and group_id < len(kernel_block_sizes):
            kernel_block_size = kernel_block_sizes[group_id]
        views = create_kv_cache_views(
            raw,
            spec,
            num_blocks,
            layout,
            dataclasses.replace(placed, layers=tensor.layers),
            kernel_block_size,
        )
        kv_caches.update(zip(tensor.layers, views, strict=True))
    _worker = WorkerKV(stack, [kv_caches[name] for name in first.layers])
    return kv_caches


def wrap_initialize_kv_cache(original: Callable[..., None]) -> Callable[..., None]:
    """``GPUModelRunner.initialize_kv_cache`` that tells allocate_kv_cache whether this is
    a profiling-only allocation."""

    @functools.wraps(original)
    def initialize_kv_cache(
        self: Any, kv_cache_config: Any, is_profiling: bool = False, **kwargs: Any
    ) -> None:
        global _profiling
        _profiling = is_profiling
        try:
            original(self, kv_cache_config, is_profiling, **kwargs)
        finally:
            _profiling = False

    return initialize_kv_cache


def _settings() -> StackSettings:
    from vllm.config import get_current_vllm_config

    config = get_current_vllm_config()
    served = config.model_config.served_model_name
    name = served if isinstance(served, str) else (served[0] if served else config.model_config.model)
    return StackSettings.from_env("vllm", config.model_config.model, name)
