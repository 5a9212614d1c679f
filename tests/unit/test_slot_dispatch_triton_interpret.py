"""The one-kernel dispatch and count (kernels.triton_slot_dispatch) run by Triton's CPU interpreter
(TRITON_INTERPRET=1) against the PyTorch reference (``expert_dispatch_reference`` for the rows,
``index_add_`` for the counts): decode and prefill sizes (up to 4,200 entries, several programs),
ties, every entry the same expert, replicas 1..M, padding masks, a closed and a doubled gate, int32
and int64 ids, counters that accumulate.

Runs in a child process (the interpreter is chosen when the kernel is defined). The CUDA run is
omni_passes.testing.vllm_cuda_dump's op check and tests/gpu/vllm/test_slot_moe_cuda.py."""

from __future__ import annotations

import importlib.util
import textwrap

import pytest

from omni_passes.testing.triton_interpret import run_interpreted

_SCRIPT = textwrap.dedent(
    """
    import torch
    from kernels.expert_dispatch import expert_dispatch_reference
    from kernels.triton_slot_dispatch import BLOCK_I, slot_dispatch_count

    def tables(E, M, P, g, replicas=None):
        slots = torch.randint(0, P, (3, E, M), generator=g)
        count = torch.randint(1, M + 1, (3, E), generator=g) if replicas is None else torch.full((3, E), replicas)
        return slots, count

    def expected_counts(size, values, add):
        return torch.zeros(size, dtype=torch.int64).index_add_(0, values.reshape(-1).long(), add)

    g = torch.Generator().manual_seed(0)
    n = 0
    cases = [  # T, K, E, M, P, dtype, masked, gate, ids kind
        (1, 6, 64, 9, 72, torch.int32, False, 1, "random"),       # batch 1, top-6
        (10, 6, 64, 9, 72, torch.int32, True, 1, "random"),       # a padded decode batch
        (64, 6, 64, 4, 72, torch.int32, True, 1, "random"),       # 384 entries: 6 programs
        (3, 4, 16, 5, 20, torch.int64, False, 2, "random"),       # int64 ids, gate 2
        (40, 6, 8, 3, 12, torch.int32, True, 1, "skewed"),        # few experts: many ties
        (50, 4, 16, 3, 20, torch.int32, False, 1, "same"),        # every entry the same expert
        (700, 6, 64, 9, 72, torch.int32, True, 1, "random"),      # a prefill chunk: 4200 entries
        (33, 6, 64, 9, 72, torch.int32, True, 0, "random"),       # gate closed: rows, no counts
    ]
    for T, K, E, M, P, dtype, masked, gate_value, kind in cases:
        layer = n % 3
        slots, count = tables(E, M, P, g, replicas=M if kind == "same" else None)
        if kind == "random":
            ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        elif kind == "skewed":
            ids = torch.randint(0, 3, (T, K), generator=g)
        else:
            ids = torch.full((T, K), 5)
        ids = ids.to(dtype)
        mask = torch.rand(T + 7, generator=g) > 0.3 if masked else None   # longer than T, as vLLM's buffer
        expert_load = torch.randint(0, 9, (3, E), generator=g)              # counters accumulate
        row_load = torch.randint(0, 9, (3, P), generator=g)
        before = expert_load.clone(), row_load.clone()
        gate = torch.tensor([gate_value])
        rows = slot_dispatch_count(ids, slots[layer], count[layer], expert_load[layer], row_load[layer], gate, mask)
        ref = expert_dispatch_reference(ids, slots, count, layer)
        assert rows.dtype == dtype and torch.equal(rows, ref), (T, K, kind)
        add = gate.expand(T * K).clone()
        if masked:
            add = add * mask[:T].long().repeat_interleave(K)
        assert torch.equal(expert_load[layer], before[0][layer] + expected_counts(E, ids, add)), (T, K, kind)
        assert torch.equal(row_load[layer], before[1][layer] + expected_counts(P, ref, add)), (T, K, kind)
        others = [i for i in range(3) if i != layer]
        assert torch.equal(expert_load[others], before[0][others]) and torch.equal(row_load[others], before[1][others])
        if kind == "same":  # the j-th occurrence takes replica j mod count: round robin over the replicas
            assert torch.equal(rows.flatten().long(), slots[layer, 5][torch.arange(T * K) % M])
        n += 1
    assert 700 * 6 > 60 * BLOCK_I  # the prefill case spans many programs

    # an empty batch: nothing launched, nothing counted
    load = torch.zeros(E, dtype=torch.int64)
    out = slot_dispatch_count(torch.zeros(0, 6, dtype=torch.int32), slots[0], count[0], load,
                              torch.zeros(P, dtype=torch.int64), torch.ones(1, dtype=torch.int64))
    assert out.shape == (0, 6) and load.sum() == 0
    print("ok", n)
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_slot_dispatch_kernel_in_interpreter_mode():
    assert run_interpreted(_SCRIPT).strip() == "ok 8"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_bad_tables_are_refused_naming_the_argument():
    import torch

    from kernels.triton_slot_dispatch import slot_dispatch_count

    ids = torch.zeros(2, 3, dtype=torch.int32)
    slots, count = torch.zeros(4, 2, dtype=torch.int64), torch.ones(4, dtype=torch.int64)
    load, rows, gate = torch.zeros(4, dtype=torch.int64), torch.zeros(5, dtype=torch.int64), torch.ones(1, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"ids must be \[T, K\]"):
        slot_dispatch_count(ids.flatten(), slots, count, load, rows, gate)
    with pytest.raises(ValueError, match=r"replica_count must have shape \(4,\)"):
        slot_dispatch_count(ids, slots, count[:3], load, rows, gate)
    with pytest.raises(ValueError, match="expert_load must be a contiguous int64 tensor"):
        slot_dispatch_count(ids, slots, count, load.int(), rows, gate)
    with pytest.raises(ValueError, match="token_mask has 1 rows for 2 tokens"):
        slot_dispatch_count(ids, slots, count, load, rows, gate, torch.ones(1, dtype=torch.bool))
