"""Engine layers: thin adapters that put vLLM's and SGLang's KV caches on a vmkv stack.
The core (vmkv.allocator, .coordinator, .spill, .vmm_ops, .stack) never imports them."""
