"""The SGLang plugin: ``register()`` runs in SGLang's scheduler processes (entry point
group ``sglang.srt.plugins``). With VMKV unset or 0 it does nothing, so SGLang is vanilla.

With VMKV=1 it checks the version (vmkv.integration.versions) and then replaces a few
names, all looked up by attribute, never by reading source (see memory.py):

* the MHA and MLA pools' buffer creation (``_create_buffers_normal`` on 0.5.23, where
  SGLang derives its pointer tables afterwards; ``_create_buffers`` on 0.5.15);
* the token and paged allocator classes where the pools' builder looks them up
  (``kv_cache_configurator`` on 0.5.23, ``model_runner_kv_cache_mixin`` on 0.5.15);
* ``Scheduler.on_idle``, where memory is settled with the coordinator, and
  ``Scheduler.get_num_allocatable_reqs``, which admits nothing while a debt is unpaid;
* ``RadixCache.match_prefix``, which reloads spilled entries past a device match.

Every target is checked before anything is replaced. SGLang logs and skips a plugin that
raises an Exception; a refusal here raises SystemExit instead, so that a server asked to
run on vmkv never runs without it.
"""

from __future__ import annotations

from types import ModuleType

from vmkv.integration.versions import Hook, UnsupportedVersion, enabled, install, require

_installed = False


def _hooks(line: str) -> list[Hook]:
    """(owner, attribute, original -> replacement) for a supported release."""
    from sglang.srt.managers import scheduler
    from sglang.srt.mem_cache import memory_pool, radix_cache

    from vmkv.integration.sglang import memory, radix

    builder = allocator_builder(line)
    if line == "0.5.23":
        mha = (memory_pool.MHATokenToKVPool, "_create_buffers_normal", memory.wrap_mha_create_buffers_normal)
    else:
        mha = (memory_pool.MHATokenToKVPool, "_create_buffers", memory.wrap_mha_create_buffers)
    return [
        mha,
        (memory_pool.MLATokenToKVPool, "_create_buffers", memory.wrap_mla_create_buffers),
        (builder, "TokenToKVPoolAllocator", memory.elastic),
        (builder, "PagedTokenToKVPoolAllocator", memory.elastic),
        (scheduler.Scheduler, "on_idle", memory.wrap_on_idle),
        (scheduler.Scheduler, "get_num_allocatable_reqs", memory.wrap_get_num_allocatable_reqs),
        (radix_cache.RadixCache, "match_prefix", radix.wrap_match_prefix),
    ]


def allocator_builder(line: str) -> ModuleType:
    """The module in which SGLang's KV pool builder looks up its allocator classes
    (``TokenToKVPoolAllocator``, ``PagedTokenToKVPoolAllocator``): vmkv replaces them
    there, and whoever builds an allocator as SGLang does takes them from there."""
    if line == "0.5.23":
        from sglang.srt.mem_cache import kv_cache_configurator

        return kv_cache_configurator
    from sglang.srt.model_executor import model_runner_kv_cache_mixin

    return model_runner_kv_cache_mixin


def install_hooks() -> str:
    """Install the hooks for the installed SGLang; returns its supported line. Raises
    UnsupportedVersion, or RuntimeError naming missing hook points, with nothing changed."""
    global _installed
    import sglang

    line = require("sglang", sglang.__version__)
    if not _installed:
        install("SGLang", sglang.__version__, line, _hooks(line))
        _installed = True
    return line


def register() -> None:
    if not enabled():
        return
    try:
        install_hooks()
    except (UnsupportedVersion, RuntimeError) as error:
        raise SystemExit(f"vmkv: {error}") from error
