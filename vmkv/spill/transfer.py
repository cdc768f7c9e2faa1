"""Moving blocks between an engine's KV tensors and host slots.

Per-block copies would be dominated by per-copy overhead (a Llama-3-8B block is 64
scattered 32 KiB rows; vLLM measured 0.5-2 MB copies 4-5x faster than 8-72 KB ones).
Blocks are therefore gathered on the device into a staging buffer laid out exactly like
a run of consecutive host slots, and each run crosses the bus as one large copy. Two
staging buffers alternate so that the gather of one chunk overlaps the copy of the
previous one; gathers run on one dedicated stream, copies on another, and neither is the
engine's compute stream. Completion is an event, polled or waited on. The host's work
before the first copy is time the bus sits idle, so it is kept small (see StreamMover).

On the host backend the KV tensors already live in host memory: blocks are gathered
straight into the slots, synchronously.

A regular layout (see :class:`RowGrid`) is gathered with one indexed copy per chunk;
any other, part by part.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from vmkv.allocator.tensors import tensor_at
from vmkv.spill.host_tier import HostTier
from vmkv.spill.layout import BlockLayout, RowGrid

if TYPE_CHECKING:
    import torch

DEFAULT_STAGING_BYTES = 64 << 20  # both buffers together


class Completion(Protocol):
    """What a device event offers (torch.cuda.Event and torch.npu.Event alike)."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...

    def wait(self, stream: Any = None) -> None: ...


class _Done:
    """Completion of work that finished before it was returned."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None

    def wait(self, stream: Any = None) -> None:
        return None


@dataclass(frozen=True)
class Run:
    """Consecutive host slots and the engine blocks that go with them, in order."""

    first_slot: int
    blocks: list[int]


def runs_of(slots: Sequence[int], blocks: Sequence[int]) -> list[Run]:
    """Groups (slot, block) pairs into runs of consecutive slots."""
    pairs = sorted(zip(slots, blocks, strict=True))
    runs: list[Run] = []
    for slot, block in pairs:
        if runs and runs[-1].first_slot + len(runs[-1].blocks) == slot:
            runs[-1].blocks.append(block)
        else:
            runs.append(Run(slot, [block]))
    return runs


def slot_runs(slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """(position, first slot, count) for each stretch of ``slots`` that ascends by one;
    negative slots (blocks not to copy) end a stretch and are left out."""
    out: list[tuple[int, int, int]] = []
    for position, slot in enumerate(slots):
        if slot < 0:
            continue
        if out and out[-1][0] + out[-1][2] == position and out[-1][1] + out[-1][2] == slot:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((position, slot, 1))
    return out


def _part_view(rows: torch.Tensor, part_index: int, layout: BlockLayout) -> torch.Tensor:
    """Part ``part_index`` of ``rows`` (n slot-shaped byte rows) as (n, *block_shape)."""
    part = layout.parts[part_index]
    chunk = rows[:, part.offset : part.offset + part.nbytes]
    return chunk.view(part.view.dtype).unflatten(1, part.view.shape[1:])


class _PartCopies:
    """Gathers and scatters part by part: works for any layout, one copy per part."""

    rows_per_block = 1

    def __init__(self, layout: BlockLayout) -> None:
        self.layout = layout

    def index(self, blocks: Sequence[int]) -> np.ndarray:
        """The block ids themselves, which index every part."""
        return np.asarray(blocks, dtype=np.int64)

    def gather(self, index: torch.Tensor, rows: torch.Tensor) -> None:
        for i, part in enumerate(self.layout.parts):
            _part_view(rows, i, self.layout).copy_(part.view.index_select(0, index))

    def scatter(self, index: torch.Tensor, rows: torch.Tensor) -> None:
        for i, part in enumerate(self.layout.parts):
            part.view.index_put_((index,), _part_view(rows, i, self.layout))


class _GridCopies:
    """Gathers and scatters all parts of a regular layout with one indexed copy."""

    def __init__(self, grid: RowGrid, device: torch.device) -> None:
        import torch

        width = next(w for w in (8, 4, 2, 1) if grid.row_bytes % w == 0 and grid.address % w == 0)
        dtype = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[width]
        kind = {"cpu": "host", "cuda": "cuda", "npu": "acl"}[device.type]
        self.memory = tensor_at(
            kind, device.index or 0, grid.address, dtype, (grid.span_rows, grid.row_bytes // width)
        )
        # On the CPU: a few thousand row numbers cost less to compute here and upload
        # once than two kernel launches on the device.
        self._first = np.asarray(grid.first_rows, dtype=np.int64)
        self._stride = np.asarray(grid.block_strides, dtype=np.int64)
        self.rows_per_block = len(self._first)

    def index(self, blocks: Sequence[int]) -> np.ndarray:
        """The memory rows of each of ``blocks`` in turn, in slot order."""
        rows = np.multiply(np.asarray(blocks, dtype=np.int64)[:, None], self._stride)
        rows += self._first
        return rows.reshape(-1)

    def _slot_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.view(self.memory.dtype).view(-1, self.memory.shape[1])

    def gather(self, index: torch.Tensor, rows: torch.Tensor) -> None:
        import torch

        torch.index_select(self.memory, 0, index, out=self._slot_rows(rows))

    def scatter(self, index: torch.Tensor, rows: torch.Tensor) -> None:
        self.memory.index_copy_(0, index, self._slot_rows(rows))


def _copies(layout: BlockLayout) -> _PartCopies | _GridCopies:
    return _PartCopies(layout) if layout.grid is None else _GridCopies(layout.grid, layout.device)


class HostMover:
    """Copies for KV tensors in host memory (the host backend): synchronous, straight
    between the engine's tensors and the slots."""

    def __init__(self, layout: BlockLayout, tier: HostTier) -> None:
        self.layout = layout
        self.tier = tier
        self._copies = _copies(layout)

    def _index(self, blocks: Sequence[int]) -> torch.Tensor:
        import torch

        return torch.from_numpy(self._copies.index(blocks))

    def save(self, blocks: Sequence[int], slots: Sequence[int]) -> Completion:
        """``blocks`` -> ``slots`` (a negative slot: leave that block out)."""
        for position, first_slot, count in slot_runs(slots):
            index = self._index(blocks[position : position + count])
            self._copies.gather(index, self.tier.run(first_slot, count))
        return _Done()

    def load(self, runs: list[Run]) -> Completion:
        for run in runs:
            self._copies.scatter(self._index(run.blocks), self.tier.run(run.first_slot, len(run.blocks)))
        return _Done()


class _IndexUpload:
    """Each transfer's row index, written into page-locked host memory and uploaded with
    one asynchronous copy. Allocating and pinning a fresh tensor per transfer cost about
    as much as launching a chunk's copies, so host buffers are reused: a ring, oldest
    first (uploads on one stream finish in order), that grows when even the oldest still
    has its upload in flight, so the host never waits for one."""

    def __init__(self, copies: _PartCopies | _GridCopies, device: torch.device) -> None:
        self._copies = copies
        self.device = device
        # (pinned buffer, its numpy view, event after its last upload), oldest first
        self._ring: deque[tuple[torch.Tensor, np.ndarray, torch.Event]] = deque()
        self._on_device: torch.Tensor | None = None

    def _host_buffer(self, rows: int) -> tuple[torch.Tensor, np.ndarray, torch.Event]:
        import torch

        reusable = self._ring.popleft() if self._ring and self._ring[0][2].query() else None
        if reusable is not None and reusable[0].numel() >= rows:
            entry = reusable
        else:  # the oldest is in flight (or too small: dropped for a larger one)
            pinned = torch.empty(max(rows, 1 << 12), dtype=torch.long, pin_memory=True)
            entry = (pinned, pinned.numpy(), torch.get_device_module(self.device).Event())
        self._ring.append(entry)
        return entry

    def upload(self, blocks: Sequence[int], stream: torch.Stream) -> torch.Tensor:
        """The index of ``blocks`` (``rows_per_block`` rows each) on the device, uploaded
        on ``stream``, which must be the current stream: the device buffer is reused, so
        only work queued on it may read the index."""
        import torch

        rows = len(blocks) * self._copies.rows_per_block
        if self._on_device is None or self._on_device.numel() < rows:
            capacity = max(rows, 2 * (0 if self._on_device is None else self._on_device.numel()), 1 << 12)
            self._on_device = torch.empty(capacity, dtype=torch.long, device=self.device)
        pinned, host, uploaded = self._host_buffer(rows)
        host[:rows] = self._copies.index(blocks)
        index = self._on_device[:rows]
        index.copy_(pinned[:rows], non_blocking=True)
        uploaded.record(stream)
        return index


class StreamMover:
    """Copies for KV tensors on a CUDA or Ascend device: staged, double-buffered and
    asynchronous on two dedicated streams.

    The host's time before the first copy is time the bus sits idle, so the loops keep
    Python work low: they switch streams with ``set_stream`` (the ``stream()`` context
    manager costs tens of microseconds) and restore the caller's stream when done, and
    they reuse their events (a stream waits on an event as it was when the wait was
    queued, so re-recording one later is safe)."""

    def __init__(
        self, layout: BlockLayout, tier: HostTier, staging_bytes: int = DEFAULT_STAGING_BYTES
    ) -> None:
        import torch

        self.layout = layout
        self.tier = tier
        self.device = layout.device
        self._copies = _copies(layout)
        self._rows = self._copies.rows_per_block
        self._index = _IndexUpload(self._copies, self.device)
        self._api = torch.get_device_module(self.device)
        self._device_index = (
            self.device.index if self.device.index is not None else self._api.current_device()
        )
        self.chunk_blocks = max(1, staging_bytes // 2 // tier.slot_stride)
        with self._api.device(self.device):
            self._buffers = [
                torch.empty((self.chunk_blocks, tier.slot_stride), dtype=torch.uint8, device=self.device)
                for _ in range(2)
            ]
            self._gather_stream = self._api.Stream(self.device)
            self._copy_stream = self._api.Stream(self.device)
        self._ready = self._api.Event()  # the caller's stream, when a transfer begins
        self._handoff = self._api.Event()  # one stream's part of a chunk, for the other
        # When each staging buffer may be overwritten (never recorded: free now).
        self._buffer_free = [self._api.Event(), self._api.Event()]
        self._turn = 0

    def _chunks(self, runs: list[Run]) -> list[tuple[int, int, int]]:
        """(first slot, offset into the call's block list, count) per chunk."""
        out: list[tuple[int, int, int]] = []
        offset = 0
        for run in runs:
            for start in range(0, len(run.blocks), self.chunk_blocks):
                count = min(self.chunk_blocks, len(run.blocks) - start)
                out.append((run.first_slot + start, offset + start, count))
            offset += len(run.blocks)
        return out

    def _begin(self, blocks: Sequence[int]) -> tuple[Callable[[], None], torch.Tensor]:
        """Orders this transfer after the engine's queued work (writes to blocks being
        saved, reads of blocks being loaded into) and uploads the blocks' index, with the
        gather stream current. Returns what puts the caller's stream and device back
        (``set_stream`` changes the current device too), and the index."""
        api = self._api
        device, caller = api.current_device(), api.current_stream(self._device_index)

        def restore() -> None:
            api.set_stream(caller)
            if device != self._device_index:
                api.set_device(device)

        self._ready.record(caller)
        self._gather_stream.wait_event(self._ready)
        api.set_stream(self._gather_stream)
        try:
            return restore, self._index.upload(blocks, self._gather_stream)
        except BaseException:
            restore()
            raise

    def _rows_of(self, index: torch.Tensor, first: int, count: int) -> torch.Tensor:
        return index[first * self._rows : (first + count) * self._rows]

    def _hand_off(self, source: torch.Stream, target: torch.Stream) -> None:
        self._handoff.record(source)
        target.wait_event(self._handoff)

    def _completion(self, stream: torch.Stream) -> torch.Event:
        event = self._api.Event()
        event.record(stream)
        return event

    def save(self, blocks: Sequence[int], slots: Sequence[int]) -> Completion:
        """Device ``blocks`` -> host ``slots`` (a negative slot: leave that block out).
        The engine's pending writes to the blocks come first. Staged chunk by chunk in
        the caller's block order; each stretch of consecutive slots in a chunk crosses
        the bus as one copy. If launching fails, the copies already launched land before
        this raises, so the caller may free their slots."""
        if not blocks:
            return _Done()
        gather, copy = self._gather_stream, self._copy_stream
        restore, index = self._begin(blocks)
        try:
            for offset in range(0, len(slots), self.chunk_blocks):
                chunk = slots[offset : offset + self.chunk_blocks]
                runs = slot_runs(chunk)
                if not runs:
                    continue
                buffer = self._take_buffer()
                self._api.set_stream(gather)
                gather.wait_event(self._buffer_free[buffer])
                rows = self._buffers[buffer][: len(chunk)]
                self._copies.gather(self._rows_of(index, offset, len(chunk)), rows)
                self._hand_off(gather, copy)
                self._api.set_stream(copy)
                for position, first_slot, count in runs:
                    slots_run = self.tier.run(first_slot, count)
                    slots_run.copy_(rows[position : position + count], non_blocking=True)
                self._buffer_free[buffer].record(copy)
            return self._completion(copy)
        except BaseException:
            copy.synchronize()
            raise
        finally:
            restore()

    def load(self, runs: list[Run]) -> Completion:
        """Host slots -> device blocks. Kernels still reading the old contents come first;
        the engine must order its reads after the returned event."""
        if not runs:
            return _Done()
        gather, copy = self._gather_stream, self._copy_stream
        restore, index = self._begin([b for run in runs for b in run.blocks])
        try:
            for first_slot, offset, count in self._chunks(runs):
                buffer = self._take_buffer()
                copy.wait_event(self._buffer_free[buffer])
                self._api.set_stream(copy)
                rows = self._buffers[buffer][:count]
                rows.copy_(self.tier.run(first_slot, count), non_blocking=True)
                self._hand_off(copy, gather)
                self._api.set_stream(gather)
                self._copies.scatter(self._rows_of(index, offset, count), rows)
                self._buffer_free[buffer].record(gather)
            return self._completion(gather)
        except BaseException:
            gather.synchronize()
            raise
        finally:
            restore()

    def _take_buffer(self) -> int:
        self._turn ^= 1
        return self._turn


def make_mover(layout: BlockLayout, tier: HostTier) -> HostMover | StreamMover:
    return HostMover(layout, tier) if layout.device.type == "cpu" else StreamMover(layout, tier)
