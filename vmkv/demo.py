"""The quick-start demo: two processes, each with its own KV space on the host backend,
take turns being busy. Watch each one's mapped pages (and the memory really held by its
memfd) grow while it serves a burst and come back when the burst ends."""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from dataclasses import dataclass

from vmkv.allocator import BlockAllocator, KVSpace, PagePool
from vmkv.vmm_ops import open_vmm

LAYERS = 8
BLOCK_BYTES = 16 * 1024  # per layer and per K/V: 16 tokens x 4 heads x 64 dims x fp32
NUM_BLOCKS = 4096  # 1 GiB of virtual KV per instance
BURST_BLOCKS = 1536
PAGE_SIZE = 2 << 20


@dataclass(frozen=True)
class Sample:
    name: str
    t: float
    used_blocks: int
    mapped_pages: int
    resident_bytes: int


def _instance(name: str, phase: float, period: float, seconds: float, out: mp.Queue) -> None:
    """One 'engine': busy during half of every period, idle the other half."""
    vmm = open_vmm("host", page_size=PAGE_SIZE)
    pool = PagePool(vmm)
    space = KVSpace(pool, [BLOCK_BYTES] * (2 * LAYERS), NUM_BLOCKS)
    allocator = BlockAllocator(space)
    live: list[list[int]] = []
    start = time.monotonic()
    while (now := time.monotonic() - start) < seconds:
        busy = ((now + phase) % period) < period / 2
        if busy and sum(map(len, live)) < BURST_BLOCKS:
            blocks = allocator.alloc(64)
            if blocks is not None:
                live.append(blocks)
        elif not busy and live:
            allocator.free(live.pop())
            pool.trim()
        stats = allocator.stats()
        out.put(Sample(name, now, stats.used_blocks, stats.mapped_pages, vmm.stats()["resident_bytes"]))
        time.sleep(0.02)
    for blocks in live:
        allocator.free(blocks)
    space.close()
    pool.trim()
    out.put(Sample(name, seconds, 0, 0, vmm.stats()["resident_bytes"]))


def run_demo(seconds: float = 6.0, period: float = 3.0) -> int:
    ctx = mp.get_context("spawn")
    samples: mp.Queue = ctx.Queue()
    procs = [
        ctx.Process(target=_instance, args=(name, phase, period, seconds, samples))
        for name, phase in (("A", 0.0), ("B", period / 2))
    ]
    for proc in procs:
        proc.start()
    latest: dict[str, Sample] = {}
    peak: dict[str, int] = {"A": 0, "B": 0}
    next_print = 0.0
    columns = " ".join(
        f"{'{name} ' + label:>{width}}" for label, width in (("blocks", 8), ("pages", 7), ("MiB", 6))
    )
    print(f"{'t/s':>5} | {columns.format(name='A')} | {columns.format(name='B')}")
    while any(p.is_alive() for p in procs) or not samples.empty():
        try:
            sample = samples.get(timeout=0.2)
        except queue.Empty:
            continue
        latest[sample.name] = sample
        peak[sample.name] = max(peak[sample.name], sample.resident_bytes)
        if len(latest) == 2 and sample.t >= next_print:
            a, b = latest["A"], latest["B"]
            print(
                f"{sample.t:5.1f} | {a.used_blocks:8} {a.mapped_pages:7} {a.resident_bytes >> 20:6} | "
                f"{b.used_blocks:8} {b.mapped_pages:7} {b.resident_bytes >> 20:6}"
            )
            next_print = sample.t + 0.5
    for proc in procs:
        proc.join()
    final = {name: latest[name].resident_bytes >> 20 for name in ("A", "B")}
    print(
        f"peak resident MiB: A={peak['A'] >> 20} B={peak['B'] >> 20}; "
        f"after the run: A={final['A']} B={final['B']} (virtual KV per instance: "
        f"{2 * LAYERS * BLOCK_BYTES * NUM_BLOCKS >> 20} MiB)"
    )
    ok = all(p.exitcode == 0 for p in procs) and final == {"A": 0, "B": 0}
    return 0 if ok else 1
