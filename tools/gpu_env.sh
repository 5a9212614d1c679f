#!/usr/bin/env bash
# Source on the GPU machine after the offline vLLM bundle is installed in /tmp/vsite
# (README "On a GPU"): the environment every vLLM CUDA command here uses, and the package's
# vllm.general_plugins entry point made visible without pip-installing the checkout (the machine
# has no build tools' index): a dist-info folder in /tmp/vsite names omni_passes' plugin.
export PYTHONPATH=/tmp/vsite:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1
export PY=${PY:-/opt/torch/.venv/bin/python3}
info=/tmp/vsite/omni_infer-0.1.0.dist-info
mkdir -p "$info"
printf 'Metadata-Version: 2.1\nName: omni-infer\nVersion: 0.1.0\n' > "$info/METADATA"
printf '[vllm.general_plugins]\nomni_passes = omni_passes.hosts.vllm.plugin:register\n' > "$info/entry_points.txt"
