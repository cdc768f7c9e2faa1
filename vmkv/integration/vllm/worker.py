"""Worker side: vLLM's KV cache tensors, backed by a vmkv KV space.

vLLM 0.26 (both model runners) allocates one zero-filled raw buffer per
``KVCacheTensor`` (shared by its layers) and reshapes it with the attention backend's
shape. Here each raw buffer is a buffer of a KV space instead
(:func:`allocate_raw_kv_cache`). Mapping a KV page backs the same blocks in every buffer,
which is right only if a block is one contiguous slice of each buffer: the pool checks
that on the reshaped tensors (:func:`check_blocks_outermost`).

vLLM 0.32 allocates one zero-filled backing buffer and views it per layer; block ``b``
of layer ``l`` sits at ``offset + l * layer_stride + b * block_stride``. Here each layer
is a buffer of a KV space instead, and vLLM's own ``create_kv_cache_views`` makes the
per-layer views, so shapes, strides and dtypes are exactly vanilla's (a layer's view
does not show the distance between layers). Nothing is zero-filled: pages are mapped
when the block pool hands their blocks out.

At tensor parallel size > 1 (0.32, vLLM's multiprocessing executor) a rank joins no
coordinator: its allocation reserves the same layout for its shard and serves a
:mod:`vmkv.ranks` channel, and the scheduler's block pool, in the engine's process,
drives every rank as one backend (:func:`scheduler_kv`).
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import inspect
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vmkv.allocator.kv_space import blocks_are_outermost
from vmkv.allocator.tensors import tensor_at, torch_device
from vmkv.integration.versions import UnsupportedParallelism, release_line, tensor_parallel_lines
from vmkv.ranks import RankGroup, RankServer
from vmkv.stack import KVStack, StackSettings, capacity_bytes, open_backend

log = logging.getLogger("vmkv")

if TYPE_CHECKING:
    import torch
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.kv_cache_layout import KVCacheLayout


@dataclasses.dataclass
class WorkerKV:
    stack: KVStack
    layer_views: list[torch.Tensor]  # in layer order, blocks first: what the spill tier copies
    kv_dtype: str  # the model's KV cache dtype (part of the spill namespace)
    bound_layers: dict[str, Any] = dataclasses.field(default_factory=dict)  # vLLM's attention layers
    block_pool: Any = None  # the scheduler's VmkvBlockPool over this cache, once built


_worker: WorkerKV | None = None
_rank: RankServer | None = None  # this process's KV shard, at tensor parallel size > 1
_profiling = False  # inside a profiling-only KV allocation (vLLM's minimal CUDA-graph cache)


class UnsupportedKVLayout(RuntimeError):
    pass


def current_worker() -> WorkerKV:
    """The KV cache of this process's worker (the scheduler shares its process at TP=1)."""
    if _worker is None:
        raise RuntimeError(
            "vmkv's block pool found no vmkv KV cache in this process and no vmkv ranks it "
            "spawned: vmkv needs the scheduler and the worker in one process "
            "(--distributed-executor-backend uni; on the CPU, vLLM also needs "
            "VLLM_ENABLE_V1_MULTIPROCESSING=0), or tensor-parallel ranks of vLLM's "
            "multiprocessing executor"
        )
    return _worker


def scheduler_kv() -> WorkerKV:
    """The KV cache the scheduler's block pool hands out: this process's worker's, or
    that of the tensor-parallel ranks this process spawned, driven as one (vmkv.ranks):
    the pool then maps, unmaps, spills and reloads pages on every rank."""
    global _worker
    if _worker is None and (ranks := RankGroup.connect()) is not None:
        _worker = WorkerKV(KVStack.over_ranks(ranks, _settings()), [], "auto")
        log.info("vmkv drives %d tensor-parallel ranks", len(ranks.infos))
    return current_worker()


def allocate_kv_cache(
    kv_cache_config: KVCacheConfig,
    device: torch.device,
    layout: KVCacheLayout,
    kernel_block_sizes: list[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Drop-in for ``vllm.v1.worker.utils.allocate_kv_cache`` over a vmkv KV space (at
    tensor parallel size > 1, over this rank's reservation, mapped as the scheduler says)."""
    import torch
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs, create_kv_cache_views
    from vllm.v1.worker import utils

    global _worker, _rank
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
    if _worker is not None or _rank is not None:
        raise RuntimeError("vmkv allocates one KV cache per process; this one already has it")
    block_bytes = [first.block_stride] * num_layers
    world = get_tensor_model_parallel_world_size()
    if world > 1:
        rank = get_tensor_model_parallel_rank()
        # vLLM's multiprocessing executor spawns the ranks from the scheduler's process.
        _rank = RankServer(open_backend(device), block_bytes, num_blocks, rank, world, os.getppid())
        atexit.register(_rank.unlink)  # the scheduler unlinks it when it connects
        kind, base, geometry = _rank.vmm.kind, _rank.base, _rank.layout
    else:
        stack = KVStack(device, block_bytes, num_blocks, _settings())
        kind, base, geometry = stack.vmm.kind, stack.space.base, stack.space.layout
    raw = tensor_at(kind, device.index or 0, base, torch.int8, (geometry.nbytes,))
    placed = dataclasses.replace(
        first, size=geometry.nbytes, layer_stride=geometry.capacity_blocks * first.block_stride
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
    layer_views = [kv_caches[name] for name in first.layers]
    if world > 1:
        _rank.layer_views = layer_views
    else:
        _worker = WorkerKV(stack, layer_views, str(layer_views[0].dtype))
    return kv_caches


def allocate_raw_kv_cache(kv_cache_config: KVCacheConfig, device: torch.device) -> dict[str, torch.Tensor]:
    """Drop-in for vLLM 0.26's raw KV allocation: one int8 buffer of ``size`` bytes per
    ``KVCacheTensor``, shared by its layers, each a buffer of one KV space."""
    import torch
    from vllm.config import get_current_vllm_config

    global _worker
    tensors = kv_cache_config.kv_cache_tensors
    if not tensors:
        return {}
    num_blocks = kv_cache_config.num_blocks
    if any(t.block_stride for t in tensors) or any(t.size % num_blocks for t in tensors):
        raise UnsupportedKVLayout(
            "vmkv needs one KV buffer per layer whose size is a whole number of blocks "
            "(vLLM's packed cross-layer layout is not supported); unset VMKV"
        )
    if _worker is not None:
        raise RuntimeError("vmkv allocates one KV cache per process; this one already has it")
    stack = KVStack(device, [t.size // num_blocks for t in tensors], num_blocks, _settings())
    raw: dict[str, torch.Tensor] = {}
    views: list[torch.Tensor] = []
    for i, tensor in enumerate(tensors):
        buffer = stack.space.tensor(i, torch.int8, (tensor.size,))
        raw.update(dict.fromkeys(tensor.shared_by, buffer))
        views.append(buffer.view(num_blocks, tensor.size // num_blocks))
    spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
    layers = get_current_vllm_config().compilation_config.static_forward_context
    bound = {name: layers[name] for t in tensors for name in t.shared_by if name in layers}
    _worker = WorkerKV(stack, views, str(getattr(spec, "dtype", "auto")), bound)
    return raw


def allocate_v2_kv_cache(
    kv_cache_config: KVCacheConfig, shared_layers: dict[str, str], device: torch.device
) -> dict[str, torch.Tensor]:
    """Drop-in for vLLM 0.26's V2 runner ``attn_utils._allocate_kv_cache``: the same raw
    buffers as the V1 runner's (layers that share another's KV get none, as in vanilla)."""
    return allocate_raw_kv_cache(kv_cache_config, device)


def wrap_warmup_kernels(original: Callable[..., None]) -> Callable[..., None]:
    """vLLM 0.26's V2 ``warmup_kernels`` runs a made-up prefill and decode with blocks
    1, 2, ... that no scheduler handed out, and writes their KV. On vmkv a block's page
    is mapped only once the allocator hands it out, so each made-up step first takes the
    pages it names (KVStack.map_blocks), and the warmup gives them all back at its end,
    to the coordinator too: they are no working set."""

    @functools.wraps(original)
    def warmup_kernels(
        model_runner: Any, execute_model: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> None:
        if _worker is None:
            return original(model_runner, execute_model, *args, **kwargs)
        stack = _worker.stack
        taken: list[int] = []

        def execute_with_pages(scheduler_output: Any) -> Any:
            taken.extend(stack.map_blocks(_named_blocks(scheduler_output)))
            return execute_model(scheduler_output)

        try:
            return original(model_runner, execute_with_pages, *args, **kwargs)
        finally:
            stack.return_pages(taken)

    return warmup_kernels


def _named_blocks(scheduler_output: Any) -> set[int]:
    """The block ids a scheduler output hands the model runner."""
    named: set[int] = set()
    for request in scheduler_output.scheduled_new_reqs:
        for group in request.block_ids:
            named.update(group)
    for groups in scheduler_output.scheduled_cached_reqs.new_block_ids:
        for group in groups or ():
            named.update(group)
    return named


def wrap_allocate_kv_cache_tensors(original: Callable[..., dict[str, torch.Tensor]]) -> Callable[..., Any]:
    """vLLM 0.26's V1 ``GPUModelRunner._allocate_kv_cache_tensors``, over a KV space
    except for profiling-only caches."""

    @functools.wraps(original)
    def _allocate_kv_cache_tensors(self: Any, kv_cache_config: KVCacheConfig) -> dict[str, torch.Tensor]:
        if _profiling:
            return original(self, kv_cache_config)
        return allocate_raw_kv_cache(kv_cache_config, self.device)

    return _allocate_kv_cache_tensors


def check_blocks_outermost(worker: WorkerKV) -> None:
    """Raises UnsupportedKVLayout unless every bound layer's KV tensor keeps each block
    in one contiguous slice of its buffer."""
    if not worker.bound_layers:  # none on 0.32, whose allocation checks the layout itself
        return
    num_blocks = worker.layer_views[0].shape[0]
    for name, layer in worker.bound_layers.items():
        cache = getattr(layer, "kv_cache", None)
        for tensor in cache if isinstance(cache, list) else [cache]:
            if tensor is not None and tensor.numel() and not blocks_are_outermost(tensor, num_blocks):
                raise UnsupportedKVLayout(
                    f"layer {name}'s KV cache {tuple(tensor.shape)} (strides {tensor.stride()}) does "
                    "not keep a block contiguous; this attention backend cannot run on vmkv, unset VMKV"
                )


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


def wrap_worker_init(original: Callable[..., None]) -> Callable[..., None]:
    """A worker's ``__init__`` that, when the user set no KV cache size, first sets it to
    the instance's vmkv capacity (its max, or the coordinator's budget), as if given on
    the command line: vLLM's profile of free memory would count the neighbours' elastic KV
    caches as taken, differently at each start. Tensor-parallel ranks that share a
    device (the host) share that capacity."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs).arguments
        config = bound["vllm_config"]
        check_parallelism(config.parallel_config)
        if not config.cache_config.kv_cache_memory_bytes:
            from vllm.platforms import current_platform

            device = torch_device(current_platform.device_type, bound.get("local_rank", 0))
            sharing = config.parallel_config.tensor_parallel_size if device.type == "cpu" else 1
            config.cache_config.kv_cache_memory_bytes = capacity_bytes(device, _settings(config)) // sharing
        original(self, *args, **kwargs)

    return __init__


def check_parallelism(parallel: Any) -> None:
    """Raises UnsupportedParallelism unless the engine is one worker, or tensor-parallel
    ranks that vLLM's multiprocessing executor spawns (the scheduler finds their
    channels under its own process id) on a release line that supports them."""
    import vllm

    others = {"pipeline": parallel.pipeline_parallel_size, "data": parallel.data_parallel_size}
    used = ", ".join(f"{kind} parallel size {size}" for kind, size in others.items() if size > 1)
    if used:
        raise UnsupportedParallelism("vLLM", used)
    tensor = parallel.tensor_parallel_size
    if tensor == 1:
        return
    lines = tensor_parallel_lines("vllm")
    if release_line(vllm.__version__, lines) not in lines:
        raise UnsupportedParallelism("vLLM", f"tensor parallel size {tensor} on vLLM {vllm.__version__}")
    if parallel.distributed_executor_backend != "mp":
        backend = parallel.distributed_executor_backend
        raise UnsupportedParallelism("vLLM", f"tensor parallel size {tensor} under the {backend!r} executor")


def wrap_execute_model(original: Callable[..., Any]) -> Callable[..., Any]:
    """``Worker.execute_model`` that tells this rank's channel when a step has run, so
    that an unmap the scheduler decided after sending it waits for it (vmkv.ranks)."""

    @functools.wraps(original)
    def execute_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(self, *args, **kwargs)
        finally:
            if _rank is not None:
                _rank.step_done()

    return execute_model


def wrap_scheduler_init(original: Callable[..., None]) -> Callable[..., None]:
    """``Scheduler.__init__`` with its config current, as in the workers, so that the
    block pool it builds reads vmkv's settings for this instance from it."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(signature.bind(self, *args, **kwargs).arguments["vllm_config"]):
            original(self, *args, **kwargs)

    return __init__


def _settings(config: Any = None) -> StackSettings:
    """vmkv's settings for the instance of ``config`` (default: vLLM's current config)."""
    from vllm.config import get_current_vllm_config

    config = config or get_current_vllm_config()
    served = config.model_config.served_model_name
    name = served if isinstance(served, str) else (served[0] if served else config.model_config.model)
    return StackSettings.from_env("vllm", config.model_config.model, name)
