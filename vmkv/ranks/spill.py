"""The spill tier of a tensor-parallel engine, as the scheduler's process sees it.

Each rank keeps its shard of a cold block in its own host tier, under the block's hash
(vmkv.ranks.server). :class:`RankSpill` gives the scheduler's reclaim and reload the
interface of one :class:`~vmkv.spill.SpillStore`: a store is done once every rank has
copied its shard, a key counts as held only where every rank holds it, and a retrieve
that some rank lost in the meantime is a miss (KeyError), so the engine recomputes.
Stores and retrieves carry the unmap fence: a rank copies only after it has run every
step sent before, since those may still write the blocks.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from vmkv.ranks.channel import ChannelError, Op, Status, pack_bytes, pack_keys
from vmkv.ranks.group import RankGroup, raise_errors, replies
from vmkv.spill.keys import Namespace


class Copied:
    """A finished copy: every rank answered only once its shard had been copied."""

    def wait(self) -> None:
        return None

    def fence(self, stream: Any = None) -> None:
        return None


class RankSpill:
    def __init__(self, ranks: RankGroup, namespace: Namespace) -> None:
        self.ranks = ranks
        fields = json.dumps(dataclasses.asdict(namespace)).encode()
        raise_errors(ranks.broadcast(Op.SPILL_OPEN, 0, pack_bytes(fields)))

    def store(self, keys: Sequence[bytes], blocks: Sequence[int]) -> Copied:
        """Copy ``blocks`` on every rank under ``keys``; RuntimeError when a rank's tier
        has no room (reclaim then drops the blocks)."""
        payload = pack_keys([bytes(key) for key in keys], list(blocks))
        raise_errors(self.ranks.broadcast(Op.STORE, self.ranks.steps_scheduled, payload))
        return Copied()

    def lookup(self, keys: Sequence[bytes]) -> int:
        answers = self.ranks.broadcast(Op.LOOKUP, 0, pack_keys([bytes(key) for key in keys], []))
        held = [words[0] for words in replies(answers, 1)]
        if not all(0 <= count <= len(keys) for count in held):
            raise ChannelError(f"the ranks say they hold {held} of {len(keys)} keys")
        return min(held)

    def retrieve(self, keys: Sequence[bytes], into_blocks: Sequence[int]) -> Copied:
        payload = pack_keys([bytes(key) for key in keys], list(into_blocks))
        answers = self.ranks.broadcast(Op.RETRIEVE, self.ranks.steps_scheduled, payload)
        raise_errors(answers, expected=(Status.OK, Status.MISSING))
        if any(status == Status.MISSING for status, _ in answers):
            raise KeyError(f"a rank's spill tier no longer holds one of {len(keys)} blocks")
        return Copied()

    def stats(self) -> dict[str, int]:
        """Rank 0's tier (every rank's holds the same blocks but for races lost)."""
        names = ("valid", "stored_blocks", "retrieved_blocks", "slot_count")
        return dict(zip(names, replies(self.ranks.broadcast(Op.SPILL_STATS, 0, []), 4)[0], strict=True))

    def close(self) -> None:
        """The ranks close their tiers with the rest of their memory."""
