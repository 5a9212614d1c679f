"""Alias: the vLLM general plugin lives in ``omni_passes.hosts.vllm.plugin`` (the package's
``vllm.general_plugins`` entry points there). This path stays for installs that name
``omni_passes.vllm_plugin:register``."""

from omni_passes.hosts.vllm.plugin import register

__all__ = ["register"]
