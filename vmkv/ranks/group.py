"""The scheduler's side of a tensor-parallel engine: its ranks, driven as one backend.

:class:`RankGroup` has the interface of a :class:`~vmkv.vmm_ops.Vmm`, and each of its
pages is one physical page on every rank. The page pool, KV space, block allocator and
reclaim of the scheduler's process run over it unchanged, exactly as they run over one
device at tensor parallel size 1: they decide which pages to map and when, and every
decision reaches every rank as one command on its channel. Commands go to all ranks at
once, and a command returns when all have answered: a page counts as mapped only once
every rank maps it, so a block is never handed out on a page some rank lacks. A rank
that cannot create a page (its device is full) makes the whole creation a miss, and the
ranks that did create give theirs back.

Unmaps carry the number of steps scheduled so far (:meth:`RankGroup.note_step`), and
each rank unmaps only once it has run that many (see vmkv.ranks.server).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import Counter
from collections.abc import Collection, Sequence

from vmkv.allocator.kv_space import KVLayout
from vmkv.coordinator import Instance, join
from vmkv.coordinator.group import GroupLease
from vmkv.ranks.channel import (
    DATA_WORDS,
    Channel,
    ChannelError,
    NoChannel,
    Op,
    RankInfo,
    Status,
    error_text,
    unlink,
)
from vmkv.vmm_ops import OutOfDeviceMemory

BASE = 1 << 40  # the group's addresses: BASE + an offset into every rank's reservation
POLL_S = 1.0  # how often a wait for a rank checks that its process lives


class RankGroup:
    """The ranks of one engine, behind the interface of one backend."""

    def __init__(self, channels: Sequence[Channel], infos: Sequence[RankInfo]) -> None:
        first = infos[0]
        if first.world != len(infos):
            raise ChannelError(f"rank 0 says the engine has {first.world} ranks, {len(infos)} are open")
        for info in infos[1:]:
            same = (info.world, info.kind, info.page_size, info.num_blocks, info.block_bytes)
            if same != (first.world, first.kind, first.page_size, first.num_blocks, first.block_bytes):
                raise ChannelError(
                    f"rank {info.rank}'s KV shard ({info.kind}, {info.page_size}-byte pages, "
                    f"{info.num_blocks} blocks of {info.block_bytes[:2]}...) differs from rank 0's"
                )
        self.channels = list(channels)
        self.infos = list(infos)
        self.kind, self.device, self.page_size = first.kind, first.device, first.page_size
        self.layout = KVLayout.of(first.block_bytes, first.num_blocks, first.page_size)
        self.steps_scheduled = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._broken: str | None = None

    @classmethod
    def connect(cls, owner_pid: int | None = None) -> RankGroup | None:
        """The ranks that this process (``owner_pid``) spawned, or None when rank 0 has no
        channel under it (the engine runs no vmkv ranks). ChannelError when a channel is
        there but unusable."""
        owner = os.getpid() if owner_pid is None else owner_pid
        try:
            first, info = Channel.open(owner, 0)
        except NoChannel:
            return None
        channels, infos = [first], [info]
        try:
            for rank in range(1, info.world):
                channel, rank_info = Channel.open(owner, rank)
                channels.append(channel)
                infos.append(rank_info)
            return cls(channels, infos)
        except BaseException:
            for channel in channels:
                channel.close()
            raise
        finally:
            for channel in channels:
                unlink(channel.name)

    # -- what the pool, the space and the coordinator ask of a backend ----------------

    def mem_info(self) -> tuple[int, int]:
        return self.infos[0].mem_info()

    def reserve(self, size: int) -> int:
        if size != self.layout.nbytes:
            raise ValueError(f"the ranks reserved {self.layout.nbytes} bytes of KV, not {size}")
        return BASE

    def release_reservation(self, address: int) -> None:
        if address != BASE:
            raise ValueError(f"{address:#x} is not the ranks' reservation")

    def create_pages(self, count: int) -> list[int]:
        ids = [next(self._ids) for _ in range(count)]
        answers = self.broadcast(Op.CREATE, 0, ids)
        created = [rank for rank, (status, _) in enumerate(answers) if status == Status.OK]
        if len(created) == len(answers):
            return ids
        self.broadcast(Op.RELEASE, 0, ids, ranks=created)
        full = [rank for rank, (status, _) in enumerate(answers) if status == Status.OUT_OF_MEMORY]
        raise_errors(answers, expected=(Status.OK, Status.OUT_OF_MEMORY))
        raise OutOfDeviceMemory(f"no memory for {count} KV pages on rank {full[0]}'s device")

    def release_pages(self, pages: Sequence[int]) -> None:
        raise_errors(self.broadcast(Op.RELEASE, 0, list(pages)))

    def map(self, pairs: Sequence[tuple[int, int]]) -> None:
        words = [word for address, page in pairs for word in (self._offset(address), page)]
        answers = self.broadcast(Op.MAP, 0, words)
        mapped = [rank for rank, (status, _) in enumerate(answers) if status == Status.OK]
        if len(mapped) < len(answers):
            if mapped:  # all or nothing, as on one device
                self.broadcast(Op.UNMAP, 0, words[::2], ranks=mapped)
            raise_errors(answers)  # raises: some rank's status is not OK

    def unmap(self, addresses: Sequence[int]) -> list[int]:
        offsets = [self._offset(address) for address in addresses]
        raise_errors(self.broadcast(Op.UNMAP, self.steps_scheduled, offsets))
        return []

    def synchronize(self) -> None:
        """Nothing to wait for here: a rank waits for its own device before it copies."""

    def mapped(self, addresses: Sequence[int]) -> list[bool]:
        """Whether any rank has a page at each address (one that is mapped anywhere may
        not be mapped again)."""
        answers = self.broadcast(Op.MAPPED, 0, [self._offset(address) for address in addresses])
        return [any(flags) for flags in zip(*replies(answers, len(addresses)), strict=True)]

    # -- the engine's side -------------------------------------------------------------

    def note_step(self) -> None:
        """The scheduler has produced one more step, which every rank will run."""
        self.steps_scheduled += 1

    def rank_stats(self) -> list[dict[str, int]]:
        """Per rank: KV pages' physical pages mapped, pages held, steps run."""
        fields = ("mapped", "held", "steps")
        answers = self.broadcast(Op.STATS, 0, [])
        return [dict(zip(fields, words, strict=True)) for words in replies(answers, len(fields))]

    def join(
        self, name: str, engine: str, model: str, min_bytes: int, max_bytes: int | None, weight: int
    ) -> GroupLease:
        """Register with the coordinator of every device the ranks use. The sizes are per
        rank: a segment that several ranks share counts them several times."""
        per_device = Counter((info.kind, info.device) for info in self.infos)
        members: list[tuple[Instance, int]] = []
        try:
            for (kind, device), ranks in per_device.items():
                info = next(i for i in self.infos if (i.kind, i.device) == (kind, device))
                most = None if max_bytes is None else max_bytes * ranks
                instance = join(info, name, engine, model, min_bytes * ranks, most, weight)  # type: ignore[arg-type]
                members.append((instance, ranks))
        except BaseException:
            for instance, _ in members:
                instance.close()
            raise
        return GroupLease(members)

    def close(self) -> None:
        """Tell the ranks to unmap and release everything."""
        if self._broken is None:
            self.broadcast(Op.CLOSE, 0, [])
        for channel in self.channels:
            channel.close()

    # -- internals ---------------------------------------------------------------------

    def _offset(self, address: int) -> int:
        offset = address - BASE
        if not 0 <= offset < self.layout.nbytes or offset % self.page_size:
            raise ValueError(f"address {address:#x} is not a page of the ranks' KV reservation")
        return offset

    def broadcast(
        self, op: Op, argument: int, payload: list[int], ranks: Sequence[int] | None = None
    ) -> list[tuple[Status, list[int]]]:
        """Send one command to ``ranks`` (all by default) and wait for all answers. A
        failure in between leaves some ranks' answers unread, so the channels are out of
        step and the group refuses every later command."""
        if len(payload) > DATA_WORDS:
            raise ValueError(f"a {op.name} of {len(payload)} words exceeds the channels' {DATA_WORDS}")
        targets = range(len(self.channels)) if ranks is None else ranks
        with self._lock:
            if self._broken is not None:
                raise ChannelError(self._broken)
            try:
                for rank in targets:
                    self.channels[rank].send(op, argument, payload)
                return [self._answer(rank) for rank in targets]
            except BaseException as error:
                self._broken = self._broken or f"vmkv's rank channels are out of step after {error!r}"
                raise

    def _answer(self, rank: int) -> tuple[Status, list[int]]:
        channel, pid = self.channels[rank], self.infos[rank].pid
        while (answer := channel.receive(POLL_S)) is None:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                self._broken = f"vmkv's rank {rank} (pid {pid}) has exited; its KV pages are gone with it"
                raise ChannelError(self._broken) from None
        return answer


def raise_errors(
    answers: list[tuple[Status, list[int]]], expected: Collection[Status] = (Status.OK,)
) -> None:
    """RuntimeError for the first rank that answered an error, else for the first whose
    status the command cannot have."""
    for rank, (status, payload) in enumerate(answers):
        if status == Status.ERROR:
            raise RuntimeError(f"vmkv rank {rank}: {error_text(payload)}")
    for rank, (status, _) in enumerate(answers):
        if status not in expected:
            raise RuntimeError(f"vmkv rank {rank} answered {status.name}, which this command cannot have")


def replies(answers: list[tuple[Status, list[int]]], words: int) -> list[list[int]]:
    """Every rank's payload of an answered query, each exactly ``words`` long."""
    raise_errors(answers)
    for rank, (_, payload) in enumerate(answers):
        if len(payload) != words:
            raise ChannelError(f"vmkv rank {rank} answered {len(payload)} words where {words} belong")
    return [payload for _, payload in answers]
