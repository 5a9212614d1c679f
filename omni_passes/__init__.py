"""omni_passes: OmniInfer's model-side optimisations as torch.fx compiler passes.

- ``omni_passes.compile(model, config)``: torch.compile with the passes (Inductor; torchair).
- ``omni_passes.vllm_post_grad_pass``: the same passes inside vLLM, enabled with
  ``--compilation-config '{"inductor_passes": {"post_grad_custom_post_pass":
  "omni_passes.vllm_post_grad_pass"}}'`` and ``OMNI_PASSES_CONFIG=/path/to/config.json``.
"""

from omni_passes.compiler import compile  # noqa: F401,A004
from omni_passes.config import ConfigError, PassConfig  # noqa: F401

__all__ = ["compile", "PassConfig", "ConfigError"]
