"""A tensor-parallel rank without an engine: a RankServer over the host backend, driven
from stdin so that a test can look into the rank's own memory.

  python tests/rank_worker.py OWNER_PID RANK WORLD HOST_CAPACITY

Prints "ready" once its channel exists. Then, one per line:
  write BLOCK BYTE   writes BYTE over block BLOCK of buffer 0, prints "ok"
  read BLOCK         prints the first byte of block BLOCK of buffer 0
  step               this rank has run one more scheduling step
"""

from __future__ import annotations

import ctypes
import sys

from vmkv.ranks import RankServer
from vmkv.vmm_ops import open_vmm

PAGE = 1 << 20
BLOCK_BYTES = [64 << 10] * 4
NUM_BLOCKS = 256


def main() -> None:
    owner, rank, world, capacity = (int(arg) for arg in sys.argv[1:5])
    server = RankServer(
        open_vmm("host", page_size=PAGE, host_capacity=capacity), BLOCK_BYTES, NUM_BLOCKS, rank, world, owner
    )
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if words[0] == "write":
            block, value = int(words[1]), int(words[2])
            ctypes.memset(server.base + block * BLOCK_BYTES[0], value, BLOCK_BYTES[0])
            print("ok", flush=True)
        elif words[0] == "read":
            print(ctypes.c_ubyte.from_address(server.base + int(words[1]) * BLOCK_BYTES[0]).value, flush=True)
        elif words[0] == "step":
            server.step_done()
            print("ok", flush=True)
    server.unlink()


if __name__ == "__main__":
    main()
