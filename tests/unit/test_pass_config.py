"""The pass configuration JSON: one format, validated, unknown keys rejected."""

import json

import pytest

from omni_passes.config import ConfigError, PassConfig


def write(tmp_path, data, name="passes.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_full_example_from_design_loads(tmp_path):
    path = write(tmp_path, {
        "passes": ["redundant_experts", "sparse_attention"], "placement": "placement.json",
        "sparse_attention": {"sink": 128, "recent": 384, "pattern": [0, 3, 4]},
        "report_path": "report.json", "expert_load_path": "loads.npy", "expert_load_interval_steps": 100,
    })
    config = PassConfig.load(path)
    assert config.passes == ("redundant_experts", "sparse_attention")
    assert config.placement == str(tmp_path / "placement.json")  # relative to the config file
    assert config.sparse_attention.pattern == (0, 3, 4)
    assert config.expert_load_interval_steps == 100


def test_fingerprint_changes_with_config_and_placement_contents(tmp_path):
    placement = tmp_path / "placement.json"
    placement.write_text("{}")
    a = PassConfig.load(write(tmp_path, {"placement": "placement.json"}))
    b = PassConfig.load(write(tmp_path, {"placement": "placement.json", "expert_load_interval_steps": 5}))
    assert a.fingerprint() != b.fingerprint()
    before = a.fingerprint()
    placement.write_text('{"changed": 1}')
    assert a.fingerprint() != before


@pytest.mark.parametrize("data, message", [
    ({"passes": ["redundant_experts"], "placment": "x.json"}, "unknown key(s) 'placment'"),
    ({"passes": ["fast_mode"]}, "unknown pass(es) 'fast_mode'"),
    ({"passes": "redundant_experts"}, "'passes' must be a list"),
    ({"sparse_attention": {"sink": -1}}, "sparse_attention'.sink must be an integer >= 0"),
    ({"sparse_attention": {"recent": -3}}, "sparse_attention'.recent must be an integer >= 1"),
    ({"sparse_attention": {"sink": 4, "recent": 0}}, "sparse_attention'.recent must be an integer >= 1"),
    ({"sparse_attention": {"pattern": [1, 1]}}, "lists a layer twice"),
    ({"sparse_attention": {"window": 3}}, "unknown key(s) 'window'"),
    ({"expert_load_interval_steps": 0}, "must be a positive integer"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_configs_are_rejected_naming_the_problem(tmp_path, data, message):
    with pytest.raises(ConfigError) as info:
        PassConfig.load(write(tmp_path, data))
    assert message in str(info.value)
    assert str(tmp_path / "passes.json") in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        PassConfig.load(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="malformed JSON"):
        PassConfig.load(write(tmp_path, "{not json"))
