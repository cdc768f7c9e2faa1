"""Spill and restore bandwidth of the spill tier, against a plain memcpy of the same bytes
measured in the same run.

Blocks are Llama-3-8B sized by default: 32 layers x {K, V} x 16 tokens x 8 KV heads x
head dim 128 in bf16 = 2 MiB per block, scattered as 64 rows of 32 KiB in vLLM's
per-layer (2, num_blocks, 16, 8, 128) tensors. On CUDA the tensors live in a vmkv KV
space (VMM memory) and the tier is page-locked shared memory.

  spill:   store(keys, blocks) + wait(): gather into staging, copy to host slots, publish;
           keys are 32-byte digests, as vLLM's block hashes are
  restore: retrieve(keys, blocks) + wait(): copy from host slots, scatter into blocks
  call us: the host's time inside store() / retrieve(), before they return
  floor:   one contiguous device->pinned-host (or host->device) copy of the same bytes;
           on the host backend one memcpy between two contiguous buffers

  python benchmarks/bench_spill.py --backend {host,cuda} [--blocks 16,64,256] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import time
from collections.abc import Callable

import torch
from common import elapsed, emit

from vmkv.spill import Namespace, SpillStore, Transfer
from vmkv.vmm_ops import open_vmm


def kv_tensors(args: argparse.Namespace, num_blocks: int) -> tuple[list[torch.Tensor], object]:
    """vLLM's per-layer KV tensors; on CUDA inside a vmkv KV space (returned to keep alive)."""
    block_shape = (args.block_size, args.kv_heads, args.head_dim)
    if args.backend == "host":
        return [
            torch.zeros((2, num_blocks, *block_shape), dtype=torch.bfloat16) for _ in range(args.layers)
        ], None
    from vmkv.allocator import BlockAllocator, KVSpace, PagePool

    vmm = open_vmm("cuda")
    block_bytes = args.block_size * args.kv_heads * args.head_dim * 2
    space = KVSpace(PagePool(vmm), [block_bytes] * (2 * args.layers), num_blocks)
    allocator = BlockAllocator(space)
    assert allocator.alloc(space.capacity_blocks - 1) is not None  # map everything
    shape = (2, space.capacity_blocks, *block_shape)
    tensors = [space.tensor(2 * i, torch.bfloat16, shape) for i in range(args.layers)]
    for t in tensors:
        t.normal_()
    return tensors, (vmm, space, allocator)


def sync(backend: str) -> None:
    if backend == "cuda":
        torch.cuda.synchronize()


def timed(start: Callable[[], Transfer]) -> tuple[float, float]:
    """(seconds until ``start`` returned, seconds until its transfer was done): the
    first is the host's share, before and while the copies run."""
    began = time.perf_counter()
    transfer = start()
    returned = time.perf_counter()
    transfer.wait()
    return returned - began, time.perf_counter() - began


def floor_seconds(backend: str, nbytes: int, repeats: int) -> tuple[float, float]:
    """(device->host, host->device) seconds of one contiguous copy of ``nbytes``."""
    if backend == "host":
        src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
        out = statistics.median(elapsed(lambda: dst.copy_(src)) for _ in range(repeats))
        return out, out
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def copy(dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()

    copy(host, device)
    d2h = statistics.median(elapsed(lambda: copy(host, device)) for _ in range(repeats))
    h2d = statistics.median(elapsed(lambda: copy(device, host)) for _ in range(repeats))
    return d2h, h2d


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["host", "cuda"], default="host")
    parser.add_argument("--blocks", default=None, help="comma-separated batch sizes in blocks")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    default_batches = "16,64,256,1024,4096" if args.backend == "cuda" else "16,64,256"
    batches = [int(b) for b in (args.blocks or default_batches).split(",")]
    num_blocks = max(batches) + 1
    tensors, keep_alive = kv_tensors(args, num_blocks)
    vmm = keep_alive[0] if keep_alive else None
    namespace = Namespace(f"bench-spill-{random.getrandbits(32)}", "auto", args.block_size)
    probe = SpillStore(tensors, namespace, block_dim=1, capacity_bytes=1 << 30)
    slot_bytes = probe.layout.slot_bytes
    probe.close()
    store = SpillStore(
        tensors, namespace, block_dim=1, capacity_bytes=(max(batches) + 8) * slot_bytes, vmm=vmm
    )
    rows = []
    columns = [("blocks", 7), ("MiB", 8), ("spill GB/s", 11), ("floor", 7), ("ratio", 6)]
    columns += [("restore GB/s", 13), ("floor", 7), ("ratio", 6), ("call us", 16)]
    print(" ".join(f"{name:>{width}}" for name, width in columns))
    for n in batches:
        nbytes = n * slot_bytes
        blocks = random.sample(range(1, num_blocks), n)  # scattered, as in a real cache
        spill, restore, spill_calls, restore_calls = [], [], [], []
        for rep in range(args.repeats + 1):  # the first round warms up
            keys = [hashlib.sha256(f"{n}-{rep}-{i}".encode()).digest() for i in range(n)]
            sync(args.backend)
            spill_call, spill_s = timed(lambda k=keys, b=blocks: store.store(k, b))
            restore_call, restore_s = timed(lambda k=keys, b=blocks: store.retrieve(k, b))
            if rep:
                spill.append(spill_s)
                restore.append(restore_s)
                spill_calls.append(spill_call)
                restore_calls.append(restore_call)
        floor_d2h, floor_h2d = floor_seconds(args.backend, nbytes, args.repeats)
        row = {
            "blocks": n,
            "bytes": nbytes,
            "spill_gbps": nbytes / statistics.median(spill) / 1e9,
            "restore_gbps": nbytes / statistics.median(restore) / 1e9,
            "floor_d2h_gbps": nbytes / floor_d2h / 1e9,
            "floor_h2d_gbps": nbytes / floor_h2d / 1e9,
            "spill_call_us": statistics.median(spill_calls) * 1e6,
            "restore_call_us": statistics.median(restore_calls) * 1e6,
        }
        row["spill_vs_floor"] = row["spill_gbps"] / row["floor_d2h_gbps"]
        row["restore_vs_floor"] = row["restore_gbps"] / row["floor_h2d_gbps"]
        rows.append(row)
        print(
            f"{n:>7} {nbytes / 2**20:>8.0f} {row['spill_gbps']:>11.2f} {row['floor_d2h_gbps']:>7.2f} "
            f"{row['spill_vs_floor']:>6.2f} {row['restore_gbps']:>13.2f} {row['floor_h2d_gbps']:>7.2f} "
            f"{row['restore_vs_floor']:>6.2f} {row['spill_call_us']:>7.0f}/{row['restore_call_us']:<8.0f}",
            flush=True,
        )
    result = {
        "bench": "spill",
        "backend": args.backend,
        "device": torch.cuda.get_device_name() if args.backend == "cuda" else "cpu",
        "block_bytes": slot_bytes,
        "tier_pinned": bool(store.tier.slots.is_pinned()) if args.backend == "cuda" else None,
        "staging_chunk_blocks": getattr(store._mover, "chunk_blocks", None),
        "rows": rows,
    }
    store.close()
    emit(result, args.json)


if __name__ == "__main__":
    main()
