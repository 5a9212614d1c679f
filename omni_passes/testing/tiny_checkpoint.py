"""A tiny random DeepSeek-V3 checkpoint that transformers and vLLM (CPU) both load.

Layout of the directory written by `make_tiny_deepseek_checkpoint`:
    config.json, model.safetensors, generation_config.json   (transformers `save_pretrained`)
    tokenizer.json, tokenizer_config.json, chat_template.jinja (byte-level BPE, trained here)

Why these shapes:
- MLA: vLLM's CPU MLA kernel only compiles for a latent head size of 576, so
  kv_lora_rank + qk_rope_head_dim = 512 + 64 like the real model; everything else is small.
- hidden_size and moe_intermediate_size are multiples of 32: vLLM's CPU grouped-GEMM MoE kernel
  (cpu_fused_moe) needs hidden and intermediate sizes divisible by 32.
- `topk_method="noaux_tc"` and `scoring_func="sigmoid"` make vLLM create
  `gate.e_score_correction_bias` (the loader raises KeyError otherwise); the bias is filled with
  small random values so the biased selection differs from the unbiased scores, as in the real
  model.
- initializer_range=0.2 (not 0.02): greedy output varies from token to token and routing
  spreads over the experts, so tests comparing tokens can notice a wrong expert mapping.
- float32 weights: every x86/ARM CPU runs vLLM's float32 kernels (bfloat16 needs AVX512-BF16 or
  AMX to be fast and is emulated elsewhere), and with random weights float32 keeps greedy argmax
  ties rare, so "same tokens with a pass on and off" compares the rewrite, not rounding noise.
  Pass dtype="bfloat16" for the production dtype.

Deterministic: the same arguments give byte-identical weights and tokenizer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Special tokens come first so that their ids are fixed: bos=0, eos=1, pad=2 (config agrees).
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
BOS, EOS, PAD = SPECIAL_TOKENS[0], SPECIAL_TOKENS[1], SPECIAL_TOKENS[2]

# Roles become special tokens; the prompt ends with the assistant tag when a reply is wanted.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# Training text for the tokenizer: written for this project, plain English plus some digits and
# code-ish punctuation so that common merges exist. Its exact content only has to stay fixed.
CORPUS = """\
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.
A mixture of experts model sends every token to a few experts chosen by a router.
The router scores each expert, keeps the best groups, and then picks the top experts.
Experts that receive many tokens are hot; experts that receive few tokens are cold.
Placing copies of hot experts on several devices spreads the load and lowers the latency.
Attention keeps the first tokens of a sequence as a sink and the most recent tokens as a window.
Prefill reads the whole prompt at once; decode produces one token at a time for each request.
A proxy sends each request to the instance that already holds the longest matching prefix.
Compilers trace a program into a graph, rewrite the graph, and generate fast kernels for it.
Every pass looks for a pattern in the graph and replaces it with an equivalent, faster one.
If the pass does not recognise the graph, it leaves the graph alone and reports the reason.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024 2048 4096 8192 and 3.14159.
Code: def forward(self, hidden_states): return self.experts(hidden_states, topk_ids, weights)
Lists [1, 2, 3], maps {"key": "value"}, paths /tmp/model/config.json, and calls f(x) = y.
Questions and answers: What is the capital of France? Paris is the capital of France.
How many experts are active per token? Eight experts out of two hundred fifty six are active.
Why is decoding slow? Each step reads all weights and the whole key value cache from memory.
She sells sea shells by the sea shore, and the shells she sells are surely sea shells.
Once upon a time there was a small model that wanted to run fast on a tiny computer.
It learned to share its work among many helpers, and every helper did a little part of it.
In the morning the weather was cold and grey, but by the afternoon the sky was clear and blue.
Tests must be deterministic: the same input gives the same output on every run and machine.
"""


def _train_tokenizer(vocab_size: int):
    """A byte-level BPE with exactly `vocab_size` entries (filler tokens pad a short training)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    # Plain encoding starts with <|bos|> like DeepSeek's tokenizer; chat prompts get it from the
    # template and are encoded without special tokens.
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    short = vocab_size - tokenizer.get_vocab_size()
    if short > 0:
        # A model vocabulary larger than the tokenizer's would let greedy decoding emit ids the
        # tokenizer cannot decode; fill the gap with inert special tokens.
        tokenizer.add_special_tokens([f"<|filler_{i}|>" for i in range(short)])
    return tokenizer


def _config(
    *,
    num_layers: int,
    first_k_dense_replace: int,
    n_routed_experts: int,
    num_experts_per_tok: int,
    n_group: int,
    topk_group: int,
    vocab_size: int,
):
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_shared_experts=1,
        n_routed_experts=n_routed_experts,
        routed_scaling_factor=2.5,
        kv_lora_rank=512,
        q_lora_rank=32,
        qk_rope_head_dim=64,
        qk_nope_head_dim=32,
        v_head_dim=32,
        n_group=n_group,
        topk_group=topk_group,
        num_experts_per_tok=num_experts_per_tok,
        first_k_dense_replace=first_k_dense_replace,
        norm_topk_prob=True,
        max_position_embeddings=2048,
        # With the default 0.02 a random model repeats one token; 0.2 gives varied greedy output
        # and routing that depends on the input, so a wrong rewrite shows up in the tokens.
        initializer_range=0.2,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
        num_mtp_layers=0,
    )
    # Read by vLLM's DeepSeek-V2/V3 model code (not transformers): biased sigmoid routing.
    config.topk_method = "noaux_tc"
    config.scoring_func = "sigmoid"
    config.architectures = ["DeepseekV3ForCausalLM"]
    return config


def _check_arguments(
    num_layers: int,
    first_k_dense_replace: int,
    n_routed_experts: int,
    num_experts_per_tok: int,
    n_group: int,
    topk_group: int,
    vocab_size: int,
) -> None:
    def fail(message: str) -> None:
        raise ValueError(f"make_tiny_deepseek_checkpoint: {message}")

    if num_layers < 1:
        fail(f"num_layers must be >= 1, got {num_layers}")
    if not 0 <= first_k_dense_replace < num_layers:
        fail(
            f"first_k_dense_replace must be in [0, num_layers) so at least one MoE layer exists, "
            f"got {first_k_dense_replace} with num_layers={num_layers}"
        )
    if n_group < 1 or n_routed_experts % n_group != 0:
        fail(f"n_routed_experts={n_routed_experts} must be a positive multiple of n_group={n_group}")
    if not 1 <= topk_group <= n_group:
        fail(f"topk_group must be in [1, n_group={n_group}], got {topk_group}")
    # Group-limited routing keeps topk_group groups and picks the experts among them.
    reachable = topk_group * (n_routed_experts // n_group)
    if not 1 <= num_experts_per_tok <= reachable:
        fail(
            f"num_experts_per_tok must be in [1, {reachable}] (topk_group * experts per group), "
            f"got {num_experts_per_tok}"
        )
    if vocab_size < 300:
        fail(f"vocab_size must be >= 300 (256 bytes + special tokens + merges), got {vocab_size}")


def make_tiny_deepseek_checkpoint(
    path: str | Path,
    *,
    num_layers: int = 4,
    first_k_dense_replace: int = 1,
    n_routed_experts: int = 16,
    num_experts_per_tok: int = 4,
    n_group: int = 4,
    topk_group: int = 2,
    seed: int = 0,
    vocab_size: int = 512,
    dtype: str = "float32",
) -> Path:
    """Write a random DeepSeek-V3 (`DeepseekV3ForCausalLM`) with its tokenizer to `path`.

    Layers 0..first_k_dense_replace-1 are dense MLPs, the rest MoE (n_routed_experts routed
    experts + 1 shared, sigmoid scores with correction bias, group-limited top-k). Takes about a
    second. Returns the directory.
    """
    import torch
    from transformers import DeepseekV3ForCausalLM, PreTrainedTokenizerFast

    _check_arguments(
        num_layers, first_k_dense_replace, n_routed_experts, num_experts_per_tok, n_group,
        topk_group, vocab_size,
    )
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"make_tiny_deepseek_checkpoint: dtype must be 'float32' or 'bfloat16', got {dtype!r}")

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = _config(
        num_layers=num_layers,
        first_k_dense_replace=first_k_dense_replace,
        n_routed_experts=n_routed_experts,
        num_experts_per_tok=num_experts_per_tok,
        n_group=n_group,
        topk_group=topk_group,
        vocab_size=vocab_size,
    )

    # A private generator state: the caller's global RNG is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DeepseekV3ForCausalLM(config)
        with torch.no_grad():
            # transformers initialises the routing bias to zeros; small random values make the
            # biased choice differ from the unbiased weights, as in a trained model.
            for name, buffer in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buffer.copy_(torch.randn(buffer.shape) * 0.02)
    model = model.to(torch_dtype)
    model.config.dtype = dtype
    model.save_pretrained(out, safe_serialization=True)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(vocab_size),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=config.max_position_embeddings,
    )
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m omni_passes.testing.tiny_checkpoint",
        description="Write a tiny random DeepSeek-V3 checkpoint (weights + tokenizer) to OUT_DIR.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    parser.add_argument("--dense-layers", type=int, default=1, help="leading dense layers (default 1)")
    parser.add_argument("--experts", type=int, default=16, help="routed experts per MoE layer (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args(argv)
    try:
        out = make_tiny_deepseek_checkpoint(
            args.out_dir,
            num_layers=args.layers,
            first_k_dense_replace=args.dense_layers,
            n_routed_experts=args.experts,
            seed=args.seed,
            dtype=args.dtype,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"path": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
