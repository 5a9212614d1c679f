"""Train a small DeepSeek-V3 on synthetic passkey retrieval, then measure task accuracy against
compression for searched and random layer patterns.

    python -m omni_passes.training.passkey --device cuda --minutes 3 --out DIR [--json]
    python -m omni_passes.training.passkey --device cpu --minutes 1 --smoke      # mechanics only

Why: a random-weight model has no attention worth keeping, so the pattern search can only show
its mechanics there. A model that must look far back (the passkey sits well outside the recent
window of the question) makes layer choice matter: compressing the layers that retrieve breaks
the task, compressing others does not.

Task (token ids: 0 BOS, 1 KEY, 2 END, 3 ASK, 4..13 digits, then filler)::

    BOS f f f ... KEY d1 d2 d3 d4 END f f f ... f ASK d1 d2 d3 d4
                  ^ at least `recent` tokens before ASK, after the sink

Filler tokens are random, so the only predictable tokens are the answer digits; the loss is
cross-entropy on them. Accuracy = all digits right (teacher-forced argmax, which equals greedy
decoding whenever it is right).

After training, for each number k of compressed layers (1 .. L-1): the calibration-KL search
(``omni_passes.attn_search``, greedy; calibration prompts are task sequences, no labels) picks a
pattern; every pattern of k layers (or ``--random`` of them when there are more) is evaluated
too. Compression uses the masked reference (dense attention with the sink+recent mask on the
pattern), which is what the sparse-attention pass computes. Writes ``passkey_results.json`` and
``passkey_accuracy.png`` under ``--out``; with ``--save DIR`` also the trained weights
(``save_pretrained``). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from itertools import combinations
from pathlib import Path

import torch

BOS, KEY, END, ASK, DIGIT0 = 0, 1, 2, 3, 4
FILLER0 = DIGIT0 + 10


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- task
def sample_batch(batch: int, seq_len: int, digits: int, sink: int, recent: int, filler: int,
                 generator: torch.Generator, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B, T], key digits [B, digits]). The key block lies after the sink and ends more
    than ``recent`` tokens before the question, so only uncompressed layers can read it there."""
    ask = seq_len - digits - 1
    latest = ask - recent - (digits + 2)          # key block [s, s + digits + 2) ends before ask - recent
    if latest < sink + 1:
        raise ValueError(f"passkey: seq_len {seq_len} too short for digits {digits}, sink {sink}, recent {recent}")
    tokens = FILLER0 + torch.randint(0, filler, (batch, seq_len), generator=generator)
    key = torch.randint(0, 10, (batch, digits), generator=generator)
    starts = torch.randint(sink + 1, latest + 1, (batch,), generator=generator)
    tokens[:, 0] = BOS
    for b in range(batch):
        s = int(starts[b])
        tokens[b, s] = KEY
        tokens[b, s + 1:s + 1 + digits] = DIGIT0 + key[b]
        tokens[b, s + 1 + digits] = END
    tokens[:, ask] = ASK
    tokens[:, ask + 1:] = DIGIT0 + key
    return tokens.to(device), key.to(device)


def answer_logits(model, tokens: torch.Tensor, digits: int) -> torch.Tensor:
    """Logits at the positions that predict the answer digits: [B, digits, V]."""
    return model(tokens).logits[:, -digits - 1:-1]


@torch.no_grad()
def accuracy(model, tokens: torch.Tensor, key: torch.Tensor, digits: int, batch: int = 256) -> float:
    right = 0
    for start in range(0, tokens.shape[0], batch):
        logits = answer_logits(model, tokens[start:start + batch], digits)
        right += int((logits.argmax(-1) == DIGIT0 + key[start:start + batch]).all(-1).sum())
    return right / tokens.shape[0]


# --------------------------------------------------------------------------- model
def build_model(args, device: str):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    small = args.smoke
    config = DeepseekV3Config(
        vocab_size=FILLER0 + args.filler, hidden_size=64 if small else 128,
        intermediate_size=128 if small else 256, moe_intermediate_size=32 if small else 64,
        num_hidden_layers=args.layers, first_k_dense_replace=max(args.layers - 2, 1),
        n_routed_experts=4 if small else 8, num_experts_per_tok=2, n_group=1, topk_group=1,
        n_shared_experts=1, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=32 if small else 64, kv_lora_rank=32 if small else 64, qk_rope_head_dim=16,
        qk_nope_head_dim=16 if small else 32, v_head_dim=16 if small else 32,
        max_position_embeddings=2 * args.seq_len, rope_scaling=None, tie_word_embeddings=False,
        bos_token_id=BOS, eos_token_id=END, pad_token_id=END,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = DeepseekV3ForCausalLM(config)
    return model


def train(model, args, device: str) -> dict:
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    budget = args.minutes * 60
    start = time.perf_counter()
    step, losses = 0, []
    use_bf16 = device.startswith("cuda")
    model.train()
    while True:
        elapsed = time.perf_counter() - start
        if elapsed > budget or (args.max_steps and step >= args.max_steps):
            break
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * max(0.05, 1.0 - elapsed / budget)
        for group in optimizer.param_groups:
            group["lr"] = lr
        tokens, key = sample_batch(args.batch, args.seq_len, args.digits, args.sink, args.recent, args.filler,
                                   generator, device)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_bf16):
            logits = answer_logits(model, tokens, args.digits)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                 (DIGIT0 + key).reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        losses.append(float(loss.detach()))
        if step % args.log_every == 0:
            say(f"step {step}  loss {sum(losses[-args.log_every:]) / args.log_every:.4f}  "
                f"lr {lr:.2e}  {time.perf_counter() - start:.0f}s")
    model.eval()
    return {"steps": step, "seconds": time.perf_counter() - start,
            "final_loss": sum(losses[-50:]) / max(len(losses[-50:]), 1)}


# --------------------------------------------------------------------------- evaluation
def evaluate(model, args, device: str) -> dict:
    from omni_passes.attn_search import CalibrationObjective, make_strategy
    from omni_passes.kvcache.attention import masked_reference

    generator = torch.Generator().manual_seed(args.seed + 100)
    tokens, key = sample_batch(args.eval_size, args.seq_len, args.digits, args.sink, args.recent, args.filler,
                               generator, device)
    calib, _ = sample_batch(args.calib_count, args.seq_len, args.digits, args.sink, args.recent, args.filler,
                            generator, device)
    objective = CalibrationObjective(model, list(calib), args.sink, args.recent)

    def acc(pattern):
        with masked_reference(model, args.sink, args.recent, list(pattern)):
            return accuracy(model, tokens, key, args.digits)

    layers = model.config.num_hidden_layers
    rng = random.Random(args.seed)
    rows = []
    everything = []
    for size in range(1, layers):
        searched = make_strategy("greedy").search(objective, layers, size, rng)
        patterns = [list(c) for c in combinations(range(layers), size)]
        if len(patterns) > args.random:
            patterns = [patterns[i] for i in sorted(rng.sample(range(len(patterns)), args.random))]
        others = [{"pattern": p, "kl": objective(p), "accuracy": acc(p)} for p in patterns]
        everything.extend(others)
        accs = [o["accuracy"] for o in others]
        rows.append({
            "compressed_layers": size,
            "searched": {"pattern": searched.pattern, "kl": searched.value, "accuracy": acc(searched.pattern)},
            "random": {"count": len(others), "accuracy_mean": sum(accs) / len(accs), "accuracy_min": min(accs),
                       "accuracy_max": max(accs), "patterns": others},
        })
        say(f"{size} compressed: searched {searched.pattern} acc {rows[-1]['searched']['accuracy']:.3f}; "
            f"random acc mean {rows[-1]['random']['accuracy_mean']:.3f} (min {min(accs):.3f}, max {max(accs):.3f})")
    return {"dense_accuracy": acc([]), "all_compressed_accuracy": acc(list(range(layers))),
            "kl_accuracy_spearman": _spearman([e["kl"] for e in everything], [e["accuracy"] for e in everything]),
            "by_budget": rows, "eval_sequences": args.eval_size, "calibration_sequences": args.calib_count}


def _spearman(x: list[float], y: list[float]) -> float | None:
    if len(x) < 3:
        return None

    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        r = [0.0] * len(values)
        i = 0
        while i < len(order):  # average ranks over ties
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for t in range(i, j + 1):
                r[order[t]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var else None


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["evaluation"]["by_budget"]
    ks = [r["compressed_layers"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.fill_between(ks, [r["random"]["accuracy_min"] for r in rows], [r["random"]["accuracy_max"] for r in rows],
                    color="#cccccc", label="random patterns (min-max)")
    ax.plot(ks, [r["random"]["accuracy_mean"] for r in rows], "o--", color="#888888", label="random patterns (mean)")
    ax.plot(ks, [r["searched"]["accuracy"] for r in rows], "o-", color="#e15759", label="searched (calibration KL)")
    ax.axhline(result["evaluation"]["dense_accuracy"], color="#4e79a7", lw=1, label="dense")
    ax.set_xlabel(f"compressed layers of {result['config']['layers']} (sink {result['config']['sink']} + "
                  f"recent {result['config']['recent']})")
    ax.set_ylabel("passkey accuracy")
    ax.set_xticks(ks)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--minutes", type=float, default=3.0, help="training wall-clock budget")
    parser.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: time only)")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--digits", type=int, default=4)
    parser.add_argument("--filler", type=int, default=64, help="filler vocabulary size")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--recent", type=int, default=16)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--eval-size", type=int, default=1024)
    parser.add_argument("--calib-count", type=int, default=32)
    parser.add_argument("--random", type=int, default=20, help="patterns evaluated per budget when there are more")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--smoke", action="store_true", help="a smaller model (CPU smoke runs)")
    parser.add_argument("--out", metavar="DIR", help="write passkey_results.json and passkey_accuracy.png")
    parser.add_argument("--save", metavar="DIR", help="save the trained weights there (save_pretrained)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON document on stdout")
    args = parser.parse_args(argv)
    if args.layers < 2:
        parser.error("--layers must be >= 2 (a pattern search needs a choice)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        say("passkey: --device cuda asked for, but CUDA is not available")
        return 2
    model = build_model(args, device)
    params = sum(p.numel() for p in model.parameters())
    say(f"passkey: {args.layers}-layer DeepSeek-V3 ({params / 1e6:.2f} M parameters) on {device}, "
        f"seq {args.seq_len}, sink {args.sink} + recent {args.recent}, {args.minutes} min")
    training = train(model, args, device)
    result = {
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "save", "json")} | {"parameters": params},
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "training": training,
    }
    result["evaluation"] = evaluate(model, args, device)
    if args.save:
        model.save_pretrained(args.save)
        result["saved"] = args.save
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "passkey_results.json").write_text(json.dumps(result, indent=2) + "\n")
        plot(result, out / "passkey_accuracy.png")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        ev = result["evaluation"]
        print(f"trained {training['steps']} steps in {training['seconds']:.0f}s, final loss {training['final_loss']:.4f}; "
              f"dense accuracy {ev['dense_accuracy']:.3f}, all layers compressed {ev['all_compressed_accuracy']:.3f}")
        for row in ev["by_budget"]:
            print(f"  {row['compressed_layers']} compressed: searched {row['searched']['pattern']} "
                  f"{row['searched']['accuracy']:.3f} | random mean {row['random']['accuracy_mean']:.3f} "
                  f"(min {row['random']['accuracy_min']:.3f}, max {row['random']['accuracy_max']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
