"""Custom ops that the omni passes insert (namespace ``omni``).

Each op has a torch.library definition, a fake (meta) kernel for tracing, and a PyTorch
reference that runs on CPU and CUDA. Inductor lowerings (``kernels.inductor_lowerings``),
Triton kernels for CUDA and torchair GE converters live beside them and are imported
lazily. Importing this package registers the ops.
"""

from kernels import expert_dispatch, expert_load  # noqa: F401  (registers omni::*)
from kernels import latent_attention, slot_fused_moe, sparse_attention  # noqa: F401
