"""The quick-start demo: two processes, each with its own KV space on the host backend,
share a coordinator budget smaller than their two peaks and take turns being busy.
Watch each one's memory grow while it serves a burst; the idle one keeps its pages
pooled until the busy one needs them, then the coordinator's reclaim moves them over."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from dataclasses import dataclass

from vmkv.allocator import BlockAllocator, KVSpace, PagePool
from vmkv.allocator.reclaim import Reclaimer
from vmkv.coordinator import Segment, join
from vmkv.vmm_ops import open_vmm

LAYERS = 8
BLOCK_BYTES = 16 * 1024  # per layer and per K/V: 16 tokens x 4 heads x 64 dims x fp32
NUM_BLOCKS = 4096  # 1 GiB of virtual KV per instance
BURST_BLOCKS = 1536
PAGE_SIZE = 2 << 20
BUDGET = 512 << 20  # less than the two bursts together (2 x 416 MiB)


@dataclass(frozen=True)
class Sample:
    name: str
    t: float
    used_blocks: int
    held_bytes: int
    resident_bytes: int


def _instance(segment: str, name: str, phase: float, period: float, seconds: float, out: mp.Queue) -> None:
    """One 'engine': busy during half of every period, idle the other half."""
    vmm = open_vmm("host", page_size=PAGE_SIZE)
    instance = join(vmm, name, engine="demo", segment=segment)
    pool = PagePool(vmm, lease=instance)
    space = KVSpace(pool, [BLOCK_BYTES] * (2 * LAYERS), NUM_BLOCKS)
    allocator = BlockAllocator(space)
    instance.reclaimer = Reclaimer(pool, [allocator])
    live: list[list[int]] = []
    start = time.monotonic()
    while (now := time.monotonic() - start) < seconds:
        busy = ((now + phase) % period) < period / 2
        if busy and sum(map(len, live)) < BURST_BLOCKS:
            blocks = allocator.alloc(64)
            if blocks is not None:
                live.append(blocks)
        elif not busy and live:
            allocator.free(live.pop())  # the pages stay pooled until someone needs them
        held = pool.stats().held * PAGE_SIZE
        out.put(Sample(name, now, allocator.stats().used_blocks, held, vmm.stats()["resident_bytes"]))
        time.sleep(0.02)
    for blocks in live:
        allocator.free(blocks)
    space.close()
    pool.trim()
    instance.close()
    out.put(Sample(name, seconds, 0, 0, vmm.stats()["resident_bytes"]))


def run_demo(seconds: float = 6.0, period: float = 3.0) -> int:
    ctx = mp.get_context("spawn")
    samples: mp.Queue = ctx.Queue()
    segment = Segment.open_or_create(f"/vmkv-{os.getuid()}-demo{os.getpid()}", PAGE_SIZE, lambda: BUDGET)
    print(f"budget {BUDGET >> 20} MiB shared by A and B (coordinator segment {segment.name})")
    procs = [
        ctx.Process(target=_instance, args=(segment.name, name, phase, period, seconds, samples))
        for name, phase in (("A", 0.0), ("B", period / 2))
    ]
    for proc in procs:
        proc.start()
    latest: dict[str, Sample] = {}
    peak: dict[str, int] = {"A": 0, "B": 0}
    next_print = 0.0
    columns = " ".join(f"{'{name} ' + label:>{width}}" for label, width in (("blocks", 8), ("held MiB", 10)))
    print(f"{'t/s':>5} | {columns.format(name='A')} | {columns.format(name='B')} | {'A+B MiB':>7}")
    try:
        while any(p.is_alive() for p in procs) or not samples.empty():
            try:
                sample = samples.get(timeout=0.2)
            except queue.Empty:
                continue
            latest[sample.name] = sample
            peak[sample.name] = max(peak[sample.name], sample.held_bytes)
            if len(latest) == 2 and sample.t >= next_print:
                a, b = latest["A"], latest["B"]
                print(
                    f"{sample.t:5.1f} | {a.used_blocks:8} {a.held_bytes >> 20:10} | "
                    f"{b.used_blocks:8} {b.held_bytes >> 20:10} | {(a.held_bytes + b.held_bytes) >> 20:7}"
                )
                next_print = sample.t + 0.5
        for proc in procs:
            proc.join()
    finally:
        segment.unlink()
    final = {name: latest[name].resident_bytes >> 20 for name in ("A", "B")}
    print(
        f"peak held MiB: A={peak['A'] >> 20} B={peak['B'] >> 20} under a {BUDGET >> 20} MiB budget; "
        f"after the run: A={final['A']} B={final['B']} (virtual KV per instance: "
        f"{2 * LAYERS * BLOCK_BYTES * NUM_BLOCKS >> 20} MiB)"
    )
    ok = all(p.exitcode == 0 for p in procs) and final == {"A": 0, "B": 0}
    return 0 if ok else 1
