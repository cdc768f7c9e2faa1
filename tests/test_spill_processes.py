"""The shared spill tier across real processes: concurrent use, a writer killed in the
middle of its copies, and spill on reclaim with reload on a prefix hit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from spill_helpers import block_matches
from spill_worker import BATCH, WRITER_SCALE, worker_store

from vmkv.coordinator import Segment
from vmkv.coordinator.segment import remove_segment
from vmkv.spill import ON_HOST

HERE = Path(__file__).parent
WORKER = HERE / "spill_worker.py"


def spawn(*args: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=HERE,
    )
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise AssertionError(f"spill worker died at start: {proc.stderr.read()}")
    assert json.loads(line)["ready"]
    return proc


def last_json(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_concurrent_store_and_retrieve_from_several_processes():
    model = f"mixed-{os.getpid()}"
    workers = [spawn(model, "mixed", str(i * 20), "20", "60") for i in range(3)]
    results = [last_json(w) for w in workers]
    assert all(r["corrupt"] == 0 for r in results), results
    assert sum(r["verified"] for r in results) > 30, results  # others' blocks were found
    assert all(r["stored"] == 180 for r in results)


def test_writer_killed_mid_transfer_never_corrupts_the_tier():
    model = f"killed-{os.getpid()}"
    store, tensors, block_dim = worker_store(model, 2, slots=48, shape_scale=WRITER_SCALE)
    try:
        for round_ in range(5):
            first = round_ * 100_000
            writer = spawn(model, "writer", str(first))
            time.sleep(random.uniform(0.1, 0.4))
            writer.send_signal(signal.SIGKILL)
            writer.wait()
            store.tier.index.sweep()
            stats = store.stats()
            assert stats["writing"] == 0, f"round {round_}: a dead writer's slots stayed reserved"
            assert stats["attached"] == 1
            valid = [
                (f"w{g}-{i}", i)
                for g in range(first, first + 20_000)
                for i in range(BATCH)
                if store.contains(f"w{g}-{i}") == ON_HOST
            ]
            assert valid and len(valid) <= stats["valid"]
            for key, seed in valid:
                store.retrieve([key], [1]).wait()
                assert block_matches(tensors, block_dim, 1, seed), f"round {round_}: block {key} is corrupt"
        assert store.stats()["aborted"] >= 3  # kills landed inside copies
    finally:
        store.close()


def test_reclaim_spills_cold_prefix_and_a_later_hit_reloads_it():
    page = 1 << 20
    name = f"/vmkv-{os.getuid()}-spilltest{os.getpid()}"
    Segment.open_or_create(name, page, lambda: 160 * page)
    try:
        engine = spawn(name, "engine", f"toy-{os.getpid()}")
        # The engine holds its prefix's pages; a second instance then needs most of the budget.
        greedy = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "coordinator_worker.py"),
                name,
                "greedy",
                "greedy-min",
                "--min",
                str(150 * page),
                "--seconds",
                "3",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert json.loads(greedy.stdout.readline())["ready"]
        reached = json.loads(greedy.stdout.readline())
        assert reached["held_bytes"] >= 150 * page, reached
        _out, err = greedy.communicate(timeout=60)
        assert greedy.returncode == 0, err
        engine.stdin.write("go\n")
        engine.stdin.flush()
        result = last_json(engine)
        assert result["spilled"] > 0 and result["spilled_by_reclaim"] >= result["spilled"], result
        assert result["found_on_host"] == result["spilled"], result
        assert result["dropped"] == 0 and result["verified"], result
    finally:
        remove_segment(name)


def test_torch_tensors_are_not_needed_to_find_blocks():
    """Keys, not tensors, name blocks: a fresh store of the same namespace sees them."""
    model = f"fresh-{os.getpid()}"
    first, tensors, _block_dim = worker_store(model, 8, slots=8)
    tensors[0][1].fill_(3)
    first.store(["k-a"], [1])
    second, other_tensors, _ = worker_store(model, 8, slots=8)
    try:
        second.retrieve(["k-a"], [2]).wait()
        assert torch.equal(other_tensors[0][2], tensors[0][1])
    finally:
        first.close()
        second.close()
