"""SGLang's cold radix-tree entries to the spill tier, and back on a prefix hit.

SGLang caches KV by token path, not by block hash, so a token's key is a hash chain
over its whole path (:func:`vmkv.spill.keys.token_chain`, seeded per ``extra_key``
namespace): only the same prefix finds it again. One spill block is one token slot of
every layer's K and V.

*Spill:* when the coordinator asks this instance for memory, :meth:`RadixSpill.spill_coldest`
copies the least recently used unlocked entries to the host tier just before SGLang's own
eviction frees them (SGLang evicts in that order too; an entry copied but kept costs only
the copy).

*Reload:* ``RadixCache.match_prefix`` is wrapped: past the device match, the tier is asked
for the following tokens (``SpillStore.chain_hits``); the hits get fresh slots, are copied
back and inserted into the tree, and the match is run again, so the scheduler sees a
device hit.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch

from vmkv.spill import SpillTierFull
from vmkv.spill.keys import token_chain
from vmkv.stack import KVStack

log = logging.getLogger("vmkv")

SEED = b"vmkv-sglang-radix"
MEMO_LIMIT = 1 << 17


class RadixSpill:
    """Spill and reload for one SGLang allocator's radix cache (the scheduler's thread)."""

    def __init__(self, stack: KVStack, allocator: Any) -> None:
        self.stack = stack
        self.allocator = allocator
        self._end_keys: dict[int, bytes] = {}  # node id -> the key of its last token
        self.spilled_tokens = 0
        self.reloaded_tokens = 0

    def _node_keys(self, node: Any, root: Any) -> list[bytes]:
        """The keys of ``node``'s own tokens."""
        return token_chain(self._end_key(node.parent, root, node.key.extra_key), node.key.token_ids)

    def _end_key(self, node: Any, root: Any, extra_key: str | None) -> bytes:
        """The key of ``node``'s last token; the namespace seed for the root."""
        if node is root:
            return hashlib.blake2b(SEED + (extra_key or "").encode(), digest_size=16).digest()
        if (known := self._end_keys.get(node.id)) is None:
            if len(self._end_keys) > MEMO_LIMIT:
                self._end_keys.clear()
            known = self._end_keys[node.id] = self._node_keys(node, root)[-1]
        return known

    def spill_coldest(self, tree_cache: Any, tokens: int) -> None:
        """Copy the least recently used unlocked entries, about ``tokens`` of them."""
        spill, root = self.stack.spill, tree_cache.root_node
        if spill is None:
            return
        cold, pending = [], [root]
        while pending:
            node = pending.pop()
            pending.extend(node.children.values())
            if node is not root and node.lock_ref == 0 and node.value is not None and not node.key.is_bigram:
                cold.append(node)
        cold.sort(key=lambda node: node.last_access_time)
        keys: list[bytes] = []
        slots: list[int] = []
        for node in cold:
            if len(slots) >= tokens:
                break
            keys += self._node_keys(node, root)
            slots += node.value.tolist()
        if not keys:
            return
        try:
            spill.store(keys, slots).wait()
            self.spilled_tokens += len(keys)
        except SpillTierFull as error:
            log.warning("vmkv: %d cold radix tokens dropped, not spilled (%s)", len(keys), error)

    def reload(self, tree_cache: Any, key: Any, result: Any) -> bool:
        """Bring back from the tier what follows the device match ``result`` of ``key``;
        True when the tree grew (the caller matches again)."""
        spill = self.stack.spill
        # 0.5.23 reports the match length, 0.5.15 the matched slots.
        matched = getattr(result, "device_prefix_len", None)
        matched = len(result.device_indices) if matched is None else matched
        page = tree_cache.page_size
        end = len(key) // page * page
        if spill is None or key.is_bigram or matched >= end:
            return False
        previous = self._end_key(result.last_device_node, tree_cache.root_node, key.extra_key)
        keys = spill.chain_hits(previous, key.token_ids[matched:end])
        count = len(keys) // page * page
        if count == 0 or (slots := self.allocator.alloc(count)) is None:
            return False
        try:
            spill.retrieve(keys[:count], slots.tolist()).wait()
        except KeyError:  # evicted from the tier since the lookup
            self.allocator.free(slots)
            return False
        from sglang.srt.mem_cache.base_prefix_cache import InsertParams

        value = torch.cat((torch.zeros(matched, dtype=slots.dtype, device=slots.device), slots))
        inserted = tree_cache.insert(InsertParams(key=key[: matched + count], value=value))
        if inserted.prefix_len > matched:  # already there after all: keep the tree's copy
            self.allocator.free(slots[: inserted.prefix_len - matched])
        self.reloaded_tokens += count
        return True


def wrap_match_prefix(original: Any) -> Any:
    """RadixCache.match_prefix that reloads spilled entries past the device match."""

    def match_prefix(self: Any, params: Any) -> Any:
        result = original(self, params)
        radix = getattr(self.token_to_kv_pool_allocator, "radix_spill", None)
        if radix is not None and not self.disable and radix.reload(self, params.key, result):
            result = original(self, params)
        return result

    return match_prefix
