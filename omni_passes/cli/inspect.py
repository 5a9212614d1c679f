"""`omni-passes inspect`: run the passes on a MoE model's graph, report, show and check the rewrite.

    omni-passes inspect --model-config tiny --passes redundant_experts --check --json
    omni-passes inspect --model-config tiny-qwen3-moe --placement p.json --check --out graphs/
    omni-passes inspect --model-config config.json --pass-config passes.json --out graphs/

Any transformers MoE causal-LM config.json works (random weights); the tiny names are listed
in ``omni_passes.models.TINY_CONFIGS``. ``--check`` follows ``omni_passes.numerics``: the
rewritten compiled graph against the same compile without the passes (the pass's own error)
and that against eager (compile noise).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from omni_passes.cli.common import UserError, emit_json, say, setup_logging
from omni_passes.cli.model_args import add_model_arguments, build_from_args, pass_config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--check", action="store_true",
                        help="compare the rewrite with the same compile without the passes, and that with eager")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.add_argument("--out", metavar="DIR", help="write graphs before/after, the report and pictures of rewritten blocks")
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

    for name in ("batch", "seq_len"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    config = pass_config_from_args(args)
    torchair = _torchair_or_none(args)
    if args.backend == "torchair" and torchair is None:
        return 2
    hf_config, model = build_from_args(args)
    config, refused_attention = _refuse_unsafe(config, model)
    inputs = torch.randint(0, hf_config.vocab_size, (args.batch, args.seq_len),
                           generator=torch.Generator().manual_seed(args.seed)).to(args.device)
    references = _references(model, inputs, config) if args.check else None
    graphs: dict[str, list[str]] = {"before": [], "after": []}
    out_dir = Path(args.out) if args.out else None
    pictures: list[str] = []

    def on_graph(stage, graph, _reports):
        graphs[stage].append(graph.python_code("self").src)
        if stage == "after" and out_dir is not None:
            from omni_passes.render import render_rewrites

            pictures.extend(render_rewrites(graph, out_dir, prefix=f"graph{len(graphs['after']) - 1}_"))

    torch._dynamo.reset()
    try:
        if torchair is not None:
            from omni_passes.hosts.torchair import compile_for_ge_dump

            compiled = compile_for_ge_dump(model, config, out_dir / "ge", torchair=torchair[0])
        else:
            compiled = omni_passes.compile(model, config)
    except (ConfigError, PlacementError, ValueError) as exc:
        raise UserError(str(exc)) from None
    compiled.omni.manager.on_graph = on_graph
    for layer, reason in refused_attention.items():
        compiled.omni.manager.reports["sparse_attention"].skip(layer, reason)
    say(f"compiling {args.model_config} ({type(model).__name__}, {hf_config.num_hidden_layers} layers) "
        f"with passes {list(config.passes)}")
    with torch.no_grad():
        out = compiled(inputs).logits.float()
    result = compiled.omni.report()
    result["model"] = {"config": args.model_config, "model_type": hf_config.model_type,
                       "class": type(model).__name__, "layers": hf_config.num_hidden_layers,
                       "moe_layers": list(compiled.omni.info.moe_layer_ids), "experts": compiled.omni.info.num_experts}
    if references is not None:
        from omni_passes.numerics import check_rewrite

        eager, plain, reference_kind = references
        result["check"] = {**check_rewrite(out, plain, eager, getattr(torch, args.dtype)),
                           "outputs": "logits", "reference": reference_kind}
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


def _refuse_unsafe(config, model):
    """Refuse what the passes cannot rewrite safely in this architecture: sparse attention per
    layer (dropped from the pattern, reported as skipped with the reason), then whatever
    ``omni_passes.compile`` itself refuses (the dispatch pass as a whole), before the eager
    references are computed."""
    from omni_passes.registry import refuse_unsafe
    from omni_passes.config import PassConfig
    from omni_passes.model_info import attention_refusals
    from omni_passes.placement.placement import PlacementError

    refused: dict[int, str] = {}
    if "sparse_attention" in config.passes:
        pattern = list(config.sparse_attention.pattern)
        refused = attention_refusals(model, [i for i in pattern if i < model.config.num_hidden_layers])
        if refused:
            data = config.to_dict()
            data["sparse_attention"]["pattern"] = [i for i in pattern if i not in refused]
            config = PassConfig.from_dict(data, source=config.source)
    try:
        refuse_unsafe(model, config)
    except PlacementError as exc:
        raise UserError(str(exc)) from None
    return config, refused


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


def _references(model, inputs, config):
    """(eager logits, compiled-without-passes logits, what they are), before the passes touch
    the model (materialising redundant slots changes it). With sparse_attention the dense
    model is the wrong reference once prompts exceed sink + recent: both references then run
    the model with the sink+recent mask on the pattern layers."""
    import contextlib

    import omni_passes

    attn = config.sparse_attention
    kind = "eager model, same weights and inputs"
    context = contextlib.nullcontext
    if "sparse_attention" in config.passes and attn.pattern:
        from omni_passes.kvcache.attention import masked_reference

        def context():
            return masked_reference(model, attn.sink, attn.recent, list(attn.pattern))

        kind += f", with the sink {attn.sink} + recent {attn.recent} attention mask on layers {list(attn.pattern)}"
    try:
        with torch.no_grad(), context():
            eager = model(inputs).logits.float()
            torch._dynamo.reset()
            plain = omni_passes.compile(model, {"passes": []})(inputs).logits.float()
    except ValueError as exc:
        raise UserError(f"{config.source}: {exc}") from None
    return eager, plain, kind


def _print_human(result: dict) -> None:
    for name, report in result["passes"].items():
        print(f"pass {name}: matched layers {report['matched_layers']} ({report['rewritten_nodes']} nodes inserted)")
        for skip in report["skipped"]:
            print(f"  skipped layer {skip['layer']}: {skip['reason']}")
    if "check" in result:
        check = result["check"]
        print(f"check: pass error {check['pass_error']:.3g} (vs the same compile without the passes), "
              f"compile noise {check['compile_noise']:.3g} (compiled vs eager), tolerance {check['tolerance']:.3g}: "
              f"{'ok' if check['ok'] else 'MISMATCH'}")
    for path in result.get("files", []):
        print(f"wrote {path}")
