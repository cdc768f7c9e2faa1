"""The coordinator's shared-memory segment: naming, creation, attachment and checks.

One segment per user and device, named ``/vmkv-<uid>-<backend><device>``, mode 0600. It is
created by the first instance on the device and outlives none of its users' safety: the
table inside is validated on every locked access, and a segment owned by someone else,
readable by others, or of a foreign layout is refused with a clear error.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import posix_ipc

from vmkv.coordinator._table import SEGMENT_SIZE, SegmentError, Table

SHM_DIR = Path("/dev/shm")
INIT_WAIT_S = 2.0


def segment_name(backend: str, device: int, uid: int | None = None) -> str:
    if not backend.isalnum():
        raise ValueError(f"backend name {backend!r} must be alphanumeric")
    return f"/vmkv-{os.getuid() if uid is None else uid}-{backend}{int(device)}"


def check_segment_name(name: str) -> str:
    """``name`` when it is one of this user's segment names, ``/vmkv-<uid>-<rest>`` (rest:
    letters, digits, ``.``, ``_``, ``-``; not a spill tier's), else ValueError: vmkv opens,
    lists and removes nothing outside the user's own namespace."""
    prefix = f"/vmkv-{os.getuid()}-"
    rest = name[len(prefix) :] if name.startswith(prefix) else ""
    if (
        not rest
        or rest.startswith("spill-")
        or not all(c.isascii() and (c.isalnum() or c in "._-") for c in rest)
    ):
        raise ValueError(
            f"segment name {name!r} is not one of yours: vmkv's segments are named "
            f"{prefix}<letters, digits, . _ ->"
        )
    return name


def doorbell_name(segment: str, slot: int) -> str:
    """The POSIX semaphore that wakes the instance in ``slot``."""
    return f"{segment}-s{int(slot)}"


def remove_segment(name: str) -> None:
    """Unlink a segment and its doorbells. Processes that still map it keep their copy."""
    posix_ipc.unlink_shared_memory(check_segment_name(name))
    for bell in SHM_DIR.glob(f"sem.{name.lstrip('/')}-s*"):
        bell.unlink(missing_ok=True)


def user_segments(uid: int | None = None) -> list[str]:
    """Names of this user's coordinator segments (doorbells live in /dev/shm as sem.*).
    Only files: other things may share the prefix (a spill folder, see launch.py)."""
    prefix = f"vmkv-{os.getuid() if uid is None else uid}-"
    spill = prefix + "spill-"  # the spill tiers share the prefix (vmkv.spill.host_tier)
    found = SHM_DIR.glob(prefix + "*")
    return sorted(f"/{p.name}" for p in found if p.is_file() and not p.name.startswith(spill))


def check_private(path: Path) -> None:
    """Refuse IPC objects that another user owns or that others can read or write."""
    info = path.stat()
    if info.st_uid != os.getuid():
        raise SegmentError(
            f"{path} belongs to uid {info.st_uid}, not to you (uid {os.getuid()}); refusing it"
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise SegmentError(f"{path} has mode {stat.S_IMODE(info.st_mode):o}; vmkv only uses 0600 objects")


class Segment:
    """A mapped coordinator segment and its table."""

    def __init__(self, name: str, memory: posix_ipc.SharedMemory) -> None:
        self.name = name
        self._mmap = mmap.mmap(memory.fd, SEGMENT_SIZE)
        memory.close_fd()
        self._anchor = ctypes.c_char.from_buffer(self._mmap)
        self.table = Table(self._anchor, ctypes.addressof(self._anchor), SEGMENT_SIZE)

    @classmethod
    def attach(cls, name: str) -> Segment:
        """Open an existing segment (for the CLI and for later instances);
        FileNotFoundError when there is none."""
        check_private(SHM_DIR / check_segment_name(name).lstrip("/"))
        memory = posix_ipc.SharedMemory(name)
        if (size := memory.size) < SEGMENT_SIZE:
            memory.close_fd()
            raise SegmentError(f"{name} is {size} bytes, expected {SEGMENT_SIZE}: not a vmkv segment")
        segment = cls(name, memory)
        deadline = time.monotonic() + INIT_WAIT_S
        while not segment.table.initialized:
            if time.monotonic() > deadline:
                raise SegmentError(f"{name} was never initialized (its creator died?); run `vmkv reset`")
            time.sleep(0.01)
        segment.table.header()  # validates the layout and version
        return segment

    @classmethod
    def open_or_create(cls, name: str, page_size: int, budget: Callable[[], int]) -> Segment:
        """Attach, or create and initialize with ``budget()`` bytes when none exists. A
        budget that cannot be read leaves no segment behind."""
        try:
            memory = posix_ipc.SharedMemory(
                check_segment_name(name), posix_ipc.O_CREX, mode=0o600, size=SEGMENT_SIZE
            )
        except posix_ipc.ExistentialError:
            segment = cls.attach(name)
        else:
            segment = cls(name, memory)
            try:
                pages = budget() // page_size
                if pages <= 0:
                    raise ValueError(f"a budget under one page ({page_size} bytes) leaves nothing to share")
            except BaseException:
                segment.unlink()
                raise
            segment.table.initialize(page_size, pages)
        if segment.table.page_size != page_size:
            raise SegmentError(
                f"{name} counts pages of {segment.table.page_size} bytes; this instance uses {page_size}"
            )
        return segment

    def unlink(self) -> None:
        remove_segment(self.name)
