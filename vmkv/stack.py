"""One engine instance's whole vmkv stack, assembled the same way for every engine.

An engine layer (vmkv.integration.*) describes its KV cache (bytes per block per layer,
number of blocks, device) and its prefix cache; this module builds the rest: the
backend, the coordinator lease, the page pool, the KV space, the block allocator, the
reclaimer and the spill tier. Settings come from the environment so that they reach
engine processes the engine itself spawns:

  VMKV_NAME       name in `vmkv ls` (default: the served model name)
  VMKV_MIN/MAX    guaranteed and maximal KV memory, "4G" or "25%" of the device
  VMKV_WEIGHT     share of contended memory (default 1)
  VMKV_SPILL      0 (or off, no, false) turns the spill tier off; VMKV_CPU_BYTES sizes it
  VMKV_KEEP_FREE_PAGES  empty KV pages kept mapped to hide map latency (default 2)
  VMKV_DEBT_GRACE_S     how long an instance that owes pages waits for its running
                  requests to free them before it preempts some (default 0.5; inf: never)
  VMKV_PAGE_BYTES physical page size (default: the backend's; finer pages make small
                  engines more elastic, coarser ones map faster on CUDA)
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmkv.allocator import BlockAllocator, KVSpace, PagePool
from vmkv.allocator.kv_space import KVLayout
from vmkv.allocator.reclaim import ColdCache, ColdTier, Reclaimer
from vmkv.allocator.tensors import torch_device
from vmkv.background import BackgroundChore
from vmkv.coordinator import Instance, join, open_segment
from vmkv.coordinator.group import GroupLease
from vmkv.coordinator.units import named_size
from vmkv.vmm_ops import Vmm, open_vmm

if TYPE_CHECKING:
    import torch

    from vmkv.ranks import RankGroup
    from vmkv.ranks.spill import RankSpill
    from vmkv.spill import Namespace, SpillStore

BACKEND_OF_DEVICE = {"cpu": "host", "cuda": "cuda", "npu": "acl"}
DEVICE_OF_BACKEND = {backend: device for device, backend in BACKEND_OF_DEVICE.items()}
GRANTABLE_TTL_S = 0.005
SPARE_HOLD_S = 2.0  # how long a step's worth of pages stays mapped ahead after the step
MAP_AHEAD_BATCH = 4  # pages per map ahead: set-access goes one contiguous run at a time


MAX_WEIGHT = 1_000_000  # the coordinator's table holds weights up to this
SWITCH_WORDS = {
    "1": True,
    "on": True,
    "yes": True,
    "true": True,
    "0": False,
    "off": False,
    "no": False,
    "false": False,
}


def _env_count(name: str, default: str, low: int, high: int) -> int:
    """The whole number in $``name``, from ``low`` to ``high``; ValueError naming it."""
    text = os.environ.get(name, default)
    if not re.fullmatch(r"[0-9]{1,12}", text.strip()) or not low <= int(text) <= high:
        kind = "a positive integer" if low == 1 else "a non-negative integer"
        raise ValueError(f"{name} must be {kind} up to {high}, got {text!r}")
    return int(text)


@dataclass(frozen=True)
class StackSettings:
    name: str
    engine: str
    model: str
    min_size: str | None = None  # "4G" or "25%" of the device, resolved once it is open
    max_size: str | None = None
    weight: int = 1
    spill: bool = True
    keep_free_pages: int = 2
    debt_grace_s: float = 0.5

    @classmethod
    def from_env(cls, engine: str, model: str, default_name: str) -> StackSettings:
        env = os.environ
        weight = _env_count("VMKV_WEIGHT", "1", low=1, high=MAX_WEIGHT)
        keep = _env_count("VMKV_KEEP_FREE_PAGES", "2", low=0, high=1 << 20)
        grace_text = env.get("VMKV_DEBT_GRACE_S", "0.5")
        try:
            grace = float(grace_text)
        except ValueError:
            grace = -1.0
        if not grace >= 0:  # NaN too
            raise ValueError(f"VMKV_DEBT_GRACE_S must be a number of seconds >= 0 or inf, got {grace_text!r}")
        spill_text = env.get("VMKV_SPILL", "1").strip().lower()
        if spill_text not in SWITCH_WORDS:
            raise ValueError(f"VMKV_SPILL must be 1 or 0 (on/off, yes/no, true/false), got {spill_text!r}")
        for name in ("VMKV_MIN", "VMKV_MAX"):  # sizes; percentages resolve once the device is open
            if text := env.get(name):
                named_size(name, text, total=1 << 60)
        return cls(
            name=env.get("VMKV_NAME") or default_name,
            engine=engine,
            model=model,
            min_size=env.get("VMKV_MIN") or None,
            max_size=env.get("VMKV_MAX") or None,
            weight=weight,
            spill=SWITCH_WORDS[spill_text],
            keep_free_pages=keep,
            debt_grace_s=grace,
        )


def open_backend(device: torch.device) -> Vmm:
    """The vmkv backend for ``device`` ($VMKV_BACKEND overrides), with $VMKV_PAGE_BYTES pages."""
    kind = os.environ.get("VMKV_BACKEND") or BACKEND_OF_DEVICE.get(device.type)
    if kind is None:
        raise ValueError(f"vmkv has no backend for {device.type} devices")
    page = os.environ.get("VMKV_PAGE_BYTES")
    return open_vmm(kind, device.index or 0, page_size=named_size("VMKV_PAGE_BYTES", page) if page else 0)


def capacity_bytes(device: torch.device, settings: StackSettings) -> int:
    """The most KV memory an instance on ``device`` may hold: its max, capped by the
    coordinator's budget. Engines size their KV cache by this when the user gives no size:
    profiling free memory would count the neighbours' elastic KV caches as taken, and
    differently from one start to the next."""
    vmm = open_backend(device)
    budget = open_segment(vmm).table.header()["budget_pages"] * vmm.page_size
    if settings.max_size is None:
        return budget
    return min(budget, named_size("VMKV_MAX", settings.max_size, vmm.mem_info()[1]))


class KVStack:
    """Backend → lease → pool → KV space → block allocator, with reclaim (and spill)."""

    def __init__(
        self,
        device: torch.device,
        block_bytes: Sequence[int],
        num_blocks: int,
        settings: StackSettings,
        ranks: RankGroup | None = None,
    ):
        """``ranks``: the tensor-parallel ranks that hold the KV cache, when this process
        (the scheduler's) holds none; every page then maps on all of them."""
        self.settings = settings
        self.device = device
        self.vmm: Vmm | RankGroup = ranks if ranks is not None else open_backend(device)
        self.ranks = ranks
        total = self.vmm.mem_info()[1]
        min_bytes = named_size("VMKV_MIN", settings.min_size, total) if settings.min_size else 0
        max_bytes = named_size("VMKV_MAX", settings.max_size, total) if settings.max_size else None
        kv_page_bytes = (
            KVLayout.of(block_bytes, num_blocks, self.vmm.page_size).physical_per_page * self.vmm.page_size
        )
        if max_bytes is not None and max_bytes < kv_page_bytes:
            raise ValueError(
                f"a max of {settings.max_size} is less than one KV page ({kv_page_bytes} bytes), "
                "which every instance needs for its null block"
            )
        self.instance: Instance | GroupLease = (
            join(
                self.vmm,
                settings.name,
                settings.engine,
                settings.model,
                min_bytes,
                max_bytes,
                settings.weight,
            )
            if ranks is None
            else ranks.join(
                settings.name, settings.engine, settings.model, min_bytes, max_bytes, settings.weight
            )
        )
        try:
            self.pool = PagePool(self.vmm, lease=self.instance)
            self.space = KVSpace(self.pool, block_bytes, num_blocks)
            try:
                self.allocator = BlockAllocator(
                    self.space, keep_free_pages=settings.keep_free_pages, num_blocks=num_blocks
                )
            except BaseException:
                self.space.close()
                raise
        except BaseException:  # the lease must not outlive a stack that never was
            self.instance.close()
            raise
        # Mapping ahead and (on a device, where an unmap first waits for the work queued
        # there) unmapping emptied pages run on threads of this stack, not the engine's.
        self._mapper = BackgroundChore("vmkv-mapper", self._map_spares)
        self._unmapper = BackgroundChore("vmkv-unmapper", self.allocator.unmap_retired)
        if self.vmm.kind != "host" or ranks is not None:  # ranks: an unmap waits for their steps
            self.allocator.on_retired = self._unmapper.wake
        self.reclaimer = Reclaimer(self.pool, [self.allocator])
        self.instance.reclaimer = self.reclaimer
        self.spill: SpillStore | RankSpill | None = None
        self._grantable, self._grantable_at, self._grantable_changes = 0, float("-inf"), -1
        self._prefetcher = BackgroundChore("vmkv-prefetch", self._reserve_prefetched)
        self._prefetch_pages = 0

    @classmethod
    def over_ranks(cls, ranks: RankGroup, settings: StackSettings) -> KVStack:
        """The scheduler's stack over the tensor-parallel ranks that hold its KV cache."""
        device = torch_device(DEVICE_OF_BACKEND[ranks.kind], ranks.device)
        try:
            return cls(device, ranks.layout.block_bytes, ranks.infos[0].num_blocks, settings, ranks=ranks)
        except BaseException:
            ranks.close()
            raise

    def grantable_blocks(self) -> int:
        """Blocks this instance could map now without waiting for anyone: its pooled
        pages plus the free budget the coordinator would grant; none while it owes.

        A scheduler asks for every request of every step, so this must cost about what
        vLLM's own free count costs. The answer is reused until this instance's pages
        change, mapping included (a count that still included budget it has just taken
        would promise blocks no one can give), or GRANTABLE_TTL_S passes (the
        coordinator's free budget moves with the other instances)."""
        changes, now = self.pool.changes, time.monotonic()
        if changes != self._grantable_changes or now - self._grantable_at > GRANTABLE_TTL_S:
            # An instance that owes may not grow (the coordinator refuses it too)
            pages = 0 if self.pool.debt else self.pool.pooled + self.instance.headroom()
            grantable = pages // self.space.physical_per_page * self.allocator.blocks_per_page
            self._grantable = min(grantable, self.allocator.num_unmapped_blocks())
            self._grantable_changes, self._grantable_at = changes, now
        return self._grantable

    def owes(self) -> bool:
        """Whether reclaim asked this instance for more pages than it had idle. The
        engine then admits no new work, so that its pages empty as running requests
        finish and pay the debt. Without this a loaded engine refills every freed block
        from its own queue, and the instance that asked waits until the queue drains."""
        return self.pool.debt > 0

    def debt_kv_pages(self) -> int:
        """The KV pages whose return would pay what this instance owes."""
        return -(-self.pool.debt // self.space.physical_per_page)

    def overdue_kv_pages(self) -> int:
        """KV pages owed for longer than the debt grace period: the engine should preempt
        the running requests that keep them (see holders_to_preempt), then :meth:`pay`."""
        return self.debt_kv_pages() if self.pool.debt_age() > self.settings.debt_grace_s else 0

    def report_reclaimable(self, free_blocks: int, pinned_pages: int = 0) -> None:
        """For an engine that keeps its own free list (SGLang): on an idle turn, it could
        give back at once the KV pages that ``free_blocks`` of free or evictable blocks
        fill, but ``pinned_pages`` it must keep. Reclaim counts them as it counts vLLM's
        cold cached blocks; without this, a neighbour over its fair share would never get
        the pages an idle instance keeps cached. Report 0 once the engine allocates: a
        busy instance pays only as its requests finish."""
        kv_pages = min(free_blocks // self.allocator.blocks_per_page, self.space.mapped_pages - pinned_pages)
        self.reclaimer.engine_reclaimable = max(0, kv_pages) * self.space.physical_per_page

    def alloc_waiting(self, count: int, seconds: float) -> list[int] | None:
        """``count`` blocks, asking again for up to ``seconds``; None after that. For the
        budget an engine counted as free and another instance took first: reclaim from
        others' cold blocks takes milliseconds, but a neighbour whose blocks are all in
        use pays only as its requests finish, and the engine's thread waits here."""
        deadline = time.monotonic() + seconds
        while (blocks := self.allocator.alloc(count)) is None:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.01)
        return blocks

    def map_blocks(self, blocks: Iterable[int]) -> list[int]:
        """Take the pages of ``blocks``, mapping those that are unmapped, for an engine
        that writes blocks it never allocated (vLLM 0.26's warmup): until
        :meth:`return_pages`, no allocation hands them out and no reclaim unmaps them.
        Returns the pages taken (not the null block's); raises RuntimeError when the
        budget cannot hold them."""
        pages = {block // self.allocator.blocks_per_page for block in blocks} - {0}
        taken = self.allocator.take_pages(pages)
        if taken is None:
            raise RuntimeError(
                f"vmkv could not map the {len(pages)} KV pages that the engine writes outside "
                "its allocator: the coordinator's budget is full; give this instance a larger VMKV_MIN"
            )
        return taken

    def return_pages(self, pages: Sequence[int]) -> None:
        """Give the pages :meth:`map_blocks` took back (see :meth:`give_back`): an idle
        instance holding them would keep a neighbour that starts later from growing."""
        if pages:
            self.allocator.free_pages(pages)
            self.give_back()

    def give_back(self) -> None:
        """Return the memory of the pages that emptied (but the few kept mapped, see
        VMKV_KEEP_FREE_PAGES) and of the pool's idle pages to the device and the
        coordinator now: after an engine freed all but its null block's page (a flush,
        warmup's pages)."""
        self.allocator.unmap_retired()
        self.pool.trim()

    def pay(self) -> None:
        """Pay the debt from empty pages and cold blocks now (after a preemption)."""
        self.reclaimer.pay()

    def prefetch(self, blocks: int) -> None:
        """Lease pages for ``blocks`` blocks beyond those free now, in the background, so
        that the engine sees them free at its next scheduling step.

        An engine admits a request only when its free-block count covers it, and that
        count holds only what this instance can map at once. When another instance holds
        the whole budget as idle cached blocks, nothing would ever ask it for them: the
        engine calls this on a shortfall, and the lease reclaims them (spilling) without
        the engine blocking or being promised blocks that may not come."""
        # One at a time: a prefetch in flight has not shown in the free count yet.
        if blocks <= 0 or not self._prefetcher.wait_idle(0):
            return
        unmapped = self.allocator.num_free_blocks() - self.allocator.num_free_mapped_blocks()
        page_ids = -(-min(blocks, unmapped) // self.allocator.blocks_per_page)
        if page_ids > 0:
            self._prefetch_pages = page_ids
            self._prefetcher.wake()

    def _reserve_prefetched(self) -> None:
        """Lease the KV pages prefetch asked for: in one ask first, so that an instance
        asked to give them back owes all of them at once and pays in one go (one grace
        period, one preemption); then one at a time, so that a shortfall larger than the
        fair share still gets the part within it."""
        page_ids, per_page = self._prefetch_pages, self.space.physical_per_page
        if page_ids > 1 and self.pool.reserve(page_ids * per_page):
            return
        for _ in range(page_ids):
            if not self.pool.reserve(per_page):
                return

    def map_ahead(self, step_blocks: int) -> None:
        """After a scheduling step that took ``step_blocks`` new blocks: keep that many
        blocks' pages mapped ahead for the next SPARE_HOLD_S, mapped on a thread of this
        stack, so that the next step like it maps nothing on the engine's thread.

        Mapping a page takes a driver map per layer buffer and a set-access per
        contiguous run (tens of µs each on an H100: milliseconds for a page of a
        32-layer model). Requests that decode in lockstep each cross into a new block
        in the same step, so such a step takes many pages at once; mapping them in the
        step stalls it. The mapper uses only memory the instance has pooled or the
        budget has free: it never reclaims from others, and maps nothing while the
        instance owes. This runs at every step: it only reads counters and wakes the
        mapper."""
        allocator = self.allocator
        if step_blocks > 0:
            allocator.hold_spares(-(-step_blocks // allocator.blocks_per_page), SPARE_HOLD_S)
        if allocator.spares_wanted() and not self.pool.debt:
            self._mapper.wake()

    def _map_spares(self) -> None:
        per_page = self.space.physical_per_page
        while (want := self.allocator.spares_wanted()) > 0:
            if self.pool.debt or self.pool.pooled + self.instance.headroom() < per_page:
                return
            if self.allocator.map_ahead(min(want, MAP_AHEAD_BATCH)) == 0:
                return

    def attach_cache(
        self, cache: ColdCache, tensors: Sequence[torch.Tensor], namespace: Namespace, block_dim: int = 0
    ) -> None:
        """Let reclaim take the engine's cold cached blocks, spilling them to the host
        tier first unless VMKV_SPILL=0."""
        self.open_spill(tensors, namespace, block_dim)
        self.reclaimer.cold.append(ColdTier(self.allocator, cache, self.spill))

    def open_spill(self, tensors: Sequence[torch.Tensor], namespace: Namespace, block_dim: int = 0) -> None:
        """Open the spill tier for ``tensors`` as ``self.spill`` (stays None when
        VMKV_SPILL=0), for engines that spill on their own thread instead of reclaim's.
        With tensor-parallel ranks, each rank spills its shard of its own tensors."""
        if not self.settings.spill or self.spill is not None:
            return
        if self.ranks is not None:
            from vmkv.ranks.spill import RankSpill

            self.spill = RankSpill(self.ranks, namespace)
        else:
            from vmkv.spill import SpillStore

            self.spill = SpillStore(tensors, namespace, block_dim, vmm=self.vmm)

    def reload(self, key: bytes) -> int | None:
        """A fresh block holding the spilled block of ``key``, or None when the tier lacks
        it or no block is free (the engine then recomputes). Work queued after this on
        the current stream sees the data (the copy is fenced); on the host it is done."""
        if self.spill is None or self.spill.lookup([key]) != 1:
            return None
        fresh = self.allocator.alloc(1)
        if fresh is None:
            return None
        try:
            self.spill.retrieve([key], fresh).fence()
        except KeyError:  # evicted from the tier since the lookup
            self.allocator.free(fresh)
            return None
        return fresh[0]

    def close(self) -> None:
        self._mapper.close()
        self._unmapper.close()
        self._prefetcher.close()
        self.allocator.unmap_retired()
        self.instance.close()
        if self.ranks is not None:
            self.ranks.close()
        if self.spill is not None:
            self.spill.close()
