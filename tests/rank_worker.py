"""A tensor-parallel rank without an engine: a RankServer over the host backend, driven
from stdin so that a test can look into the rank's own memory.

  python tests/rank_worker.py OWNER_PID RANK WORLD HOST_CAPACITY [BACKEND]

BACKEND is host (default) or cuda (device 0; the memory is written through torch).

Prints "ready" once its channel exists. Then, one per line:
  write BLOCK BYTE   writes BYTE over block BLOCK of buffer 0, prints "ok"
  read BLOCK         prints the first byte of block BLOCK of buffer 0
  step               this rank has run one more scheduling step
"""

from __future__ import annotations

import sys

import torch

from vmkv.allocator.tensors import tensor_at
from vmkv.ranks import RankServer
from vmkv.vmm_ops import open_vmm

BLOCK_BYTES = [64 << 10] * 4
NUM_BLOCKS = 256


def main() -> None:
    owner, rank, world, capacity = (int(arg) for arg in sys.argv[1:5])
    backend = sys.argv[5] if len(sys.argv) > 5 else "host"
    # 1 MiB pages on the host (16 blocks a KV page); CUDA's granularity, 2 MiB, on a GPU.
    page = 1 << 20 if backend == "host" else 0
    vmm = open_vmm(backend, page_size=page, host_capacity=capacity if backend == "host" else 0)
    server = RankServer(vmm, BLOCK_BYTES, NUM_BLOCKS, rank, world, owner)
    server.layer_views = [  # one (blocks, bytes) view per buffer, as an engine would lay them out
        tensor_at(backend, 0, server.base + offset, torch.uint8, (NUM_BLOCKS, size))
        for offset, size in zip(server.layout.buffer_offsets, BLOCK_BYTES, strict=True)
    ]

    def block(index: int) -> torch.Tensor:
        return tensor_at(backend, 0, server.base + index * BLOCK_BYTES[0], torch.uint8, (BLOCK_BYTES[0],))

    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if words[0] == "write":
            block(int(words[1])).fill_(int(words[2]))
            if backend == "cuda":
                torch.cuda.synchronize()
            print("ok", flush=True)
        elif words[0] == "read":
            print(int(block(int(words[1]))[-1].item()), flush=True)
        elif words[0] == "step":
            server.step_done()
            print("ok", flush=True)
    server.unlink()


if __name__ == "__main__":
    main()
