"""Per-page map and unmap cost through vmkv, against the raw driver sequence measured in
the same run.

Floors (all on the same device, same page size):
  pooled floor: raw map of each page + one access grant per batch (what vmkv's pooled
                path must do at minimum; cuda only needs the grant).
  naive path:   create + map + access per page (kvcached's map path, with no handle
                pool); its unmap + release runs untimed.
The floors are driven from Python (cuda-bindings on CUDA, ctypes on the host), so they
include a little call overhead per page that vmkv's one C++ call per batch does not pay.

  python benchmarks/bench_vmm.py --backend {host,cuda} [--json]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics

from common import elapsed, emit

from vmkv.vmm_ops import Vmm, open_vmm

BATCHES = (1, 8, 64, 512)


class CudaRaw:
    """The raw driver calls, through cuda-bindings."""

    def __init__(self, page_size: int, max_pages: int) -> None:
        from cuda.bindings import driver as cu

        self.cu = cu
        self.page_size = page_size
        self._check(cu.cuInit(0))
        device = self._check(cu.cuDeviceGet(0))
        self._check(cu.cuCtxSetCurrent(self._check(cu.cuDevicePrimaryCtxRetain(device))))
        self.prop = cu.CUmemAllocationProp()
        self.prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        self.prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self.prop.location.id = 0
        self.access = cu.CUmemAccessDesc()
        self.access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self.access.location.id = 0
        self.access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self.base = int(self._check(cu.cuMemAddressReserve(page_size * max_pages, page_size, 0, 0)))
        self.handles = [self.create() for _ in range(max_pages)]
        self.fresh: list = []

    @staticmethod
    def _check(result):
        err, *values = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise RuntimeError(f"driver error {err}")
        return values[0] if len(values) == 1 else None

    def create(self) -> object:
        return self._check(self.cu.cuMemCreate(self.page_size, self.prop, 0))

    def map_pooled(self, count: int) -> None:
        cu, size = self.cu, self.page_size
        for i in range(count):
            cu.cuMemMap(self.base + i * size, size, 0, self.handles[i], 0)
        cu.cuMemSetAccess(self.base, count * size, [self.access], 1)

    def unmap(self, count: int) -> None:
        cu, size = self.cu, self.page_size
        for i in range(count):
            cu.cuMemUnmap(self.base + i * size, size)

    def naive_map(self, count: int) -> None:
        cu, size = self.cu, self.page_size
        for i in range(count):
            handle = self.create()
            cu.cuMemMap(self.base + i * size, size, 0, handle, 0)
            cu.cuMemSetAccess(self.base + i * size, size, [self.access], 1)
            self.fresh.append(handle)

    def naive_unmap(self, count: int) -> None:
        for i, handle in enumerate(self.fresh):
            self.cu.cuMemUnmap(self.base + i * self.page_size, self.page_size)
            self.cu.cuMemRelease(handle)
        self.fresh.clear()


class HostRaw:
    """The raw syscalls of the host backend, through ctypes."""

    PROT_NONE, PROT_RW = 0, 3
    MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANON, MAP_NORESERVE = 0x01, 0x02, 0x10, 0x20, 0x4000
    PUNCH_HOLE_KEEP_SIZE = 0x02 | 0x01

    def __init__(self, page_size: int, max_pages: int) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
        self.libc, self.page_size = libc, page_size
        self.fd = os.memfd_create("bench-raw")
        os.ftruncate(self.fd, page_size * max_pages)
        libc.fallocate(self.fd, 0, 0, page_size * max_pages)
        self.base = libc.mmap(
            None,
            page_size * max_pages,
            self.PROT_NONE,
            self.MAP_PRIVATE | self.MAP_ANON | self.MAP_NORESERVE,
            -1,
            0,
        )

    def map_pooled(self, count: int) -> None:
        mmap, size = self.libc.mmap, self.page_size
        for i in range(count):
            mmap(
                self.base + i * size, size, self.PROT_RW, self.MAP_SHARED | self.MAP_FIXED, self.fd, i * size
            )

    def unmap(self, count: int) -> None:
        mmap, size = self.libc.mmap, self.page_size
        flags = self.MAP_PRIVATE | self.MAP_ANON | self.MAP_FIXED | self.MAP_NORESERVE
        for i in range(count):
            mmap(self.base + i * size, size, self.PROT_NONE, flags, -1, 0)

    def naive_map(self, count: int) -> None:
        size = self.page_size
        for i in range(count):
            self.libc.fallocate(self.fd, 0, i * size, size)
        self.map_pooled(count)

    def naive_unmap(self, count: int) -> None:
        self.unmap(count)
        size = self.page_size
        for i in range(count):
            self.libc.fallocate(self.fd, self.PUNCH_HOLE_KEEP_SIZE, i * size, size)


def measure_batch(vmm: Vmm, raw: CudaRaw | HostRaw, pairs: list[tuple[int, int]], repeats: int) -> dict:
    """Median µs per page of each path for one batch. Map and unmap alternate so every
    timed call starts from the same state."""
    batch, addresses = len(pairs), [a for a, _ in pairs]
    samples: dict[str, list[float]] = {
        "map": [],
        "unmap": [],
        "floor_map": [],
        "floor_unmap": [],
        "naive": [],
    }
    for _ in range(repeats):
        samples["map"].append(elapsed(lambda: vmm.map(pairs)))
        samples["unmap"].append(elapsed(lambda: vmm.unmap(addresses)))
        samples["floor_map"].append(elapsed(lambda: raw.map_pooled(batch)))
        samples["floor_unmap"].append(elapsed(lambda: raw.unmap(batch)))
        samples["naive"].append(elapsed(lambda: raw.naive_map(batch)))
        raw.naive_unmap(batch)
    return {name: statistics.median(values) / batch * 1e6 for name, values in samples.items()}


def run(backend: str, repeats: int, page_size: int) -> dict[str, object]:
    max_pages = max(BATCHES)
    vmm = open_vmm(backend, page_size=page_size)
    page = vmm.page_size
    va = vmm.reserve(page * max_pages)
    pages = vmm.create_pages(max_pages)
    raw = CudaRaw(page, max_pages) if backend == "cuda" else HostRaw(page, max_pages)
    rows = []
    for batch in BATCHES:
        pairs = [(va + i * page, pages[i]) for i in range(batch)]
        per_page = measure_batch(vmm, raw, pairs, repeats)
        row = {
            "batch": batch,
            "vmkv_map_us": round(per_page["map"], 3),
            "vmkv_unmap_us": round(per_page["unmap"], 3),
            "floor_map_us": round(per_page["floor_map"], 3),
            "floor_unmap_us": round(per_page["floor_unmap"], 3),
            "naive_map_us": round(per_page["naive"], 3),
        }
        row["map_vs_floor"] = round(row["vmkv_map_us"] / row["floor_map_us"], 3)
        row["naive_vs_map"] = round(row["naive_map_us"] / row["vmkv_map_us"], 2)
        rows.append(row)
    vmm.close()
    return {"bench": "vmm", "backend": backend, "page_size": page, "repeats": repeats, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["host", "cuda"], default="host")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--page-mib", type=int, default=2, help="physical page size in MiB")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.backend, args.repeats, args.page_mib << 20)
    print(
        f"{'batch':>5} {'vmkv map':>9} {'floor map':>9} {'ratio':>6} {'vmkv unmap':>10} {'floor unmap':>11} "
        f"{'naive':>9} {'naive/map':>9}   (µs per page)"
    )
    for r in result["rows"]:
        print(
            f"{r['batch']:5} {r['vmkv_map_us']:9.2f} {r['floor_map_us']:9.2f} {r['map_vs_floor']:6.2f} "
            f"{r['vmkv_unmap_us']:10.2f} {r['floor_unmap_us']:11.2f} {r['naive_map_us']:9.2f} "
            f"{r['naive_vs_map']:9.1f}"
        )
    emit(result, args.json)


if __name__ == "__main__":
    main()
