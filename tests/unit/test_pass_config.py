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
    # the placement is read with the configuration (once per process): a configuration read
    # after the file changed has another fingerprint, the one read before keeps its own
    assert PassConfig.load(write(tmp_path, {"placement": "placement.json"})).fingerprint() != before
    assert a.fingerprint() == before


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
    ({"rebalance": {"interval_steps": 0}}, "'rebalance.interval_steps' must be an integer >= 1, got 0"),
    ({"rebalance": {"window_steps": "10"}}, "'rebalance.window_steps' must be an integer >= 1, got '10'"),
    ({"rebalance": {"max_moves": -1}}, "'rebalance.max_moves' must be an integer >= 0 or null, got -1"),
    ({"rebalance": {"max_replicas": 0}}, "'rebalance.max_replicas' must be an integer >= 1 or null, got 0"),
    ({"rebalance": {"min_gain": 1.5}}, "'rebalance.min_gain' must be a number in [0, 1], got 1.5"),
    ({"rebalance": {"layer_min_gain": True}}, "'rebalance.layer_min_gain' must be a number in [0, 1], got True"),
    ({"rebalance": {"forecast": "yes"}}, "'rebalance.forecast' must be true or false"),
    ({"rebalance": {"interval": 5}}, "'rebalance': unknown key(s) 'interval'; known: interval_steps"),
    ({"rebalance": 5}, "'rebalance' must be an object"),
    ({"passes": ["sparse_attention"], "rebalance": {}}, "'rebalance' require the 'redundant_experts' pass"),
    ({"slot_load_path": 3}, "'slot_load_path' must be a file path string"),
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


def test_rebalance_block_and_slot_load_path(tmp_path):
    config = PassConfig.load(write(tmp_path, {
        "passes": ["redundant_experts"], "slot_load_path": "slots.npy",
        "rebalance": {"interval_steps": 20, "window_steps": 80, "min_gain": 0.02, "max_moves": 8},
    }))
    assert config.slot_load_path == str(tmp_path / "slots.npy")
    r = config.rebalance
    assert (r.interval_steps, r.window_steps, r.min_gain, r.max_moves) == (20, 80, 0.02, 8)
    assert (r.layer_min_gain, r.max_replicas, r.forecast) == (0.005, None, True)  # documented defaults
    assert PassConfig.load(write(tmp_path, {"passes": ["redundant_experts"]}, "b.json")).rebalance is None
    other = PassConfig.load(write(tmp_path, {"passes": ["redundant_experts"], "rebalance": {"max_moves": 9}}, "c.json"))
    assert other.fingerprint() != config.fingerprint()


def test_graph_fingerprint_covers_the_graph_structure_only(tmp_path):
    """The vLLM host names its state after this: configurations that compile the same graph
    share it (a compile cache may hand one the other's graph), others do not."""
    base = {"passes": ["redundant_experts", "sparse_attention"], "sparse_attention": {"pattern": [1]}}
    a = PassConfig.from_dict(base)
    same_graph = PassConfig.from_dict({**base, "placement": str(tmp_path / "p.json"), "report_path": "r.json",
                                       "expert_load_path": "l.npy", "rebalance": {"interval_steps": 5}})
    assert same_graph.graph_fingerprint() == a.graph_fingerprint() and same_graph.fingerprint() != a.fingerprint()
    for other in ({**base, "passes": ["redundant_experts"]},
                  {**base, "sparse_attention": {"pattern": [1], "recent": 256}},
                  {**base, "sparse_attention": {"pattern": [1, 2]}}):
        assert PassConfig.from_dict(other).graph_fingerprint() != a.graph_fingerprint()
