"""`omni-passes search-attn`: choose which layers to compress to sink + recent attention.

    omni-passes search-attn --model-config tiny --layers 8 --budget 0.5 --json
    omni-passes search-attn --model-config DIR --weights DIR --budget 0.25 --calib prompts.json \
        --sink 4 --recent 16 --search genetic --write-config passes.json

Minimises the calibration objective (mean KL of next-token distributions, dense vs compressed,
over calibration prompts longer than sink + recent; ``omni_passes.attn_search.objective``) over
patterns of ``round(budget * layers)`` layers, and compares the chosen pattern with random
patterns of the same size. With random weights (no ``--weights``) this shows the mechanics only.

Calibration file (``--calib``): JSON — a list of token-id lists, or ``{"token_ids": [[...], ...]}`` —
or JSONL with one such list (or ``{"token_ids": [...]}``) per line, or a ``.txt`` file with one
prompt per line, tokenized with ``--tokenizer`` (default: the ``--weights`` directory). Without
``--calib``: ``--calib-count`` random-token prompts of ``--calib-len`` tokens (seeded).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from omni_passes.cli.common import UserError, emit_json, say, setup_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-config", default="tiny", metavar="PATH|tiny",
                        help="transformers DeepSeek-V3/V2 config.json (or its directory), or 'tiny'")
    parser.add_argument("--layers", type=int, default=None, metavar="N", help="override the number of decoder layers")
    parser.add_argument("--weights", metavar="DIR", help="load trained weights (save_pretrained directory) instead of random ones")
    parser.add_argument("--budget", type=float, required=True, metavar="FRACTION",
                        help="fraction of the decoder layers to compress, in [0, 1]")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--recent", type=int, default=16)
    parser.add_argument("--calib", metavar="FILE", help="calibration prompts (see the module help)")
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer for a .txt --calib (default: --weights)")
    parser.add_argument("--calib-count", type=int, default=8, help="random calibration prompts without --calib")
    parser.add_argument("--calib-len", type=int, default=None, help="their length (default 3 * (sink + recent))")
    parser.add_argument("--search", default="greedy", choices=["greedy", "genetic"])
    parser.add_argument("--population", type=int, default=16, help="genetic: population size")
    parser.add_argument("--generations", type=int, default=12, help="genetic: generations")
    parser.add_argument("--random", type=int, default=16, metavar="N", help="random patterns to compare with")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--write-config", metavar="FILE", help="write a pass config with the chosen pattern")
    parser.add_argument("--plot", metavar="DIR", help="write search_attn.png: random patterns' objective vs the chosen one")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def main(args: argparse.Namespace) -> int:
    setup_logging()
    result = run(args)
    if args.json:
        emit_json(result)
    else:
        _print_human(result)
    return 0


def run(args: argparse.Namespace) -> dict:
    from omni_passes.attn_search import CalibrationObjective, make_strategy, random_patterns
    from omni_passes.attn_search.search import layers_for_budget

    if args.sink < 0 or args.recent < 1:
        raise UserError(f"need --sink >= 0 and --recent >= 1, got sink={args.sink}, recent={args.recent}")
    hf_config, model = _build(args)
    num_layers = hf_config.num_hidden_layers
    try:
        size = layers_for_budget(args.budget, num_layers)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    prompts, source = _calibration(args, hf_config.vocab_size)
    try:
        objective = CalibrationObjective(model, prompts, args.sink, args.recent)
    except ValueError as exc:
        raise UserError(f"{source}: {exc}") from None
    rng = random.Random(args.seed)
    options = {"population": args.population, "generations": args.generations} if args.search == "genetic" else {}
    say(f"search-attn: {args.search} search for {size} of {num_layers} layers, sink {args.sink} recent {args.recent}, "
        f"{len(prompts)} calibration prompts ({source})")
    found = make_strategy(args.search, **options).search(objective, num_layers, size, rng)
    searched_evaluations = objective.evaluations
    randoms = random_patterns(num_layers, size, args.random, random.Random(args.seed + 1))
    random_values = [objective(p) for p in randoms]
    result = {
        "model": {"config": args.model_config, "layers": num_layers,
                  "weights": args.weights or "random (mechanics only: no learned attention)"},
        "sink": args.sink, "recent": args.recent, "budget": args.budget, "compressed_layers": size,
        "objective": "mean KL(dense || compressed) of next-token distributions at positions >= sink + recent",
        "calibration": {"source": source, "prompts": len(prompts), "tokens": [int(p.numel()) for p in prompts]},
        "search": args.search,
        "chosen": {"pattern": found.pattern, "kl": found.value, "evaluations": searched_evaluations},
        "random": _summary(randoms, random_values),
        "chosen_beats_fraction_of_random": (sum(v > found.value for v in random_values) / len(random_values)
                                            if random_values else None),
        "trace": found.trace,
    }
    if args.write_config:
        config = {"passes": ["sparse_attention"],
                  "sparse_attention": {"sink": args.sink, "recent": args.recent, "pattern": found.pattern}}
        Path(args.write_config).write_text(json.dumps(config, indent=2) + "\n")
        result["wrote_config"] = args.write_config
    if args.plot:
        result["plot"] = _plot(Path(args.plot), random_values, found.value, result)
    return result


def _build(args):
    from omni_passes.models import ModelConfigError, build_model, load_hf_config

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but CUDA is not available here")
    dtype = getattr(torch, args.dtype)
    if args.weights:
        from transformers import AutoModelForCausalLM

        path = Path(args.weights)
        if not (path / "config.json").exists():
            raise UserError(f"--weights {path}: no config.json there (expected a save_pretrained directory)")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
        if args.layers is not None:
            raise UserError("--layers cannot change a trained model; leave it out with --weights")
        return model.config, model
    try:
        hf_config = load_hf_config(args.model_config, layers=args.layers)
        model = build_model(hf_config, dtype=dtype, device=args.device, seed=args.seed)
    except ModelConfigError as exc:
        raise UserError(str(exc)) from None
    from omni_passes.model_info import attention_refusals

    refused = attention_refusals(model, range(hf_config.num_hidden_layers))
    if refused:  # the masked reference would not be this model's attention there
        raise UserError("sink+recent attention cannot stand in for layers "
                        f"{sorted(refused)} of this model: {next(iter(refused.values()))}")
    return hf_config, model


def _calibration(args, vocab_size: int) -> tuple[list[torch.Tensor], str]:
    if not args.calib:
        length = args.calib_len or 3 * (args.sink + args.recent)
        if args.calib_count < 1:
            raise UserError(f"--calib-count must be >= 1, got {args.calib_count}")
        generator = torch.Generator().manual_seed(args.seed)
        prompts = [torch.randint(0, vocab_size, (length,), generator=generator) for _ in range(args.calib_count)]
        return prompts, f"{args.calib_count} random-token prompts of {length} tokens"
    path = Path(args.calib)
    if not path.exists():
        raise UserError(f"--calib {path}: no such file")
    if path.suffix == ".txt":
        prompts = _tokenize_lines(path, args.tokenizer or args.weights)
    else:
        prompts = _token_lists(path)
    bad = [(i, t) for i, p in enumerate(prompts) for t in p if not 0 <= t < vocab_size]
    if bad:
        i, t = bad[0]
        raise UserError(f"--calib {path}: prompt #{i} has token id {t} outside the vocabulary [0, {vocab_size})")
    return [torch.tensor(p, dtype=torch.long) for p in prompts], str(path)


def _token_lists(path: Path) -> list[list[int]]:
    text = path.read_text()
    try:
        data = json.loads(text)
        rows = data.get("token_ids") if isinstance(data, dict) else data
    except json.JSONDecodeError:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise UserError(f"--calib {path}: neither JSON nor JSONL ({exc})") from None
        rows = [r.get("token_ids") if isinstance(r, dict) else r for r in rows]
    if isinstance(rows, list) and rows and all(isinstance(t, int) for t in rows):
        rows = [rows]  # one prompt
    if not isinstance(rows, list) or not rows:
        raise UserError(f"--calib {path}: expected a non-empty list of token-id lists")
    for i, row in enumerate(rows):
        if not isinstance(row, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in row):
            raise UserError(f"--calib {path}: prompt #{i} is not a list of integer token ids")
    return rows


def _tokenize_lines(path: Path, tokenizer_dir: str | None) -> list[list[int]]:
    if not tokenizer_dir:
        raise UserError(f"--calib {path}: a .txt file needs --tokenizer DIR (or --weights with a tokenizer)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise UserError(f"--calib {path}: no prompts")
    return [tokenizer(line)["input_ids"] for line in lines]


def _summary(patterns: list[list[int]], values: list[float]) -> dict:
    if not values:
        return {"patterns": [], "kl": []}
    ordered = sorted(values)
    return {"patterns": patterns, "kl": values, "mean": sum(values) / len(values), "min": ordered[0],
            "median": ordered[len(ordered) // 2], "max": ordered[-1]}


def _plot(out_dir: Path, random_values: list[float], chosen: float, result: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(random_values, bins=min(20, max(len(random_values), 1)), color="#bbbbbb", label="random patterns")
    ax.axvline(chosen, color="#e15759", label=f"{result['search']}: {result['chosen']['pattern']}")
    ax.set_xlabel("calibration KL (dense || compressed)")
    ax.set_ylabel("patterns")
    ax.set_title(f"{result['compressed_layers']} of {result['model']['layers']} layers, "
                 f"sink {result['sink']} + recent {result['recent']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "search_attn.png"
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def _print_human(result: dict) -> None:
    chosen, rand = result["chosen"], result["random"]
    print(f"{result['search']} search: compress layers {chosen['pattern']} "
          f"({result['compressed_layers']} of {result['model']['layers']}), KL {chosen['kl']:.4g} "
          f"({chosen['evaluations']} evaluations)")
    if rand.get("kl"):
        print(f"random patterns ({len(rand['kl'])}): KL mean {rand['mean']:.4g}, min {rand['min']:.4g}, "
              f"median {rand['median']:.4g}, max {rand['max']:.4g}; chosen beats "
              f"{100 * result['chosen_beats_fraction_of_random']:.0f}% of them")
    if "wrote_config" in result:
        print(f"wrote {result['wrote_config']}")
    if "plot" in result:
        print(f"wrote {result['plot']}")
