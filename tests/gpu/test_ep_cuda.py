"""Expert parallelism at world size 1 on the GPU, through NCCL: equals transformers' MoE.

One rank holds every slot, so this checks the CUDA path (NCCL all-to-all with itself, bf16
``torch._grouped_mm`` and the float32 fallback under Inductor, in-place placement switches without
recompiling), not the spreading over GPUs (tests/integration/test_ep_gloo.py
checks that at world size 2-4 on CPU).
"""

from __future__ import annotations

import pytest
import torch

from omni_passes.ep.checks import build_case, check_worker, problems
from omni_passes.ep.launch import run_workers

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-4), ("bfloat16", 3e-2)])
def test_ep_world1_nccl_equals_reference(dtype: str, rtol: float, tmp_path) -> None:
    # One rank: every placement is balanced, so a rebalance has nothing to gain; the in-place
    # switches identity -> (EPLB ->) ours still rewrite slots and tables.
    path, case = build_case(1, 20, tmp_path, "inductor", dtype=dtype, device="cuda")
    reports = run_workers(check_worker, 1, "nccl", (path,))
    assert problems(reports, case, rtol) == []
