"""SGLang's KV memory on vmkv: the pools' buffers and the allocators' free lists.

*Buffers.* A pool's per-layer buffers (``size + page_size`` token rows) come from one
vmkv KV space with one block per SGLang page, so block ids are SGLang's page ids (token
ids when ``page_size`` is 1). A layer's K and V are adjacent, as in SGLang's own fused
allocation. Nothing is zero-filled: SGLang's kernels write a slot before reading it.

*Free lists.* SGLang hands out ids from a device tensor with its own kernels; vmkv only
decides which ids are in that tensor (:class:`vmkv.allocator.paged_ids.PagedIds`). It
grows by a whole KV page of ids when an allocation would run short, and shrinks by the
pages whose every id is free: when the scheduler is idle, and when the coordinator asks
for memory back. The coordinator's request arrives on its own thread, while the free
list, the radix tree and the device stream belong to the scheduler's; so the request is
only noted there (``Reclaimer.on_debt``) and paid on the scheduler's thread, in
:meth:`ElasticIds.settle`, by evicting cold radix-tree entries if freeing is not enough,
after copying them to the spill tier (radix.py) unless VMKV_SPILL=0.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from vmkv.allocator.paged_ids import PagedIds
from vmkv.allocator.tensors import torch_device
from vmkv.integration.sglang.radix import RadixSpill
from vmkv.integration.versions import UnsupportedParallelism
from vmkv.spill import Namespace
from vmkv.stack import KVStack, StackSettings

log = logging.getLogger("vmkv")


def check_single_rank() -> None:
    """Raises UnsupportedParallelism in a server of several ranks (tensor, pipeline or
    attention data parallel): each rank's scheduler runs its own pool and must decide
    exactly as the others do, which a lease of its own would break."""
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized() and distributed.get_world_size() > 1:
        raise UnsupportedParallelism("SGLang", f"{distributed.get_world_size()} ranks")


def vmkv_buffers(pool: Any, shapes: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
    """Tensors of ``shapes`` (token rows first) for ``pool``, from a new KV stack that the
    pool keeps as ``pool.vmkv``."""
    check_single_rank()
    page, rows, dtype = pool.page_size, pool.size + pool.page_size, pool.store_dtype
    block_bytes = [page * math.prod(shape[1:]) * dtype.itemsize for shape in shapes]
    model = os.environ.get("VMKV_MODEL", "sglang")
    settings = StackSettings.from_env("sglang", model, default_name=f"sglang-{os.getpid()}")
    stack = KVStack(torch_device(pool.device), block_bytes, -(-rows // page), settings)
    pool.vmkv = stack
    capacity = stack.space.capacity_blocks * page
    return [stack.space.tensor(i, dtype, (capacity, *s[1:]))[:rows] for i, s in enumerate(shapes)]


def _plain(pool: Any) -> bool:
    """Whether the pool uses the token-major layout vmkv backs (not HND, not AITER's 5-D,
    not a custom memory pool)."""
    return not (
        getattr(pool, "use_hnd", False)
        or getattr(pool, "kv_cache_layout", None) == "vectorized_5d"
        or getattr(pool, "enable_custom_mem_pool", False)
        or getattr(pool, "custom_mem_pool", None) is not None
    )


def _mha_buffers(pool: Any) -> bool:
    """Sets the MHA pool's k_buffer and v_buffer from vmkv; False for layouts it leaves."""
    if not _plain(pool):
        log.warning("vmkv: this KV cache layout stays vanilla (HND, 5-D or custom pool)")
        return False
    rows = pool.size + pool.page_size
    k_shape, v_shape = (rows, pool.head_num, pool.head_dim), (rows, pool.head_num, pool.v_head_dim)
    tensors = vmkv_buffers(pool, [k_shape, v_shape] * pool.layer_num)
    pool.k_buffer, pool.v_buffer = tensors[0::2], tensors[1::2]
    return True


def wrap_mha_create_buffers_normal(original: Any) -> Any:
    """0.5.23: MHATokenToKVPool._create_buffers_normal; SGLang then derives its pointers."""

    def _create_buffers_normal(self: Any) -> None:
        if not _mha_buffers(self):
            original(self)

    return _create_buffers_normal


def wrap_mha_create_buffers(original: Any) -> Any:
    """0.5.15: MHATokenToKVPool._create_buffers makes the buffers and their pointer tables."""

    def _create_buffers(self: Any) -> None:
        if getattr(self, "is_quantized_kv_cache", False) or not _mha_buffers(self):
            return original(self)
        buffers = self.k_buffer + self.v_buffer
        pointers = [t.data_ptr() for t in buffers]
        self.data_ptrs = torch.tensor(pointers, dtype=torch.uint64, device=self.device)
        self.k_data_ptrs, self.v_data_ptrs = self.data_ptrs.split(self.layer_num)
        self.data_strides = torch.tensor([t[0].nbytes for t in buffers], device=self.device)

    return _create_buffers


def wrap_mla_create_buffers(original: Any) -> Any:
    """MLATokenToKVPool._create_buffers (both lines): one latent buffer per layer."""

    def _create_buffers(self: Any) -> None:
        if not _plain(self):
            return original(self)
        shape = (self.size + self.page_size, 1, self.kv_cache_dim)
        self.kv_buffer = vmkv_buffers(self, [shape] * self.layer_num)

    return _create_buffers


class ElasticIds:
    """Mixed into SGLang's token and paged allocators (see the module docstring).

    An allocator whose pool is not on vmkv (a layout vmkv leaves alone) stays vanilla.
    """

    _ids: PagedIds | None = None
    radix_spill: RadixSpill | None = None  # read by the wrapped RadixCache.match_prefix
    auditing = False  # set by the wrapped Scheduler.on_idle around SGLang's leak check

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # runs clear(): the vanilla, full free list
        stack: KVStack | None = getattr(self._kvcache, "vmkv", None)
        if stack is None:
            return
        self._stack = stack
        self._ids = PagedIds(stack.allocator, self.device)
        self._owed = False
        self._free_seen = -1  # free ids at the last idle shrink: skip it while unchanged
        stack.reclaimer.on_debt.append(self._note_debt)
        if stack.settings.spill:
            pool = self._kvcache
            buffers = pool.k_buffer + pool.v_buffer if hasattr(pool, "k_buffer") else pool.kv_buffer
            namespace = Namespace(stack.settings.model, str(pool.store_dtype), 1, hash_seed="sglang-radix")
            stack.open_spill(buffers, namespace)
            self.radix_spill = RadixSpill(stack, self)
        self.clear()

    # -- SGLang's allocator interface ------------------------------------------------------

    def clear(self) -> None:
        """Every id is free again (flush_cache, release_memory_occupation): back to page 0
        alone, and the other pages' memory goes back to the device and the coordinator."""
        super().clear()
        if self._ids is not None:
            self._ids.release_all()
            self._stack.give_back()
            self.free_pages = self._ids.initial()

    def available_size(self) -> int:
        """What SGLang may allocate: its free list, the spare mapped pages and what the
        coordinator would grant now. While ``auditing``, vanilla's count instead: every id
        not handed out, which SGLang's idle leak check expects to add up, with the radix
        tree's, to the pool's size (it raises otherwise)."""
        free = super().available_size()
        if self._ids is None:
            return free
        if self.auditing:
            return free + self._ids.unlisted() * self.page_size
        spare = self._stack.allocator.num_free_mapped_blocks()  # empty pages kept mapped
        return free + (spare + self._stack.grantable_blocks()) * self.page_size

    def owes(self) -> bool:
        """Whether reclaim asked for more pages than this instance had idle: it then
        admits no new request (see wrap_get_num_allocatable_reqs)."""
        return self._ids is not None and self._stack.owes()

    def alloc(self, need_size: int, *args: Any, **kwargs: Any) -> torch.Tensor | None:
        self._ensure(need_size // self.page_size)
        return super().alloc(need_size, *args, **kwargs)

    def alloc_extend(self, prefix_lens: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor | None:
        extend_tokens = kwargs["extend_num_tokens"] if "extend_num_tokens" in kwargs else args[4]
        self._ensure(extend_tokens // self.page_size + len(prefix_lens) + 1)  # SGLang's own bound
        return super().alloc_extend(prefix_lens, *args, **kwargs)

    def alloc_decode(self, seq_lens: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor | None:
        self._ensure(len(seq_lens))
        return super().alloc_decode(seq_lens, *args, **kwargs)

    # -- vmkv ------------------------------------------------------------------------------

    def _ensure(self, ids: int) -> None:
        """Grow the free list so that ``ids`` can be handed out; on a miss leave it, and
        SGLang's allocation returns None (it evicts or retracts, as when full)."""
        if self._ids is None:
            return
        if self._owed:
            self.settle(None)
        self._stack.report_reclaimable(0)  # busy: nothing could go back at once
        short = ids - super().available_size() // self.page_size
        if short > 0 and (fresh := self._ids.grow(short)) is not None:
            self.free_pages = torch.cat((self.free_pages, fresh))

    def prefetch_for(self, tokens: int) -> None:
        """A waiting request needs ``tokens`` free tokens to be admitted: lease what it
        lacks for a later turn (see KVStack.prefetch and wrap_get_num_allocatable_reqs)."""
        if self._ids is not None:
            self._stack.prefetch(-(-tokens // self.page_size) - self.available_size() // self.page_size)

    def report_idle(self, tree_cache: Any) -> None:
        """On an idle turn: tell reclaim what this instance could give back at once, the
        KV pages its free ids and its evictable radix entries fill, but page 0, which
        holds the padding id (KVStack.report_reclaimable)."""
        if self._ids is None:
            return
        tokens = super().available_size() + (tree_cache.evictable_size() if tree_cache is not None else 0)
        self._stack.report_reclaimable(tokens // self.page_size, pinned_pages=1)

    def _note_debt(self) -> None:  # the coordinator's thread
        self._owed = True

    def _shrink(self) -> None:
        """Drop the ids of wholly free pages from the free list; their pages go back."""
        self.merge_and_sort_free()
        self.free_pages = self._ids.shrink(self.free_pages)

    def settle(self, tree_cache: Any) -> None:
        """On the scheduler's thread: pay what the coordinator asked for (first with free
        pages, then by evicting cold radix-tree entries), and give back wholly free pages
        once the free list has changed."""
        if self._ids is None:
            return
        free = super().available_size()
        if not self._owed and free == self._free_seen:
            return
        stack = self._stack
        self._shrink()
        if self._owed:
            owed_pages = stack.debt_kv_pages()
            if owed_pages and tree_cache is not None and tree_cache.evictable_size() > 0:
                from sglang.srt.mem_cache.base_prefix_cache import EvictParams

                tokens = owed_pages * self._ids.ids_per_page * self.page_size
                if self.radix_spill is not None:
                    self.radix_spill.spill_coldest(tree_cache, tokens)
                tree_cache.evict(EvictParams(num_tokens=tokens))
                self._shrink()
            stack.pay()  # from the pages now empty
            self._owed = stack.owes() and tree_cache is None
        self._free_seen = super().available_size()


def elastic(base: type) -> type:
    """SGLang allocator class ``base`` with vmkv's free-list management mixed in."""
    return type(f"Vmkv{base.__name__}", (ElasticIds, base), {"__module__": __name__})


def wrap_get_num_allocatable_reqs(original: Any) -> Any:
    """Scheduler.get_num_allocatable_reqs, which SGLang asks whenever requests wait.

    * 0 while the allocator owes pages, so SGLang admits no new request, while its
      running requests go on decoding (its chunked prefill in progress too: SGLang skips
      this check for it). Their pages then empty as they finish and pay the debt.
      Counting the debt out of ``available_size`` instead would make SGLang retract
      running requests to fit the next decode step, recomputing them.
    * Otherwise, when the first waiting request does not fit what is available, lease
      what it lacks in the background (ElasticIds.prefetch_for): SGLang admits only what
      ``available_size`` covers, which holds only what the coordinator grants at once,
      so without this an instance whose neighbour holds the budget would never ask."""
    from sglang.srt.managers.schedule_policy import CLIP_MAX_NEW_TOKENS

    def get_num_allocatable_reqs(self: Any, *args: Any, **kwargs: Any) -> int:
        allocator = getattr(self, "token_to_kv_pool_allocator", None)
        if isinstance(allocator, ElasticIds):
            if allocator.owes():
                return 0
            if waiting := getattr(self, "waiting_queue", None):
                first = waiting[0]  # SGLang's own admission estimate: prompt + clipped output
                new_tokens = min(first.sampling_params.max_new_tokens or 0, CLIP_MAX_NEW_TOKENS)
                allocator.prefetch_for(len(first.origin_input_ids) + new_tokens)
        return original(self, *args, **kwargs)

    return get_num_allocatable_reqs


def wrap_on_idle(original: Any) -> Any:
    """Scheduler.on_idle: SGLang's own turn (its leak check then counts every id not
    handed out as free, see ElasticIds.available_size), then settle the allocator's memory
    with the coordinator and report what it could give back (ElasticIds.report_idle).

    SGLang calls this whenever it found no batch to run. Then, with no request running,
    it reopens admission: when wrap_get_num_allocatable_reqs said 0 (a debt), SGLang marked
    the running batch full, and in 0.5.15 only a request leaving that batch clears the
    mark; with none left to leave, requests would wait forever, the debt long paid."""

    def on_idle(self: Any, *args: Any, **kwargs: Any) -> Any:
        allocator = getattr(self, "token_to_kv_pool_allocator", None)
        if not isinstance(allocator, ElasticIds):
            return original(self, *args, **kwargs)
        allocator.auditing = True
        try:
            result = original(self, *args, **kwargs)
        finally:
            allocator.auditing = False
        tree_cache = getattr(self, "tree_cache", None)
        allocator.settle(tree_cache)
        running = getattr(self, "running_batch", None)
        if running is None or not running.is_empty() or getattr(self, "chunked_req", None) is not None:
            return result
        allocator.report_idle(tree_cache)  # no request holds ids: nothing counted is in use
        if not allocator.owes():
            running.batch_is_full = False
        return result

    return on_idle
