"""The coordinator with real processes, real shared memory and the host backend."""

from __future__ import annotations

import gc
import json
import mmap
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmkv.coordinator import Segment, SegmentError, join, parse_size
from vmkv.coordinator.segment import SHM_DIR, remove_segment
from vmkv.coordinator.timeline import Timeline
from vmkv.coordinator.units import budget_bytes
from vmkv.vmm_ops import open_vmm

HERE = Path(__file__).parent
WORKER = HERE / "coordinator_worker.py"
PAGE = 1 << 20
BUDGET_PAGES = 64


@pytest.fixture
def segment(request):
    """A private segment per test: 64 pages of 1 MiB."""
    name = f"/vmkv-{os.getuid()}-test{os.getpid()}x{abs(hash(request.node.name)) % 10**6}"
    seg = Segment.open_or_create(name, PAGE, lambda: BUDGET_PAGES * PAGE)
    yield seg
    remove_segment(name)


def spawn(segment: Segment, name: str, mode: str, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), segment.name, name, mode, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise AssertionError(f"worker {name} died at start: {proc.stderr.read()}")
    assert json.loads(line)["ready"]
    return proc


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1]) if out.strip() else {}


def vmkv_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmkv", *args], capture_output=True, text=True, timeout=60)


def check_invariants(seg: Segment) -> list[dict]:
    rows = seg.table.snapshot()
    budget = seg.table.header()["budget_pages"]
    assert sum(r["leased"] for r in rows) <= budget
    for r in rows:
        # Pages are leased before they are created and released after: a held page is
        # always covered, so no page is counted twice and none goes uncounted.
        assert r["held"] <= r["leased"], r
        assert r["mapped"] <= r["held"], r
    return rows


# -- the segment -----------------------------------------------------------------------


def test_segment_is_private_per_user_and_versioned(segment):
    path = SHM_DIR / segment.name.lstrip("/")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert f"-{os.getuid()}-" in segment.name
    header = segment.table.header()
    assert (header["version"], header["page_size"], header["budget_pages"]) == (2, PAGE, BUDGET_PAGES)
    vmm = open_vmm("host", page_size=2 * PAGE)
    with pytest.raises(SegmentError, match="pages of 1048576 bytes"):
        join(vmm, "mismatch", segment=segment.name)


def test_a_table_keeps_its_mapping_alive(segment):
    table = Segment.attach(segment.name).table  # the Segment object itself is dropped here
    gc.collect()
    assert table.header()["budget_pages"] == BUDGET_PAGES


def _poke(segment: Segment, offset: int, data: bytes) -> None:
    with open(SHM_DIR / segment.name.lstrip("/"), "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        m[offset : offset + len(data)] = data


@pytest.mark.parametrize(
    ("offset", "data", "message"),
    [
        (0, b"NOTVMKV!", "bad magic"),
        (8, (999).to_bytes(4, "little"), "layout version 999"),
        (12, (7).to_bytes(4, "little"), "foreign layout"),
    ],
)
def test_corrupted_or_foreign_header_is_a_clear_error(segment, offset, data, message):
    _poke(segment, offset, data)
    with pytest.raises(SegmentError, match=message):
        Segment.attach(segment.name)
    result = vmkv_cli("ls", "--segment", segment.name)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_corrupted_slot_is_a_clear_error(segment):
    vmm = open_vmm("host", page_size=PAGE)
    instance = join(vmm, "victim", segment=segment.name)
    instance.close()
    proc = spawn(segment, "w", "hold", "--seconds", "30")
    try:
        header_bytes = int.from_bytes((SHM_DIR / segment.name.lstrip("/")).read_bytes()[12:16], "little")
        slot = segment.table.snapshot()[0]["slot"]
        slot_bytes = int.from_bytes((SHM_DIR / segment.name.lstrip("/")).read_bytes()[16:20], "little")
        weight_offset = header_bytes + slot * slot_bytes + 4 + 4 + 8 + 8 + 64 + 32 + 128 + 8 + 8
        _poke(segment, weight_offset, (0).to_bytes(4, "little"))
        with pytest.raises(SegmentError, match="weight 0"):
            segment.table.snapshot()
    finally:
        proc.kill()
        proc.wait()


def test_foreign_permissions_are_refused(segment):
    path = SHM_DIR / segment.name.lstrip("/")
    path.chmod(0o644)
    with pytest.raises(SegmentError, match="mode 644"):
        Segment.attach(segment.name)


def test_sizes_and_budget_rule():
    assert parse_size("512M") == 512 << 20
    assert parse_size("4G") == 4 << 30
    assert parse_size("1.5GiB") == 3 << 29
    assert parse_size("10%", total=1000) == 100
    for bad in ("", "ten", "-1G", "0", "5%"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert budget_bytes("40G", 80 << 30, 10 << 30) == 40 << 30
    assert budget_bytes("50%", 80 << 30, 10 << 30) == 40 << 30
    assert budget_bytes(None, 80 << 30, 10 << 30) == 9 << 30


# -- leases ----------------------------------------------------------------------------


def test_grants_misses_and_max_in_one_process(segment):
    vmm = open_vmm("host", page_size=PAGE)
    a = join(vmm, "a", max_bytes=40 * PAGE, segment=segment.name)
    b = join(vmm, "b", segment=segment.name)
    assert a.acquire(40)
    assert not a.acquire(1)  # its max
    assert b.acquire(24)
    assert not b.acquire(1)  # b is below its fair share (32), but a has nothing it can give back
    rows = {r["name"]: r for r in check_invariants(segment)}
    assert rows["a"]["leased"] == 40 and rows["b"]["leased"] == 24
    assert rows["a"]["misses"] == 1 and rows["b"]["misses"] == 1
    with pytest.raises(ValueError, match="only 40 are leased"):
        a.release(41, 0, 0)
    with pytest.raises(ValueError, match="not covered"):
        a.release(10, 31, 0)
    with pytest.raises(ValueError, match="already registered"):
        join(vmm, "a", segment=segment.name)
    a.close()
    b.close()
    assert segment.table.snapshot() == []


def test_timeline_samples_each_instance_held_memory(segment, tmp_path):
    vmm = open_vmm("host", page_size=PAGE)
    a = join(vmm, "a", segment=segment.name)
    timeline = Timeline(segment.name, period_s=0.01)
    try:
        time.sleep(0.05)
        assert a.acquire(8)
        a.report(held=8, mapped=0)
        time.sleep(0.05)
        end = timeline.now()
    finally:
        timeline.close()
        a.close()
    assert timeline.peak("a", 0.0, end) == 8 * PAGE
    assert timeline.peak("nobody", 0.0, end) == 0
    assert min(b for _, n, b in timeline.rows if n == "a") == 0  # sampled before it grew
    timeline.write_csv(tmp_path / "t.csv")
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines[0].startswith("seconds,instance,held_bytes,leased_pages,reclaim_request_pages")
    assert len(lines) == len(timeline.rows) + 1
    pytest.importorskip("matplotlib")
    assert timeline.plot(tmp_path / "t.png", 16 * PAGE, [("a", 0.0, end)]) == str(tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("processes", [2, 4, 8, 16])
def test_processes_hammer_and_invariants_hold(segment, processes):
    procs = [spawn(segment, f"w{i}", "churn", "--seconds", "3") for i in range(processes)]
    samples = 0
    while any(p.poll() is None for p in procs):
        check_invariants(segment)
        samples += 1
        time.sleep(0.005)
    results = [finish(p) for p in procs]
    assert samples > 50
    assert all(r["granted"] > 0 for r in results), results
    assert segment.table.snapshot() == []  # every lease returned on exit


def _leased_by_name(segment: Segment) -> dict[str, int]:
    return {r["name"]: r["leased"] for r in segment.table.snapshot()}


def test_weights_are_respected_under_contention(segment):
    """Weights 1 : 3 over a 64-page budget: fair shares 16 and 48. Tolerance: the heavy
    instance's mean share of the leased pages over the second half is 0.75 +- 0.10."""
    light = spawn(segment, "light", "churn", "--weight", "1", "--seconds", "6")
    heavy = spawn(segment, "heavy", "churn", "--weight", "3", "--seconds", "6")
    time.sleep(3)
    shares = []
    for _ in range(100):
        leased = _leased_by_name(segment)
        if len(leased) == 2 and sum(leased.values()):
            shares.append(leased["heavy"] / sum(leased.values()))
        check_invariants(segment)
        time.sleep(0.02)
    finish(light), finish(heavy)
    mean = sum(shares) / len(shares)
    assert 0.65 <= mean <= 0.85, mean


def test_what_could_go_back_is_counted_at_every_heartbeat_only_with_a_neighbour(segment):
    """Counting what an instance could give back walks every cold block of its cache under
    the allocator's lock: milliseconds for a large one, at every heartbeat. Alone on its
    device, nobody can use the count, so it is made rarely; once another instance joins,
    at every heartbeat again."""
    from vmkv.allocator import BlockAllocator, KVSpace, PagePool
    from vmkv.allocator.reclaim import Reclaimer

    vmm = open_vmm("host", page_size=PAGE)
    alone = join(vmm, "alone", segment=segment.name)
    pool = PagePool(vmm, lease=alone)
    allocator = BlockAllocator(KVSpace(pool, [PAGE // 4, PAGE // 4], 1024), keep_free_pages=0)
    counts = []
    reclaimer = Reclaimer(pool, [allocator])
    count = reclaimer.reclaimable
    reclaimer.reclaimable = lambda: counts.append(time.monotonic()) or count()  # type: ignore[method-assign]
    alone.reclaimer = reclaimer
    other = None
    try:
        time.sleep(6 * alone.heartbeat_s)  # 1.5 s: at start, then once a second
        assert len(counts) <= 2, f"counted {len(counts)} times alone"
        other = join(vmm, "other", segment=segment.name)
        joined = time.monotonic()
        time.sleep(6 * alone.heartbeat_s)
        assert sum(1 for at in counts if at > joined) >= 3
    finally:
        if other is not None:
            other.close()
        alone.close()


def test_a_busy_instance_is_asked_once_and_pays_as_its_blocks_free(segment):
    """Reclaim from an instance whose pages all hold live blocks leaves it owing; asking
    again must not double the debt, the debtor may not grow, and freeing blocks pays the
    debt to the one who asked."""
    from vmkv.allocator import BlockAllocator, KVSpace, PagePool
    from vmkv.allocator.reclaim import Reclaimer

    vmm = open_vmm("host", page_size=PAGE)
    busy = join(vmm, "busy", segment=segment.name)
    pool = PagePool(vmm, lease=busy)
    allocator = BlockAllocator(KVSpace(pool, [PAGE // 4, PAGE // 4], 1024), keep_free_pages=0)
    busy.reclaimer = Reclaimer(pool, [allocator])
    live = []
    while (blocks := allocator.alloc(allocator.blocks_per_page)) is not None:
        live.append(blocks)
    other = join(vmm, "other", segment=segment.name)
    try:
        assert _leased_by_name(segment)["busy"] == BUDGET_PAGES
        for _attempt in range(3):
            assert not other.acquire(8)  # nothing is idle: a miss, and busy owes 8
            deadline = time.monotonic() + 2
            while pool.stats().debt < 8 and time.monotonic() < deadline:
                time.sleep(0.005)
            row = next(r for r in segment.table.snapshot() if r["name"] == "busy")
            assert (row["reclaim_request"], pool.stats().debt) == (8, 8)
        for blocks in live[-2:]:  # two KV pages of two physical pages each: half the debt
            allocator.free(blocks)
        assert pool.stats().debt == 4
        # The 4 pages paid are free budget, but they are the asker's: busy may not take them.
        assert busy.headroom() == 0 and not busy.acquire(1)
        for blocks in live[-4:-2]:
            allocator.free(blocks)
        assert pool.stats().debt == 0
        rows = {r["name"]: r for r in check_invariants(segment)}
        assert rows["busy"]["leased"] == BUDGET_PAGES - 8 and rows["busy"]["reclaim_request"] == 0
        assert other.acquire(8)
    finally:
        other.close()
        busy.close()


def test_an_ask_beyond_what_an_instance_can_give_is_refused_not_owed(segment):
    """A stale report of idle pages can get an instance asked for pages it cannot give
    (here its null block's page). Owing them forever would stop it from ever growing."""
    from vmkv.allocator import BlockAllocator, KVSpace, PagePool
    from vmkv.allocator.reclaim import Reclaimer
    from vmkv.coordinator import Outcome
    from vmkv.coordinator.instance import ring

    vmm = open_vmm("host", page_size=PAGE)
    small = join(vmm, "small", segment=segment.name)
    pool = PagePool(vmm, lease=small)
    allocator = BlockAllocator(KVSpace(pool, [PAGE // 4, PAGE // 4], 1024))  # maps the null page
    small.reclaimer = Reclaimer(pool, [allocator])
    other = join(vmm, "other", segment=segment.name)
    try:
        assert other.acquire(BUDGET_PAGES - 2 - 2)  # 2 pages stay free; small holds 2
        table = segment.table
        table.heartbeat(small.slot, small.generation, 2)  # a stale report: 2 idle pages
        outcome, victims = table.request(other.slot, other.generation, 3)
        assert outcome == Outcome.RECLAIMING and victims == [small.slot]
        ring(segment, small.slot)
        deadline = time.monotonic() + 2
        while _row(segment, "small")["reclaim_request"] and time.monotonic() < deadline:
            time.sleep(0.005)
        table.note_miss(other.slot, other.generation, 0)
        assert _row(segment, "small")["reclaim_request"] == 0 and pool.stats().debt == 0
        assert small.acquire(1)  # it may grow again
    finally:
        other.close()
        small.close()


def _row(segment: Segment, name: str) -> dict:
    return next(r for r in segment.table.snapshot() if r["name"] == name)


def test_min_is_guaranteed_by_reclaim(segment):
    hog = spawn(segment, "hog", "churn", "--weight", "100", "--seconds", "6")
    time.sleep(1)
    assert _leased_by_name(segment)["hog"] > BUDGET_PAGES * 0.8  # it took nearly everything
    small = spawn(segment, "small", "greedy-min", "--weight", "1", "--min", str(24 * PAGE), "--seconds", "2")
    result = finish(small)
    assert result["held_bytes"] >= 24 * PAGE, result
    finish(hog)


def test_limit_change_applies_to_an_idle_instance(segment):
    proc = spawn(segment, "idle", "hold", "--seconds", "30")
    try:
        deadline = time.monotonic() + 2
        while _leased_by_name(segment).get("idle", 0) < 16 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _leased_by_name(segment)["idle"] == 16
        result = vmkv_cli("limit", "idle", "--max", "4M", "--segment", segment.name)
        assert result.returncode == 0, result.stderr
        deadline = time.monotonic() + 1.0
        while _leased_by_name(segment)["idle"] > 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        row = next(r for r in segment.table.snapshot() if r["name"] == "idle")
        assert row["leased"] <= 4 and row["max_pages"] == 4
        assert row["reclaims"] >= 1
        bad = vmkv_cli("limit", "nobody", "--max", "4M", "--segment", segment.name)
        assert bad.returncode == 1 and "no live instance" in bad.stderr
        bad = vmkv_cli("limit", "idle", "--min", "8M", "--max", "4M", "--segment", segment.name)
        assert bad.returncode == 1 and "min must not exceed max" in bad.stderr
    finally:
        proc.kill()
        proc.wait()


# -- crash safety ----------------------------------------------------------------------


def test_killed_instance_lease_returns_within_two_seconds(segment):
    survivor = spawn(segment, "survivor", "hold", "--seconds", "30")
    victim = spawn(segment, "victim", "hold", "--seconds", "30")
    try:
        deadline = time.monotonic() + 2
        while _leased_by_name(segment).get("victim", 0) < 16 and time.monotonic() < deadline:
            time.sleep(0.01)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        killed = time.monotonic()
        while "victim" in _leased_by_name(segment):  # snapshot does not sweep: the survivor must
            assert time.monotonic() - killed < 2.0, "lease not reclaimed within 2 s"
            time.sleep(0.01)
    finally:
        survivor.kill()
        survivor.wait()


LOCKER = """
import sys
from vmkv.coordinator import Segment
table = Segment.attach(sys.argv[1]).table
print("ready", flush=True)
table.lock_cycles(1 << 62)  # holds the lock about half of the time, until killed
"""


def test_chaos_sigkill_never_deadlocks_and_leases_come_back(segment):
    rng = random.Random(7)
    workers: dict[str, subprocess.Popen] = {}
    kills, serial = 0, 0

    def start(kind: str) -> None:
        nonlocal serial
        serial += 1
        name = f"{kind}{serial}"
        if kind == "lock":
            proc = subprocess.Popen(
                [sys.executable, "-c", LOCKER, segment.name], stdout=subprocess.PIPE, text=True
            )
            proc.stdout.readline()
        else:
            proc = spawn(segment, name, "churn", "--seconds", "60")
        workers[name] = proc

    for i in range(6):
        start("lock" if i % 2 else "churn")
    while kills < 100:
        time.sleep(rng.uniform(0.0, 0.03))
        name = rng.choice(sorted(workers))
        workers.pop(name).send_signal(signal.SIGKILL)
        kills += 1
        start("lock" if name.startswith("lock") else "churn")
        started = time.monotonic()
        check_invariants(segment)  # would hang or raise if the lock were lost
        assert time.monotonic() - started < 5
    for proc in workers.values():
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert segment.table.header()["lock_recoveries"] > 0  # some kills landed inside the lock
    segment.table.sweep()
    left = segment.table.snapshot()
    assert left == [], [(r["name"], r["pid"], r["alive"], os.path.exists(f"/proc/{r['pid']}")) for r in left]
    vmm = open_vmm("host", page_size=PAGE)
    fresh = join(vmm, "after", segment=segment.name)
    assert fresh.acquire(BUDGET_PAGES)  # the whole budget is free again
    fresh.close()


# -- CLI and metrics -------------------------------------------------------------------


def test_only_shared_memory_objects_count_as_segments(segment, tmp_path):
    """A folder with the users' prefix in /dev/shm (the co-location bench keeps its spill
    tier's files in one) is no segment: listing every segment once failed on it with
    posix_ipc's "Invalid parameter(s)"."""
    import tempfile

    from vmkv.coordinator import user_segments

    folder = tempfile.mkdtemp(prefix=f"vmkv-{os.getuid()}-coloc-", dir=SHM_DIR)
    try:
        names = user_segments()
        assert segment.name in names and f"/{Path(folder).name}" not in names
        result = vmkv_cli("ls", "--json")
        assert result.returncode == 0, result.stderr
        listed = [entry["segment"] for entry in json.loads(result.stdout)["segments"]]
        assert segment.name in listed
    finally:
        os.rmdir(folder)


def test_cli_ls_prom_top_and_reset(segment):
    proc = spawn(segment, "served", "hold", "--seconds", "30")
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:  # reclaimable is counted by the heartbeat (alone: each second)
            rows = segment.table.snapshot()
            if rows and rows[0]["leased"] == 16 and rows[0]["reclaimable"] == 14:
                break
            time.sleep(0.01)
        listing = json.loads(vmkv_cli("ls", "--json", "--segment", segment.name).stdout)
        (entry,) = listing["segments"]
        (row,) = entry["instances"]
        assert (row["name"], row["engine"], row["model"], row["leased"]) == ("served", "test", "tiny", 16)
        # 16 held: the null block's KV page (2 physical pages) stays mapped, 14 are pooled.
        assert (row["held"], row["mapped"], row["reclaimable"]) == (16, 2, 14)
        text = vmkv_cli("ls", "--segment", segment.name).stdout
        assert "served" in text and "budget 64.0M" in text
        prom = vmkv_cli("ls", "--prom", "--segment", segment.name).stdout
        assert (
            f'vmkv_leased{{engine="test",instance="served",model="tiny",segment="{segment.name}"}} 16.0'
            in prom
        )
        assert "vmkv_grant_latency_seconds_bucket" in prom and "vmkv_grants_total" in prom
        assert "vmkv_budget_pages" in prom
        top = vmkv_cli("top", "--iterations", "1", "--segment", segment.name)
        assert top.returncode == 0 and "served" in top.stdout
        refused = vmkv_cli("reset", "--segment", segment.name)
        assert refused.returncode == 1 and "in use by served" in refused.stderr
        assert (SHM_DIR / segment.name.lstrip("/")).exists()
    finally:
        proc.kill()
        proc.wait()
    removed = vmkv_cli("reset", "--segment", segment.name)
    assert removed.returncode == 0, removed.stderr
    assert not (SHM_DIR / segment.name.lstrip("/")).exists()
    assert not list(SHM_DIR.glob(f"sem.{segment.name.lstrip('/')}-s*"))
    segment.table = None  # the fixture's own unlink has nothing left to do
    Segment.open_or_create(segment.name, PAGE, lambda: PAGE)  # recreate so the fixture can remove it


def test_metrics_are_served_over_http(segment):
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    vmm = open_vmm("host", page_size=PAGE)
    instance = join(vmm, "exported", engine="test", segment=segment.name)
    assert instance.acquire(3)
    server = subprocess.Popen(
        [sys.executable, "-m", "vmkv", "metrics", "--port", str(port), "--segment", segment.name],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert "serving Prometheus metrics" in server.stdout.readline()
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'instance="exported"' in body
        assert "vmkv_leased{" in body and "} 3.0" in body
        assert "vmkv_grants_total" in body and "vmkv_reclaim_latency_seconds_bucket" in body
    finally:
        server.terminate()
        server.wait()
        instance.close()


def test_a_budget_that_cannot_be_read_leaves_no_segment_behind(monkeypatch):
    """The first instance creates the segment; a bad VMKV_BUDGET must not leave it half
    made, or every later instance would wait for an initialization that never comes."""
    name = f"/vmkv-{os.getuid()}-badbudget{os.getpid()}"
    vmm = open_vmm("host", page_size=1 << 20, host_capacity=64 << 20)
    for bad in ("4X", "-1G", "nan", "1K"):
        monkeypatch.setenv("VMKV_BUDGET", bad)
        with pytest.raises(ValueError):
            join(vmm, "a", segment=name)
        assert not (SHM_DIR / name.lstrip("/")).exists(), bad
    monkeypatch.setenv("VMKV_BUDGET", "16M")
    instance = join(vmm, "a", segment=name)
    try:
        assert instance.segment.table.header()["budget_pages"] == 16
    finally:
        instance.close()
        remove_segment(name)


def test_segment_names_outside_the_users_namespace_are_refused(monkeypatch):
    vmm = open_vmm("host", page_size=1 << 20, host_capacity=64 << 20)
    for name in ("noslash", "/a/b", f"/vmkv-{os.getuid() + 1}-x", f"/vmkv-{os.getuid()}-"):
        monkeypatch.setenv("VMKV_SEGMENT", name)
        with pytest.raises(ValueError, match=f"segment name {name!r} is not one of yours"):
            join(vmm, "a")


def test_names_with_control_bytes_are_refused(segment):
    vmm = open_vmm("host", page_size=1 << 20, host_capacity=64 << 20)
    for field, value in (("name", "a\nb"), ("engine", "vllm\x1b[2J"), ("model", "m\x00")):
        kwargs = {"name": "ok", "engine": "vllm", "model": "m", field: value}
        with pytest.raises(ValueError, match=f"{field} must be printable"):
            join(vmm, kwargs.pop("name"), segment=segment.name, **kwargs)
    assert segment.table.snapshot() == []


def test_the_budget_changes_from_the_cli_and_a_size_under_a_page_is_refused(segment):
    page = segment.table.header()["page_size"]
    changed = vmkv_cli("budget", str(3 * page), "--segment", segment.name)
    assert changed.returncode == 0, changed.stderr
    assert segment.table.header()["budget_pages"] == 3
    refused = vmkv_cli("budget", "1K", "--segment", segment.name)
    assert refused.returncode == 1
    assert f"a budget of 1K is less than one page ({page} bytes)" in refused.stderr
    assert segment.table.header()["budget_pages"] == 3


def test_names_read_back_are_checked_and_never_undecodable(segment):
    """Another process of the user rewrites a registered name: a control byte is named as
    corruption (it would forge lines in vmkv ls), bytes that are not UTF-8 read as U+FFFD."""
    vmm = open_vmm("host", page_size=1 << 20, host_capacity=64 << 20)
    instance = join(vmm, "victim-name", segment=segment.name)
    try:
        with open(SHM_DIR / segment.name.lstrip("/"), "r+b") as shared:
            raw = mmap.mmap(shared.fileno(), 0)
            at = raw.find(b"victim-name\0")
            raw[at : at + 4] = b"\xff\xfeim"
            assert segment.table.snapshot()[0]["name"] == "\ufffd\ufffdimim-name"
            raw[at : at + 4] = b"vi\nt"
            with pytest.raises(SegmentError, match="has a name with control bytes"):
                segment.table.snapshot()
            raw[at : at + 4] = b"vict"
            raw.close()
        assert segment.table.snapshot()[0]["name"] == "victim-name"
    finally:
        instance.close()


def test_an_overwritten_lock_is_named_not_an_abort_and_reset_removes_the_segment():
    """glibc aborts the process that locks a mutex whose type word was overwritten (here
    to a priority-protected type, as another process of the user could): vmkv checks the
    word first and names it, and `vmkv reset` can then remove the segment."""
    segment = Segment.open_or_create(
        f"/vmkv-{os.getuid()}-lockkind{os.getpid()}", PAGE, lambda: BUDGET_PAGES * PAGE
    )
    kind_at = 64 + 16  # the header's mutex, then glibc's __kind (x86-64)
    with open(SHM_DIR / segment.name.lstrip("/"), "r+b") as shared:
        raw = mmap.mmap(shared.fileno(), 0)
        assert int.from_bytes(raw[kind_at : kind_at + 4], "little") != 0  # robust and shared
        raw[kind_at : kind_at + 4] = (0x40).to_bytes(4, "little")
        raw.close()
    check = subprocess.run(
        [sys.executable, "-c", f"from vmkv.coordinator import Segment; Segment.attach({segment.name!r})"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 1 and "lock has been overwritten" in check.stderr  # not -6 (SIGABRT)
    removed = vmkv_cli("reset", "--segment", segment.name)
    assert removed.returncode == 0 and "removing it" in removed.stdout
    assert not (SHM_DIR / segment.name.lstrip("/")).exists()


def test_header_counters_out_of_range_are_corruption_not_an_overflow(segment):
    """A budget or generation counter rewritten past what vmkv ever writes would let the
    sum of leases or the next generation wrap: both are refused as corruption."""
    with open(SHM_DIR / segment.name.lstrip("/"), "r+b") as shared:
        raw = mmap.mmap(shared.fileno(), 0)
        for offset, value in ((32, 1 << 41), (40, 1 << 63)):  # Header.budget_pages, next_generation
            saved = raw[offset : offset + 8]
            raw[offset : offset + 8] = value.to_bytes(8, "little")
            with pytest.raises(SegmentError, match="budget or generation counter is out of range"):
                segment.table.header()
            raw[offset : offset + 8] = saved
        raw.close()
    assert segment.table.header()["budget_pages"] == BUDGET_PAGES
