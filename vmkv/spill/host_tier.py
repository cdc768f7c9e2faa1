"""The host tier's memory: one shared-memory segment per namespace, index then slots.

The segment lives in /dev/shm, mode 0600, named ``/vmkv-<uid>-spill-<digest>``, so every
instance of the same namespace on the node maps the same slots and finds the blocks the
others spilled. Its memory is committed with fallocate when it is created: a tier larger
than what /dev/shm can hold fails then, with an error naming VMKV_CPU_BYTES, instead of
raising SIGBUS inside an engine later. On CUDA and Ascend each process page-locks its
mapping through its Vmm (cuMemHostRegister, aclrtHostRegister), so copies to and from
the device are asynchronous DMA at full speed.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import time
from typing import TYPE_CHECKING

import posix_ipc

from vmkv.coordinator.segment import SHM_DIR, check_private
from vmkv.spill._index import Index, Policy, SegmentError, geometry
from vmkv.vmm_ops import DriverError, Vmm

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

INIT_WAIT_S = 2.0
HEADER_PROBE_BYTES = 4096  # the index header fits in the first page


def tier_name(namespace_digest: bytes, uid: int | None = None) -> str:
    return f"/vmkv-{os.getuid() if uid is None else uid}-spill-{namespace_digest.hex()[:24]}"


def user_tiers(uid: int | None = None) -> list[str]:
    """Names of this user's spill segments."""
    prefix = f"vmkv-{os.getuid() if uid is None else uid}-spill-"
    return sorted(f"/{p.name}" for p in SHM_DIR.glob(prefix + "*"))


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
        slot_count = capacity_bytes // slot_bytes
        if slot_count <= 0:
            raise ValueError(
                f"VMKV_CPU_BYTES={capacity_bytes} holds no block of {slot_bytes} bytes; raise it"
            )
        memory, created = self._open(slot_count, slot_bytes)
        size = memory.size
        self._mmap = mmap.mmap(memory.fd, size)
        memory.close_fd()
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

    def _open(self, slot_count: int, slot_bytes: int) -> tuple[posix_ipc.SharedMemory, bool]:
        total = geometry(slot_count, slot_bytes)["total_bytes"]
        try:
            memory = posix_ipc.SharedMemory(self.name, posix_ipc.O_CREX, mode=0o600, size=total)
        except posix_ipc.ExistentialError:
            check_private(SHM_DIR / self.name.lstrip("/"))
            deadline = time.monotonic() + INIT_WAIT_S
            while (size := (SHM_DIR / self.name.lstrip("/")).stat().st_size) < HEADER_PROBE_BYTES:
                if time.monotonic() > deadline:  # its creator sizes it right after creating it
                    raise SegmentError(f"{self.name} is {size} bytes: not a vmkv spill tier") from None
                time.sleep(0.01)
            return posix_ipc.SharedMemory(self.name), False
        try:
            os.posix_fallocate(memory.fd, 0, total)
        except OSError as error:
            memory.close_fd()
            posix_ipc.unlink_shared_memory(self.name)
            free = os.statvfs(SHM_DIR).f_bavail * os.statvfs(SHM_DIR).f_frsize
            raise ValueError(
                f"cannot commit a {total}-byte spill tier in {SHM_DIR} ({free} bytes free): "
                f"{error.strerror}; lower VMKV_CPU_BYTES"
            ) from None
        return memory, True

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
        remaining = self.index.detach(self.proc)
        if remaining == 0:
            try:
                posix_ipc.unlink_shared_memory(self.name)
            except posix_ipc.ExistentialError:
                log.debug("spill tier %s was already removed", self.name)
