"""Block alloc/free throughput of the page-aware allocator, with and without page
mapping, against a bare Python free list (the floor: no pages, no checks) in the same run.

  steady:   pages stay mapped (keep_free_pages is large); alloc/free touch no driver.
  churn:    every page is unmapped when it empties and mapped again when needed.

  python benchmarks/bench_alloc.py [--backend host] [--json]
"""

from __future__ import annotations

import argparse

from common import emit, median_seconds

from vmkv.allocator import BlockAllocator, KVSpace, PagePool
from vmkv.vmm_ops import open_vmm

LAYERS = 32
BLOCK_BYTES = 16 * 8 * 128 * 2  # Llama-3-8B: 16 tokens x 8 KV heads x 128 dims, bf16
NUM_BLOCKS = 4096


def floor_ops_per_second(batch: int, rounds: int) -> float:
    free = list(range(1, NUM_BLOCKS))

    def cycle() -> None:
        for _ in range(rounds):
            taken = [free.pop() for _ in range(batch)]
            free.extend(taken)

    return 2 * batch * rounds / median_seconds(cycle, 5)


def allocator_ops_per_second(allocator: BlockAllocator, batch: int, rounds: int) -> float:
    def cycle() -> None:
        for _ in range(rounds):
            blocks = allocator.alloc(batch)
            assert blocks is not None
            allocator.free(blocks)

    return 2 * batch * rounds / median_seconds(cycle, 5)


def run(backend: str, rounds: int) -> dict[str, object]:
    vmm = open_vmm(backend)
    pool = PagePool(vmm)
    space = KVSpace(pool, [BLOCK_BYTES] * (2 * LAYERS), NUM_BLOCKS)
    bpp = space.blocks_per_page
    rows = []
    for mode, keep in (("steady", space.num_pages), ("churn", 0)):
        allocator = BlockAllocator(space, keep_free_pages=keep)
        # Batches that fill whole pages, so that churn really maps and unmaps each round.
        for batch in (1, bpp, 4 * bpp):
            ops = allocator_ops_per_second(allocator, batch, rounds)
            floor = floor_ops_per_second(batch, rounds)
            rows.append(
                {
                    "mode": mode,
                    "batch": batch,
                    "ops_per_s": round(ops),
                    "floor_ops_per_s": round(floor),
                    "vs_floor": round(ops / floor, 3),
                }
            )
        allocator.trim()
        space.unmap_pages([0])  # the null block's page, so the next allocator starts clean
    space.close()
    vmm.close()
    return {"bench": "alloc", "backend": backend, "blocks_per_page": bpp, "layers": LAYERS, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["host", "cuda", "acl"], default="host")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.backend, args.rounds)
    print(f"{'mode':7} {'batch':>5} {'ops/s':>12} {'floor ops/s':>12} {'ratio':>6}")
    for r in result["rows"]:
        ops, floor = f"{r['ops_per_s']:12,}", f"{r['floor_ops_per_s']:12,}"
        print(f"{r['mode']:7} {r['batch']:5} {ops} {floor} {r['vs_floor']:6.3f}")
    emit(result, args.json)


if __name__ == "__main__":
    main()
