"""Expert parallelism on GPUs through NCCL: outputs equal transformers' MoE.

World size 1 (one GPU) checks the CUDA path: NCCL all-to-all with itself, bf16
``torch._grouped_mm`` and the float32 fallback under Inductor, in-place placement switches
without recompiling. Only one rank holds every slot there, so the spreading over ranks is checked
at world sizes 2, 4 and 8 where that many GPUs are visible (NCCL, with an online rebalance), and
on CPU with gloo at 2-4 (tests/integration/test_ep_gloo.py).
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

REBALANCE = {"window": 4, "interval": 2, "min_gain": 0.0, "layer_min_gain": 0.0}
SLOTS_PER_RANK = {2: 10, 4: 5, 8: 3}  # 16 experts: 4, 4 and 8 redundant slots


@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-4), ("bfloat16", 3e-2)])
def test_ep_world1_nccl_equals_reference(dtype: str, rtol: float, tmp_path) -> None:
    # One rank: every placement is balanced, so a rebalance has nothing to gain; the in-place
    # switches identity -> (EPLB ->) ours still rewrite slots and tables.
    path, case = build_case(1, 20, tmp_path, "inductor", dtype=dtype, device="cuda")
    reports = run_workers(check_worker, 1, "nccl", (path,))
    assert problems(reports, case, rtol) == []


@pytest.mark.parametrize("world", [2, 4, 8])
def test_ep_multi_gpu_nccl_equals_reference(world: int, tmp_path) -> None:
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs, {torch.cuda.device_count()} visible")
    # Reference in float32 on the CPU; every rank runs float32 on its own GPU.
    path, case = build_case(world, SLOTS_PER_RANK[world], tmp_path, "inductor", rebalance=REBALANCE)
    reports = run_workers(check_worker, world, "nccl", (path,))
    assert problems(reports, case, 1e-4) == []
