"""`omni::vllm_slot_moe_forward_shared` / `omni::vllm_slot_moe_forward`: vLLM's MoE on storage rows.

On vLLM's CUDA build each MoE layer is one opaque op, ``vllm.moe_forward_shared(hidden_states,
router_logits, shared_experts_input, input_ids, layer_name, hidden_dim_unpadded) -> (shared,
routed)`` (``vllm.moe_forward`` without shared experts). The graph pass
``omni_passes.fx.moe_forward_slots`` swaps it for these ops, which take the same arguments plus
``state`` (the host's ``kernels.state`` handle: a stable handle, the same in every process for one
configuration) and, per call:

1. find the layer's ``MoERunner`` from ``layer_name``, as vLLM's op does (vLLM compiles one
   artifact for all isomorphic graph pieces and runs it for every layer, so the layer is an
   argument, never a constant of the graph);
2. run vLLM's own steps of ``MoERunner._forward_impl`` for one GPU: sync the shared-experts
   stream, the gate, the shared experts (before or overlapped, as vLLM decides), the routing;
3. count the logical ids into ``expert_load[row]``, map them to storage rows
   (``omni::expert_dispatch``'s rule) and count those into ``row_load[row]`` (times ``gate``,
   padding rows of a CUDA-graph batch left out): one Triton kernel on CUDA
   (``kernels.triton_slot_dispatch``), PyTorch elsewhere and for long prefill chunks;
4. run the layer's fused-experts kernel (``quant_method.moe_kernel.apply``, Triton on an H100
   for bf16) on the ``[E + R, ...]`` rows the host registered (``rows{row}.w13_weight`` /
   ``rows{row}.w2_weight`` in the state; without them, on vLLM's own ``[E, ...]`` parameters),
   with the kernel tile configuration vLLM picks for E experts, so a token's expert output has
   the same bits whichever row serves it;
5. return ``(shared, routed)`` like vLLM's op; the graph after the node is unchanged (the
   routed scaling factor is applied there, by the runner's code, as before).

Everything per call is tensor-side (tables and counters are persistent tensors read on the
device, counts multiplied by ``gate``), so a CUDA graph replay counts and dispatches like an
eager call and reads placements applied in place. No step hooks run here: under CUDA graphs
this Python runs only while capturing.

Routing: ``"router"`` calls the layer's own vLLM router (bit-identical ids and weights to
passes-off, including the fused CUDA grouped-top-k kernel); ``"reference"`` runs
``kernels.vllm_moe_routing`` (vLLM's Python path; see there for where the two differ).

Nothing here bakes process state into a graph: the ops' arguments are vLLM's plus an int that
names the configuration, so a compiled artifact loaded by another process (vLLM's compile cache)
finds that process's state: the first lookup of an unknown handle calls the resolver the host
installed (``kernels.state.set_resolver``), which builds the runtime and registers both the state
tensors and this module's ``SlotBinding`` for the handle. The schemas must be defined before such
an artifact loads (``define_slot_ops``; the layer-name type is vLLM's ``LayerName`` opaque type on
torch >= 2.11).

``reference_slot_moe`` is the same dispatch on plain tensors with a pure-torch expert MLP, for
CPU tests of routing, dispatch and counting.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from kernels.expert_dispatch import expert_dispatch_reference
from kernels.state import has_tensor, lookup
from kernels.vllm_moe_routing import RouterSpec, grouped_topk

Routing = Literal["router", "reference"]
NAMES = {"shared": "vllm_slot_moe_forward_shared", "plain": "vllm_slot_moe_forward"}

_lock = threading.Lock()
_defined: dict[tuple[str, str], SlotOps] = {}
_libraries: dict[str, torch.library.Library] = {}


# ---- bindings: the host side, reached through the state handle ---------------------------------
@dataclass
class SlotBinding:
    """What the ops need from a host's placement runtime besides its tensors.

    Attributes:
        state: the ``kernels.state`` handle of ``replica_slots``, ``replica_count``,
            ``expert_load``, ``row_load``, ``gate`` and, for layers with redundant rows,
            ``rows{row}.w13_weight`` / ``rows{row}.w2_weight`` (``[E + R, ...]``; vLLM's
            parameters view their first E).
        moe_row: vLLM layer name (``model.layers.N.mlp.experts``) -> MoE row of the tables; None
            runs vLLM's own path for that layer (not placed).
        routing: ``"router"`` or ``"reference"`` (module docstring).
        token_mask: optional ``() -> [T] bool`` (True for real tokens) so counts skip the padding
            rows of a CUDA-graph batch; it must return a persistent tensor (read at replay).
    """

    state: int
    moe_row: Callable[[str], int | None]
    routing: Routing = "router"
    token_mask: Callable[[], torch.Tensor | None] | None = None
    checked: set = field(default_factory=set)


_bindings: dict[int, SlotBinding] = {}


def register_binding(binding: SlotBinding) -> None:
    """Bind the ops called with ``state=binding.state`` to ``binding`` (the host registers the
    state tensors under the same handle)."""
    with _lock:
        _bindings[binding.state] = binding


def unregister_binding(state: int) -> None:
    with _lock:
        _bindings.pop(state, None)


def binding_for(state: int) -> SlotBinding:
    """The binding of ``state``. An unknown handle is first looked up in ``kernels.state``, which
    calls the host's resolver (a graph from a compile cache: the host builds its runtime there,
    inside the first forward, and registers the binding too)."""
    bound = _bindings.get(state)
    if bound is None:
        lookup(state, "gate")  # resolves the state, or raises naming the handle
        bound = _bindings.get(state)
    if bound is None:
        raise LookupError(f"omni::vllm_slot_moe: state {state} is registered but has no SlotBinding "
                          "(the host must call kernels.vllm_slot_moe.register_binding)")
    return bound


# ---- the pure-torch reference -------------------------------------------------------------------
def count_into(counter: torch.Tensor, values: torch.Tensor, gate: torch.Tensor,
               token_mask: torch.Tensor | None = None) -> None:
    """``counter[v] += gate`` for every entry of ``values [T, K]`` whose token is real, in place."""
    flat = values.reshape(-1).long()
    add = gate.expand(flat.numel())
    if token_mask is not None:
        add = add * token_mask.to(add.dtype).repeat_interleave(values.shape[-1])
    counter.index_add_(0, flat, add)


def dispatch_and_count(state: int, row: int, ids: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logical ids ``[T, K]`` -> storage rows (same shape and dtype), counting both into MoE
    row ``row`` of the state's ``expert_load`` / ``row_load``.

    On CUDA, up to ``PAIRWISE_LIMIT`` entries, one Triton kernel does all of it
    (``kernels.triton_slot_dispatch``: one launch per layer and step inside a CUDA graph);
    elsewhere, and for longer prefill chunks, ``dispatch_and_count_reference``."""
    if ids.is_cuda and ids.dim() == 2 and 0 < ids.numel() <= _pairwise_limit():
        from kernels.triton_slot_dispatch import slot_dispatch_count

        return slot_dispatch_count(ids, lookup(state, "replica_slots")[row], lookup(state, "replica_count")[row],
                                   lookup(state, "expert_load")[row], lookup(state, "row_load")[row],
                                   lookup(state, "gate"), token_mask)
    return dispatch_and_count_reference(state, row, ids, token_mask)


def dispatch_and_count_reference(state: int, row: int, ids: torch.Tensor,
                                 token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``dispatch_and_count`` in PyTorch, any device and size: the reference of the Triton kernel."""
    gate = lookup(state, "gate")
    count_into(lookup(state, "expert_load")[row], ids, gate, token_mask)
    rows = expert_dispatch_reference(ids, lookup(state, "replica_slots"), lookup(state, "replica_count"), row)
    count_into(lookup(state, "row_load")[row], rows, gate, token_mask)
    return rows


def _pairwise_limit() -> int:
    from kernels.triton_slot_dispatch import PAIRWISE_LIMIT

    return PAIRWISE_LIMIT


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """vLLM's gated activation: ``silu(x[..., :d]) * x[..., d:]`` (w13 holds gate then up)."""
    d = x.shape[-1] // 2
    return torch.nn.functional.silu(x[..., :d]) * x[..., d:]


def reference_experts(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                      rows: torch.Tensor) -> torch.Tensor:
    """``sum_k weights[t, k] * w2[r] @ silu_and_mul(w13[r] @ hidden[t])`` with ``r = rows[t, k]``.

    Args: hidden ``[T, H]``; w13 ``[P, 2I, H]``; w2 ``[P, H, I]``; weights ``[T, K]``; rows
    ``[T, K]`` in ``[0, P)``. Returns ``[T, H]`` in hidden's dtype, accumulated in fp32 over the
    K columns in order, so a token's result does not depend on which row holds its experts.
    """
    up = torch.einsum("th,tkoh->tko", hidden.float(), w13[rows.long()].float())
    down = torch.einsum("tki,tkhi->tkh", silu_and_mul(up), w2[rows.long()].float())
    out = torch.zeros_like(down[:, 0])
    for k in range(rows.shape[1]):
        out = out + weights[:, k:k + 1].float() * down[:, k]
    return out.to(hidden.dtype)


def reference_slot_moe(hidden: torch.Tensor, logits: torch.Tensor, spec: RouterSpec, bias: torch.Tensor | None,
                       w13_rows: torch.Tensor, w2_rows: torch.Tensor, state: int, row: int,
                       token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The routed part of the op on plain tensors: route, count, dispatch to rows, experts.
    Returns the routed output ``[T, H]`` before the runner's output scale."""
    weights, ids = grouped_topk(logits, spec, bias)
    rows = dispatch_and_count(state, row, ids, token_mask)
    return reference_experts(hidden, w13_rows, w2_rows, weights, rows)


# ---- the vLLM path ------------------------------------------------------------------------------
def vllm_runner(layer_name: Any) -> Any:
    """The ``MoERunner`` of ``layer_name`` from vLLM's forward context (vLLM's own lookup)."""
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import (
        _resolve_layer_name,
        get_layer_from_name,
    )

    return get_layer_from_name(_resolve_layer_name(layer_name))


def unsupported_reason(runner: Any) -> str | None:
    """Why this op cannot run ``runner`` (None: it can). One GPU, unquantized modular kernel."""
    experts = runner.routed_experts
    method = experts.quant_method
    if getattr(method, "is_monolithic", True) or getattr(method, "moe_kernel", None) is None:
        return f"{type(method).__name__} is not a modular fused-MoE kernel"
    if type(method).__name__ != "UnquantizedFusedMoEMethod":
        return f"{type(method).__name__}: only unquantized experts are placed on rows"
    config = experts.moe_config
    if getattr(config, "has_bias", False):
        return "expert biases (w13_bias/w2_bias) are not extended to rows"
    if experts.expert_map is not None or runner.do_naive_dispatch_combine or getattr(config, "pcp_size", 1) > 1:
        return "expert/data/context parallelism: the op covers one device"
    if getattr(runner, "_fse_fuse_gate", False):
        return "a fused router + shared-expert gate"
    if runner.router.eplb_state is not None:
        return "vLLM's own EPLB is enabled on this layer"
    if type(runner.router).__name__ == "ZeroExpertRouter":
        return "zero-expert routing"
    if getattr(runner, "routed_input_transform", None) is not None or getattr(runner, "routed_output_transform", None) is not None:
        return "latent MoE transforms"
    return None


def route(runner: Any, binding: SlotBinding, hidden: torch.Tensor, logits: torch.Tensor,
          input_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(topk_weights, topk_ids)`` of logical experts for this layer."""
    if binding.routing == "router":
        dtype = runner.routed_experts.quant_method.topk_indices_dtype
        return runner.router.select_experts(hidden_states=hidden, router_logits=logits, topk_indices_dtype=dtype,
                                            input_ids=input_ids)
    spec = RouterSpec.from_vllm_runner(runner)
    return grouped_topk(logits, spec, runner.router.e_score_correction_bias)


def _expert_rows(state: int, row: int, experts: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if has_tensor(state, f"rows{row}.w13_weight"):
        w13, w2 = lookup(state, f"rows{row}.w13_weight"), lookup(state, f"rows{row}.w2_weight")
        if experts.w13_weight.data_ptr() != w13.data_ptr() or experts.w2_weight.data_ptr() != w2.data_ptr():
            raise RuntimeError(f"omni::vllm_slot_moe: {experts.layer_name}'s expert parameters are no longer views "
                               "of its storage rows (replaced after the rows were built?); the rows would be stale")
        return w13, w2
    return experts.w13_weight, experts.w2_weight


def _kernel_config(kernel: Any, hidden: torch.Tensor, experts: Any, top_k: int) -> dict | None:
    """The Triton tile configuration vLLM would pick for the layer's own E experts (its tuned
    table is keyed by E, so E + R rows could pick another tile and change the bits)."""
    fused = kernel.fused_experts
    if type(fused).__name__ != "TritonExperts":
        return None
    from vllm.model_executor.layers.fused_moe.fused_moe import (
        try_get_optimal_moe_config,
    )

    return try_get_optimal_moe_config(tuple(experts.w13_weight.shape), tuple(experts.w2_weight.shape), top_k,
                                      fused.quant_config.config_name(hidden.dtype), hidden.shape[0],
                                      block_shape=fused.block_shape)


def vllm_slot_forward(runner: Any, binding: SlotBinding, row: int, hidden: torch.Tensor, logits: torch.Tensor,
                      shared_input: torch.Tensor | None, input_ids: torch.Tensor | None
                      ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``MoERunner._forward_impl`` for one GPU, with the experts on the layer's storage rows."""
    from vllm.model_executor.layers.fused_moe import override_config
    from vllm.model_executor.layers.fused_moe.runner.shared_experts import (
        SharedExpertsOrder,
    )

    if id(runner) not in binding.checked:
        reason = unsupported_reason(runner)
        if reason:
            raise RuntimeError(f"omni::vllm_slot_moe: cannot place the experts of {runner.layer_name}: {reason}")
        binding.checked.add(id(runner))
    experts = runner.routed_experts
    method = experts.quant_method
    experts._ensure_moe_quant_config_init()
    runner._maybe_sync_shared_experts_stream(shared_input)
    if runner.gate is not None:
        logits, _ = runner.gate(hidden)
    runner._maybe_apply_shared_experts(shared_input, SharedExpertsOrder.NO_OVERLAP)
    weights, ids = route(runner, binding, hidden, logits, input_ids)
    mask = binding.token_mask() if binding.token_mask is not None else None
    mask = mask[: ids.shape[0]] if mask is not None else None
    rows = dispatch_and_count(binding.state, row, ids, mask)
    w13, w2 = _expert_rows(binding.state, row, experts)
    pinned = _kernel_config(method.moe_kernel, hidden, experts, ids.shape[-1]) if w13.shape[0] != experts.w13_weight.shape[0] else None
    with override_config(pinned) if pinned is not None else contextlib.nullcontext():
        routed = method.moe_kernel.apply(
            hidden_states=hidden, w1=w13, w2=w2, topk_weights=weights, topk_ids=rows, activation=experts.activation,
            global_num_experts=w13.shape[0], expert_map=None,
            apply_router_weight_on_input=experts.apply_router_weight_on_input,
            shared_experts=runner.shared_experts, shared_experts_input=shared_input,
        )
    runner._maybe_apply_shared_experts(shared_input, SharedExpertsOrder.MULTI_STREAM_OVERLAPPED)
    shared = runner.shared_experts.output if runner.shared_experts is not None else None
    return shared, routed


def _forward(hidden_states, router_logits, shared_experts_input, input_ids, layer_name, state):
    runner = vllm_runner(layer_name)
    bound = binding_for(state)
    row = bound.moe_row(runner.layer_name)
    if row is None:  # not placed: vLLM's own path, unchanged
        result = runner._forward_impl(hidden_states, router_logits, shared_experts_input, input_ids)
        return result if isinstance(result, tuple) else (None, result)
    return vllm_slot_forward(runner, bound, row, hidden_states, router_logits, shared_experts_input, input_ids)


def _forward_shared_impl(hidden_states, router_logits, shared_experts_input, input_ids, layer_name,
                         hidden_dim_unpadded, state):
    return _forward(hidden_states, router_logits, shared_experts_input, input_ids, layer_name, state)


def _forward_plain_impl(hidden_states, router_logits, shared_experts_input, input_ids, layer_name,
                        hidden_dim_unpadded, state):
    return _forward(hidden_states, router_logits, shared_experts_input, input_ids, layer_name, state)[1]


def _forward_shared_fake(hidden_states, router_logits, shared_experts_input, input_ids, layer_name,
                         hidden_dim_unpadded, state):
    routed = (hidden_states.new_empty((*hidden_states.shape[:-1], hidden_dim_unpadded)) if hidden_dim_unpadded > 0
              else torch.empty_like(hidden_states))
    shared = torch.empty_like(shared_experts_input if shared_experts_input is not None else hidden_states)
    return shared, routed


def _forward_plain_fake(hidden_states, router_logits, shared_experts_input, input_ids, layer_name,
                        hidden_dim_unpadded, state):
    return _forward_shared_fake(hidden_states, router_logits, shared_experts_input, input_ids, layer_name,
                                hidden_dim_unpadded, state)[1]


# ---- definitions --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SlotOps:
    """The two op overloads (``torch.ops.<namespace>.vllm_slot_moe_forward[_shared].default``)."""

    shared: Any
    plain: Any


def slot_schemas(layer_name_type: str) -> dict[str, str]:
    """vLLM 0.26's ``moe_forward_shared`` / ``moe_forward`` schemas plus ``int state``."""
    rest = (f"Tensor router_logits, Tensor? shared_experts_input, Tensor? input_ids, {layer_name_type} layer_name, "
            "SymInt hidden_dim_unpadded, int state")
    return {"shared": f"{NAMES['shared']}(Tensor hidden_states, {rest}) -> (Tensor, Tensor)",
            "plain": f"{NAMES['plain']}(Tensor(a0!) hidden_states, {rest}) -> Tensor"}


def vllm_layer_name_type() -> str:
    """The schema type of vLLM's ``layer_name`` argument in this process: its ``LayerName`` opaque
    type (torch >= 2.11 and ``VLLM_USE_LAYERNAME`` on) or ``str``."""
    from vllm.utils import torch_utils

    if not getattr(torch_utils, "_USE_LAYERNAME", False):
        return "str"
    from torch._library.opaque_object import get_opaque_type_name

    return get_opaque_type_name(torch_utils.LayerName)


def define_slot_ops(layer_name_type: str | None = None, namespace: str = "omni") -> SlotOps:
    """Define the two ops once per process (idempotent). ``layer_name_type`` defaults to vLLM's
    (``vllm_layer_name_type``, which imports vLLM); tests pass a stand-in type and namespace."""
    kind = layer_name_type or vllm_layer_name_type()
    key = (namespace, kind)
    with _lock:
        if key in _defined:
            return _defined[key]
        if any(ns == namespace for ns, _ in _defined):
            raise RuntimeError(f"omni::vllm_slot_moe ops already defined in namespace {namespace!r} with another "
                               f"layer-name type; asked for {kind!r}")
        library = _libraries.setdefault(namespace, torch.library.Library(namespace, "FRAGMENT"))
        impls = {"shared": (_forward_shared_impl, _forward_shared_fake), "plain": (_forward_plain_impl, _forward_plain_fake)}
        for variant, schema in slot_schemas(kind).items():
            library.define(schema, tags=(torch.Tag.needs_fixed_stride_order,))
            impl, fake = impls[variant]
            library.impl(NAMES[variant], impl, "CompositeExplicitAutograd")
            library._register_fake(NAMES[variant], fake)
        packet = getattr(torch.ops, namespace)
        ops = SlotOps(shared=getattr(packet, NAMES["shared"]).default, plain=getattr(packet, NAMES["plain"]).default)
        _defined[key] = ops
        return ops
