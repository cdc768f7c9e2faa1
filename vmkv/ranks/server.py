"""A tensor-parallel rank's side: its KV shard's reservation, mapped as the scheduler says.

The rank reserves the same layout as every other rank (the same blocks per page, its own
bytes per block) and serves its channel on a daemon thread: it creates, maps, unmaps and
releases physical pages on its own device under the ids the scheduler gives them. A
command names offsets into the reservation, never addresses, and every offset and id is
checked before anything changes.

An unmap carries a fence: the number of scheduling steps the scheduler had sent out when
it decided the unmap. vLLM sends a step to every rank and goes on (the next step may be
scheduled while ranks still run this one), so a rank may not have run a step that
still uses a page the scheduler has since freed. The rank unmaps only after it has run
that many steps (:meth:`RankServer.step_done`, called after each of its steps).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from vmkv.allocator.kv_space import KVLayout
from vmkv.ranks.channel import Channel, Op, RankInfo, Status, unlink, unpack_bytes, unpack_keys
from vmkv.vmm_ops import OutOfDeviceMemory, Vmm

if TYPE_CHECKING:
    import torch

    from vmkv.spill import SpillStore

log = logging.getLogger("vmkv")
T = TypeVar("T")


class CommandError(ValueError):
    """A command that names something it may not (answered as an error, nothing changed)."""


class RankServer:
    """Maps this rank's KV reservation page by page, as its channel commands."""

    def __init__(
        self, vmm: Vmm, block_bytes: Sequence[int], num_blocks: int, rank: int, world: int, owner_pid: int
    ) -> None:
        self.vmm = vmm
        self.layout = KVLayout.of(block_bytes, num_blocks, vmm.page_size)
        self.base = vmm.reserve(self.layout.nbytes)
        self._pages: dict[int, int] = {}  # the scheduler's page id -> this rank's page
        self._mapped: dict[int, int] = {}  # offset -> the scheduler's page id there
        self._mapped_ids: set[int] = set()  # its values, kept apart: checked per command
        self.rank, self.world = rank, world
        # The engine's KV tensors of this shard, blocks first: what the spill tier copies.
        self.layer_views: list[torch.Tensor] = []
        self.spill: SpillStore | None = None
        self._steps = 0
        self._stepped = threading.Condition()
        self._closing = False
        free, total = vmm.mem_info()
        info = RankInfo(
            rank,
            world,
            os.getpid(),
            vmm.kind,
            vmm.device,
            vmm.page_size,
            free,
            total,
            num_blocks,
            tuple(block_bytes),
        )
        self._channel = Channel.create(info, owner_pid)
        self._thread = threading.Thread(target=self._serve, name=f"vmkv-rank{rank}", daemon=True)
        self._thread.start()

    def step_done(self) -> None:
        """This rank has run one more scheduling step (its work is queued on the device)."""
        with self._stepped:
            self._steps += 1
            self._stepped.notify_all()

    def _serve(self) -> None:
        channel = self._channel
        while not self._closing:
            command = channel.wait_command(None)
            if command is None:
                continue
            op, argument, payload = command
            try:
                status, reply = self._run(op, argument, payload)
            except CommandError as error:
                channel.answer_error(str(error))
                continue
            except Exception as error:  # a driver error: the scheduler raises it
                log.exception("vmkv rank command %s failed", op)
                channel.answer_error(f"{type(error).__name__}: {error}")
                continue
            channel.answer(status, reply)
            if op == Op.CLOSE:
                return

    def _run(self, op: int, argument: int, payload: list[int]) -> tuple[Status, list[int]]:
        if op == Op.CREATE:
            return self._create(payload)
        if op == Op.RELEASE:
            self._release(payload)
        elif op == Op.MAP:
            self._map(payload)
        elif op == Op.UNMAP:
            self._unmap(argument, payload)
        elif op == Op.MAPPED:
            offsets = [self._check_offset(offset) for offset in payload]
            return Status.OK, [int(offset in self._mapped) for offset in offsets]
        elif op == Op.STATS:
            return Status.OK, [len(self._mapped), len(self._pages), self._steps]
        elif op == Op.CLOSE:
            self._closing = True
            self.close_memory()
        elif Op.SPILL_OPEN <= op <= Op.SPILL_STATS:
            return self._spill_command(op, argument, payload)
        else:
            raise CommandError(f"unknown command {op}")
        return Status.OK, []

    def _spill_command(self, op: int, fence: int, payload: list[int]) -> tuple[Status, list[int]]:
        """The spill tier of this rank's shard: every rank keeps its own, under the same
        keys, in a namespace of its own (the shards' layouts are alike)."""
        from vmkv.spill import Namespace, SpillStore, SpillTierFull

        if op == Op.SPILL_OPEN:
            if self.spill is None:
                fields = json.loads(_unpack(unpack_bytes, payload, 0)[0])
                namespace = Namespace(**{**fields, "shard": f"{self.rank}/{self.world}"})
                self.spill = SpillStore(self.layer_views, namespace, vmm=self.vmm)
            return Status.OK, []
        if self.spill is None:
            raise CommandError("no spill tier open on this rank")
        if op == Op.SPILL_STATS:
            stats = self.spill.stats()
            keys = ("valid", "stored_blocks", "retrieved_blocks", "slot_count")
            return Status.OK, [int(stats[key]) for key in keys]
        keys, blocks = _unpack(unpack_keys, payload)
        if op == Op.LOOKUP:
            return Status.OK, [self.spill.lookup(keys)]
        # The blocks may still be written by steps sent before: by the last step of the
        # request a cold block belonged to, or of one preempted from a reloaded block.
        self._wait_steps(fence)
        self.vmm.synchronize()
        try:
            if op == Op.STORE:
                self.spill.store(keys, blocks).wait()
            else:
                self.spill.retrieve(keys, blocks).wait()
        except SpillTierFull as error:
            raise CommandError(str(error)) from None
        except KeyError:
            return Status.MISSING, []
        except ValueError as error:  # a block out of range, keys and blocks that differ
            raise CommandError(str(error)) from None
        return Status.OK, []

    def _create(self, ids: list[int]) -> tuple[Status, list[int]]:
        if len(set(ids)) != len(ids) or any(i < 0 or i in self._pages for i in ids):
            raise CommandError("CREATE names a page id twice, a negative one, or one in use")
        try:
            created = self.vmm.create_pages(len(ids))
        except OutOfDeviceMemory:
            return Status.OUT_OF_MEMORY, []
        self._pages.update(zip(ids, created, strict=True))
        return Status.OK, []

    def _release(self, ids: list[int]) -> None:
        unknown = [i for i in ids if i not in self._pages]
        if unknown:
            raise CommandError(f"RELEASE of page id {unknown[0]}, which this rank does not hold")
        if len(set(ids)) != len(ids):
            raise CommandError("RELEASE names a page id twice")
        in_use = set(ids) & self._mapped_ids
        if in_use:
            raise CommandError(f"RELEASE of page id {min(in_use)}, which is still mapped")
        self.vmm.release_pages([self._pages[i] for i in ids])
        for i in ids:
            del self._pages[i]

    def _map(self, pairs: list[int]) -> None:
        if len(pairs) % 2:
            raise CommandError("MAP needs (offset, page id) pairs")
        offsets = [self._check_offset(offset) for offset in pairs[::2]]
        ids = pairs[1::2]
        for offset, page in zip(offsets, ids, strict=True):
            if offset in self._mapped:
                raise CommandError(f"MAP at offset {offset:#x}, which is already mapped")
            if page not in self._pages:
                raise CommandError(f"MAP of page id {page}, which this rank does not hold")
        if (
            len(set(offsets)) != len(offsets)
            or len(set(ids)) != len(ids)
            or not self._mapped_ids.isdisjoint(ids)
        ):
            raise CommandError("MAP names an offset or a page twice, or a page mapped elsewhere")
        self.vmm.map(
            [(self.base + offset, self._pages[page]) for offset, page in zip(offsets, ids, strict=True)]
        )
        self._mapped.update(zip(offsets, ids, strict=True))
        self._mapped_ids.update(ids)

    def _unmap(self, fence: int, offsets: list[int]) -> None:
        for offset in offsets:
            if self._check_offset(offset) not in self._mapped:
                raise CommandError(f"UNMAP at offset {offset:#x}, which is not mapped")
        if len(set(offsets)) != len(offsets):
            raise CommandError("UNMAP names an offset twice")
        self._wait_steps(fence)  # the steps sent before may still use these pages
        self.vmm.unmap([self.base + offset for offset in offsets])
        for offset in offsets:
            self._mapped_ids.discard(self._mapped.pop(offset))

    def _wait_steps(self, fence: int) -> None:
        with self._stepped:
            self._stepped.wait_for(lambda: self._steps >= fence or self._closing)

    def _check_offset(self, offset: int) -> int:
        if not 0 <= offset < self.layout.nbytes or offset % self.layout.page_size:
            raise CommandError(
                f"offset {offset:#x} is not a page of this rank's {self.layout.nbytes:#x}-byte reservation"
            )
        return offset

    def close_memory(self) -> None:
        """Unmap and release everything (the scheduler has gone; views must be dropped)."""
        with self._stepped:
            self._stepped.notify_all()
        if self.spill is not None:
            self.spill.close()
            self.spill = None
        if self._mapped:
            self.vmm.unmap([self.base + offset for offset in self._mapped])
            self._mapped.clear()
            self._mapped_ids.clear()
        if self._pages:
            self.vmm.release_pages(list(self._pages.values()))
            self._pages.clear()

    def unlink(self) -> None:
        """Remove the channel's names (once the scheduler has opened it, or never will)."""
        unlink(self._channel.name)


def _unpack(unpack: Callable[..., T], *args: object) -> T:
    try:
        return unpack(*args)
    except ValueError as error:
        raise CommandError(str(error)) from None
