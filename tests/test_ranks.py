"""Tensor-parallel ranks: the scheduler's stack maps, unmaps and leases pages on every
rank, each a real process with its own host-backend memory (tests/rank_worker.py)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from vmkv.coordinator import Segment
from vmkv.coordinator.segment import SHM_DIR, remove_segment
from vmkv.ranks import ChannelError, RankGroup
from vmkv.ranks.channel import Channel, Op, RankInfo, Status, channel_name, error_text, unlink
from vmkv.ranks.spill import RankSpill
from vmkv.spill import Namespace
from vmkv.stack import KVStack, StackSettings
from vmkv.vmm_ops import OutOfDeviceMemory

WORKER = Path(__file__).with_name("rank_worker.py")
BLOCK_BYTES = [64 << 10] * 4  # as in rank_worker.py: on the host, 16 blocks a KV page of 4 pages


class Rank:
    def __init__(self, rank: int, world: int, capacity: int, backend: str) -> None:
        path = [str(WORKER.parent.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        command = [sys.executable, str(WORKER), str(os.getpid()), str(rank), str(world), str(capacity)]
        command.append(backend)
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        assert self.ask() == "ready"

    def ask(self, line: str | None = None) -> str:
        if line is not None:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=10)


@contextlib.contextmanager
def ranks(capacities: list[int], backend: str = "host") -> Iterator[tuple[RankGroup, list[Rank]]]:
    started = []
    try:
        for rank, capacity in enumerate(capacities):
            started.append(Rank(rank, len(capacities), capacity, backend))
        group = RankGroup.connect()
        assert group is not None
        yield group, started
    finally:
        for rank in started:
            rank.stop()


@contextlib.contextmanager
def scripted_rank(answers: list[tuple[int, list[int]]]) -> Iterator[Channel]:
    """Rank 0 of 1, played by a thread of this process: it answers each command with the
    next (status, payload) of ``answers``, whatever was asked (a rank gone wrong)."""
    info = RankInfo(0, 1, os.getpid(), "host", 0, 2 << 20, 1 << 30, 1 << 30, 64, tuple(BLOCK_BYTES))
    channel = Channel.create(info, os.getpid())

    def serve() -> None:
        for status, payload in answers:
            if channel.wait_command(10) is None:
                return
            channel.data[: len(payload)] = memoryview(array("q", payload))
            channel.header[1], channel.header[2] = status, len(payload)  # any status, valid or not
            channel._answer.release()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield channel
    finally:
        thread.join(timeout=10)
        channel.close()
        unlink(channel.name)


@contextlib.contextmanager
def group_stack(monkeypatch, group: RankGroup, budget: str = "256M") -> Iterator[KVStack]:
    segment = f"/vmkv-{os.getuid()}-ranktest{os.getpid()}"
    monkeypatch.setenv("VMKV_SEGMENT", segment)
    monkeypatch.setenv("VMKV_BUDGET", budget)
    settings = StackSettings("tp", "test", "tiny", keep_free_pages=0)
    stack = KVStack(torch.device("cpu"), BLOCK_BYTES, 256, settings, ranks=group)
    try:
        yield stack
    finally:
        stack.close()
        remove_segment(segment)


@pytest.mark.parametrize("backend", ["host", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_every_rank_maps_the_pages_the_scheduler_hands_blocks_from(monkeypatch, backend):
    """On CUDA both ranks share GPU 0, each in its own process and context; the
    scheduler's process opens no CUDA context at all."""
    with ranks([64 << 20, 64 << 20], backend) as (group, workers), group_stack(monkeypatch, group) as stack:
        assert not list(SHM_DIR.glob(channel_name(os.getpid(), 0).lstrip("/") + "*"))  # names gone
        allocator = stack.allocator
        blocks = allocator.alloc(2 * allocator.blocks_per_page)  # the null block's page, two more
        assert blocks is not None and stack.space.mapped_pages == 3
        per_rank = stack.space.mapped_pages * stack.space.physical_per_page
        assert [s["mapped"] for s in group.rank_stats()] == [per_rank, per_rank]
        for rank, worker in enumerate(workers):  # each rank's memory is its own
            for block in blocks:
                assert worker.ask(f"write {block} {rank + 7}") == "ok"
        assert {worker.ask(f"read {blocks[-1]}") for worker in workers} == {"7", "8"}
        # The coordinator counts a page on each rank: both share one device's segment.
        (row,) = Segment.attach(os.environ["VMKV_SEGMENT"]).table.snapshot()
        assert row["held"] == row["leased"] == 2 * stack.pool.stats().held
        allocator.free(blocks)
        deadline = time.monotonic() + 5
        while stack.space.mapped_pages > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [s["mapped"] for s in group.rank_stats()] == [stack.space.physical_per_page] * 2


def test_an_unmap_waits_until_every_rank_has_run_the_steps_scheduled_before_it(monkeypatch):
    with ranks([64 << 20, 64 << 20]) as (group, workers), group_stack(monkeypatch, group) as stack:
        blocks = stack.allocator.alloc(20)
        group.note_step()
        group.note_step()  # two steps went out; they may still use these blocks' pages
        stack.allocator.free(blocks)
        trim = threading.Thread(target=stack.give_back)
        trim.start()
        time.sleep(0.3)
        assert stack.space.mapped_pages >= 1 and trim.is_alive()
        assert workers[0].ask("step") == workers[0].ask("step") == "ok"
        assert workers[1].ask("step") == "ok"
        time.sleep(0.2)
        assert trim.is_alive()  # rank 1 has run one of the two
        assert workers[1].ask("step") == "ok"
        trim.join(timeout=5)
        assert not trim.is_alive() and stack.space.mapped_pages == 1
        assert [s["steps"] for s in group.rank_stats()] == [2, 2]


def test_a_rank_whose_device_is_full_makes_the_allocation_a_miss_on_all(monkeypatch):
    # Rank 1 has room for the null block's page (4 physical pages) and no more.
    with ranks([64 << 20, 4 << 20]) as (group, _), group_stack(monkeypatch, group) as stack:
        assert stack.allocator.alloc(stack.allocator.blocks_per_page) is None
        assert [s["held"] for s in group.rank_stats()] == [4, 4]  # rank 0 gave its new ones back
        with pytest.raises(OutOfDeviceMemory, match="rank 1"):
            group.create_pages(1)


def test_bad_commands_are_refused_by_name_and_change_nothing(monkeypatch):
    with ranks([64 << 20]) as (group, _), group_stack(monkeypatch, group) as stack:
        before = group.rank_stats()
        with pytest.raises(ValueError, match="not a page of the ranks' KV reservation"):
            group.map([(12345, 1)])
        with pytest.raises(RuntimeError, match="which this rank does not hold"):
            group.map([(stack.space.base + (8 << 20), 999)])
        with pytest.raises(RuntimeError, match="not mapped"):
            group.unmap([stack.space.base + (8 << 20)])
        with pytest.raises(RuntimeError, match="page id 424242, which this rank does not hold"):
            group.release_pages([424242])
        channel = group.channels[0]  # a command no rank knows, and one that lies about its size
        channel.send(Op.STATS, 0, [])
        assert channel.receive(5)[0] == Status.OK
        channel.header[0] = 99
        channel._ask.release()
        status, payload = channel.receive(5)
        assert status == Status.ERROR and "unknown command 99" in error_text(payload)
        assert group.rank_stats() == before


def test_a_rank_that_exits_is_named_and_no_one_waits_for_it(monkeypatch):
    with ranks([64 << 20, 64 << 20]) as (group, workers), group_stack(monkeypatch, group) as stack:
        workers[1].process.kill()
        workers[1].process.wait()
        with pytest.raises(ChannelError, match=r"rank 1 .* has exited"):
            stack.allocator.alloc(4 * stack.allocator.blocks_per_page)
        with pytest.raises(ChannelError, match="rank 1"):
            group.rank_stats()


def test_each_rank_spills_and_reloads_its_own_shard_of_a_block(monkeypatch, tmp_path):
    monkeypatch.setenv("VMKV_CPU_BYTES", "8M")
    with ranks([64 << 20, 64 << 20]) as (group, workers), group_stack(monkeypatch, group) as stack:
        stack.open_spill([], Namespace(f"ranktest{os.getpid()}", "auto", 32))
        spill = stack.spill
        block, other = stack.allocator.alloc(2)
        for rank, worker in enumerate(workers):
            assert worker.ask(f"write {block} {rank + 40}") == "ok"
        spill.store([b"hash-a"], [block]).wait()
        assert spill.lookup([b"hash-a", b"hash-b"]) == 1 and spill.lookup([b"hash-b"]) == 0
        spill.retrieve([b"hash-a"], [other]).fence()
        assert [worker.ask(f"read {other}") for worker in workers] == ["40", "41"]  # shards apart
        assert spill.stats()["valid"] == 1
        with pytest.raises(KeyError):
            spill.retrieve([b"hash-b"], [other])
        with pytest.raises(RuntimeError, match="block id 1000000 out of range"):
            spill.store([b"hash-c"], [10**6])
        channel = group.channels[0]  # a key list that does not add up
        channel.send(Op.LOOKUP, 0, [5, 0, 1])
        status, payload = channel.receive(5)
        assert status == Status.ERROR and "does not add up" in error_text(payload)
        assert spill.lookup([b"hash-a"]) == 1


def test_answers_a_command_cannot_have_are_refused_and_a_garbled_one_stops_the_group():
    answers = [
        (Status.MISSING, []),  # to a map: a status only a retrieve may have
        (Status.OK, []),  # opens the spill tier
        (Status.OK, [5]),  # holds 5 of the 1 key it was asked about
        (Status.OK, [1, 2]),  # stats of 2 words, not 3
        (99, []),  # no status at all
    ]
    with scripted_rank(answers):
        group = RankGroup.connect()
        assert group is not None
        with pytest.raises(RuntimeError, match="rank 0 answered MISSING, which this command cannot have"):
            group.map([(group.reserve(group.layout.nbytes), 1)])
        spill = RankSpill(group, Namespace("scripted", "auto", 16))
        with pytest.raises(ChannelError, match=r"hold \[5\] of 1 keys"):
            spill.lookup([b"key"])
        with pytest.raises(ChannelError, match="answered 2 words where 3 belong"):
            group.rank_stats()
        with pytest.raises(ChannelError, match="answered status 99"):
            group.rank_stats()
        with pytest.raises(ChannelError, match="out of step"):  # its answers can no longer be trusted
            group.rank_stats()
        group.close()


def test_a_rank_channel_that_is_there_but_unusable_is_named_not_taken_for_no_ranks():
    info = RankInfo(0, 1, os.getpid(), "host", 0, 2 << 20, 1 << 30, 1 << 30, 64, tuple(BLOCK_BYTES))
    channel = Channel.create(info, os.getpid())
    try:
        channel.info_words[0] = 0  # never finished, or not vmkv's
        with pytest.raises(ChannelError, match="not a vmkv channel"):
            RankGroup.connect()
    finally:
        channel.close()
        unlink(channel.name)


def test_the_scheduler_finds_no_ranks_where_none_were_started():
    assert RankGroup.connect(owner_pid=1) is None
    with pytest.raises(ChannelError, match="no channel from rank 0"):
        Channel.open(1, 0)
