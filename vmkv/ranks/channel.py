"""The command channel between an engine's scheduler and one of its tensor-parallel ranks.

With tensor parallelism the scheduler decides which KV pages are mapped, but each rank
holds its shard of every block on its own device, in its own process. One channel per
rank carries the scheduler's page operations there: a shared-memory area and two POSIX
semaphores (one to ask, one to answer), private to the user (mode 0600). A command is a
batch of int64 words, so a whole map or unmap costs one semaphore round trip per rank,
not a socket call per page.

The rank creates its channel when it allocates its KV cache, under the scheduler's
process id (its parent: vLLM's multiprocessing executor spawns the ranks), and writes
what it reserved (:class:`RankInfo`). The scheduler opens every rank's channel when it
builds its block pool, and unlinks the names: nothing is left in /dev/shm afterwards.
Everything read from the other side is validated before use.
"""

from __future__ import annotations

import contextlib
import enum
import mmap
import os
from array import array
from dataclasses import dataclass

import posix_ipc

from vmkv.coordinator.segment import SHM_DIR, check_private
from vmkv.vmm_ops import BACKENDS

MAGIC = 0x766D6B7674703031  # "vmkvtp01"
MAX_BUFFERS = 4096
INFO_WORDS = 16 + MAX_BUFFERS
HEADER_WORDS = 4  # op, argument (the answer's status), payload words, unused
DATA_WORDS = 1 << 20  # payload capacity: 8 MiB, half a million map pairs
WORD = 8
CHANNEL_BYTES = (INFO_WORDS + HEADER_WORDS + DATA_WORDS) * WORD


class ChannelError(RuntimeError):
    """A channel that is missing, foreign, malformed, or whose other side stopped."""


class NoChannel(ChannelError):
    """No channel exists under the name: the engine runs no vmkv ranks."""


class Op(enum.IntEnum):
    CREATE = 1  # payload: new page ids
    RELEASE = 2  # payload: page ids
    MAP = 3  # payload: (offset, page id) pairs
    UNMAP = 4  # argument: the scheduler's step count (the fence); payload: offsets
    MAPPED = 5  # payload: offsets; reply: 0 or 1 each
    STATS = 6  # reply: mapped offsets, pages held, steps done
    CLOSE = 7
    SPILL_OPEN = 8  # payload: the namespace's fields as JSON (pack_bytes)
    STORE = 9  # argument: the fence; payload: pack_keys(keys, blocks)
    LOOKUP = 10  # payload: pack_keys(keys, []); reply: the leading keys held
    RETRIEVE = 11  # argument: the fence; payload: pack_keys(keys, blocks)
    SPILL_STATS = 12  # reply: valid blocks, stored, retrieved, slots


class Status(enum.IntEnum):
    OK = 0
    OUT_OF_MEMORY = 1
    ERROR = 2  # payload: the error's message (pack_bytes)
    MISSING = 3  # a key to retrieve is not in the rank's spill tier


def channel_name(owner_pid: int, rank: int) -> str:
    """Per user, per scheduler process and rank. Not under the coordinator's
    ``/vmkv-<uid>-`` prefix, so that `vmkv ls` never takes a channel for a segment."""
    return f"/vmkvtp-{os.getuid()}-{int(owner_pid)}-r{int(rank)}"


@dataclass(frozen=True)
class RankInfo:
    """What a rank reserved for its KV shard, as the scheduler's side needs it."""

    rank: int
    world: int
    pid: int
    kind: str
    device: int
    page_size: int
    free_bytes: int
    total_bytes: int
    num_blocks: int
    block_bytes: tuple[int, ...]

    def mem_info(self) -> tuple[int, int]:
        """The rank's device memory when it wrote this (the coordinator sizes budgets by it)."""
        return self.free_bytes, self.total_bytes

    def words(self) -> list[int]:
        kind = BACKENDS.index(self.kind)
        head = [MAGIC, self.rank, self.world, self.pid, kind, self.device, self.page_size]
        return [
            *head,
            self.free_bytes,
            self.total_bytes,
            self.num_blocks,
            len(self.block_bytes),
            *self.block_bytes,
        ]

    @classmethod
    def parse(cls, words: memoryview, rank: int) -> RankInfo:
        if words[0] != MAGIC:
            raise ChannelError(f"rank {rank}'s channel is not a vmkv channel (or was never written)")
        got_rank, world, pid, kind, device, page_size, free, total, num_blocks, count = words[1:11]
        if got_rank != rank or not 0 <= rank < world:
            raise ChannelError(f"rank {rank}'s channel says it is rank {got_rank} of {world}")
        if not 0 <= kind < len(BACKENDS) or device < 0 or pid <= 0:
            raise ChannelError(f"rank {rank}'s channel names backend {kind}, device {device}, pid {pid}")
        if page_size <= 0 or page_size & (page_size - 1) or num_blocks <= 0 or not 0 < count <= MAX_BUFFERS:
            raise ChannelError(
                f"rank {rank}'s channel has page size {page_size}, {num_blocks} blocks, {count} buffers"
            )
        block_bytes = tuple(words[11 : 11 + count])
        if min(block_bytes) <= 0 or not 0 <= free <= total:
            raise ChannelError(
                f"rank {rank}'s channel has block sizes {block_bytes[:4]}... and memory {free}/{total}"
            )
        return cls(rank, world, pid, BACKENDS[kind], device, page_size, free, total, num_blocks, block_bytes)


class Channel:
    """One end of a rank's channel: the rank creates it, the scheduler opens it."""

    def __init__(
        self, name: str, memory: posix_ipc.SharedMemory, ask: posix_ipc.Semaphore, answer: posix_ipc.Semaphore
    ):
        self.name = name
        self._map = mmap.mmap(memory.fd, CHANNEL_BYTES)
        memory.close_fd()
        self._ask, self._answer = ask, answer
        self.words = memoryview(self._map).cast("q")
        self.info_words = self.words[:INFO_WORDS]
        self.header = self.words[INFO_WORDS : INFO_WORDS + HEADER_WORDS]
        self.data = self.words[INFO_WORDS + HEADER_WORDS :]

    @classmethod
    def create(cls, info: RankInfo, owner_pid: int) -> Channel:
        """The rank's end: a fresh channel (a stale one of a dead process with the same
        id is replaced) holding ``info``."""
        if len(info.block_bytes) > MAX_BUFFERS:
            raise ValueError(f"{len(info.block_bytes)} KV buffers; a channel describes at most {MAX_BUFFERS}")
        words = info.words()
        name = channel_name(owner_pid, info.rank)
        unlink(name)
        memory = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=CHANNEL_BYTES)
        ask = posix_ipc.Semaphore(name + "-q", posix_ipc.O_CREX, mode=0o600)
        answer = posix_ipc.Semaphore(name + "-a", posix_ipc.O_CREX, mode=0o600)
        channel = cls(name, memory, ask, answer)
        channel.info_words[1 : len(words)] = memoryview(array("q", words[1:]))
        channel.info_words[0] = MAGIC  # last: the scheduler reads nothing before it
        return channel

    @classmethod
    def open(cls, owner_pid: int, rank: int) -> tuple[Channel, RankInfo]:
        """The scheduler's end of ``rank``'s channel, or ChannelError when there is none."""
        name = channel_name(owner_pid, rank)
        try:
            check_private(SHM_DIR / name.lstrip("/"))
            memory = posix_ipc.SharedMemory(name)
            ask, answer = posix_ipc.Semaphore(name + "-q"), posix_ipc.Semaphore(name + "-a")
        except (posix_ipc.ExistentialError, FileNotFoundError) as error:
            raise NoChannel(f"no channel from rank {rank} of the process {owner_pid}: {error}") from None
        if memory.size != CHANNEL_BYTES:
            memory.close_fd()
            ask.close()
            answer.close()
            raise ChannelError(f"{name} is {memory.size} bytes, not a vmkv channel of {CHANNEL_BYTES}")
        channel = cls(name, memory, ask, answer)
        try:
            return channel, RankInfo.parse(channel.info_words, rank)
        except ChannelError:
            channel.close()
            raise

    # -- the scheduler's side --------------------------------------------------------

    def send(self, op: Op, argument: int, payload: list[int]) -> None:
        if len(payload) > DATA_WORDS:
            raise ValueError(f"a {op.name} of {len(payload)} words exceeds the channel's {DATA_WORDS}")
        self.data[: len(payload)] = memoryview(array("q", payload))
        self.header[0], self.header[1], self.header[2] = int(op), argument, len(payload)
        self._ask.release()

    def receive(self, timeout: float) -> tuple[Status, list[int]] | None:
        """The rank's answer, or None if none came within ``timeout`` seconds."""
        try:
            self._answer.acquire(timeout)
        except posix_ipc.BusyError:
            return None
        status, count = self.header[1], self.header[2]
        if status not in Status._value2member_map_ or not 0 <= count <= DATA_WORDS:
            raise ChannelError(f"{self.name} answered status {status} with {count} words")
        return Status(status), self.data[:count].tolist()

    # -- the rank's side -------------------------------------------------------------

    def wait_command(self, timeout: float | None) -> tuple[int, int, list[int]] | None:
        """(op, argument, payload) of the next command, or None at a timeout. The op is
        not validated here: the rank answers an unknown one with an error."""
        try:
            self._ask.acquire(timeout)
        except posix_ipc.BusyError:
            return None
        op, argument, count = self.header[0], self.header[1], self.header[2]
        if not 0 <= count <= DATA_WORDS:
            return op, argument, [-1]  # refused by the rank as malformed
        return op, argument, self.data[:count].tolist()

    def answer(self, status: Status, payload: list[int]) -> None:
        self.data[: len(payload)] = memoryview(array("q", payload))
        self.header[1], self.header[2] = int(status), len(payload)
        self._answer.release()

    def answer_error(self, message: str) -> None:
        self.answer(Status.ERROR, pack_bytes(message.encode()[: (DATA_WORDS - 1) * WORD]))

    def close(self) -> None:
        for view in (self.info_words, self.header, self.data, self.words):
            view.release()
        self._map.close()
        self._ask.close()
        self._answer.close()


def error_text(payload: list[int]) -> str:
    """The message of an ERROR answer."""
    try:
        return unpack_bytes(payload, 0)[0].decode(errors="replace")
    except ValueError:
        return "(malformed error message)"


def pack_bytes(data: bytes) -> list[int]:
    """``data`` as words: its length, then its bytes padded to whole words."""
    padded = data + b"\0" * (-len(data) % WORD)
    return [len(data), *array("q", padded)]


def unpack_bytes(words: list[int], at: int) -> tuple[bytes, int]:
    """The bytes packed at ``words[at]`` and the index just past them; ValueError when
    the length runs past the words."""
    if not 0 <= at < len(words) or not 0 <= words[at] <= (len(words) - at - 1) * WORD:
        raise ValueError("packed bytes run past the command")
    size = words[at]
    end = at + 1 + -(-size // WORD)
    return array("q", words[at + 1 : end]).tobytes()[:size], end


def pack_keys(keys: list[bytes], blocks: list[int]) -> list[int]:
    """Block hashes (and the blocks they go with, if any) as one payload."""
    return [len(keys), len(blocks), *blocks, *(word for key in keys for word in pack_bytes(key))]


def unpack_keys(words: list[int]) -> tuple[list[bytes], list[int]]:
    """What pack_keys packed; ValueError when the words do not add up."""
    if len(words) < 2 or not 0 <= words[0] <= len(words) or words[1] not in (0, words[0]):
        raise ValueError("a key list that does not add up")
    count, with_blocks = words[0], words[1]
    blocks, at, keys = words[2 : 2 + with_blocks], 2 + with_blocks, []
    for _ in range(count):
        key, at = unpack_bytes(words, at)
        keys.append(key)
    if at != len(words) or len(blocks) != with_blocks:
        raise ValueError("a key list that does not add up")
    return keys, blocks


def unlink(name: str) -> None:
    """Remove a channel's names (processes that opened it keep it)."""
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_shared_memory(name)
    for suffix in ("-q", "-a"):
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_semaphore(name + suffix)
