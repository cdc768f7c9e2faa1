"""vLLM on vmkv: the plugin (``register``), the worker's KV allocation and the elastic
block pool. Activated by VMKV=1; otherwise vLLM runs exactly as vanilla."""
