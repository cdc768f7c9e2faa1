"""Page-aware block allocator over a :class:`KVSpace`.

Block ids are what the engines use (vLLM's block table, SGLang's page indices): block
``b`` lives in KV page ``b // blocks_per_page``. Allocation fills the fullest partly used
page first (best fit) so that frees leave whole pages empty, and a page goes back to the
pool only when every block on it is free. Block 0 is the null block the engines expect;
it stays allocated and its page stays mapped for the allocator's whole life.

Running out is a miss (``alloc`` returns None), not an exception: the engine decides
whether to wait or preempt. Misuse raises ``ValueError`` naming the bad id and changes
nothing.

Which blocks of the mapped pages are free is kept by the C++ :class:`BlockBook`: vLLM
takes and returns blocks for every request of every scheduling step, and the same
bookkeeping in Python cost several times vLLM's own free queue. This module decides
what to map and unmap, and when.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from vmkv.allocator._book import BlockBook
from vmkv.allocator.kv_space import KVSpace

NULL_BLOCK = 0


@dataclass(frozen=True)
class AllocatorStats:
    capacity_blocks: int
    blocks_per_page: int
    mapped_pages: int
    used_blocks: int  # allocated by callers; the null block is not counted
    free_mapped_blocks: int  # free blocks on mapped pages
    misses: int

    @property
    def fragmentation(self) -> float:
        """Share of mapped block slots not holding a live block (0 = perfectly packed)."""
        mapped = self.mapped_pages * self.blocks_per_page
        return 0.0 if mapped == 0 else self.free_mapped_blocks / mapped


class BlockAllocator:
    """Hands out block ids, mapping KV pages as needed and unmapping empty ones.

    ``keep_free_pages`` fully free pages stay mapped to absorb alloc/free churn (the
    engine layers use a few; the default 0 returns every empty page at once), more for a
    while after :meth:`hold_spares`. :meth:`map_ahead` maps pages before they are needed,
    on the caller's thread but without holding up allocations. The page of the null block
    is mapped at construction; on a full node that may take a reclaim from the other
    instances, so it is retried for up to ``startup_wait_s``.
    """

    def __init__(
        self,
        space: KVSpace,
        keep_free_pages: int = 0,
        startup_wait_s: float = 10.0,
        num_blocks: int | None = None,
    ) -> None:
        if keep_free_pages < 0:
            raise ValueError(f"keep_free_pages must be >= 0, got {keep_free_pages}")
        if num_blocks is not None and not 0 < num_blocks <= space.capacity_blocks:
            raise ValueError(f"num_blocks must be in [1, {space.capacity_blocks}], got {num_blocks}")
        self.space = space
        self.keep_free_pages = keep_free_pages
        self.blocks_per_page = space.blocks_per_page
        # The engine's block count; the space rounds it up to whole pages. Ids past it are
        # never handed out, so the last page may hold fewer blocks.
        self.num_blocks = num_blocks if num_blocks is not None else space.capacity_blocks
        # alloc/free come from the engine; trim and cold reclaim come from the coordinator's
        # thread. Engine layers hold it too while they change which blocks are cached.
        self.lock = threading.RLock()
        # Held by map_ahead across its driver calls, while its pages are in neither the
        # unmapped heap nor the mapped pages; take this one first, then ``lock``.
        self._ahead_lock = threading.Lock()
        # Empty pages on their way out: out of the free lists, not yet in the unmapped
        # heap. unmap_retired unmaps them outside ``lock``: on a device an unmap first
        # waits for the device's queued work, and the engine must not wait on the lock
        # meanwhile. Set on_retired to have that done elsewhere (KVStack: on a thread of
        # its own); unset, free() does it on its caller's thread after the lock.
        self._retiring: list[int] = []
        self._unmap_lock = threading.Lock()
        self.on_retired: Callable[[], None] | None = None
        self._spares, self._spares_until = 0, 0.0  # see hold_spares
        # The pages in the book are those mapped; a page being mapped or unmapped is in
        # neither the book nor the unmapped heap.
        self._book = BlockBook(self.num_blocks, self.blocks_per_page)
        # The book's free count, copied after each change: the engines read it for every
        # request of every step, and a plain attribute costs a third of a C++ property.
        self._free_mapped = 0
        self._unmapped: list[int] = list(range(space.num_pages))  # a heap: lowest first
        self._unmapped_blocks = self.num_blocks
        self._misses = 0
        deadline = time.monotonic() + startup_wait_s
        while not self._map_new_pages(1):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"no physical memory for the null block's page after {startup_wait_s} s: "
                    "the device (or this instance's lease) is full"
                )
            time.sleep(0.005)

    # -- queries ---------------------------------------------------------------------

    def num_free_blocks(self) -> int:
        """Blocks this allocator could still hand out if physical memory allows."""
        return self._free_mapped + self._unmapped_blocks

    def num_unmapped_blocks(self) -> int:
        """Blocks on pages not mapped: handed out only after mapping their pages."""
        return self._unmapped_blocks

    def num_free_mapped_blocks(self) -> int:
        """Free blocks on mapped pages: handed out without mapping anything."""
        return self._free_mapped

    def num_empty_mapped_pages(self) -> int:
        """Mapped pages with no live block: what trim() would give back."""
        return self._book.num_empty

    def spares_wanted(self) -> int:
        """How many more empty pages should be mapped now (see :meth:`hold_spares`);
        cheap enough for every scheduling step."""
        return max(0, min(self._kept_pages() - self._book.num_empty, len(self._unmapped)))

    def is_allocated(self, block: int) -> bool:
        return self._book.is_allocated(block)

    def live_blocks(self, page: int) -> int:
        """Allocated blocks on mapped KV page ``page``."""
        return self._book.live_blocks(page)

    def pages_only_holding(self, blocks: Iterable[int]) -> dict[int, list[int]]:
        """Mapped pages whose every allocated block is in ``blocks``: freeing those blocks
        empties them. Maps each such page to its blocks."""
        return self._book.pages_only_holding(list(blocks))

    def stats(self) -> AllocatorStats:
        return AllocatorStats(
            capacity_blocks=self.num_blocks,
            blocks_per_page=self.blocks_per_page,
            mapped_pages=self.space.mapped_pages,
            used_blocks=self._book.used,
            free_mapped_blocks=self._free_mapped,
            misses=self._misses,
        )

    # -- alloc / free ------------------------------------------------------------------

    def alloc(self, count: int) -> list[int] | None:
        """``count`` distinct block ids, or None (a miss) with nothing changed."""
        _check_count(count, "block")
        with self.lock:
            return self._alloc(count)

    def alloc_up_to(self, count: int) -> list[int]:
        """Up to ``count`` blocks, as many as can be had now: all of them if their pages
        can be mapped, else the free blocks on pages already mapped (maybe none)."""
        _check_count(count, "block")
        with self.lock:
            blocks = self._alloc(count)
            if blocks is not None:
                return blocks
            on_mapped = min(count, self._free_mapped)
            return self._take(on_mapped) if on_mapped else []

    def _alloc(self, count: int) -> list[int] | None:
        shortfall = count - self._free_mapped
        if shortfall > 0:
            pages = -(-shortfall // self.blocks_per_page)
            if shortfall > self._unmapped_blocks or not self._map_new_pages(pages):
                self._misses += 1
                return None
        return self._take(count)

    def _recount(self) -> None:
        self._free_mapped = self._book.free_mapped

    def _take(self, count: int) -> list[int]:
        blocks = self._book.take(count)
        self._free_mapped -= count
        return blocks

    def free(self, blocks: Iterable[int]) -> None:
        """Return blocks. Pages left with no live block are unmapped (beyond the
        ``keep_free_pages`` spares)."""
        blocks = list(blocks)
        with self.lock:
            self._free(blocks)
        self._settle()

    def _free(self, blocks: list[int]) -> None:
        self._book.put(blocks)
        self._free_mapped += len(blocks)
        if self._book.num_empty > self.keep_free_pages:
            self._release_empty_pages(self._kept_pages())

    # -- mapping ahead -------------------------------------------------------------------

    def hold_spares(self, pages: int, seconds: float) -> None:
        """Keep up to ``pages`` empty pages mapped for the next ``seconds`` (at least
        ``keep_free_pages`` always): an engine whose steps take that many pages' worth of
        blocks at once would otherwise unmap pages one step and map them again the next."""
        now = time.monotonic()
        if now >= self._spares_until or pages >= self._spares:
            self._spares = pages
        self._spares_until = now + seconds

    def map_ahead(self, pages: int) -> int:
        """Map up to ``pages`` more pages, all their blocks free, so that allocations find
        them mapped; returns how many were mapped (0 when their memory cannot be had).

        The lock is held only to pick the pages and to hand them out, not across the
        driver calls, which on CUDA cost milliseconds a page: the engine goes on
        allocating meanwhile, from the pages already mapped."""
        with self._ahead_lock:
            with self.lock:
                picked = [heapq.heappop(self._unmapped) for _ in range(min(pages, len(self._unmapped)))]
            mapped = False
            try:
                mapped = bool(picked) and self.space.map_pages(picked)
            finally:  # a driver error leaves them unmapped (KVSpace rolls back): back to the heap
                with self.lock:
                    if mapped:
                        self._add_mapped(picked)
                    else:
                        for page in picked:
                            heapq.heappush(self._unmapped, page)
            return len(picked) if mapped else 0

    def _kept_pages(self) -> int:
        spares = self._spares if time.monotonic() < self._spares_until else 0
        return max(self.keep_free_pages, spares)

    # -- whole pages -------------------------------------------------------------------

    def page_blocks(self, page: int) -> range:
        """The block ids of KV page ``page`` (the last page may hold fewer)."""
        if not 0 <= page < self.space.num_pages:
            raise ValueError(f"KV page {page} out of range [0, {self.space.num_pages})")
        bpp = self.blocks_per_page
        return range(page * bpp, min((page + 1) * bpp, self.num_blocks))

    def alloc_pages(self, count: int) -> list[int] | None:
        """``count`` whole empty KV pages with all their blocks, or None (a miss) with
        nothing changed: for engines that hand out the ids inside a page themselves
        (SGLang's token slots), so that no per-block bookkeeping runs here."""
        _check_count(count, "page")
        with self.lock:
            reuse = self._book.empty_pages()[:count]
            fresh = count - len(reuse)
            mapped = self._map_new_pages(fresh) if 0 < fresh <= len(self._unmapped) else []
            if mapped is None or len(reuse) + len(mapped) < count:
                self._misses += 1
                return None
            pages = reuse + mapped
            self._book.take_whole(pages)
            self._recount()
            return pages

    def take_pages(self, pages: Iterable[int]) -> list[int] | None:
        """Take every block of these KV pages, mapping those that are unmapped, for a
        caller that must use fixed block ids (vLLM's V2 warmup writes blocks 1, 2, ...
        without asking a scheduler). Returns the pages taken: a mapped page that holds
        live blocks (the null block's) is left as it is, and stays mapped while they live.
        None, a miss with nothing changed, when the memory cannot be had. Give the pages
        taken back with :meth:`free_pages`.

        Everything is decided under the locks that mapping ahead and allocation take, so
        that no page is taken twice, or unmapped while its blocks are written."""
        wanted = sorted(set(pages))
        for page in wanted:
            if isinstance(page, bool) or not isinstance(page, int):
                raise ValueError(f"KV page {page!r} is not an integer")
            if not 0 < page < self.space.num_pages:
                raise ValueError(f"KV page {page} out of range [1, {self.space.num_pages})")
        while True:
            self.unmap_retired()  # a page on its way out is unmapped first
            with self._ahead_lock, self.lock:
                unmapped = set(self._unmapped)
                if all(page in unmapped or self._book.is_mapped(page) for page in wanted):
                    fresh = [page for page in wanted if page in unmapped]
                    empty = [p for p in wanted if self._book.is_mapped(p) and self._book.live_blocks(p) == 0]
                    if fresh and not self._map(fresh):
                        self._misses += 1
                        return None
                    self._unmapped = [page for page in self._unmapped if page not in fresh]
                    heapq.heapify(self._unmapped)
                    taken = sorted(fresh + empty)
                    self._book.take_whole(taken)
                    self._recount()
                    return taken
            # A page is being unmapped on another thread, which needs the locks to finish.
            time.sleep(0.001)

    def free_pages(self, pages: Iterable[int]) -> None:
        """Return whole pages taken with :meth:`alloc_pages`; every block on them must be
        allocated. Empty pages beyond ``keep_free_pages`` are unmapped."""
        with self.lock:
            self._book.put_whole(list(pages))
            self._recount()
            self._release_empty_pages(self._kept_pages())
        self._settle()

    def trim(self, pages: int | None = None) -> int:
        """Unmap fully free pages now (all of them, or up to ``pages``); returns how many."""
        if pages is not None and pages < 0:
            raise ValueError(f"a page count must be >= 0, got {pages}")
        with self.lock:
            empty = self._book.num_empty
            released = self._release_empty_pages(empty - min(empty, pages) if pages is not None else 0)
        self.unmap_retired()
        return released

    def unmap_retired(self) -> None:
        """Unmap the pages that emptied past what is kept mapped, and return their memory
        to the pool; on return, an unmap in flight on another thread is done too. The
        driver call runs outside ``lock``, so allocations and frees go on meanwhile, and
        ``_unmap_lock`` is never held while waiting for ``lock``: reclaim calls this with
        ``lock`` held."""
        with self.lock:
            pages, self._retiring = self._retiring, []
        error: BaseException | None = None
        with self._unmap_lock:
            if not pages:
                return
            try:
                self.space.unmap_pages(pages)
            except BaseException as raised:  # the bookkeeping below follows what it did
                error = raised
        with self.lock:
            for page in pages:
                if self.space.is_mapped(page):  # a driver error left it: retried later
                    self._retiring.append(page)
                else:
                    heapq.heappush(self._unmapped, page)
                    self._unmapped_blocks += self._book.page_size(page)
        if error is not None:
            raise error

    def _settle(self) -> None:
        if self._retiring:
            if self.on_retired is not None:
                self.on_retired()
            else:
                self.unmap_retired()

    # -- internals ---------------------------------------------------------------------

    def _map_new_pages(self, count: int) -> list[int] | None:
        """The lowest unmapped pages, mapped, or None with nothing changed (also when a
        map ahead has the last ones in flight)."""
        if count > len(self._unmapped):
            return None
        pages = [heapq.heappop(self._unmapped) for _ in range(count)]
        mapped = False
        try:
            mapped = self._map(pages)
        finally:  # a miss, or a driver error (KVSpace left them unmapped): back to the heap
            if not mapped:
                for page in pages:
                    heapq.heappush(self._unmapped, page)
        return pages if mapped else None

    def _map(self, pages: list[int]) -> bool:
        """Map ``pages`` with all their blocks free; the caller keeps the unmapped heap."""
        if not self.space.map_pages(pages):
            return False
        self._add_mapped(pages)
        return True

    def _add_mapped(self, pages: list[int]) -> None:
        self._book.add_pages(pages)
        self._recount()
        self._unmapped_blocks -= sum(self._book.page_size(page) for page in pages)

    def _release_empty_pages(self, keep: int) -> int:
        """Retire the highest empty pages beyond ``keep`` (see unmap_retired)."""
        victims = self._book.retire_empty(keep)
        self._recount()
        self._retiring.extend(victims)
        return len(victims)


def _check_count(count: int, what: str) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        raise ValueError(f"{what} count must be a positive integer, got {count!r}")
