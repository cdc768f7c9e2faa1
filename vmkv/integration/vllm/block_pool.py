"""Scheduler side: vLLM's BlockPool, elastic.

vLLM's pool owns a fixed number of blocks and keeps every free one in its free queue.
Here the pool sees the instance's *virtual* capacity, and a free block is one of two
things:

* a cached free block (it holds a prefix, no request uses it): it stays in vLLM's free
  queue, in vLLM's LRU order, and its page stays mapped;
* an empty block: it lives in the vmkv block allocator, whose pages map on demand and go
  back to the coordinator once all their blocks are empty.

New blocks come from the allocator first (page-aware, leased), and from evicting cached
blocks (vLLM's own LRU) only when the lease cannot grow. The free count is what can
really be had now: empty blocks on mapped pages, cached free blocks, and what the
coordinator would grant from free budget. While the instance owes others pages, a
scheduling step admits no new request (``wrap_schedule``): a freed block reused by a
new request keeps its page from emptying, and the instance would pay only once its whole
queue drained. Running requests keep growing while they finish, since preempting them
means computing their tokens again; but a debt still unpaid after VMKV_DEBT_GRACE_S
makes vLLM preempt the running requests on the pages that the fewest of them share
(``preempting``), and those pages go at once. When the first waiting request does not fit, the pool
leases what it lacks in the background (``on_shortfall``), taking other instances' idle
pages, so the request fits a step later. When another instance needs memory, reclaim
takes whole pages of cold cached blocks, spilling them to the host tier first. The free
count can promise budget that another instance takes before the allocation: that
allocation is then vLLM's own miss (``wrap_allocate_slots``), as when its pool runs short.

The hooks work per scheduling step, not per request: vLLM calls allocate_slots and the
free count for every request of every step, and whatever vmkv adds there is paid that
many times over.

Every method that touches the free queue or the hash map holds the allocator's lock:
reclaim runs on the coordinator's thread.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import (
    BlockHash,
    BlockHashWithGroupId,
    FreeKVCacheBlockQueue,
    KVCacheBlock,
    make_block_hash_with_group_id,
)
from vllm.v1.core.sched.request_queue import SchedulingPolicy
from vllm.v1.request import Request, RequestStatus

from vmkv.allocator.reclaim import holders_to_preempt
from vmkv.integration.vllm.worker import check_blocks_outermost, scheduler_kv

# How long get_new_blocks keeps asking the coordinator after a race lost the budget it
# had counted as free (KVStack.alloc_waiting). Past this the allocation is a miss that
# vLLM handles as its own (KVBlocksUnavailable).
GROW_RETRY_S = 0.2


class KVBlocksUnavailable(RuntimeError):
    """The blocks the free count promised could not be had in time (see
    VmkvBlockPool._grow); wrap_allocate_slots turns this into vLLM's own miss."""


class VmkvBlockPool(BlockPool):
    def __init__(
        self, num_gpu_blocks: int, enable_caching: bool, hash_block_size: int, *args: Any, **kwargs: Any
    ) -> None:
        from vllm.v1.core import kv_cache_utils

        from vmkv.spill import Namespace

        worker = scheduler_kv()
        check_blocks_outermost(worker)
        self._stack = worker.stack
        self._allocator = worker.stack.allocator
        if num_gpu_blocks > self._allocator.num_blocks:
            raise ValueError(f"{num_gpu_blocks} blocks exceed the KV space's {self._allocator.num_blocks}")
        # Blocks lookups found during the scheduler step in progress: the scheduler touches
        # them later in the same step, so reclaim (on another thread) must leave them.
        self._step_hits: set[int] = set()
        self._scheduling = False
        self._step_blocks = 0  # new blocks taken in this scheduling step: mapped ahead after it
        self._pages = worker.stack.pool
        self._grantable, self._grantable_changes = 0, -1
        self.reloaded_blocks = 0
        self.grow_misses = 0  # allocations that lost counted budget to a neighbour
        super().__init__(num_gpu_blocks, enable_caching, hash_block_size, *args, **kwargs)
        self._lock = self._allocator.lock
        self._free_mapped_blocks = self._allocator.num_free_mapped_blocks
        # Only cached free blocks queue here; empty ones live in the allocator.
        self.free_block_queue = FreeKVCacheBlockQueue([])
        for block in self.blocks:
            block.prev_free_block = block.next_free_block = None
        worker.block_pool = self
        if enable_caching:
            namespace = Namespace(
                model=self._stack.settings.model,
                kv_dtype=worker.kv_dtype,
                block_size=hash_block_size,
                # Hashes chain from NONE_HASH: instances share blocks only if it agrees.
                hash_seed=bytes(getattr(kv_cache_utils, "NONE_HASH", b"")).hex(),
            )
            self._stack.attach_cache(self, worker.layer_views, namespace)

    # -- counts --------------------------------------------------------------------------

    def get_num_free_blocks(self) -> int:
        """vLLM asks this for every request of every step, so it reads counters without
        the lock: reclaim on the coordinator's thread may move a block between the two
        counts in between, and the answer is then off by a few blocks for one step, which
        get_new_blocks absorbs (it asks the coordinator again).

        KVStack.grantable_blocks asks the coordinator: once per scheduling step, and
        again whenever this instance's pages change (the mapper's included)."""
        if self._grantable_changes != self._pages.changes or not self._scheduling:
            self._grantable, self._grantable_changes = self._stack.grantable_blocks(), self._pages.changes
        return self._free_mapped_blocks() + self.free_block_queue.num_free_blocks + self._grantable

    def _count_everything(self) -> int:
        """The free count inside reset_prefix_cache: vLLM's own accounting, every block
        not referenced."""
        return self.num_gpu_blocks - 1 - self._num_referenced()

    def get_usage(self) -> float:
        return self._num_referenced() / max(1, self.num_gpu_blocks - 1)

    def _num_referenced(self) -> int:
        with self._lock:
            return self._allocator.stats().used_blocks - self.free_block_queue.num_free_blocks

    def owes(self) -> bool:
        return self._stack.owes()

    def requests_to_preempt(
        self, running: Sequence[Request], block_ids: Callable[[str], tuple[list[int], ...]]
    ) -> list[Request]:
        """The running requests whose blocks keep the pages of an overdue debt (see
        KVStack.overdue_kv_pages and holders_to_preempt); none while the debt is young."""
        pages = self._stack.overdue_kv_pages()
        if pages == 0 or not running:
            return []
        with self._lock:
            holdings = {r.request_id: [b for ids in block_ids(r.request_id) for b in ids] for r in running}
            cold = [block for block, _ in self.cold_blocks()]
            chosen = set(holders_to_preempt(self._allocator, holdings, cold, pages))
        return [r for r in running if r.request_id in chosen]

    def step_out(self) -> None:
        """The step just scheduled goes to the ranks: unmaps decided from now on wait
        until they have run it (vmkv.ranks). Counted last, so that an unmap in this
        step's own scheduling (a debt paid after a preemption) waits only for the steps
        already sent."""
        ranks = self._stack.ranks
        if ranks is not None:
            ranks.note_step()

    def pay_debt(self) -> None:
        """After a preemption: the preempted requests' blocks are free or cold now."""
        self._stack.pay()

    def on_shortfall(self, tokens: int) -> None:
        """A request of ``tokens`` more tokens did not fit: lease the blocks it lacks for
        the next scheduling step (see KVStack.prefetch)."""
        needed = -(-tokens // self.hash_block_size) + 1
        self._stack.prefetch(needed - self.get_num_free_blocks())

    # -- allocation ----------------------------------------------------------------------

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Empty blocks from the allocator first, then cached free blocks (evicted), in
        one pass under the lock: vLLM asks for every request that crosses into a block."""
        self._step_blocks += num_blocks
        with self._lock:
            fresh = self._allocator.alloc_up_to(num_blocks)
            missing = num_blocks - len(fresh)
            if missing == 0:
                return self._hand_out(fresh, [])
            cached = self.free_block_queue.popleft_n(min(missing, self.free_block_queue.num_free_blocks))
            missing -= len(cached)
            if missing == 0:
                return self._hand_out(fresh, cached)
        fresh += self._grow(missing, fresh, cached)
        with self._lock:
            return self._hand_out(fresh, cached)

    def _grow(self, missing: int, fresh: list[int], cached: list[KVCacheBlock]) -> list[int]:
        """``missing`` more blocks once the coordinator grants them: the budget counted
        as free went to another instance meanwhile. After GROW_RETRY_S the blocks taken
        so far go back, the free count is read afresh (the budget is gone), and the
        allocation is a miss."""
        more = self._stack.alloc_waiting(missing, GROW_RETRY_S)
        if more is None:
            with self._lock:
                self._allocator.free(fresh)
                self.free_block_queue.append_n(cached)
                self._grantable_changes = -1
                self.grow_misses += 1
            raise KVBlocksUnavailable(f"vmkv could not have {missing} more KV blocks in {GROW_RETRY_S} s")
        return more

    def _hand_out(self, fresh: list[int], cached: list[KVCacheBlock]) -> list[KVCacheBlock]:
        """What vLLM's get_new_blocks does to the blocks it pops; empty blocks have no
        hash to evict."""
        pool = self.blocks
        blocks = [pool[block_id] for block_id in fresh] + cached
        if getattr(self, "_reuse_watchers", None):  # vLLM 0.32 and later
            self._notify_reuse(blocks)
        if cached and self.enable_caching:
            for block in cached:
                self._maybe_evict_cached_block(block)
        for block in blocks:
            block.ref_cnt += 1
        if self.metrics_collector:
            for block in blocks:
                self.metrics_collector.on_block_allocated(block)
        return blocks

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        to_cache: list[KVCacheBlock] = []
        empty: list[int] = []
        with self._lock:
            for block in ordered_blocks:
                owner = getattr(block, "pool", None)  # vLLM 0.32 and later
                if owner is not None and owner is not self:
                    owner.free_blocks([block])
                    continue
                block.ref_cnt -= 1
                if block.ref_cnt == 0 and not block.is_null:
                    if self.enable_caching and block.block_hash is not None:
                        to_cache.append(block)
                    else:
                        empty.append(block.block_id)
            if to_cache:
                self.free_block_queue.append_n(to_cache)
            if empty:
                self._allocator.free(empty)

    # -- the prefix cache, under the lock ---------------------------------------------------

    @contextlib.contextmanager
    def scheduling_step(self) -> Iterator[None]:
        """Around one ``Scheduler.schedule`` call: what it looks up stays until it ends.
        Afterwards as many pages as the step took are mapped ahead (KVStack.map_ahead)."""
        with self._lock:
            self._scheduling = True
            self._step_blocks = 0
            self._grantable_changes = -1  # the others' use of the budget moved meanwhile
        try:
            yield
        finally:
            with self._lock:
                self._scheduling = False
                self._step_hits.clear()
            self._stack.map_ahead(self._step_blocks)

    def touch(self, blocks: Sequence[KVCacheBlock]) -> None:
        with self._lock:
            super().touch(blocks)

    def get_cached_block(
        self, block_hash: BlockHash, kv_cache_group_ids: list[int]
    ) -> list[KVCacheBlock] | None:
        with self._lock:
            hit = super().get_cached_block(block_hash, kv_cache_group_ids)
            if hit is None and self._stack.spill is not None and len(kv_cache_group_ids) == 1:
                hit = self._reload(make_block_hash_with_group_id(block_hash, kv_cache_group_ids[0]))
            if hit is not None and self._scheduling:
                self._step_hits.update(block.block_id for block in hit)
            return hit

    def _reload(self, key: BlockHashWithGroupId) -> list[KVCacheBlock] | None:
        """A device miss that the spill tier holds becomes a cached block like any other."""
        block_id = self._stack.reload(bytes(key))
        if block_id is None:
            return None
        block = self.blocks[block_id]
        self._insert_block_hash(key, block, num_tokens=None)
        self.free_block_queue.append(block)
        self.reloaded_blocks += 1
        return [block]

    def cache_full_blocks(self, *args: Any, **kwargs: Any) -> None:
        with self._lock:
            super().cache_full_blocks(*args, **kwargs)

    def cache_partial_block(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return super().cache_partial_block(*args, **kwargs)

    def unpin_blocks(self, blocks: Iterable[KVCacheBlock], on_reuse: Callable[[KVCacheBlock], None]) -> None:
        with self._lock:
            super().unpin_blocks(blocks, on_reuse)

    def evict_blocks(self, block_ids: set[int]) -> None:
        with self._lock:
            super().evict_blocks(block_ids)
            self._release_uncached_free_blocks()

    def reset_prefix_cache(self) -> bool:
        with self._lock:
            self.get_num_free_blocks = self._count_everything  # type: ignore[method-assign]
            try:
                reset = super().reset_prefix_cache()
            finally:
                del self.get_num_free_blocks
            if reset:
                self._release_uncached_free_blocks()
            return reset

    def _release_uncached_free_blocks(self) -> None:
        """Free blocks that lost their hash leave the queue for the allocator."""
        uncached = [b for b in self.free_block_queue.get_all_free_blocks() if b.block_hash is None]
        for block in uncached:
            self.free_block_queue.remove(block)
        self._allocator.free([b.block_id for b in uncached])

    # -- reclaim (ColdCache), called with the allocator's lock held ----------------------------

    def cold_blocks(self) -> list[tuple[int, bytes | None]]:
        """Cached free blocks, coldest first, but for those a lookup found in the
        scheduler step in progress (the scheduler is about to take them). Full blocks
        carry their hash for the spill tier; partial ones (vLLM may cache a block's
        prefix) are only dropped."""
        queued = self.free_block_queue.get_all_free_blocks()
        return [(b.block_id, self._spill_key(b)) for b in queued if b.block_id not in self._step_hits]

    def _spill_key(self, block: KVCacheBlock) -> bytes | None:
        tokens = block.block_hash_num_tokens
        full = tokens is None or tokens % self.hash_block_size == 0
        return bytes(block.block_hash) if block.block_hash is not None and full else None

    def evict(self, blocks: Sequence[int]) -> None:
        for block_id in blocks:
            block = self.blocks[block_id]
            self.free_block_queue.remove(block)
            self._maybe_evict_cached_block(block)


@contextlib.contextmanager
def preempting(scheduler: Any, victims: list[Request]) -> Iterator[None]:
    """Make the scheduling step inside preempt exactly ``victims``, through vLLM's own
    preemption, so that its bookkeeping (asynchronous scheduling included) stays vLLM's.

    Under FCFS, a request that finds no free blocks makes vLLM preempt the last running
    request and try again, until it fits or preempts itself. So the victims go last, and
    until all of them are preempted no request gets blocks."""
    if not victims:
        yield
        return
    chosen = {id(request) for request in victims}
    scheduler.running[:] = [r for r in scheduler.running if id(r) not in chosen] + victims
    manager = scheduler.kv_cache_manager
    allocate = manager.allocate_slots

    def allocate_slots(request: Request, *args: Any, **kwargs: Any) -> Any:
        if any(victim.status == RequestStatus.RUNNING for victim in victims):
            return None
        return allocate(request, *args, **kwargs)

    manager.allocate_slots = allocate_slots
    try:
        yield
    finally:
        del manager.allocate_slots  # the class's method again


def wrap_allocate_slots(original: Callable[..., Any]) -> Callable[..., Any]:
    """``KVCacheManager.allocate_slots`` that answers vLLM's miss (None) when vmkv could
    not have the blocks its free count promised (KVBlocksUnavailable), instead of letting
    the error stop the engine: the scheduler then preempts a running request, or leaves
    a waiting one waiting, as it does when its own pool runs short. By then a request
    that was not running had the prefix blocks it hit attached; they are freed, so its
    next try finds them in the cache again instead of attaching them twice.

    vLLM calls this for every request it schedules, so the wrapper forwards its
    arguments untouched (naming them cost 80 ns more per call on the CPU machine)."""

    @functools.wraps(original)
    def allocate_slots(*args: Any, **kwargs: Any) -> Any:  # (manager, request, ...)
        try:
            return original(*args, **kwargs)
        except KVBlocksUnavailable:
            manager = args[0]
            request = args[1] if len(args) > 1 else kwargs["request"]
            if request.status != RequestStatus.RUNNING:
                manager.free(request)
            return None

    return allocate_slots


def wrap_schedule(original: Callable[..., Any], admission_limit: str) -> Callable[..., Any]:
    """``Scheduler.schedule`` inside its vmkv pool's ``scheduling_step``.

    While the instance owes, the step's admission limit (the scheduler attribute named
    ``admission_limit``: it admits no request past it) is the number already running, so
    only running requests are scheduled; once the debt is overdue, the step preempts the
    running requests that keep its pages (FCFS only: under priority scheduling vLLM picks
    its own victims) and pays. After the step, the first waiting request (a new one, or
    one preempted) leases what it lacks."""

    @functools.wraps(original)
    def schedule(self: Any, *args: Any, **kwargs: Any) -> Any:
        pool = self.kv_cache_manager.block_pool
        if not isinstance(pool, VmkvBlockPool):
            return original(self, *args, **kwargs)
        limit = getattr(self, admission_limit)
        owes = pool.owes()
        victims: list[Request] = []
        if owes:
            setattr(self, admission_limit, min(limit, len(self.running)))
            if self.policy == SchedulingPolicy.FCFS and not getattr(self, "defer_block_free", False):
                victims = pool.requests_to_preempt(self.running, self.kv_cache_manager.get_block_ids)
        try:
            with pool.scheduling_step(), preempting(self, victims):
                output = original(self, *args, **kwargs)
        finally:
            setattr(self, admission_limit, limit)
        if any(victim.status == RequestStatus.PREEMPTED for victim in victims):
            pool.pay_debt()
        if self.waiting and not owes:
            first = self.waiting.peek_request()
            pool.on_shortfall(first.num_tokens - first.num_computed_tokens)
        pool.step_out()
        return output

    return schedule
