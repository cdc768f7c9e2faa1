"""Content addresses of spilled blocks.

Keys are the engine's own block hashes (vLLM's block-hash chain, a hash of SGLang's radix
path), so a prefix spilled by one request is found again by the next one that shares it.
A hash alone is not enough: the same tokens give the same hash under another model,
dtype, layout or block size, and those blocks must never be confused. Every key is
therefore bound to a :class:`Namespace`, and the tier of one namespace lives in its own
shared-memory segment as well.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from vmkv.spill._index import KEY_BYTES, KeyedHasher

BlockHash = bytes | int | str
BYTES_TAG = b"b"


@dataclass(frozen=True)
class Namespace:
    """What must agree for two instances to share KV blocks.

    ``model`` is the served model's identity (name or path plus revision), ``kv_dtype`` the
    engine's KV cache dtype setting (e.g. "auto", "fp8_e4m3"), ``block_size`` tokens per
    block, and ``hash_seed`` whatever seeds the engine's block hashes (vLLM's
    PYTHONHASHSEED-derived NONE_HASH, for example). The tensor layout is added by the
    store from the tensors themselves, so it cannot be declared wrongly. ``shard`` names
    a tensor-parallel rank's part ("0/2"): the ranks' shards have alike layouts but
    different heads, and must never be taken for one another.
    """

    model: str
    kv_dtype: str
    block_size: int
    hash_seed: str = ""
    shard: str = ""

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("a namespace needs the model's identity")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")

    def digest(self, layout_signature: str) -> bytes:
        """32 bytes naming this namespace with one concrete tensor layout."""
        fields = {**asdict(self), "layout": layout_signature}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).digest()


def _raw(block_hash: BlockHash) -> bytes:
    """The hash as tagged bytes, so that 1, "1" and b"1" stay different keys."""
    if type(block_hash) is bytes:  # vLLM's hashes: the common case first
        return BYTES_TAG + block_hash
    if isinstance(block_hash, bool):
        raise TypeError("a block hash must be bytes, int or str, not bool")
    if isinstance(block_hash, int):
        return b"i" + block_hash.to_bytes((block_hash.bit_length() + 8) // 8, "little", signed=True)
    if isinstance(block_hash, str):
        return b"s" + block_hash.encode()
    if isinstance(block_hash, bytes | bytearray | memoryview):
        return BYTES_TAG + bytes(block_hash)
    raise TypeError(f"a block hash must be bytes, int or str, got {type(block_hash).__name__}")


class TierKeys:
    """The tier's keys for engine block hashes, unique to one namespace digest: each key
    is the hash's BLAKE2b, keyed with the digest.

    A spill hashes every block's key before its first copy can start, so the hashing is
    one C++ call per batch (hashlib's per-call overhead alone was a visible share of a
    64-block transfer on an H100).
    """

    def __init__(self, namespace_digest: bytes) -> None:
        self._hasher = KeyedHasher(namespace_digest[:32])

    def key(self, block_hash: BlockHash) -> bytes:
        return self._hasher.digests([_raw(block_hash)])[0]

    def keys(self, block_hashes: Sequence[BlockHash]) -> list[bytes]:
        hashes = list(block_hashes)
        if all(type(block_hash) is bytes for block_hash in hashes):  # the engines' hashes
            return self._hasher.digests(hashes, BYTES_TAG)
        return self._hasher.digests([_raw(block_hash) for block_hash in hashes])


def token_chain(previous: bytes, tokens: Sequence[int]) -> list[bytes]:
    """One hash per token, each covering ``previous`` (the hash of the token before, or of
    a namespace seed) and so every token before it: a key for one token's KV that only the
    same prefix finds again. For engines that cache by token path (SGLang's radix tree)
    rather than by block hash."""
    keys: list[bytes] = []
    for token in tokens:
        token_bytes = token.to_bytes(8, "little", signed=True)
        previous = hashlib.blake2b(previous + token_bytes, digest_size=KEY_BYTES).digest()
        keys.append(previous)
    return keys
