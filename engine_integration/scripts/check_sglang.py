"""setup.sh's check for SGLang on the CPU: SGLang's own plugin loader installs vmkv's
hooks (VMKV=1), then an MHA pool and a token allocator are built as SGLang builds them,
and an allocation maps KV pages on demand."""

from __future__ import annotations

import sglang
import torch
from sglang.srt.mem_cache import memory_pool
from sglang.srt.plugins import load_plugins

from vmkv.integration.sglang.plugin import allocator_builder
from vmkv.integration.versions import require

load_plugins()
builder = allocator_builder(require("sglang", sglang.__version__))
pool = memory_pool.MHATokenToKVPool(65536, 1, torch.float16, 8, 128, 4, "cpu", False)
allocator = builder.TokenToKVPoolAllocator(65536, torch.float16, "cpu", pool, False)
before = pool.vmkv.space.mapped_pages
ids = allocator.alloc(20000)
print(f"vmkv: {type(allocator).__name__}: KV pages mapped {before} -> {pool.vmkv.space.mapped_pages}")
allocator.free(ids)
allocator.settle(None)
print(f"vmkv: after free, KV pages mapped {pool.vmkv.space.mapped_pages}")
pool.vmkv.close()
