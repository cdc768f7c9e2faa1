"""The spill store in one process on the host backend: round trips, eviction order,
capacity, keys and bad input."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_python
from hypothesis import given, settings
from hypothesis import strategies as st
from spill_helpers import DTYPES, LAYOUTS, block_matches, fill_block, make_kv

from vmkv.spill import (
    ABSENT,
    ON_DEVICE,
    ON_HOST,
    Namespace,
    SegmentError,
    SpillStore,
    SpillTierFull,
    Transfer,
)
from vmkv.spill.host_tier import user_tiers
from vmkv.spill.keys import KeyedHasher, TierKeys, token_chain
from vmkv.spill.layout import BlockLayout
from vmkv.spill.transfer import _GridCopies, _PartCopies
from vmkv.vmm_ops import open_vmm

NS = Namespace("test/model", "auto", 16, hash_seed="t")


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> Namespace:
    """A namespace private to the test, so tests never share a tier by accident."""
    return Namespace(f"model-{request.node.name}-{os.getpid()}", "auto", 16)


def open_store(tensors, block_dim, namespace, slots: int, **kwargs) -> SpillStore:
    probe = SpillStore(tensors, namespace, block_dim, capacity_bytes=1 << 30, **kwargs)
    slot_bytes = probe.layout.slot_bytes
    probe.close()
    return SpillStore(tensors, namespace, block_dim, capacity_bytes=slots * slot_bytes, **kwargs)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_is_bit_exact(layout, dtype, namespace):
    tensors, block_dim = make_kv(layout, 32, dtype)
    for block in range(1, 32):
        fill_block(tensors, block_dim, block, seed=block)
    store = open_store(tensors, block_dim, namespace, slots=64)
    try:
        assert store.store([f"h{b}" for b in range(1, 11)], list(range(1, 11))).done()
        for t in tensors:
            t.zero_()
        store.retrieve([f"h{b}" for b in range(1, 11)], list(range(21, 31))).wait()
        for b in range(1, 11):
            assert block_matches(tensors, block_dim, 20 + b, seed=b)
        assert not tensors[0].select(block_dim, 11).any()  # untouched blocks stay untouched
    finally:
        store.close()


def test_layer_tensors_of_one_buffer_form_one_grid():
    # vLLM's (2, num_blocks, ...) layer tensors back to back, as in a vmkv KV space.
    memory = torch.zeros(3 * 2 * 8 * 16 * 64, dtype=torch.bfloat16)
    tensors = [t.view(2, 8, 16, 64) for t in memory.chunk(3)]
    grid = BlockLayout(tensors, block_dim=1).grid
    assert grid is not None
    assert grid.address == memory.data_ptr()
    assert grid.row_bytes == 16 * 64 * 2  # a block's K (or V) row in one layer
    assert grid.first_rows == (0, 8, 16, 24, 32, 40)  # K then V, layer by layer
    assert grid.block_strides == (1,) * 6
    assert grid.span_rows == 48


def test_padded_parts_have_no_grid():
    tensors, block_dim = make_kv("split", 8, torch.float16)  # 30-byte parts need padding
    assert BlockLayout(tensors, block_dim).grid is None


@pytest.mark.parametrize("layout", ["flat", "vllm", "strided"])
def test_grid_copies_match_part_copies(layout):
    """Both ways of moving blocks write the same slot bytes, so processes that take
    different ways still share blocks."""
    tensors, block_dim = make_kv(layout, 16, torch.float32)
    for block in range(16):
        fill_block(tensors, block_dim, block, seed=block)
    layout_ = BlockLayout(tensors, block_dim)
    assert layout_.grid is not None
    by_grid, by_parts = _GridCopies(layout_.grid, layout_.device), _PartCopies(layout_)
    blocks = [5, 0, 11]
    slots = [torch.zeros(3, layout_.slot_bytes, dtype=torch.uint8) for _ in range(2)]
    by_grid.gather(torch.from_numpy(by_grid.index(blocks)), slots[0])
    by_parts.gather(torch.from_numpy(by_parts.index(blocks)), slots[1])
    assert torch.equal(slots[0], slots[1])
    by_grid.scatter(torch.from_numpy(by_grid.index([1, 2, 3])), slots[0])
    for target, seed in zip([1, 2, 3], [5, 0, 11], strict=True):
        assert block_matches(tensors, block_dim, target, seed)
    assert block_matches(tensors, block_dim, 4, seed=4)


@settings(max_examples=25, deadline=None)
@given(
    pairs=st.lists(
        st.tuples(st.integers(1, 47), st.integers(0, 10**6)),
        min_size=1,
        max_size=20,
        unique_by=lambda p: p[0],
    ),
    targets=st.permutations(list(range(1, 48))),
)
def test_random_round_trips(pairs, targets):
    tensors, block_dim = make_kv("vllm", 48, torch.bfloat16)
    blocks = [b for b, _ in pairs]
    for block, seed in pairs:
        fill_block(tensors, block_dim, block, seed)
    namespace = Namespace(f"random-{os.getpid()}", "auto", 16)
    store = open_store(tensors, block_dim, namespace, slots=64)
    try:
        store.store([f"k{seed}-{b}" for b, seed in pairs], blocks)
        into = targets[: len(pairs)]
        store.retrieve([f"k{seed}-{b}" for b, seed in pairs], into).wait()
        for (_, seed), target in zip(pairs, into, strict=True):
            assert block_matches(tensors, block_dim, target, seed)
    finally:
        store.close()


def test_lookup_counts_leading_hits_and_contains(namespace):
    tensors, _block_dim = make_kv("flat", 16, torch.float16)
    on_device = {b"resident"}
    store = SpillStore(tensors, namespace, capacity_bytes=1 << 20, device_lookup=lambda k: k in on_device)
    try:
        store.store([b"a", b"b", b"c"], [1, 2, 3])
        assert store.lookup([b"a", b"b", b"c", b"d"]) == 3
        assert store.lookup([b"a", b"x", b"c"]) == 1
        assert store.lookup([b"x", b"a"]) == 0
        assert store.contains(b"a") == ON_HOST
        assert store.contains(b"resident") == ON_DEVICE
        assert store.contains(b"zzz") == ABSENT
        stats = store.stats()
        assert stats["valid"] == 3 and stats["hits"] == 4 and stats["misses"] == 3
        # the same hash as int, str or bytes names different keys; none collide
        assert store.lookup([97]) == 0 and store.lookup(["a"]) == 0
    finally:
        store.close()


def test_storing_a_present_key_is_skipped(namespace):
    tensors, block_dim = make_kv("flat", 16, torch.float16)
    fill_block(tensors, block_dim, 1, seed=1)
    fill_block(tensors, block_dim, 2, seed=2)
    store = open_store(tensors, block_dim, namespace, slots=4)
    try:
        assert store.store([b"k"], [1]).blocks == 1
        assert store.store([b"k", b"k"], [2, 3]).blocks == 0  # first copy wins, repeats too
        store.retrieve([b"k"], [5]).wait()
        assert block_matches(tensors, block_dim, 5, seed=1)
        assert store.stats()["skipped_blocks"] == 2
        assert store.store([b"a", b"b", b"a"], [1, 2, 3]).blocks == 2  # a new key repeated: one slot
        assert store.stats()["valid"] == 3
        store.retrieve([b"a", b"b"], [5, 6]).wait()
        assert block_matches(tensors, block_dim, 5, seed=1) and block_matches(tensors, block_dim, 6, seed=2)
    finally:
        store.close()


@pytest.mark.parametrize(
    ("policy", "survivor"),
    [("lru", b"a"), ("fifo", b"d"), ("lfu", b"a")],
)
def test_eviction_policy_picks_the_victim(policy, survivor, namespace):
    tensors, block_dim = make_kv("flat", 16, torch.float16)
    store = open_store(tensors, block_dim, namespace, slots=3, policy=policy)
    try:
        store.store([b"a", b"b", b"c"], [1, 2, 3])
        assert store.lookup([b"a"]) == 1  # a is now the most recent and most used
        store.store([b"d"], [4])  # one of a, b, c must go
        kept = {key for key in (b"a", b"b", b"c", b"d") if store.contains(key) == ON_HOST}
        assert len(kept) == 3 and b"d" in kept
        expected_victim = {"lru": b"b", "fifo": b"a", "lfu": b"b"}[policy]
        assert expected_victim not in kept and survivor in kept
        assert store.stats()["evictions"] == 1
    finally:
        store.close()


def test_lru_order_over_many_inserts(namespace):
    tensors, block_dim = make_kv("flat", 64, torch.float16)
    store = open_store(tensors, block_dim, namespace, slots=8)
    try:
        for i in range(8):
            store.store([i], [i + 1])
        for i in (0, 2, 4):
            assert store.lookup([i]) == 1
        store.store([100, 101, 102], [20, 21, 22])  # evicts the three least recent: 1, 3, 5
        assert [store.contains(i) == ON_HOST for i in range(8)] == [
            True,
            False,
            True,
            False,
            True,
            False,
            True,
            True,
        ]
        assert store.stats()["valid"] == 8
    finally:
        store.close()


def test_full_tier_raises_and_changes_nothing(namespace):
    tensors, block_dim = make_kv("flat", 16, torch.float16)
    store = open_store(tensors, block_dim, namespace, slots=2)
    try:
        store.store([b"a", b"b"], [1, 2])
        with pytest.raises(SpillTierFull, match="no room for 3"):
            store.store([b"c", b"d", b"e"], [3, 4, 5])
        assert store.lookup([b"a", b"b"]) == 2
        assert store.stats()["valid"] == 2 and store.stats()["writing"] == 0
    finally:
        store.close()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_store_skips_present_keys_keeps_them_and_copies_the_rest_chunk_by_chunk(namespace, device):
    """Keys already in the tier are skipped and never evicted to make room for the same
    call's other blocks; on a device the rest crosses in several staging chunks, with
    the skipped blocks left out of them, and the caller's stream stays current."""
    tensors, block_dim = make_kv("vllm", 16, torch.float16, device=device)
    for block in range(16):
        fill_block(tensors, block_dim, block, seed=100 + block)
    store = open_store(tensors, block_dim, namespace, slots=4)
    if device == "cuda":
        store._mover.chunk_blocks = 2  # staging chunks of two blocks
        caller = torch.cuda.current_stream()
    try:
        store.store([b"a", b"b"], [1, 2]).wait()
        store.store([b"c", b"d"], [3, 4]).wait()
        transfer = store.store([b"a", b"e", b"c"], [1, 5, 3])  # full: e evicts the oldest
        transfer.wait()
        assert (transfer.blocks, store.stats()["skipped_blocks"]) == (1, 2)
        assert [store.contains(k) for k in (b"a", b"b", b"c", b"d", b"e")] == [1, -1, 1, 1, 1]
        assert store.store([], []).blocks == 0 and store.retrieve([], []).blocks == 0
        store.retrieve([b"e", b"a", b"d", b"c"], [10, 11, 12, 13]).wait()
        for target, seed in zip([10, 11, 12, 13], [105, 101, 104, 103], strict=True):
            assert block_matches(tensors, block_dim, target, seed)
        if device == "cuda":
            assert torch.cuda.current_stream() == caller
    finally:
        store.close()


def test_pinned_slots_are_not_evicted(namespace):
    tensors, block_dim = make_kv("flat", 16, torch.float16)
    store = open_store(tensors, block_dim, namespace, slots=2)
    index, proc = store.tier.index, store.tier.proc
    try:
        store.store([b"a", b"b"], [1, 2])
        slots, missing = index.pin(proc, [store._keys_for([b"a"], [1])[0]])  # a read in flight
        assert missing == -1
        store.store([b"c"], [3])
        assert store.contains(b"a") == ON_HOST and store.contains(b"b") == ABSENT
        with pytest.raises(SpillTierFull):
            store.store([b"d", b"e"], [4, 5])
        index.unpin(proc, slots)
        store.store([b"d", b"e"], [4, 5])
        assert store.contains(b"a") == ABSENT
    finally:
        store.close()


def test_token_chains_find_only_the_same_prefix_and_stop_at_the_first_gap(namespace):
    tensors, block_dim = make_kv("flat", 64, torch.float16)
    store = open_store(tensors, block_dim, namespace, slots=64)
    try:
        seed = b"seed"
        tokens = list(range(100, 140))
        keys = token_chain(seed, tokens)
        assert len(set(keys)) == len(tokens) and token_chain(seed, tokens[:5]) == keys[:5]
        store.store(keys[:30], list(range(1, 31))).wait()
        assert len(store.chain_hits(seed, tokens)) == 30  # probes in chunks, stops at the gap
        assert store.chain_hits(seed, tokens[:10]) == keys[:10]
        assert store.chain_hits(keys[9], tokens[10:]) == keys[10:30]  # resumed mid-chain
        assert store.chain_hits(b"other seed", tokens) == []
        assert store.chain_hits(seed, [7, *tokens[1:]]) == []  # another first token
    finally:
        store.close()


def test_namespaces_never_share_keys():
    tensors, block_dim = make_kv("flat", 16, torch.float16)
    fill_block(tensors, block_dim, 1, seed=1)
    stores = [
        SpillStore(tensors, Namespace(model, dtype, size), capacity_bytes=1 << 20)
        for model, dtype, size in [
            ("m1", "auto", 16),
            ("m2", "auto", 16),
            ("m1", "fp8", 16),
            ("m1", "auto", 32),
        ]
    ]
    other_layout = SpillStore(
        make_kv("flat", 16, torch.bfloat16)[0], Namespace("m1", "auto", 16), capacity_bytes=1 << 20
    )
    try:
        stores[0].store([b"same-hash"], [1])
        assert stores[0].contains(b"same-hash") == ON_HOST
        for other in [*stores[1:], other_layout]:
            assert other.tier.name != stores[0].tier.name
            assert other.contains(b"same-hash") == ABSENT
    finally:
        for store in [*stores, other_layout]:
            store.close()


@pytest.mark.parametrize("key_bytes", [1, 16, 32])
def test_tier_keys_are_keyed_blake2b_across_block_boundaries(key_bytes):
    """The C++ hasher against hashlib: lengths around BLAKE2b's 128-byte blocks, where a
    counter or last-block mistake would show. Bytes hashes are tagged with b"b"."""
    key = os.urandom(key_bytes)
    hashes = [os.urandom(n) for n in (0, 1, 63, 126, 127, 128, 254, 255, 256, 1000)]
    want = [hashlib.blake2b(b"b" + h, key=key, digest_size=16).digest() for h in hashes]
    assert TierKeys(key).keys(hashes) == want
    assert TierKeys(key).key(hashes[3]) == want[3]
    # The hasher itself, with no tag: an empty message is the key block alone.
    untagged = [b"", *hashes[1:4]]
    assert KeyedHasher(key).digests(untagged) == [
        hashlib.blake2b(m, key=key, digest_size=16).digest() for m in untagged
    ]
    with pytest.raises(ValueError, match="key is 1 to 64 bytes"):
        TierKeys(b"")


def test_bad_input_is_a_clear_error(namespace):
    tensors, _block_dim = make_kv("flat", 16, torch.float16)
    store = SpillStore(tensors, namespace, capacity_bytes=1 << 20)
    try:
        with pytest.raises(ValueError, match="2 keys for 1 blocks"):
            store.store([b"a", b"b"], [1])
        with pytest.raises(ValueError, match="out of range"):
            store.store([b"a"], [16])
        with pytest.raises(ValueError, match="listed twice"):
            store.store([b"a", b"b"], [3, 3])
        with pytest.raises(ValueError, match="not an integer"):
            store.store([b"a"], [1.5])
        with pytest.raises(TypeError, match="block hash"):
            store.store([None], [1])
        with pytest.raises(KeyError, match="not in the spill tier"):
            store.retrieve([b"never-stored"], [1])
        assert store.stats()["valid"] == 0 and store.stats()["pinned"] == 0
    finally:
        store.close()
    for call in (
        lambda: store.store([b"a"], [1]),
        lambda: store.lookup([b"a"]),
        lambda: store.retrieve([b"a"], [1]),
    ):
        with pytest.raises(ValueError, match="this spill store is closed"):
            call()
    with pytest.raises(ValueError, match="unknown eviction policy"):
        SpillStore(tensors, namespace, policy="random")
    with pytest.raises(ValueError, match="has 8 blocks"):
        SpillStore([tensors[0], torch.zeros(8, 16, 4, 32)], namespace)
    with pytest.raises(ValueError, match="holds no 4096-byte block"):
        SpillStore(tensors, namespace, capacity_bytes=100)
    with pytest.raises(ValueError, match="block_size"):
        Namespace("m", "auto", 0)


def test_segment_is_private_and_removed_by_the_last_user(namespace):
    tensors, _block_dim = make_kv("flat", 16, torch.float16)
    first = SpillStore(tensors, namespace, capacity_bytes=1 << 20)
    second = SpillStore(tensors, namespace, capacity_bytes=1 << 20)
    path = Path("/dev/shm") / first.tier.name.lstrip("/")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first.tier.name in user_tiers() and first.stats()["attached"] == 2
    first.close()
    assert path.exists()
    second.close()
    assert not path.exists()


def test_corrupted_segment_is_refused(namespace):
    tensors, _block_dim = make_kv("flat", 16, torch.float16)
    store = SpillStore(tensors, namespace, capacity_bytes=1 << 20)
    path = Path("/dev/shm") / store.tier.name.lstrip("/")
    try:
        with open(path, "r+b") as segment:
            segment.write(b"NOTVMKV!")  # the magic number
        with pytest.raises(SegmentError, match="bad magic"):
            store.lookup([b"a"])
        with pytest.raises(SegmentError, match="bad magic"):
            SpillStore(tensors, namespace, capacity_bytes=1 << 20)
    finally:
        path.unlink()


def test_tier_is_page_locked_through_the_acl_driver(namespace):
    """On a device backend each process registers its mapping of the tier with the
    driver (here the ACL shim, which counts registrations) and undoes it on close."""
    shim = ctypes.CDLL(os.environ["VMKV_ACL_LIBRARY"])
    vmm = open_vmm("acl")
    before = shim.vmkv_shim_host_registrations()
    tensors, _block_dim = make_kv("flat", 16, torch.float16)
    store = SpillStore(tensors, namespace, capacity_bytes=1 << 20, vmm=vmm)
    try:
        assert shim.vmkv_shim_host_registrations() == before + 1
    finally:
        store.close()
        assert shim.vmkv_shim_host_registrations() == before
        vmm.close()


def test_cli_lists_tiers_and_reset_removes_only_abandoned_ones(namespace):
    cli = [sys.executable, "-m", "vmkv"]
    tensors, _ = make_kv("flat", 16, torch.float16)
    live = SpillStore(tensors, namespace, capacity_bytes=1 << 20)
    live.store([b"a"], [1])
    crashed = run_python(
        "import os, torch\n"
        "from vmkv.spill import Namespace, SpillStore\n"
        "kv = [torch.zeros(16, 16, 4, 32, dtype=torch.float16)]\n"
        f"s = SpillStore(kv, Namespace('{namespace.model}-gone', 'auto', 16), capacity_bytes=1 << 20)\n"
        "print(s.tier.name, flush=True)\n"
        "os._exit(0)  # no close: the tier is left behind\n"
    )
    abandoned = crashed.stdout.strip()
    assert crashed.returncode == 0 and abandoned in user_tiers(), crashed.stderr
    try:
        listing = json.loads(subprocess.run([*cli, "ls", "--json"], capture_output=True, text=True).stdout)
        tiers = {t["segment"]: t for t in listing["spill_tiers"]}
        assert tiers[live.tier.name]["valid"] == 1 and tiers[live.tier.name]["attached"] == 1
        assert tiers[abandoned]["attached"] == 0  # swept: its process is gone
        reset = subprocess.run([*cli, "reset"], capture_output=True, text=True)
        assert reset.returncode == 1 and f"{live.tier.name}: spill tier in use" in reset.stderr
        assert abandoned not in user_tiers() and live.tier.name in user_tiers()
        assert live.lookup([b"a"]) == 1
    finally:
        live.close()


class _FailedCopy:
    """A device copy that reports an error (what a CUDA fault looks like to a Transfer)."""

    def query(self) -> bool:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def synchronize(self) -> None:
        self.query()

    def wait(self, stream=None) -> None:
        return None


def test_a_failed_copy_releases_its_slots_unpublished(namespace):
    tensors, _ = make_kv("flat", 16, torch.float16)
    store = SpillStore(tensors, namespace, capacity_bytes=1 << 20)
    index, proc = store.tier.index, store.tier.proc
    try:
        key = store._keys_for([b"doomed"], [1])
        slots = index.reserve(proc, key)
        commit, abort = (lambda: index.commit(proc, slots)), (lambda: index.abort(proc, slots))
        transfer = Transfer(_FailedCopy(), finish=commit, abandon=abort, blocks=1)
        with pytest.raises(RuntimeError, match="illegal memory access"):
            transfer.wait()
        assert store.contains(b"doomed") == ABSENT
        assert store.stats()["writing"] == 0 and store.stats()["aborted"] == 1
        with pytest.raises(RuntimeError):
            transfer.wait()  # still an error, but the slots are not released twice
        assert store.stats()["aborted"] == 1
    finally:
        store.close()


def test_a_geometry_rewritten_under_an_attached_store_is_caught_as_corruption(namespace):
    """Another process of the user rewrites the tier's geometry, consistently, to one of
    fewer slots: loops and offsets must not follow it (they come from the geometry first
    validated), and every call names the corruption."""
    import struct

    from vmkv.spill._index import SegmentError, geometry

    tensors, _block_dim = make_kv("flat", 16, torch.float16)
    store = SpillStore(tensors, namespace, capacity_bytes=1 << 20)
    try:
        store.store([b"a"], [1]).wait()
        header = store.tier.index.header()
        fields = ("slot_count", "slot_bytes", "slot_stride", "bucket_count", "data_offset", "total_bytes")
        old = struct.pack("<6Q", *(geometry(header["slot_count"], header["slot_bytes"])[f] for f in fields))
        new = struct.pack(
            "<6Q", *(geometry(header["slot_count"] // 2, header["slot_bytes"])[f] for f in fields)
        )
        with open(store.tier.path, "r+b") as tier_file:
            at = tier_file.read(1 << 12).index(old)
            tier_file.seek(at)
            tier_file.write(new)
        with pytest.raises(SegmentError, match="geometry changed while in use"):
            store.lookup([b"a"])
    finally:
        store.tier.path.unlink(missing_ok=True)
        with contextlib.suppress(SegmentError):
            store.close()
