"""Dump what vLLM 0.26 CUDA compiles for a tiny DeepSeek-V3, and try the omni MoE op there.

Run on the GPU machine (vLLM's CUDA build importable)::

    python -m omni_passes.testing.vllm_cuda_dump --out DIR [--rewrite none|identity|redundant]

One engine start per call. A post-grad pass that vLLM's ``PostGradPassManager`` runs on every
graph piece and compile range writes:

    DIR/pieces/NNN_<range>.json        every piece it is given (omni_passes.testing.graph_fixture)
    DIR/vllm026_cuda_moe_piece.json    the first piece holding a vLLM MoE node: the fixture of
                                       tests/unit/test_moe_forward_slots_pass.py
    DIR/facts.json                     schemas, layer-name type, piece/range list, MoE nodes seen

With ``--rewrite identity|redundant`` the same pass then applies ``MoeForwardSlots`` with the ops
of ``kernels.vllm_slot_moe`` (redundant: experts 0 and 1 of every MoE layer get a second row).
After start-up, ``op_check`` (in the worker, through ``collective_rpc``) compares one MoE layer
of vLLM with ``vllm_slot_forward`` bit for bit (``DIR/op_check.json``), ``dispatch_check``
compares the Triton dispatch-and-count kernel with the PyTorch path on the GPU and times both,
eagerly and replayed in a CUDA graph (``DIR/dispatch_check.json``), and greedy generation writes
``DIR/tokens_<rewrite>.json`` (and ``DIR/loads_<rewrite>.json`` when rewriting); a run compares
its tokens with ``tokens_none.json`` when that file exists in DIR.

The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: on the GPU machine
vLLM's multiprocess engine core hung before loading the model); ``--hang-dump S`` prints every
thread's stack and exits if the run takes longer than S seconds.

The checkpoint is ``tiny_checkpoint``'s model with the dimensions vLLM 0.26 needs on sm_90 (FA3
MLA prefill takes qk_nope 128 and v 128 only; hidden 256, 4 heads, expert width 128 as the
smoke test that ran there), in bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # FlashInfer is not in the offline bundle
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with a function
os.environ.setdefault("VLLM_DISABLE_COMPILE_CACHE", "1")  # compile every time, so the pass sees every piece
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process (module docstring)

try:
    from vllm.compilation.passes.inductor_pass import InductorPass as _Base
except ImportError:  # importable (for --help) without vLLM
    _Base = object

MOE_OPS = ("vllm::moe_forward_shared.default", "vllm::moe_forward.default")
PROMPTS = ["The quick brown fox jumps over the lazy dog.", "A mixture of experts model sends every token",
           "Numbers: 0 1 2 3 4 5 6 7 8 9 10 16 32 64"]
STATE_KEY = "omni_passes.testing.vllm_cuda_dump"  # stable_handle(STATE_KEY): the graph's state argument


def build_checkpoint(path: Path) -> Path:
    from omni_passes.testing import tiny_checkpoint

    make_config = tiny_checkpoint._config

    def sm90_config(**kwargs):
        config = make_config(**kwargs)
        for key, value in {"hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128, "num_attention_heads": 4,
                           "num_key_value_heads": 4, "qk_nope_head_dim": 128, "v_head_dim": 128}.items():
            setattr(config, key, value)
        config.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim  # derived at construction
        config.head_dim = config.qk_rope_head_dim
        return config

    with mock.patch.object(tiny_checkpoint, "_config", sm90_config):
        return tiny_checkpoint.make_tiny_deepseek_checkpoint(path, dtype="bfloat16")


class DumpPass(_Base):
    """Dumps every piece; with ``rewrite`` set, then swaps vLLM's MoE ops for the omni ones."""

    def __init__(self, out: str, rewrite: str = "none") -> None:
        self.out, self.rewrite, self.count = out, rewrite, 0

    def uuid(self) -> str:
        return f"omni_cuda_dump:{self.rewrite}:{time.time_ns()}"

    def is_applicable_for_range(self, compile_range: Any) -> bool:
        return True

    def __call__(self, graph) -> None:
        from omni_passes.testing.graph_fixture import dump_graph

        try:
            from vllm.compilation.passes.inductor_pass import get_pass_context

            compile_range = str(get_pass_context().compile_range)
        except Exception:  # noqa: BLE001  (best effort: only names the file)
            compile_range = "unknown"
        out = Path(self.out)
        index, self.count = self.count, self.count + 1
        stem = out / "pieces" / f"{index:03d}_{''.join(c if c.isalnum() else '_' for c in compile_range)}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".py").write_text(graph.python_code("self").src)  # readable, whatever happens below
        moe = [n for n in graph.nodes if _is_moe(n)]
        try:  # a graph the fixture format cannot hold must not stop the engine (and the GPU run)
            path = dump_graph(graph, stem.with_suffix(".json"), source=f"vLLM piece {index}, range {compile_range}",
                              compile_range=compile_range)
            if moe and not (out / "vllm026_cuda_moe_piece.json").exists():
                (out / "vllm026_cuda_moe_piece.json").write_text(path.read_text())
        except Exception as exc:  # noqa: BLE001
            stem.with_suffix(".error.txt").write_text(f"{type(exc).__name__}: {exc}\n")
        try:
            self._facts(index, compile_range, graph, moe)
        except Exception as exc:  # noqa: BLE001
            stem.with_suffix(".facts_error.txt").write_text(f"{type(exc).__name__}: {exc}\n")
        if moe and self.rewrite != "none":
            from kernels.vllm_slot_moe import define_slot_ops
            from omni_passes.fx.moe_forward_slots import MoeForwardSlots, SlotMoeOps

            ops = define_slot_ops()
            handle = _install_resolver(self.rewrite)
            report = MoeForwardSlots(SlotMoeOps(ops.shared, ops.plain, handle))(graph)
            self._append(out / "reports.jsonl", {"piece": index, "range": compile_range, **report.as_dict()})

    def _facts(self, index: int, compile_range: str, graph, moe: list) -> None:
        import torch

        from omni_passes.testing.graph_fixture import opaque_value

        facts_path = Path(self.out) / "facts.json"
        facts = json.loads(facts_path.read_text()) if facts_path.exists() else {"pieces": []}
        if "schemas" not in facts:
            from torch._library.infer_schema import infer_schema
            from vllm.model_executor.layers.fused_moe.runner import moe_runner
            from vllm.utils import torch_utils

            facts["schemas"] = {name: str(getattr(torch.ops.vllm, name).default._schema)
                                for name in ("moe_forward_shared", "moe_forward")}
            facts["inferred_schemas"] = {"moe_forward_shared": infer_schema(moe_runner._moe_forward_shared, mutates_args=()),
                                         "moe_forward": infer_schema(moe_runner._moe_forward, mutates_args=["hidden_states"])}
            facts["use_layername"] = bool(getattr(torch_utils, "_USE_LAYERNAME", False))
            facts["torch"] = torch.__version__
        entry = {"index": index, "range": compile_range, "nodes": len(graph.nodes), "moe_nodes": []}
        for node in moe:
            name_arg = node.args[4] if node.args and len(node.args) > 4 else node.kwargs.get("layer_name")
            value = name_arg.meta.get("val") if hasattr(name_arg, "meta") else name_arg
            entry["moe_nodes"].append({"node": node.name, "args": [str(a) for a in node.args],
                                       "kwargs": {k: str(v) for k, v in node.kwargs.items()},
                                       "layer_name_val_type": type(value).__name__,
                                       "layer_name_val": repr(opaque_value(value) or value)})
        facts["pieces"].append(entry)
        facts_path.write_text(json.dumps(facts, indent=1))

    @staticmethod
    def _append(path: Path, entry: dict) -> None:
        with path.open("a") as f:
            f.write(json.dumps(entry) + "\n")


def _is_moe(node) -> bool:
    """A vLLM MoE call, direct or inside ``auto_functionalized[_v2]``."""
    import torch

    from omni_passes.testing.graph_fixture import target_name

    if node.op != "call_function":
        return False
    name = target_name(node.target)
    if name in MOE_OPS:
        return True
    wrapped = node.args[0] if node.args else None
    return name.startswith("higher_order::auto_functionalized") and isinstance(wrapped, torch._ops.OpOverload) \
        and target_name(wrapped) in MOE_OPS


# ---- the worker side: a binding built from vLLM's layers on the first op call -----------------------
def moe_runners(layers: dict[str, Any]) -> dict[int, Any]:
    """Decoder layer -> MoERunner, from vLLM's layer registry (``static_forward_context``, which
    the forward context holds as ``no_compile_layers``)."""
    from omni_passes.layer_names import decoder_layer_index

    runners = {}
    for name, layer in layers.items():
        index = decoder_layer_index(name)
        if index is not None and hasattr(layer, "routed_experts") and hasattr(layer, "router"):
            runners[index] = layer
    return dict(sorted(runners.items()))


def build_state(runners: dict[int, Any], redundant: int, gate: int = 1,
                handle: int | None = None) -> tuple[int, dict[str, int]]:
    """A placement state for ``runners`` (row i = i-th MoE layer): identity tables, or experts
    0..redundant-1 with a second storage row (E + j); vLLM's parameters become views of the rows."""
    import torch

    from kernels.state import add_tensors, register_state

    first = next(iter(runners.values())).routed_experts
    layers, experts, device = len(runners), first.w13_weight.shape[0], first.w13_weight.device
    slots = torch.arange(experts, device=device).view(1, experts, 1).repeat(layers, 1, 2)
    count = torch.ones(layers, experts, dtype=torch.int64, device=device)
    slots[:, :redundant, 1] = torch.arange(experts, experts + redundant, device=device)
    count[:, :redundant] = 2
    handle = register_state({"replica_slots": slots, "replica_count": count,
                             "expert_load": torch.zeros(layers, experts, dtype=torch.int64, device=device),
                             "row_load": torch.zeros(layers, experts + redundant, dtype=torch.int64, device=device),
                             "gate": torch.full((1,), gate, dtype=torch.int64, device=device)}, handle=handle)
    rows = {}
    for row, runner in enumerate(runners.values()):
        if redundant:
            for name in ("w13_weight", "w2_weight"):
                param = getattr(runner.routed_experts, name)
                storage = torch.cat([param.data, param.data[:redundant]])
                param.data = storage[: param.shape[0]]
                add_tensors(handle, {f"rows{row}.{name}": storage})
        rows[runner.layer_name] = row
    return handle, rows


def _install_resolver(mode: str) -> int:
    """The stable handle the rewritten graphs carry; its state is built by a resolver on the first
    op call (inside vLLM's profile run, before CUDA-graph capture), gate closed."""
    from kernels.state import set_resolver, stable_handle
    from kernels.vllm_slot_moe import SlotBinding, register_binding

    handle = stable_handle(f"{STATE_KEY}:{mode}")

    def resolve(asked: int) -> None:
        if asked != handle:
            return
        from vllm.forward_context import get_forward_context

        layers = get_forward_context().no_compile_layers
        _, rows = build_state(moe_runners(layers), 2 if mode == "redundant" else 0, gate=0, handle=handle)
        register_binding(SlotBinding(state=handle, moe_row=rows.get))

    set_resolver(resolve)
    return handle


def op_check(worker) -> dict:
    """In the worker: one MoE layer through vLLM and through ``vllm_slot_forward``, bit for bit."""
    import torch
    from vllm.forward_context import set_forward_context

    from kernels.state import lookup, unregister_state
    from kernels.vllm_slot_moe import SlotBinding, vllm_slot_forward

    runners = moe_runners(worker.vllm_config.compilation_config.static_forward_context)
    layer, runner = next(iter(runners.items()))
    hidden_size = runner.routed_experts.w13_weight.shape[2]
    results = {"layer": layer, "cases": []}
    saved = {n: getattr(runner.routed_experts, n).data for n in ("w13_weight", "w2_weight")}
    with torch.no_grad(), set_forward_context(None, worker.vllm_config):
        for redundant in (0, 2):
            handle, rows = build_state({layer: runner}, redundant)
            for routing in ("router", "reference"):
                binding = SlotBinding(state=handle, moe_row=rows.get, routing=routing)  # no registration: called directly
                for tokens in (1, 4, 33, 300):  # 300 > 256: shared experts off the side stream
                    gen = torch.Generator(device="cuda").manual_seed(tokens)
                    h = torch.randn(tokens, hidden_size, device="cuda", dtype=torch.bfloat16, generator=gen)
                    expected = runner._forward_impl(h, h, h, None)
                    lookup(handle, "expert_load").zero_()
                    row_before = lookup(handle, "row_load")[0].sum()
                    got = vllm_slot_forward(runner, binding, 0, h, h, h, None)
                    loads = lookup(handle, "expert_load")[0]
                    results["cases"].append({
                        "redundant_rows": redundant, "routing": routing, "tokens": tokens,
                        "shared_equal": bool(torch.equal(got[0], expected[0])),
                        "routed_equal": bool(torch.equal(got[1], expected[1])),
                        "routed_max_abs_diff": float((got[1].float() - expected[1].float()).abs().max()),
                        "counted": int(loads.sum()), "expected_count": tokens * runner.router.top_k,
                        "row_load_total": int(lookup(handle, "row_load")[0].sum()) - int(row_before),
                    })
            unregister_state(handle)
            for name, data in saved.items():
                getattr(runner.routed_experts, name).data = data
    return results


DISPATCH_SIZES = (1, 10, 64, 256, 683, 2731, 8192)  # tokens; x6 entries: decode batches up to prefill chunks


def dispatch_check(worker=None, experts: int = 64, top_k: int = 6, slots: int = 72, width: int = 9) -> dict:
    """The Triton dispatch-and-count kernel against the PyTorch path on this GPU: same rows, same
    counts (skewed ids, a padding mask), and the time of one layer call of each, eagerly and
    replayed from a CUDA graph (microseconds). DeepSeek-V2-Lite's shape: 64 experts, top-6,
    8 redundant slots. Runs in the worker or in any CUDA process (``worker`` is unused)."""
    import functools

    import torch

    from kernels.state import register_state, unregister_state
    from kernels.triton_slot_dispatch import slot_dispatch_count
    from kernels.vllm_slot_moe import dispatch_and_count_reference

    gen = torch.Generator(device="cuda").manual_seed(0)
    dev = torch.device("cuda")
    table = torch.randint(0, slots, (1, experts, width), device=dev, generator=gen)
    count = torch.randint(1, width + 1, (1, experts), device=dev, generator=gen)
    hot = torch.softmax(torch.randn(experts, device=dev, generator=gen) * 1.5, 0)  # a skewed router
    results: dict = {"experts": experts, "top_k": top_k, "slots": slots, "cases": []}
    for tokens in DISPATCH_SIZES:
        ids = torch.multinomial(hot.expand(tokens, experts).contiguous(), top_k, generator=gen).to(torch.int32)
        mask = torch.rand(tokens + 3, device=dev, generator=gen) > 0.1
        state = {"replica_slots": table, "replica_count": count,
                 "expert_load": torch.zeros(1, experts, dtype=torch.int64, device=dev),
                 "row_load": torch.zeros(1, slots, dtype=torch.int64, device=dev),
                 "gate": torch.ones(1, dtype=torch.int64, device=dev)}
        handle = register_state(state)
        try:
            expected = dispatch_and_count_reference(handle, 0, ids, mask[:tokens])
            e_load, r_load = torch.zeros(experts, dtype=torch.int64, device=dev), torch.zeros(slots, dtype=torch.int64, device=dev)
            got = slot_dispatch_count(ids, table[0], count[0], e_load, r_load, state["gate"], mask)
            case = {"tokens": tokens, "entries": tokens * top_k, "rows_equal": bool(torch.equal(got, expected)),
                    "expert_load_equal": bool(torch.equal(e_load, state["expert_load"][0])),
                    "row_load_equal": bool(torch.equal(r_load, state["row_load"][0]))}
            triton_call = functools.partial(slot_dispatch_count, ids, table[0], count[0], e_load, r_load, state["gate"], mask)
            torch_call = functools.partial(dispatch_and_count_reference, handle, 0, ids, mask[:tokens])
            for name, call in (("triton", triton_call), ("torch", torch_call)):
                case[f"{name}_eager_us"] = _time_us(call)
                case[f"{name}_graph_us"] = _time_graph_us(call)
            results["cases"].append(case)
        finally:
            unregister_state(handle)
    return results


def _time_us(call, reps: int = 50) -> float:
    import torch

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(reps):
        call()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) * 1e3 / reps


def _time_graph_us(call, calls: int = 26, reps: int = 20) -> float:
    """One call's time inside a CUDA graph of ``calls`` calls (a model's MoE layers), replayed."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # warm-up (compiles the kernel) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            call()
    graph.replay()
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) * 1e3 / reps / calls


def read_loads(worker, mode: str) -> dict:
    from kernels.state import lookup, stable_handle

    handle = stable_handle(f"{STATE_KEY}:{mode}")
    return {"expert_load": lookup(handle, "expert_load").cpu().tolist(),
            "row_load": lookup(handle, "row_load").cpu().tolist()}


def open_gate(worker, mode: str) -> bool:
    from kernels.state import lookup, stable_handle

    lookup(stable_handle(f"{STATE_KEY}:{mode}"), "gate").fill_(1)
    return True


# ---- the driver -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omni_passes.testing.vllm_cuda_dump", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--rewrite", choices=["none", "identity", "redundant"], default="none")
    parser.add_argument("--cudagraph-mode", default=None, help="e.g. FULL_DECODE_ONLY (default: vLLM's)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--skip-check", action="store_true", help="no op_check / dispatch_check")
    parser.add_argument("--capture-sizes", default="1,2,4,8", help="CUDA-graph batch sizes (few: a faster start)")
    parser.add_argument("--hang-dump", type=float, default=0, help="dump every thread's stack and exit after this many s")
    args = parser.parse_args(argv)
    if args.hang_dump:
        import faulthandler

        faulthandler.dump_traceback_later(args.hang_dump, exit=True)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = build_checkpoint(out / "tiny_dsv3_sm90")

    from vllm import LLM, SamplingParams

    compilation = {"inductor_compile_config": {"post_grad_custom_post_pass": DumpPass(str(out), args.rewrite)},
                   "cudagraph_capture_sizes": [int(x) for x in args.capture_sizes.split(",")]}
    if args.cudagraph_mode:
        compilation["cudagraph_mode"] = args.cudagraph_mode
    start = time.time()
    llm = LLM(model=str(model), dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.3, seed=0,
              compilation_config=compilation)
    config = getattr(llm.llm_engine, "vllm_config", None)
    summary: dict[str, Any] = {"rewrite": args.rewrite, "engine_start_s": round(time.time() - start, 1),
                               "cudagraph_mode": str(config.compilation_config.cudagraph_mode) if config else None}
    if not args.skip_check:
        for name, check in (("op_check", op_check), ("dispatch_check", dispatch_check)):
            try:  # each on its own: one failing leaves the other and the generation standing
                found = llm.collective_rpc(check)[0]
            except Exception as exc:  # noqa: BLE001
                import traceback

                found = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
            (out / f"{name}.json").write_text(json.dumps(found, indent=1))
            summary[name] = _check_summary(name, found)
    if args.rewrite != "none":
        llm.collective_rpc(open_gate, args=(args.rewrite,))
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True))
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    summary["prompt_tokens"] = [len(o.prompt_token_ids) for o in outputs]
    (out / f"tokens_{args.rewrite}.json").write_text(json.dumps(tokens))
    if args.rewrite != "none":
        (out / f"loads_{args.rewrite}.json").write_text(json.dumps(llm.collective_rpc(read_loads, args=(args.rewrite,))[0]))
    baseline = out / "tokens_none.json"
    if args.rewrite != "none" and baseline.exists():
        summary["tokens_equal_passes_off"] = json.loads(baseline.read_text()) == tokens
    (out / f"summary_{args.rewrite}.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary), flush=True)
    if args.hang_dump:
        import faulthandler

        faulthandler.cancel_dump_traceback_later()
    return 0


def _check_summary(name: str, found: dict) -> dict:
    """One line's worth of a check: all equal or not, and the cases that differ."""
    if "error" in found:
        return {"ok": False, "error": found["error"]}
    keys = {"op_check": ("shared_equal", "routed_equal"),
            "dispatch_check": ("rows_equal", "expert_load_equal", "row_load_equal")}[name]
    bad = [c for c in found["cases"] if not all(c[k] for k in keys)]
    if name == "op_check":  # the torch reference routing may differ from vLLM's fused top-k on near-ties
        bad = [c for c in bad if c["routing"] == "router"] + [c for c in found["cases"] if c["counted"] != c["expected_count"]]
    entry: dict = {"ok": not bad, "cases": len(found["cases"]), "failing": bad[:6]}
    if name == "dispatch_check":
        entry["us_per_layer_call"] = {c["tokens"]: {k: round(c[k], 2) for k in c if k.endswith("_us")} for c in found["cases"]}
    return entry


if __name__ == "__main__":
    sys.exit(main())
