"""SGLang on vmkv: KV pools and token allocators backed by a vmkv KV space (plugin.py)."""
