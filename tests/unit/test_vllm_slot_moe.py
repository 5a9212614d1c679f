"""kernels.vllm_slot_moe on CPU: bindings, the fake kernels, and the pure-torch dispatch path.

The vLLM path (``vllm_slot_forward``) needs vLLM's CUDA build; here the same routing, dispatch
and counting run through ``reference_slot_moe`` on plain tensors.
"""

from __future__ import annotations

import pytest
import torch

from kernels.state import register_state, unregister_state
from kernels.vllm_moe_routing import RouterSpec, grouped_topk
from kernels.vllm_slot_moe import (
    SlotBinding,
    binding_for,
    count_into,
    define_slot_ops,
    dispatch_and_count,
    reference_experts,
    reference_slot_moe,
    register_binding,
    unregister_binding,
)
from omni_passes.testing.graph_fixture import FixtureOpaque, _opaque_type_name

E, H, I, K, T = 4, 8, 6, 2, 40
SPEC = RouterSpec(top_k=K, num_expert_group=2, topk_group=1, scoring_func="sigmoid", output_scale=2.5)


def tables(replicas: dict[int, list[int]], rows: int, layers: int = 2):
    """replica_slots [L, E, M] / replica_count [L, E] for every layer from {expert: [rows]}."""
    width = max(len(r) for r in replicas.values())
    slots = torch.tensor([[r + [r[0]] * (width - len(r)) for _, r in sorted(replicas.items())]] * layers)
    count = torch.tensor([[len(r) for _, r in sorted(replicas.items())]] * layers)
    return slots, count


IDENTITY = {e: [e] for e in range(E)}
REDUNDANT = {0: [0], 1: [1, 4], 2: [2], 3: [3, 5]}  # experts 1 and 3 have a second row


@pytest.fixture
def state():
    handles = []

    def make(replicas, rows):
        slots, count = tables(replicas, rows)
        handle = register_state({"replica_slots": slots, "replica_count": count,
                                 "expert_load": torch.zeros(2, E, dtype=torch.int64),
                                 "row_load": torch.zeros(2, rows, dtype=torch.int64),
                                 "gate": torch.ones(1, dtype=torch.int64)})
        handles.append(handle)
        return handle

    yield make
    for handle in handles:
        unregister_state(handle)


def weights(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w13, w2 = torch.randn(E, 2 * I, H, generator=gen), torch.randn(E, H, I, generator=gen)
    hidden, gate_w = torch.randn(T, H, generator=gen), torch.randn(E, H, generator=gen)
    bias = torch.randn(E, generator=gen) * 0.1
    return w13, w2, hidden, hidden @ gate_w.T, bias


def rows_of(w: torch.Tensor, replicas: dict[int, list[int]], rows: int) -> torch.Tensor:
    out = torch.empty(rows, *w.shape[1:], dtype=w.dtype)
    for expert, where in replicas.items():
        out[where] = w[expert]
    return out


def test_dispatch_follows_the_occurrence_rule_and_counts_both_ways(state):
    from kernels.state import lookup

    handle = state(REDUNDANT, 6)
    ids = torch.tensor([[1, 3], [1, 0], [3, 1], [2, 3]], dtype=torch.int32)
    rows = dispatch_and_count(handle, 1, ids)
    # j-th occurrence of expert e (token order) takes replica j mod count[e]
    assert rows.dtype == torch.int32 and rows.tolist() == [[1, 3], [4, 0], [5, 1], [2, 3]]
    assert lookup(handle, "expert_load")[1].tolist() == [1, 3, 1, 3]
    assert lookup(handle, "row_load")[1].tolist() == [1, 2, 1, 2, 1, 1]
    assert lookup(handle, "expert_load")[0].sum() == 0  # other layers untouched


def test_gate_and_token_mask_decide_what_is_counted(state):
    from kernels.state import lookup

    handle = state(REDUNDANT, 6)
    ids = torch.tensor([[1, 3], [1, 0], [3, 1], [2, 3]])
    lookup(handle, "gate").zero_()
    dispatch_and_count(handle, 0, ids)
    assert lookup(handle, "expert_load").sum() == 0 and lookup(handle, "row_load").sum() == 0
    lookup(handle, "gate").fill_(1)
    real = torch.tensor([True, True, False, False])  # two padding rows of a CUDA-graph batch
    rows = dispatch_and_count(handle, 0, ids, real)
    assert lookup(handle, "expert_load")[0].tolist() == [1, 2, 0, 1]
    assert lookup(handle, "row_load")[0].tolist() == [1, 1, 0, 1, 1, 0]
    assert rows.tolist() == [[1, 3], [4, 0], [5, 1], [2, 3]]  # padding is still dispatched (its output is unused)
    counter = torch.zeros(3, dtype=torch.int64)
    count_into(counter, torch.tensor([[0, 2], [2, 2]]), torch.tensor([3]))
    assert counter.tolist() == [3, 0, 9]


def test_redundant_rows_give_the_identity_output_bit_for_bit(state):
    w13, w2, hidden, logits, bias = weights()
    identity = reference_slot_moe(hidden, logits, SPEC, bias, w13, w2, state(IDENTITY, E), 0)
    handle = state(REDUNDANT, 6)
    redundant = reference_slot_moe(hidden, logits, SPEC, bias, rows_of(w13, REDUNDANT, 6), rows_of(w2, REDUNDANT, 6),
                                   handle, 0)
    assert torch.equal(identity, redundant)
    from kernels.state import lookup

    ids = grouped_topk(logits, SPEC, bias)[1].long()
    assert torch.equal(lookup(handle, "expert_load")[0], torch.bincount(ids.flatten(), minlength=E))
    row_load = lookup(handle, "row_load")[0]
    for expert, where in REDUNDANT.items():  # row loads add up to the logical load, split within one token
        assert row_load[where].sum() == lookup(handle, "expert_load")[0, expert]
        assert row_load[where].max() - row_load[where].min() <= 1


def test_reference_experts_equal_a_direct_moe_computation():
    w13, w2, hidden, logits, bias = weights(1)
    routing, ids = grouped_topk(logits, SPEC, bias)
    out = reference_experts(hidden, w13, w2, routing, ids)
    expected = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            e = int(ids[t, k])
            gate, up = (w13[e].double() @ hidden[t].double()).split(I)
            expected[t] += routing[t, k].double() * (w2[e].double() @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_bindings_come_from_the_hosts_resolver_on_the_first_call():
    from kernels import state as states

    handle = states.stable_handle("test_vllm_slot_moe:binding")
    calls = []

    def resolve(asked: int) -> None:  # what a host does for a graph loaded from a compile cache
        calls.append(asked)
        if asked == handle:
            states.register_state({"gate": torch.ones(1, dtype=torch.int64)}, handle=handle)
            register_binding(SlotBinding(state=handle, moe_row=lambda name: None))

    states.set_resolver(resolve)
    try:
        first = binding_for(handle)
        assert binding_for(handle) is first and first.state == handle and calls == [handle]
        with pytest.raises(LookupError, match="no host here can build that state"):
            binding_for(handle + 1)
        states.register_state({"gate": torch.ones(1)}, handle=handle + 2)
        with pytest.raises(LookupError, match="has no SlotBinding"):
            binding_for(handle + 2)
    finally:
        states.set_resolver(None)
        for h in (handle, handle + 2):
            unregister_binding(h)
            states.unregister_state(h)


def test_fake_kernels_give_vllms_output_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = define_slot_ops(layer_name_type=_opaque_type_name(), namespace="omni_test_slots")
    assert define_slot_ops(layer_name_type=_opaque_type_name(), namespace="omni_test_slots") is ops  # idempotent
    name = FixtureOpaque("model.layers.1.mlp.experts", "vllm.utils.torch_utils.LayerName")
    with FakeTensorMode():
        hidden = torch.empty(5, 16, dtype=torch.bfloat16)
        shared, routed = ops.shared(hidden, hidden, hidden, None, name, 0, 7)
        padded = ops.shared(hidden, hidden, None, None, name, 24, 7)[1]
    assert shared.shape == routed.shape == (5, 16) and routed.dtype == torch.bfloat16
    assert padded.shape == (5, 24)
    assert "needs_fixed_stride_order" in {str(t).split(".")[-1] for t in ops.shared.tags}
    with pytest.raises(RuntimeError, match="already defined in namespace 'omni_test_slots'"):
        define_slot_ops(layer_name_type="str", namespace="omni_test_slots")
