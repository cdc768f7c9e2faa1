"""Processes for the spill tests. Run as:

  python tests/spill_worker.py MODEL writer FIRST         store batches under fresh keys from
                                                          generation FIRST on, until killed
  python tests/spill_worker.py MODEL mixed FIRST COUNT    store own seeds, retrieve and verify
                                                          everyone's; prints JSON counts
  python tests/spill_worker.py SEGMENT engine MODEL       a toy engine under the coordinator whose
                                                          cold prefix is spilled by reclaim

Block contents are derived from the seed (spill_helpers.fill_block), so any process can
check any block it retrieves. Keys are f"k{seed}".
"""

from __future__ import annotations

import itertools
import json
import random
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence

import torch
from spill_helpers import block_matches, fill_block, make_kv

from vmkv.spill import Namespace, SpillStore

BATCH = 8
WRITER_SCALE = 256  # 1 MiB blocks


def worker_store(
    model: str, num_blocks: int, slots: int, shape_scale: int = 1
) -> tuple[SpillStore, list, int]:
    tensors, block_dim = make_kv("flat", num_blocks, torch.bfloat16)
    if shape_scale > 1:  # bigger blocks make each copy long enough to be killed inside
        tensors = [torch.zeros(num_blocks, 16 * shape_scale, 4, 32, dtype=torch.bfloat16)]
    namespace = Namespace(model, "auto", 16)
    probe_bytes = tensors[0][0].numel() * 2
    return SpillStore(tensors, namespace, block_dim, capacity_bytes=slots * probe_bytes), tensors, block_dim


def writer(model: str, first: int) -> None:
    """Stores blocks 1..BATCH under fresh keys f"w{generation}-{seed}" until killed, so
    that nearly all of its time is spent inside copies."""
    store, tensors, block_dim = worker_store(model, BATCH + 1, slots=48, shape_scale=WRITER_SCALE)
    for i in range(BATCH):
        fill_block(tensors, block_dim, 1 + i, seed=i)
    print(json.dumps({"ready": True}), flush=True)
    for generation in itertools.count(first):
        store.store([f"w{generation}-{i}" for i in range(BATCH)], list(range(1, 1 + BATCH)))


def mixed(model: str, first: int, count: int, others: int) -> None:
    store, tensors, block_dim = worker_store(model, 64, slots=40)
    print(json.dumps({"ready": True}), flush=True)
    all_seeds = list(range(others))
    mine = list(range(first, first + count))
    counts = {"stored": 0, "verified": 0, "gone": 0, "corrupt": 0}
    for round_ in range(30):
        batch = random.sample(mine, 6)
        for i, seed in enumerate(batch):
            fill_block(tensors, block_dim, 1 + i, seed)
        store.store([f"k{s}" for s in batch], list(range(1, 7))).wait()
        counts["stored"] += 6
        wanted = random.sample(all_seeds, 8)
        for j, seed in enumerate(wanted):
            target = 20 + (round_ % 4) * 8 + j
            try:
                store.retrieve([f"k{seed}"], [target]).wait()
            except KeyError:
                counts["gone"] += 1  # never stored yet, or evicted by someone
                continue
            ok = block_matches(tensors, block_dim, target, seed)
            counts["verified" if ok else "corrupt"] += 1
    store.close()
    print(json.dumps(counts), flush=True)


class ToyPrefixCache:
    """The smallest engine prefix cache: hash -> block, least recently released first.
    Every cached block here is unreferenced (requests have finished)."""

    def __init__(self) -> None:
        self.by_hash: OrderedDict[str, int] = OrderedDict()

    def cold_blocks(self) -> list[tuple[int, str]]:
        return [(block, key) for key, block in self.by_hash.items()]

    def evict(self, blocks: Sequence[int]) -> None:
        gone = set(blocks)
        for key in [k for k, b in self.by_hash.items() if b in gone]:
            del self.by_hash[key]


def engine(segment: str, model: str) -> None:
    """Fills a cached prefix, idles while another instance's demand makes reclaim spill
    it, then serves the same prefix again, from the device or from the spill tier."""
    from vmkv.allocator import BlockAllocator, KVSpace, PagePool
    from vmkv.allocator.reclaim import ColdTier, Reclaimer
    from vmkv.coordinator import join
    from vmkv.vmm_ops import open_vmm

    page, block_bytes, prefix_blocks = 1 << 20, 256 << 10, 48
    vmm = open_vmm("host", page_size=page)
    instance = join(vmm, model, engine="toy", model=model, segment=segment)
    pool = PagePool(vmm, lease=instance)
    space = KVSpace(pool, [block_bytes, block_bytes], 256)  # K and V buffers
    allocator = BlockAllocator(space)
    shape = (space.capacity_blocks, block_bytes // 2)
    tensors = [space.tensor(0, torch.float16, shape), space.tensor(1, torch.float16, shape)]
    spill = SpillStore(tensors, Namespace(model, "auto", 16), capacity_bytes=64 << 20)
    cache = ToyPrefixCache()
    reclaimer = Reclaimer(pool, [allocator], [ColdTier(allocator, cache, spill)])
    instance.reclaimer = reclaimer
    keys = [f"p{i}" for i in range(prefix_blocks)]

    with allocator.lock:
        blocks = allocator.alloc(prefix_blocks)
        assert blocks is not None
        for key, block in zip(keys, blocks, strict=True):
            fill_block(tensors, 0, block, seed=int(key[1:]))
            cache.by_hash[key] = block
    print(json.dumps({"ready": True, "held_pages": pool.stats().held}), flush=True)
    sys.stdin.readline()  # the test lets another instance squeeze us, then says go

    with allocator.lock:
        resident = [k for k in keys if k in cache.by_hash]
        spilled = [k for k in keys if k not in cache.by_hash]
    on_host = spill.lookup(spilled)
    result = {
        "resident": len(resident),
        "spilled": len(spilled),
        "found_on_host": on_host,
        "spilled_by_reclaim": reclaimer.spilled_blocks,
        "dropped": reclaimer.dropped_blocks,
    }
    deadline = time.monotonic() + 10
    fresh = allocator.alloc(on_host) if on_host else []
    while fresh is None and time.monotonic() < deadline:  # the other instance may hold the budget
        time.sleep(0.01)
        fresh = allocator.alloc(on_host)
    assert fresh is not None, "no blocks to reload into"
    spill.retrieve(spilled[:on_host], fresh).wait()
    ok = all(
        block_matches(tensors, 0, b, seed=int(k[1:])) for k, b in zip(spilled[:on_host], fresh, strict=True)
    )
    ok = ok and all(block_matches(tensors, 0, cache.by_hash[k], seed=int(k[1:])) for k in resident)
    result["verified"] = ok
    print(json.dumps(result), flush=True)
    spill.close()
    instance.close()


def main() -> None:
    target, mode = sys.argv[1], sys.argv[2]
    if mode == "writer":
        writer(target, int(sys.argv[3]))
    elif mode == "mixed":
        mixed(target, int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        engine(target, sys.argv[3])


if __name__ == "__main__":
    main()
