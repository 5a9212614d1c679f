"""Alias: the worker extension lives in ``omni_passes.hosts.vllm.control``. This path stays
because users name it in ``worker_extension_cls="omni_passes.vllm_control.OmniWorkerExtension"``."""

from omni_passes.hosts.vllm.control import OmniWorkerExtension

__all__ = ["OmniWorkerExtension"]
