"""The spill store: a content-addressed CPU tier for one engine's KV blocks.

The API follows the VCache seed: ``store``, ``lookup``, ``retrieve``, ``contains``,
``stats``. Keys are the engine's block hashes within a :class:`Namespace`. Transfers are
asynchronous on devices; a block becomes visible to ``lookup`` (here and in every other
process of the namespace) only once its copy has completed, so a half-written block is
never read. Reads pin their slots against eviction until their copy has completed.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vmkv.coordinator.units import named_size
from vmkv.spill._index import Policy
from vmkv.spill.host_tier import HostTier
from vmkv.spill.keys import BlockHash, Namespace, TierKeys, token_chain
from vmkv.spill.layout import BlockLayout
from vmkv.spill.transfer import Completion, make_mover, runs_of

if TYPE_CHECKING:
    import torch

    from vmkv.vmm_ops import Vmm

DEFAULT_CPU_BYTES = "5%"  # of the machine's RAM
POLICIES = {"lru": Policy.LRU, "fifo": Policy.FIFO, "lfu": Policy.LFU}

ON_DEVICE, ON_HOST, ABSENT = 0, 1, -1
FIRST_CHAIN_PROBE, CHAIN_PROBE = 16, 512  # tokens hashed per lookup in chain_hits


class SpillTierFull(RuntimeError):
    """The tier cannot make room: every slot is being written or read."""


def cpu_bytes_from_env() -> int:
    """VMKV_CPU_BYTES as a size ("8GiB") or a share of the machine's RAM ("10%")."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return named_size("VMKV_CPU_BYTES", os.environ.get("VMKV_CPU_BYTES") or DEFAULT_CPU_BYTES, total)


class Transfer:
    """One asynchronous store or retrieve. Exactly one of ``finish`` (after the copy) or
    ``abandon`` (the device reported an error: the slots are released unpublished) runs."""

    def __init__(
        self, completion: Completion, finish: Callable[[], None], abandon: Callable[[], None], blocks: int
    ) -> None:
        self._completion = completion
        self._finish = finish
        self._abandon = abandon
        self._finished = False
        self._lock = threading.Lock()
        self.blocks = blocks

    def done(self) -> bool:
        """True once the copy is complete and its result is published."""
        if not self._finished and self._settle(self._completion.query):
            self._run(self._finish)
        return self._finished

    def wait(self) -> None:
        """Block until the copy is complete and published."""
        self._settle(self._completion.synchronize)
        self._run(self._finish)

    def _settle(self, check: Callable[[], bool | None]) -> bool | None:
        try:
            return check()
        except BaseException:
            self._run(self._abandon)
            raise

    def fence(self, stream: Any = None) -> None:
        """Make ``stream`` (default: the current one) wait for this transfer on the device,
        without blocking the host: for kernels that read retrieved blocks."""
        self._completion.wait(stream)

    def _run(self, action: Callable[[], None]) -> None:
        with self._lock:
            if not self._finished:
                self._finished = True
                action()


@dataclass
class _Counters:
    stored_blocks: int = 0
    skipped_blocks: int = 0  # already in the tier
    retrieved_blocks: int = 0
    bytes_out: int = 0
    bytes_in: int = 0


class SpillStore:
    """Stores and retrieves blocks of ``tensors`` (the engine's KV tensors, blocks along
    ``block_dim``) in the node's host tier of ``namespace``.

    ``capacity_bytes`` defaults to VMKV_CPU_BYTES; it sizes the tier when this process
    creates it (later processes use the existing tier). ``vmm`` page-locks the tier on
    devices. ``device_lookup`` answers whether a key's block is resident on the device,
    for ``contains``.
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        namespace: Namespace,
        block_dim: int = 0,
        capacity_bytes: int | None = None,
        policy: str = "lru",
        vmm: Vmm | None = None,
        device_lookup: Callable[[BlockHash], bool] | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown eviction policy {policy!r}; choose one of {sorted(POLICIES)}")
        self.layout = BlockLayout(tensors, block_dim)
        self.namespace = namespace
        self._digest = namespace.digest(self.layout.signature())
        self._tier_keys = TierKeys(self._digest)
        capacity = capacity_bytes if capacity_bytes is not None else cpu_bytes_from_env()
        self.tier = HostTier(self._digest, self.layout.slot_bytes, capacity, POLICIES[policy], vmm)
        self._mover = make_mover(self.layout, self.tier)
        self._device_lookup = device_lookup
        self._pending: list[Transfer] = []
        self._lock = threading.Lock()
        self._counters = _Counters()
        self._closed = False

    # -- the API -----------------------------------------------------------------------

    def store(self, keys: Sequence[BlockHash], blocks: Sequence[int]) -> Transfer:
        """Copy ``blocks`` to the host under ``keys``. Keys already in the tier are
        skipped. The blocks must not be overwritten until the transfer is done. Raises
        SpillTierFull, with nothing changed, when there is no room even after eviction."""
        tier_keys = self._keys_for(keys, blocks)
        index, proc = self.tier.index, self.tier.proc
        with self._lock:
            self._poll_locked()
            slots = index.reserve(proc, tier_keys)  # all at once: it never evicts its own keys
            if slots is None:
                raise SpillTierFull(
                    f"the spill tier ({self.tier.slot_count} blocks) has no room for {len(keys)} more: "
                    "every slot is being written or read"
                )
            reserved = [slot for slot in slots if slot >= 0]
            try:
                completion = self._mover.save(blocks, slots)
            except BaseException:
                index.abort(proc, reserved)
                raise
            self._counters.stored_blocks += len(reserved)
            self._counters.skipped_blocks += len(blocks) - len(reserved)
            self._counters.bytes_out += len(reserved) * self.layout.slot_bytes
            return self._track(
                Transfer(
                    completion,
                    finish=lambda: index.commit(proc, reserved),
                    abandon=lambda: index.abort(proc, reserved),  # never published
                    blocks=len(reserved),
                )
            )

    def lookup(self, keys: Sequence[BlockHash]) -> int:
        """How many leading ``keys`` the tier holds (a prefix match)."""
        self._check_open()
        tier_keys = self._tier_keys.keys(keys)
        return self.tier.index.lookup(tier_keys)

    def chain_hits(self, previous: bytes, tokens: Sequence[int]) -> list[bytes]:
        """The :func:`token_chain` keys of the leading ``tokens`` the tier holds, after the
        token whose key is ``previous``. Hashes in growing chunks, so that a miss costs a
        few hashes rather than the whole prompt."""
        keys: list[bytes] = []
        probe = FIRST_CHAIN_PROBE
        while len(keys) < len(tokens):
            chunk = token_chain(previous, tokens[len(keys) : len(keys) + probe])
            hits = self.lookup(chunk)
            keys += chunk[:hits]
            if hits < len(chunk):
                break
            previous, probe = chunk[-1], CHAIN_PROBE
        return keys

    def retrieve(self, keys: Sequence[BlockHash], into_blocks: Sequence[int]) -> Transfer:
        """Copy the blocks of ``keys`` into ``into_blocks``. Every key must be in the tier
        (KeyError names the first that is not). Before reading the blocks on the device,
        ``wait()`` or ``fence()`` the transfer."""
        tier_keys = self._keys_for(keys, into_blocks)
        with self._lock:
            self._poll_locked()
            slots, missing = self.tier.index.pin(self.tier.proc, tier_keys)
            if missing >= 0:
                raise KeyError(f"block hash {keys[missing]!r} is not in the spill tier")
            try:
                completion = self._mover.load(runs_of(slots, list(into_blocks)))
            except BaseException:
                self.tier.index.unpin(self.tier.proc, slots)
                raise
            self._counters.retrieved_blocks += len(slots)
            self._counters.bytes_in += len(slots) * self.layout.slot_bytes
            index, proc = self.tier.index, self.tier.proc

            def unpin() -> None:  # after the copy, and after a failed one alike
                index.unpin(proc, slots)

            return self._track(Transfer(completion, finish=unpin, abandon=unpin, blocks=len(slots)))

    def contains(self, key: BlockHash) -> int:
        """ON_DEVICE (0), ON_HOST (1) or ABSENT (-1). A block still being copied to the
        host is not there yet."""
        if self._device_lookup is not None and self._device_lookup(key):
            return ON_DEVICE
        state = self.tier.index.state(self._tier_keys.key(key))
        return ON_HOST if state == 2 else ABSENT

    def stats(self) -> dict[str, Any]:
        """The shared tier's counters and this process's own."""
        shared = self.tier.index.stats()
        counters = self._counters
        return {
            **shared,
            "capacity_bytes": shared["slot_count"] * shared["slot_bytes"],
            "policy": self.tier.policy.name.lower(),
            "segment": self.tier.name,
            "in_flight": len(self._pending),
            "stored_blocks": counters.stored_blocks,
            "skipped_blocks": counters.skipped_blocks,
            "retrieved_blocks": counters.retrieved_blocks,
            "bytes_out": counters.bytes_out,
            "bytes_in": counters.bytes_in,
        }

    # -- lifecycle ---------------------------------------------------------------------

    def poll(self) -> int:
        """Publish finished transfers; returns how many are still in flight."""
        with self._lock:
            return self._poll_locked()

    def wait_all(self) -> None:
        with self._lock:
            for transfer in self._pending:
                transfer.wait()
            self._pending.clear()

    def close(self) -> None:
        """Finish in-flight transfers and detach (the last process removes the tier)."""
        if self._closed:
            return
        self.wait_all()
        self.tier.close()
        self._closed = True

    # -- internals ---------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this spill store is closed")

    def _keys_for(self, keys: Sequence[BlockHash], blocks: Sequence[int]) -> list[bytes]:
        self._check_open()
        if len(keys) != len(blocks):
            raise ValueError(f"{len(keys)} keys for {len(blocks)} blocks")
        self.layout.check_blocks(blocks)
        return self._tier_keys.keys(keys)

    def _track(self, transfer: Transfer) -> Transfer:
        if not transfer.done():
            self._pending.append(transfer)
        return transfer

    def _poll_locked(self) -> int:
        self._pending = [t for t in self._pending if not t.done()]
        return len(self._pending)
