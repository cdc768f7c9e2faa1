"""A co-located 'engine' for the coordinator tests: a real host backend, a leased page
pool, a KV space and a block allocator, joined to a shared segment. Run as a process:

  python tests/coordinator_worker.py SEGMENT NAME MODE [--weight W] [--min BYTES] [--seconds S]

MODE churn: requests of 1-4 KV pages arrive, live 10-60 ms, and leave; demand exceeds
            any budget, so the worker keeps asking. Prints one JSON line of counts.
MODE hold:  takes HOLD_PAGES pages once, frees the blocks (the pages stay pooled) and
            idles, so only a pushed reclaim can shrink it.
MODE greedy-min: grows until its KV use reaches --min, retrying misses, then idles.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

from vmkv.allocator import BlockAllocator, KVSpace, PagePool
from vmkv.allocator.reclaim import Reclaimer
from vmkv.coordinator import join
from vmkv.vmm_ops import open_vmm

PAGE = 1 << 20
BLOCK = 256 << 10  # 4 blocks per physical page; a KV page spans 2 buffers = 2 physical pages
HOLD_PAGES = 16


def build(segment: str, name: str, weight: int, min_bytes: int, page: int = PAGE) -> tuple:
    vmm = open_vmm("host", page_size=page)
    instance = join(
        vmm, name, engine="test", model="tiny", min_bytes=min_bytes, weight=weight, segment=segment
    )
    pool = PagePool(vmm, lease=instance)
    space = KVSpace(pool, [BLOCK, BLOCK], 1024)
    allocator = BlockAllocator(space)
    instance.reclaimer = Reclaimer(pool, [allocator])
    return instance, pool, allocator


def churn(allocator: BlockAllocator, seconds: float) -> dict[str, int]:
    rng = random.Random()
    live: list[tuple[float, list[int]]] = []
    counts = {"granted": 0, "missed": 0}
    end = time.monotonic() + seconds
    while (now := time.monotonic()) < end:
        while live and live[0][0] <= now:
            allocator.free(live.pop(0)[1])
        blocks = allocator.alloc(rng.randint(1, 4) * allocator.blocks_per_page)
        if blocks is None:
            counts["missed"] += 1
            time.sleep(0.002)
            continue
        counts["granted"] += 1
        live.append((now + rng.uniform(0.01, 0.06), blocks))
        live.sort(key=lambda item: item[0])
    return counts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("segment")
    parser.add_argument("name")
    parser.add_argument("mode", choices=["churn", "hold", "greedy-min"])
    parser.add_argument("--weight", type=int, default=1)
    parser.add_argument("--min", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--page-bytes", type=int, default=PAGE)
    args = parser.parse_args()
    instance, pool, allocator = build(args.segment, args.name, args.weight, args.min, args.page_bytes)
    print(json.dumps({"ready": True, "slot": instance.slot}), flush=True)
    if args.mode == "churn":
        print(json.dumps(churn(allocator, args.seconds)), flush=True)
    elif args.mode == "hold":
        allocator.free(allocator.alloc(HOLD_PAGES // 2 * allocator.blocks_per_page - 1))
        time.sleep(args.seconds)
    else:
        misses, deadline = 0, time.monotonic() + args.seconds
        while pool.stats().held * args.page_bytes < args.min and time.monotonic() < deadline:
            if allocator.alloc(allocator.blocks_per_page) is None:
                misses += 1
                time.sleep(0.005)
        print(json.dumps({"held_bytes": pool.stats().held * args.page_bytes, "misses": misses}), flush=True)
        time.sleep(args.seconds)
    instance.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
