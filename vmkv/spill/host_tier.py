"""The host tier's memory: one shared-memory segment per namespace, index then slots.

The segment is a file in /dev/shm (or VMKV_SPILL_DIR), mode 0600, named
``vmkv-<uid>-spill-<digest>``, so every instance of the same namespace on the node maps
the same slots and finds the blocks the others spilled. Its memory is committed with
fallocate when it is created: a tier larger than its tmpfs can hold fails then, with an
error naming VMKV_CPU_BYTES, instead of raising SIGBUS inside an engine later. On CUDA
and Ascend each process page-locks its mapping through its Vmm (cuMemHostRegister,
aclrtHostRegister), so copies to and from the device are asynchronous DMA at full speed.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from vmkv.coordinator.segment import SHM_DIR, check_private
from vmkv.spill._index import Index, Policy, SegmentError, geometry
from vmkv.vmm_ops import DriverError, Vmm

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

INIT_WAIT_S = 2.0
HEADER_PROBE_BYTES = 4096  # the index header fits in the first page


def spill_dir() -> Path:
    """Where tiers live: VMKV_SPILL_DIR, or /dev/shm (a tmpfs, like POSIX shared memory)."""
    return Path(os.environ.get("VMKV_SPILL_DIR") or SHM_DIR)


def tier_name(namespace_digest: bytes, uid: int | None = None) -> str:
    return f"/vmkv-{os.getuid() if uid is None else uid}-spill-{namespace_digest.hex()[:24]}"


def user_tiers(uid: int | None = None) -> list[str]:
    """Names of this user's spill segments."""
    prefix = f"vmkv-{os.getuid() if uid is None else uid}-spill-"
    return sorted(f"/{p.name}" for p in spill_dir().glob(prefix + "*"))


def remove_tier(name: str) -> None:
    (spill_dir() / name.lstrip("/")).unlink(missing_ok=True)


def tier_stats(name: str) -> dict[str, int]:
    """The counters of an existing tier, after dropping dead processes (for the CLI)."""
    path = spill_dir() / name.lstrip("/")
    check_private(path)
    with open(path, "r+b") as segment:
        mapping = mmap.mmap(segment.fileno(), os.fstat(segment.fileno()).st_size)
    anchor = ctypes.c_char.from_buffer(mapping)
    index = Index(anchor, ctypes.addressof(anchor), len(mapping))
    index.sweep()
    return index.stats()


class HostTier:
    """A mapped spill segment: its shared index and its slots as a byte tensor."""

    def __init__(
        self,
        namespace_digest: bytes,
        slot_bytes: int,
        capacity_bytes: int,
        policy: Policy = Policy.LRU,
        vmm: Vmm | None = None,
    ) -> None:
        import torch

        self.name = tier_name(namespace_digest)
        self.path = spill_dir() / self.name.lstrip("/")
        slot_count = capacity_bytes // slot_bytes
        if slot_count <= 0:
            raise ValueError(f"VMKV_CPU_BYTES={capacity_bytes} holds no {slot_bytes}-byte block; raise it")
        fd, created = self._open(slot_count, slot_bytes)
        size = os.fstat(fd).st_size
        # Populated up front: first-touch faults would otherwise halve the first copies.
        self._mmap = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        os.close(fd)
        self._anchor = ctypes.c_char.from_buffer(self._mmap)
        self.index = Index(self._anchor, ctypes.addressof(self._anchor), size)
        if created:
            self.index.initialize(slot_count, slot_bytes, policy, namespace_digest)
        else:
            self._wait_initialized()
        header = self.index.header()
        if header["namespace_digest"] != namespace_digest or header["slot_bytes"] != slot_bytes:
            raise SegmentError(f"{self.name} holds another namespace or block size; run `vmkv reset`")
        self.slot_count = header["slot_count"]
        self.slot_stride = header["slot_stride"]
        self.policy = header["policy"]
        data_offset = header["data_offset"]
        self.data_address = ctypes.addressof(self._anchor) + data_offset
        self.data_bytes = header["total_bytes"] - data_offset
        self.slots = torch.frombuffer(
            self._mmap, dtype=torch.uint8, count=self.slot_count * self.slot_stride, offset=data_offset
        ).view(self.slot_count, self.slot_stride)
        self._vmm = vmm if vmm is not None and vmm.kind != "host" else None
        if self._vmm is not None:
            try:
                self._vmm.register_host(self.data_address, self.data_bytes)
            except DriverError as error:
                log.warning("spill tier %s is not page-locked (%s): copies will be slower", self.name, error)
                self._vmm = None
        self.proc = self.index.attach(os.getpid())

    def _open(self, slot_count: int, slot_bytes: int) -> tuple[int, bool]:
        """(file descriptor, created) of the segment file."""
        total = geometry(slot_count, slot_bytes)["total_bytes"]
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            check_private(self.path)
            fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW)
            deadline = time.monotonic() + INIT_WAIT_S
            while (size := os.fstat(fd).st_size) < HEADER_PROBE_BYTES:
                if time.monotonic() > deadline:  # its creator sizes it right after creating it
                    os.close(fd)
                    raise SegmentError(f"{self.path} is {size} bytes: not a vmkv spill tier") from None
                time.sleep(0.01)
            return fd, False
        try:
            os.posix_fallocate(fd, 0, total)
        except OSError as error:
            os.close(fd)
            self.path.unlink()
            stats = os.statvfs(self.path.parent)
            raise ValueError(
                f"cannot commit a {total}-byte spill tier in {self.path.parent} "
                f"({stats.f_bavail * stats.f_frsize} bytes free): {error.strerror}; lower VMKV_CPU_BYTES "
                "or point VMKV_SPILL_DIR at a larger tmpfs"
            ) from None
        return fd, True

    def _wait_initialized(self) -> None:
        deadline = time.monotonic() + INIT_WAIT_S
        while not self.index.initialized:
            if time.monotonic() > deadline:
                raise SegmentError(f"{self.name} was never initialized (its creator died?); run `vmkv reset`")
            time.sleep(0.01)

    def run(self, first_slot: int, count: int) -> torch.Tensor:
        """Slots ``[first_slot, first_slot + count)`` as one contiguous (count, stride) view."""
        return self.slots[first_slot : first_slot + count]

    def close(self) -> None:
        """Detach; the last process out removes the segment."""
        if self._vmm is not None:
            self._vmm.unregister_host(self.data_address)
            self._vmm = None
        if self.index.detach(self.proc) == 0:
            remove_tier(self.name)
