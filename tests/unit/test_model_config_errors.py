"""Bad model configs: one line naming the file and the field, never a traceback."""

import json

import pytest

from omni_passes.models import TINY_CONFIGS, ModelConfigError, build_model, load_hf_config


def write(tmp_path, data, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


V2 = dict(TINY_CONFIGS["tiny-deepseek-v2"])
V3 = dict(TINY_CONFIGS["tiny"])
QWEN = dict(TINY_CONFIGS["tiny-qwen3-moe"])
GPT_OSS = dict(TINY_CONFIGS["tiny-gpt-oss"])

CASES = [
    ({**V3, "hidden_size": "big"}, "field 'hidden_size' expected int, got str (value: 'big')"),
    ({**V2, "n_group": 3}, "field 'n_group' is 3, which does not divide the 16 routed experts"),
    ({**V3, "n_group": 5}, "field 'n_group' is 5, which does not divide the 16 routed experts"),
    ({**V3, "topk_group": 5}, "field 'topk_group' is 5, more than n_group 4"),
    ({**V3, "num_experts_per_tok": 12}, "field 'num_experts_per_tok' is 12, more than the 8 experts in the topk_group=2 groups"),
    ({**QWEN, "num_experts_per_tok": 17}, "field 'num_experts_per_tok' is 17, more than the 16 routed experts"),
    ({**QWEN, "num_key_value_heads": 3}, "field 'num_key_value_heads' is 3, which does not divide num_attention_heads 4"),
    ({**QWEN, "hidden_size": 0}, "field 'hidden_size' must be an integer >= 1, got 0"),
    ({**V3, "n_routed_experts": -2}, "field 'n_routed_experts' must be an integer >= 1, got -2"),
    ({**GPT_OSS, "layer_types": ["full_attention"]}, "layer_types"),
    ({**V3, "model_type": "no_such_model"}, "field 'model_type' is 'no_such_model', which is not a transformers causal-LM model type"),
    ({**V3, "model_type": "t5"}, "field 'model_type' is 't5', which is not a transformers causal-LM model type"),
    ({k: v for k, v in V3.items() if k != "model_type"}, "field 'model_type' missing or not a string"),
    ({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2},
     "llama has no routed experts"),
]


@pytest.mark.parametrize("data,expected", CASES, ids=[c[1][:40] for c in CASES])
def test_bad_field_is_named_in_one_line(tmp_path, data, expected):
    path = write(tmp_path, {k: v for k, v in data.items()})
    with pytest.raises(ModelConfigError) as info:
        load_hf_config(str(path))
    message = str(info.value)
    assert message.startswith(f"model config {path}: "), message
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize("text,expected", [
    ("{not json", "malformed JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
])
def test_unreadable_file(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ModelConfigError, match=expected):
        load_hf_config(str(path))


def test_missing_file_and_bad_layers(tmp_path):
    with pytest.raises(ModelConfigError, match="no such file .* tiny, tiny-deepseek-v2"):
        load_hf_config(str(tmp_path / "nope.json"))
    with pytest.raises(ModelConfigError, match="--layers must be an integer >= 1, got 0"):
        load_hf_config("tiny", layers=0)


def test_directory_and_remote_code_fields_accepted(tmp_path):
    path = write(tmp_path, {**QWEN, "auto_map": {"AutoConfig": "x.Y"}, "quantization_config": {"quant_method": "fp8"}})
    config = load_hf_config(str(path.parent), layers=2)
    assert config.model_type == "qwen3_moe" and config.num_hidden_layers == 2


def test_layers_override_keeps_per_layer_lists_consistent():
    config = load_hf_config("tiny-gpt-oss", layers=3)
    assert config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    build_model(config)
