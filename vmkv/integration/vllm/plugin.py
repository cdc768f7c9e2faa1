"""The vLLM plugin: ``register()`` runs in every vLLM process (entry point group
``vllm.general_plugins``). With VMKV unset or 0 it does nothing, so vLLM is vanilla.

With VMKV=1 it checks the version (vmkv.integration.versions) and then replaces two
names, both looked up by attribute, never by reading source:

* ``gpu_model_runner.allocate_kv_cache``: the worker's KV tensors come from a vmkv KV
  space (``GPUModelRunner.initialize_kv_cache`` is wrapped to skip profiling caches);
* ``kv_cache_coordinator.BlockPool``: the scheduler's pool becomes elastic.

Every hook target is checked before anything is replaced, so a vLLM that lacks one is
refused whole instead of running half-patched.
"""

from __future__ import annotations

import logging
import os

from vmkv.integration.versions import require

log = logging.getLogger("vmkv")

_installed = False


def enabled() -> bool:
    return os.environ.get("VMKV", "0").strip().lower() not in ("", "0", "false", "no", "off")


def register() -> None:
    global _installed
    if not enabled() or _installed:
        return
    import vllm
    from vllm.v1.core import kv_cache_coordinator
    from vllm.v1.worker import gpu_model_runner

    line = require("vllm", vllm.__version__)
    targets = [
        (gpu_model_runner, "allocate_kv_cache"),
        (gpu_model_runner.GPUModelRunner, "initialize_kv_cache"),
        (kv_cache_coordinator, "BlockPool"),
    ]
    missing = [
        f"{getattr(owner, '__name__', owner)}.{name}" for owner, name in targets if not hasattr(owner, name)
    ]
    if missing:
        raise RuntimeError(f"vLLM {vllm.__version__} lacks vmkv's hook points {missing}; nothing was changed")

    from vmkv.integration.vllm import worker
    from vmkv.integration.vllm.block_pool import VmkvBlockPool

    gpu_model_runner.allocate_kv_cache = worker.allocate_kv_cache
    runner = gpu_model_runner.GPUModelRunner
    runner.initialize_kv_cache = worker.wrap_initialize_kv_cache(runner.initialize_kv_cache)
    kv_cache_coordinator.BlockPool = VmkvBlockPool
    _installed = True
    log.info("vmkv %s hooks installed (vLLM %s, pid %d)", line, vllm.__version__, os.getpid())
