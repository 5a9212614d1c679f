"""`omni-passes inspect`: run the passes on a DeepSeek graph, report, show and check the rewrite.

    omni-passes inspect --model-config tiny --passes redundant_experts --check --json
    omni-passes inspect --model-config config.json --pass-config passes.json --out graphs/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from omni_passes.cli.common import UserError, emit_json, say, setup_logging
from omni_passes.cli.model_args import add_model_arguments, build_from_args, check_tolerance, pass_config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--check", action="store_true", help="run original and rewritten on the same inputs and compare")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.add_argument("--out", metavar="DIR", help="write graphs before/after, the report and SVGs of rewritten blocks")
    parser.add_argument("--backend", choices=["inductor", "torchair"], default="inductor",
                        help="torchair: also write the GE graph torchair builds (needs --out; CANN compiles nothing)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=16)


def main(args: argparse.Namespace) -> int:
    setup_logging()
    try:
        return _run(args)
    except UserError as exc:
        say(f"omni-passes inspect: error: {exc}")
        return 2


def _run(args: argparse.Namespace) -> int:
    import omni_passes
    from omni_passes.config import ConfigError
    from omni_passes.placement.placement import PlacementError

    config = pass_config_from_args(args)
    torchair = _torchair_or_none(args)
    if args.backend == "torchair" and torchair is None:
        return 2
    hf_config, model = build_from_args(args)
    inputs = torch.randint(0, hf_config.vocab_size, (args.batch, args.seq_len),
                           generator=torch.Generator().manual_seed(args.seed)).to(args.device)
    reference = None
    reference_kind = "eager model, same weights and inputs"
    if args.check:
        reference, reference_kind = _reference(model, inputs, config)
    graphs: dict[str, list[str]] = {"before": [], "after": []}
    svgs: list[str] = []
    out_dir = Path(args.out) if args.out else None

    def on_graph(stage, graph, _reports):
        graphs[stage].append(graph.python_code("self").src)
        if stage == "after" and out_dir is not None:
            from omni_passes.render import render_rewrites

            svgs.extend(render_rewrites(graph, out_dir, prefix=f"graph{len(graphs['after']) - 1}_"))

    try:
        if torchair is not None:
            from omni_passes.torchair_backend import compile_for_ge_dump

            compiled = compile_for_ge_dump(model, config, out_dir / "ge", torchair=torchair[0])
        else:
            compiled = omni_passes.compile(model, config)
    except (ConfigError, PlacementError, ValueError) as exc:
        raise UserError(str(exc)) from None
    compiled.omni.manager.on_graph = on_graph
    say(f"compiling {args.model_config} ({hf_config.num_hidden_layers} layers) with passes {list(config.passes)}")
    with torch.no_grad():
        out = compiled(inputs).logits.float()
    result = compiled.omni.report()
    result["model"] = {"config": args.model_config, "layers": hf_config.num_hidden_layers,
                       "moe_layers": list(compiled.omni.info.moe_layer_ids), "experts": compiled.omni.info.num_experts}
    if reference is not None:
        diff = float((out - reference).abs().max())
        tolerance = check_tolerance(getattr(torch, args.dtype))
        result["check"] = {"max_abs_diff": diff, "ok": diff <= tolerance, "tolerance": tolerance,
                           "outputs": {"logits": diff}, "reference": reference_kind}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stage, sources in graphs.items():
            for i, src in enumerate(sources):
                (out_dir / f"graph{i}_{stage}.py").write_text(src)
        if torchair is not None:
            result["ge_graph"] = _ge_summary(out_dir / "ge", torchair[1])
        (out_dir / "report.json").write_text(json.dumps(result, indent=2) + "\n")
        result["files"] = sorted(str(p) for p in out_dir.iterdir())
    if args.json:
        emit_json(result)
    else:
        _print_human(result)
    return 0 if result.get("check", {}).get("ok", True) else 1


def _torchair_or_none(args):
    """(torchair, info) for --backend torchair, None otherwise; says in one line why not."""
    if args.backend != "torchair":
        return None
    if not args.out:
        say("omni-passes inspect: --backend torchair writes the GE graph under --out DIR; give --out")
        return None
    from omni_passes.testing.ascend import AscendSourcesMissing, import_torchair

    try:
        return import_torchair()
    except (AscendSourcesMissing, ImportError) as exc:
        say(f"omni-passes inspect: torchair is not available here, no GE graph written ({exc})")
        return None


def _ge_summary(ge_dir: Path, info) -> dict:
    files = sorted(str(p) for p in ge_dir.glob("*.txt"))
    note = ("GE graph built by torchair's FX-to-GE converters and dumped as text; CANN did not compile it "
            "(debug.run_eagerly" + (", torchair's native module stood in" if info.native == "stand-in" else "") + ")")
    say(f"{note}: {', '.join(files) or 'no file written'}")
    return {"files": files, "compiled_by_cann": False, "torchair": info.path, "torch_npu_version": info.version,
            "native_module": info.native, "note": note}


def _reference(model, inputs, config):
    """The eager logits the rewrite must reproduce. With sparse_attention, the dense model is
    the wrong reference once prompts exceed sink + recent: the reference is then the eager
    model with the sink+recent mask applied on the pattern layers."""
    attn = config.sparse_attention
    with torch.no_grad():
        if "sparse_attention" not in config.passes or not attn.pattern:
            return model(inputs).logits.float(), "eager model, same weights and inputs"
        from omni_passes.kvcache.attention import masked_reference

        try:
            with masked_reference(model, attn.sink, attn.recent, list(attn.pattern)):
                logits = model(inputs).logits.float()
        except ValueError as exc:
            raise UserError(f"{config.source}: {exc}") from None
    return logits, (f"eager model, same weights and inputs, with the sink {attn.sink} + recent {attn.recent} "
                    f"attention mask on layers {list(attn.pattern)}")


def _print_human(result: dict) -> None:
    for name, report in result["passes"].items():
        print(f"pass {name}: matched layers {report['matched_layers']} ({report['rewritten_nodes']} nodes inserted)")
        for skip in report["skipped"]:
            print(f"  skipped layer {skip['layer']}: {skip['reason']}")
    if "check" in result:
        check = result["check"]
        print(f"check: max abs diff {check['max_abs_diff']:.3g} (tolerance {check['tolerance']:g}): "
              f"{'ok' if check['ok'] else 'MISMATCH'}")
    for path in result.get("files", []):
        print(f"wrote {path}")
