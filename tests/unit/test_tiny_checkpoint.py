"""The tiny DeepSeek-V3 checkpoint: loadable, deterministic, vLLM-compatible config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omni_passes.testing.tiny_checkpoint import CHAT_TEMPLATE, main, make_tiny_deepseek_checkpoint


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_config_has_the_fields_vllm_needs(tiny_checkpoint: Path) -> None:
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]
    # vLLM's CPU MLA kernel only supports a latent head size of 576.
    assert config["kv_lora_rank"] + config["qk_rope_head_dim"] == 576
    assert config["topk_method"] == "noaux_tc"
    assert config["scoring_func"] == "sigmoid"
    assert config["num_hidden_layers"] == 4 and config["first_k_dense_replace"] == 1
    assert config["n_routed_experts"] == 16 and config["num_experts_per_tok"] == 4
    # cpu_fused_moe needs hidden and MoE intermediate sizes divisible by 32.
    assert config["hidden_size"] % 32 == 0 and config["moe_intermediate_size"] % 32 == 0


def test_same_seed_gives_identical_files_and_another_seed_does_not(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    again = make_tiny_deepseek_checkpoint(tmp_path / "again")
    assert _files(again) == _files(tiny_checkpoint)
    other = make_tiny_deepseek_checkpoint(tmp_path / "other", seed=1)
    assert _files(other)["model.safetensors"] != _files(tiny_checkpoint)["model.safetensors"]
    assert _files(other)["tokenizer.json"] == _files(tiny_checkpoint)["tokenizer.json"]


def test_tokenizer_round_trips_and_renders_chat(tiny_checkpoint: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    assert len(tokenizer) == 512
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    text = "Experts that receive many tokens are hot! 42 {\"k\": [1, 2]}"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == 0
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(ids) < len(text.encode())  # merges were learned, not just bytes
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|bos|><|user|>Hi<|end|><|assistant|>"
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_transformers_loads_it_and_routing_bias_is_set(tiny_checkpoint: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    assert model.dtype == torch.float32
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.shape == (16,) and bool(bias.abs().gt(0).all())
    prompt = torch.tensor([[0, 46, 75, 293, 85, 278]])
    first = model.generate(prompt, max_new_tokens=12, do_sample=False)
    second = model.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(first, second)
    # initializer_range=0.2 keeps greedy output from collapsing onto one repeated token.
    assert len(set(first[0, prompt.shape[1]:].tolist())) > 3


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_layers": 2, "first_k_dense_replace": 2}, "first_k_dense_replace"),
        ({"n_routed_experts": 10, "n_group": 4}, "n_group"),
        ({"topk_group": 5}, "topk_group"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"dtype": "float16"}, "dtype"),
    ],
)
def test_bad_arguments_name_the_field(tmp_path: Path, kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        make_tiny_deepseek_checkpoint(tmp_path / "bad", **kwargs)


def test_cli_writes_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert main([str(out), "--layers", "2"]) == 0
    assert json.loads(capsys.readouterr().out) == {"path": str(out)}
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert main([str(tmp_path / "bad"), "--layers", "1"]) == 2  # no MoE layer left
