"""Coordinator latencies, with real processes and real shared memory.

uncontended grant: one instance, lease 1 page + release, timed per acquire
contended grant:   N processes (2, 4, 8, 16) doing the same at once
reclaim round trip: a holder keeps the whole budget pooled; a requester below its
                   fair share asks for pages: doorbell -> holder releases -> grant
floor:             a bare acquire/release of the robust lock, through one Python call
                   (the same path a grant takes) and raw in C++

python benchmarks/bench_coordinator.py [--json]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

from common import emit

from vmkv.allocator import PagePool
from vmkv.allocator.reclaim import Reclaimer
from vmkv.coordinator import Instance, Segment
from vmkv.coordinator.segment import remove_segment
from vmkv.vmm_ops import open_vmm

PAGE = 1 << 20
BUDGET_PAGES = 1024


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000  # noqa: E731
    return {"p50_us": round(pick(0.5), 2), "p99_us": round(pick(0.99), 2), "n": len(ordered)}


def grant_loop(segment: str, name: str, seconds: float, start: float, out: mp.Queue) -> None:
    instance = Instance(Segment.attach(segment), name)
    while time.time() < start:
        time.sleep(0.0005)
    samples, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        began = time.perf_counter_ns()
        granted = instance.acquire(1)
        samples.append(time.perf_counter_ns() - began)
        if granted:
            instance.release(1, 0, 0)
    instance.close()
    out.put(samples)


def contended(segment: str, processes: int, seconds: float) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    start = time.time() + 1.5  # every worker starts timing together, after imports
    procs = [
        ctx.Process(target=grant_loop, args=(segment, f"c{i}", seconds, start, out)) for i in range(processes)
    ]
    for p in procs:
        p.start()
    samples = [s for _ in procs for s in out.get()]
    for p in procs:
        p.join()
    return {"processes": processes, **percentiles(samples)}


def holder(segment: str, ready: mp.Event, stop: mp.Event) -> None:
    """Keeps the budget it can get as pooled pages; gives them back when asked."""
    vmm = open_vmm("host", page_size=PAGE)
    instance = Instance(Segment.attach(segment), "holder")
    pool = PagePool(vmm, lease=instance)
    instance.reclaimer = Reclaimer(pool)
    while not stop.is_set():
        held = pool.stats().held
        if held < BUDGET_PAGES:  # refill after each reclaim
            pages = pool.acquire(pool.stats().pooled + min(64, BUDGET_PAGES - held))
            if pages is not None:
                pool.release(pages)
        else:
            ready.set()
        time.sleep(0.002)
    instance.close()


def reclaim_round_trip(segment: Segment, trials: int, pages: int) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=holder, args=(segment.name, ready, stop))
    proc.start()
    requester = Instance(segment, "requester", wait_s=0.5)
    samples = []
    for _ in range(trials):
        ready.clear()
        assert ready.wait(10), "the holder did not take the whole budget back"
        began = time.perf_counter_ns()
        assert requester.acquire(pages), "reclaim did not deliver within 0.5 s"
        samples.append(time.perf_counter_ns() - began)
        requester.release(pages, 0, 0)
    stop.set()
    proc.join()
    requester.close()
    return {"pages": pages, **percentiles(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=1.0, help="per contended run")
    parser.add_argument("--trials", type=int, default=200, help="reclaim round trips")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    name = f"/vmkv-{os.getuid()}-bench{os.getpid()}"
    segment = Segment.open_or_create(name, PAGE, lambda: BUDGET_PAGES * PAGE)
    try:
        table = segment.table
        cycles = 200_000
        began = time.perf_counter_ns()
        table.lock_cycles(cycles)
        raw_lock_ns = (time.perf_counter_ns() - began) / cycles
        lock_samples = []
        for _ in range(50_000):
            began = time.perf_counter_ns()
            table.lock_unlock()
            lock_samples.append(time.perf_counter_ns() - began)
        floor = percentiles(lock_samples)

        solo = Instance(segment, "solo")
        grant_samples = []
        for _ in range(50_000):
            began = time.perf_counter_ns()
            solo.acquire(1)
            grant_samples.append(time.perf_counter_ns() - began)
            solo.release(1, 0, 0)
        solo.close()
        uncontended = percentiles(grant_samples)
        rows = [contended(name, n, args.seconds) for n in (2, 4, 8, 16)]
        reclaim = reclaim_round_trip(segment, args.trials, 16)
    finally:
        remove_segment(name)

    print(
        f"lock floor: {floor['p50_us']:.2f} µs per Python call (p99 {floor['p99_us']:.2f}); "
        f"raw {raw_lock_ns:.0f} ns in C++"
    )
    print(
        f"uncontended grant: p50 {uncontended['p50_us']:.2f} µs, p99 {uncontended['p99_us']:.2f} µs "
        f"({uncontended['p50_us'] / floor['p50_us']:.1f}x the lock floor; goal < 5 µs)"
    )
    for r in rows:
        print(f"contended, {r['processes']:2} processes: p50 {r['p50_us']:.2f} µs, p99 {r['p99_us']:.2f} µs")
    print(
        f"reclaim round trip ({reclaim['pages']} pages): p50 {reclaim['p50_us'] / 1000:.2f} ms, "
        f"p99 {reclaim['p99_us'] / 1000:.2f} ms (goal p99 < 10 ms)"
    )
    emit(
        {
            "bench": "coordinator",
            "lock_floor": floor,
            "raw_lock_ns": round(raw_lock_ns, 1),
            "uncontended_grant": uncontended,
            "grant_vs_floor": round(uncontended["p50_us"] / floor["p50_us"], 2),
            "contended_grant": rows,
            "reclaim_round_trip": reclaim,
        },
        args.json,
    )


if __name__ == "__main__":
    main()
