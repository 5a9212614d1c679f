"""omni_passes: OmniInfer's model-side optimisations as torch.fx compiler passes.

- ``omni_passes.compile(model, config)``: torch.compile with the passes (Inductor; torchair).
- ``omni_passes.vllm_post_grad_pass``: the same passes inside vLLM, enabled with
  ``--compilation-config '{"inductor_passes": {"post_grad_custom_post_pass":
  "omni_passes.vllm_post_grad_pass"}}'`` and ``OMNI_PASSES_CONFIG=/path/to/config.json``.
- ``omni_passes.vllm_ascend_fusion_pass``: the same under vllm-ascend, on its
  ``graph_fusion_manager`` key.

Every host lives in ``omni_passes.hosts`` (torch.compile, torchair, vLLM); the graph passes in
``omni_passes.fx``; the single pass registry in ``omni_passes.registry``.
"""

from omni_passes.config import ConfigError, PassConfig  # noqa: F401
from omni_passes.hosts.torch_compile import compile  # noqa: F401,A004
from omni_passes.hosts.vllm.ascend_pass import _OmniAscendPass
from omni_passes.hosts.vllm.ascend_pass import register_with_vllm as _register_ascend_with_vllm
from omni_passes.hosts.vllm.post_grad_pass import VllmPostGradPass, register_with_vllm

# vLLM looks this up as __import__("omni_passes").__dict__["vllm_post_grad_pass"]: it must be
# a real module attribute, not a lazy one.
vllm_post_grad_pass = VllmPostGradPass()
vllm_ascend_fusion_pass = _OmniAscendPass()
register_with_vllm()
_register_ascend_with_vllm()

__all__ = ["compile", "PassConfig", "ConfigError", "vllm_post_grad_pass", "vllm_ascend_fusion_pass"]
