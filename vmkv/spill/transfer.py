"""Moving blocks between an engine's KV tensors and host slots.

Per-block copies would be dominated by per-copy overhead (a Llama-3-8B block is 64
scattered 32 KiB rows; vLLM measured 0.5-2 MB copies 4-5x faster than 8-72 KB ones).
Blocks are therefore gathered on the device into a staging buffer laid out exactly like
a run of consecutive host slots, and each run crosses the bus as one large copy. Two
staging buffers alternate so that the gather of one chunk overlaps the copy of the
previous one; gathers run on one dedicated stream, copies on another, and neither is the
engine's compute stream. Completion is an event, polled or waited on.

On the host backend the KV tensors already live in host memory: blocks are gathered
straight into the slots, synchronously.

A regular layout (see :class:`RowGrid`) is gathered with one indexed copy per chunk;
any other, part by part.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

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


def _part_view(rows: torch.Tensor, part_index: int, layout: BlockLayout) -> torch.Tensor:
    """Part ``part_index`` of ``rows`` (n slot-shaped byte rows) as (n, *block_shape)."""
    part = layout.parts[part_index]
    chunk = rows[:, part.offset : part.offset + part.nbytes]
    return chunk.view(part.view.dtype).unflatten(1, part.view.shape[1:])


class _PartCopies:
    """Gathers and scatters part by part: works for any layout, one copy per part."""

    def __init__(self, layout: BlockLayout) -> None:
        self.layout = layout

    def index(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks

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
        self._first = torch.tensor(grid.first_rows, dtype=torch.long)
        self._stride = torch.tensor(grid.block_strides, dtype=torch.long)

    def index(self, blocks: torch.Tensor) -> torch.Tensor:
        """(blocks, rows per block): the memory rows of each CPU ``blocks``, in slot order."""
        return self._first + blocks.unsqueeze(1) * self._stride

    def _slot_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.view(self.memory.dtype).view(-1, self.memory.shape[1])

    def gather(self, index: torch.Tensor, rows: torch.Tensor) -> None:
        import torch

        torch.index_select(self.memory, 0, index.reshape(-1), out=self._slot_rows(rows))

    def scatter(self, index: torch.Tensor, rows: torch.Tensor) -> None:
        self.memory.index_copy_(0, index.reshape(-1), self._slot_rows(rows))


def _copies(layout: BlockLayout) -> _PartCopies | _GridCopies:
    return _PartCopies(layout) if layout.grid is None else _GridCopies(layout.grid, layout.device)


class HostMover:
    """Copies for KV tensors in host memory (the host backend): synchronous."""

    def __init__(self, layout: BlockLayout, tier: HostTier) -> None:
        self.layout = layout
        self.tier = tier
        self._copies = _copies(layout)

    def _runs(self, runs: list[Run]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        import torch

        return [
            (self._copies.index(torch.tensor(run.blocks)), self.tier.run(run.first_slot, len(run.blocks)))
            for run in runs
        ]

    def save(self, runs: list[Run]) -> Completion:
        for index, rows in self._runs(runs):
            self._copies.gather(index, rows)
        return _Done()

    def load(self, runs: list[Run]) -> Completion:
        for index, rows in self._runs(runs):
            self._copies.scatter(index, rows)
        return _Done()


class StreamMover:
    """Copies for KV tensors on a CUDA or Ascend device: staged, double-buffered and
    asynchronous on two dedicated streams."""

    def __init__(
        self, layout: BlockLayout, tier: HostTier, staging_bytes: int = DEFAULT_STAGING_BYTES
    ) -> None:
        import torch

        self.layout = layout
        self.tier = tier
        self.device = layout.device
        self._copies = _copies(layout)
        self._api = torch.get_device_module(self.device)
        stride = tier.slot_stride
        self.chunk_blocks = max(1, staging_bytes // 2 // stride)
        with self._api.device(self.device):
            self._buffers = [
                torch.empty((self.chunk_blocks, stride), dtype=torch.uint8, device=self.device)
                for _ in range(2)
            ]
            self._gather_stream = self._api.Stream(self.device)
            self._copy_stream = self._api.Stream(self.device)
        # The last event after which each staging buffer may be overwritten.
        self._buffer_free: list[torch.Event | None] = [None, None]
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

    def _begin(self, runs: list[Run]) -> torch.Tensor:
        """Orders this transfer after the engine's queued work (writes to blocks being
        saved, reads of blocks being loaded into) and uploads the blocks' index."""
        import torch

        self._gather_stream.wait_stream(self._api.current_stream(self.device))
        blocks = [b for run in runs for b in run.blocks]
        with self._api.stream(self._gather_stream):
            # Pinned, so the upload is asynchronous and never waits for earlier transfers.
            index = self._copies.index(torch.tensor(blocks, dtype=torch.long))
            return index.pin_memory().to(self.device, non_blocking=True)

    def _event(self, stream: torch.Stream) -> torch.Event:
        event = self._api.Event()
        event.record(stream)
        return event

    def save(self, runs: list[Run]) -> Completion:
        """Device blocks -> host slots. The engine's pending writes to them come first."""
        gather, copy = self._gather_stream, self._copy_stream
        index = self._begin(runs)
        for first_slot, offset, count in self._chunks(runs):
            buffer = self._take_buffer()
            with self._api.stream(gather):
                if (free := self._buffer_free[buffer]) is not None:
                    gather.wait_event(free)
                rows = self._buffers[buffer][:count]
                self._copies.gather(index[offset : offset + count], rows)
                gathered = self._event(gather)
            with self._api.stream(copy):
                copy.wait_event(gathered)
                self.tier.run(first_slot, count).copy_(rows, non_blocking=True)
                self._buffer_free[buffer] = self._event(copy)
        return self._event(copy)

    def load(self, runs: list[Run]) -> Completion:
        """Host slots -> device blocks. Kernels still reading the old contents come first;
        the engine must order its reads after the returned event."""
        gather, copy = self._gather_stream, self._copy_stream
        index = self._begin(runs)
        for first_slot, offset, count in self._chunks(runs):
            buffer = self._take_buffer()
            with self._api.stream(copy):
                if (free := self._buffer_free[buffer]) is not None:
                    copy.wait_event(free)
                rows = self._buffers[buffer][:count]
                rows.copy_(self.tier.run(first_slot, count), non_blocking=True)
                copied = self._event(copy)
            with self._api.stream(gather):
                gather.wait_event(copied)
                self._copies.scatter(index[offset : offset + count], rows)
                self._buffer_free[buffer] = self._event(gather)
        return self._event(gather)

    def _take_buffer(self) -> int:
        self._turn ^= 1
        return self._turn


def make_mover(layout: BlockLayout, tier: HostTier) -> HostMover | StreamMover:
    return HostMover(layout, tier) if layout.device.type == "cpu" else StreamMover(layout, tier)
