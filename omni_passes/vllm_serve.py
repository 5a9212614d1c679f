"""Alias: ``python -m omni_passes.vllm_serve`` runs ``omni_passes.hosts.vllm.serve`` (vLLM's
OpenAI server with the omni passes on); the command users type stays."""

import sys

from omni_passes.hosts.vllm.serve import main

if __name__ == "__main__":
    sys.exit(main())
