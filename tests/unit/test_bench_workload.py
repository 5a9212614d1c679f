"""Workload files (validation with line numbers), prompt text, synthetic generators, cluster
files and router specs of the serving benchmark."""

import json
import statistics

import pytest

from proxy.bench import synthetic
from proxy.bench.cluster import ClusterSpec
from proxy.bench.routers import parse_spec
from proxy.bench.workload import (
    PromptBuilder,
    WorkloadError,
    WorkloadRequest,
    at_rate,
    load_jsonl,
    mean_rate,
    save_jsonl,
)
from proxy.wire.text import char_block_ids


def write(tmp_path, lines, name="w.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = [
    '{"arrival_s": 0.5, "prompt_tokens": 40, "output_tokens": 8, "prefix_group": "a", "prefix_tokens": 16}',
    '',
    '{"arrival_s": 0.0, "prompt_tokens": 10, "output_tokens": 1, "prefix_group": null, "prefix_tokens": 0}',
    '{"arrival_s": 1, "prompt_tokens": 30, "output_tokens": 2, "prefix_group": "c", "prefix_tokens": 20,'
    ' "system_group": "s", "system_tokens": 10}',
]


def test_load_good_file_sorted_and_roundtrip(tmp_path):
    reqs = load_jsonl(write(tmp_path, GOOD))
    assert [r.arrival_s for r in reqs] == [0.0, 0.5, 1.0]
    assert reqs[1] == WorkloadRequest(0.5, 40, 8, "a", 16)
    assert reqs[2].system_group == "s" and reqs[2].system_tokens == 10
    save_jsonl(reqs, tmp_path / "again.jsonl")
    assert load_jsonl(tmp_path / "again.jsonl") == reqs
    # the base format (five fields, docs/interfaces.md) is written without the optional system fields
    assert "system" not in (tmp_path / "again.jsonl").read_text().splitlines()[0]


@pytest.mark.parametrize("line,needle", [
    ('{"arrival_s": 0, "prompt_tokens": 5', "line 2: not valid JSON"),
    ('[1, 2]', "line 2: a request must be a JSON object"),
    ('{"arrival_s": 0, "prompt_tokens": 5}', "line 2: missing field(s) output_tokens"),
    ('{"arrival_s": 0, "prompt_tokens": 5, "output_tokens": 1, "colour": 1}', "line 2: unknown field(s) colour"),
    ('{"arrival_s": -1, "prompt_tokens": 5, "output_tokens": 1}', "line 2: field 'arrival_s'"),
    ('{"arrival_s": "0", "prompt_tokens": 5, "output_tokens": 1}', "line 2: field 'arrival_s'"),
    ('{"arrival_s": 0, "prompt_tokens": 0, "output_tokens": 1}', "line 2: field 'prompt_tokens' must be an integer >= 1, got 0"),
    ('{"arrival_s": 0, "prompt_tokens": 5, "output_tokens": 2.5}', "line 2: field 'output_tokens'"),
    ('{"arrival_s": 0, "prompt_tokens": 5, "output_tokens": true}', "line 2: field 'output_tokens'"),
    ('{"arrival_s": 0, "prompt_tokens": 5, "output_tokens": 1, "prefix_group": "g", "prefix_tokens": 6}',
     "line 2: shared tokens (prefix_tokens 6 + system_tokens 0) exceed prompt_tokens 5"),
    ('{"arrival_s": 0, "prompt_tokens": 5, "output_tokens": 1, "prefix_group": null, "prefix_tokens": 3}',
     "line 2: field 'prefix_tokens' is 3 but 'prefix_group' is null"),
    ('{"arrival_s": 0, "prompt_tokens": 5, "output_tokens": 1, "prefix_group": 7, "prefix_tokens": 3}',
     "line 2: field 'prefix_group' must be a non-empty string or null"),
])
def test_bad_lines_are_rejected_with_their_line_number(tmp_path, line, needle):
    path = write(tmp_path, ['{"arrival_s": 0, "prompt_tokens": 5, "output_tokens": 1}', line])
    with pytest.raises(WorkloadError) as err:
        load_jsonl(path)
    assert needle in str(err.value)
    assert str(path) in str(err.value)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(WorkloadError, match="holds no requests"):
        load_jsonl(write(tmp_path, ["", "  "]))
    with pytest.raises(WorkloadError, match="does not exist"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_prompt_text_is_one_sim_token_per_four_chars_and_shares_exactly():
    b = PromptBuilder(seed=3)
    r1 = WorkloadRequest(0, 50, 1, "g", 30, "s", 10)
    r2 = WorkloadRequest(0, 60, 1, "g", 40, "s", 10)
    r3 = WorkloadRequest(0, 25, 1, "h", 5, "s", 10)
    t1, t2, t3 = b.text(r1, 0), b.text(r2, 1), b.text(r3, 2)
    assert [len(char_block_ids(t)) for t in (t1, t2, t3)] == [50, 60, 25]
    assert len(t1) == 200
    # system + min(prefix) tokens shared, then the unique parts differ
    assert t1[:160] == t2[:160] and t1[160:164] != t2[160:164]
    assert t1[:40] == t3[:40] and t1[40:44] != t3[40:44]
    # same seed, same text; other seed, other text
    assert PromptBuilder(seed=3).text(r1, 0) == t1 and PromptBuilder(seed=4).text(r1, 0) != t1


def test_at_rate_rescales_arrivals_and_keeps_the_pattern():
    reqs = [WorkloadRequest(t, 4, 1) for t in (10.0, 10.5, 12.0, 14.0)]
    out = at_rate(reqs, 3.0)
    assert [r.arrival_s for r in out] == pytest.approx([0.0, 0.125, 0.5, 1.0])  # 0.75 req/s -> 3 req/s
    assert mean_rate(out) == pytest.approx(3.0)
    with pytest.raises(WorkloadError):
        at_rate(reqs, 0)


@pytest.mark.parametrize("name", sorted(synthetic.GENERATORS))
def test_synthetic_is_seeded_and_near_its_rate(name):
    a = synthetic.generate(name, 4.0, 300.0, seed=1)
    assert a == synthetic.generate(name, 4.0, 300.0, seed=1)
    assert a != synthetic.generate(name, 4.0, 300.0, seed=2) or name == "tiny"
    assert all(0 <= r.arrival_s < 300.0 for r in a)
    assert [r.arrival_s for r in a] == sorted(r.arrival_s for r in a)
    tolerance = 0.35 if name.startswith("bursty") else 0.12  # bursty has CV 3: wide count spread
    assert len(a) / 300.0 == pytest.approx(4.0, rel=tolerance)
    for r in a:  # every request is valid in the file format
        assert json.loads(r.to_json()) and r.prefix_tokens + r.system_tokens <= r.prompt_tokens


def test_long_prompt_shape_is_the_papers_scaled():
    reqs = synthetic.generate("long_prompt", 20.0, 500.0, seed=0)
    scale = synthetic.TOKEN_SCALE
    prompts = [r.prompt_tokens for r in reqs]
    outputs = [r.output_tokens for r in reqs]
    assert statistics.mean(prompts) * scale == pytest.approx(3500, rel=0.08)
    assert statistics.mean(outputs) * scale == pytest.approx(1200, rel=0.12)
    assert max(prompts) <= 16384 // scale and max(outputs) <= 32768 // scale


def test_multi_turn_histories_grow_within_a_conversation():
    reqs = synthetic.generate("multi_turn", 3.0, 120.0, seed=0)
    convs = {}
    for r in reqs:
        convs.setdefault(r.prefix_group, []).append(r)
    grown = 0
    for turns in convs.values():
        assert len({(t.system_group, t.system_tokens) for t in turns}) == 1
        for a, b in zip(turns, turns[1:]):
            assert b.arrival_s > a.arrival_s and b.prefix_tokens > a.prefix_tokens
            grown += 1
    assert grown > len(convs) / 2  # most conversations have several turns in the window
    assert len({r.system_group for r in reqs}) == 4


@pytest.mark.parametrize("name", ["bursty", "bursty_long"])
def test_bursty_gaps_are_bursty(name):
    reqs = synthetic.generate(name, 5.0, 2000.0, seed=0)
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(reqs, reqs[1:])]
    cv = statistics.pstdev(gaps) / statistics.mean(gaps)
    assert 2.0 < cv < 4.0  # Poisson would be 1


def test_bursty_long_has_long_prompts_lengths():
    bursty = synthetic.generate("bursty_long", 10.0, 60.0, seed=3)
    spaced = synthetic.generate("long_prompt", 10.0, 700.0, seed=3)
    assert [(r.prompt_tokens, r.output_tokens, r.prefix_group) for r in bursty] == \
        [(r.prompt_tokens, r.output_tokens, r.prefix_group) for r in spaced[:len(bursty)]]


def test_rag_shares_documents_behind_instructions():
    reqs = synthetic.generate("rag", 10.0, 200.0, seed=0)
    scale = synthetic.TOKEN_SCALE
    docs = {}
    for r in reqs:
        assert r.system_group.startswith("inst-") and r.prefix_group.startswith("doc-")
        assert r.prompt_tokens > r.system_tokens + r.prefix_tokens  # a question after the document
        docs.setdefault(r.prefix_group, set()).add(r.prefix_tokens)
    assert all(len(lengths) == 1 for lengths in docs.values())  # a document has one length
    assert all(2000 // scale <= next(iter(v)) <= 6000 // scale + 1 for v in docs.values())
    counts = sorted((sum(1 for r in reqs if r.prefix_group == g) for g in docs), reverse=True)
    assert counts[0] > 4 * counts[len(counts) // 2]  # Zipf popularity: a few documents dominate


def test_cluster_file_validation(tmp_path):
    spec = ClusterSpec.from_dict({"instances": [{"role": "prefill", "count": 1},
                                                {"role": "decode", "count": 3, "profile": {"step_overhead_s": 0.01}}]})
    assert spec.mode == "pd" and spec.label() == "1P3D"
    assert [role for role, _ in spec.instances()] == ["prefill", "decode", "decode", "decode"]
    assert ClusterSpec.from_dict(spec.to_dict()) == ClusterSpec(spec.groups, "cluster")
    bad = [
        ({"instances": []}, "non-empty list"),
        ({"nodes": []}, "unknown field(s) nodes"),
        ({"instances": [{"role": "gpu"}]}, "'role' must be one of"),
        ({"instances": [{"role": "decode", "count": 0}]}, "'count' must be a positive integer"),
        ({"instances": [{"role": "decode", "profile": {"warp": 1}}]}, "unknown profile field(s) warp"),
        ({"instances": [{"role": "decode"}, {"role": "collocated"}]}, "mixes collocated"),
        ({"instances": [{"role": "prefill"}]}, "needs at least one decode"),
        ({"instances": [{"role": "prefill", "profile": {"block_size": 8}}, {"role": "decode"}]}, "share one block_size"),
    ]
    for data, needle in bad:
        with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            ClusterSpec.from_dict(data, source="c.json")
    with pytest.raises(ValueError, match="does not exist"):
        ClusterSpec.load(tmp_path / "none.json")


def test_router_specs():
    assert parse_spec("omni").policy == "omni"
    s = parse_spec("omni:omni,bypass_tokens=16")
    assert (s.kind, s.policy, s.options) == ("omni", "omni", (("bypass_tokens", "16"),))
    assert parse_spec("vllm-router:power_of_two").policy == "power_of_two"
    assert parse_spec("sglang-router:cache_aware").kind == "sglang-router"
    assert parse_spec("direct").kind == "direct"
    s = parse_spec("vllm-router:cache_aware,balance_abs_threshold=8")
    assert s.options == (("balance_abs_threshold", "8"),)
    for bad, needle in (("nginx", "unknown router"), ("omni:fastest", "unknown omni policy"),
                        ("omni:round_robin,bypass_tokens=1", "not OPTION=VALUE"),
                        ("vllm-router", "give a policy"), ("vllm-router:magic", "policies here are"),
                        ("sglang-router:cache_aware,workers=2", "not OPTION=VALUE"),
                        ("vllm-router:cache_aware,cache_threshold=high", "takes a number"),
                        ("direct:x", "takes no policy")):
        with pytest.raises(ValueError, match=needle):
            parse_spec(bad)


def test_smg_spec_and_command():
    from proxy.bench.routers import Instances, Unsupported, command

    s = parse_spec("smg:cache_aware,balance_abs_threshold=8")
    assert (s.kind, s.policy, s.options) == ("smg", "cache_aware", (("balance_abs_threshold", "8"),))
    inst = Instances(collocated=["http://127.0.0.1:1", "http://127.0.0.1:2"])
    cmd = command(s, inst, 9000, 9001)
    assert cmd[1:4] == ["launch", "--host", "127.0.0.1"] and cmd[-2:] == ["--balance-abs-threshold", "8"]
    assert cmd[cmd.index("--policy") + 1] == "cache_aware"
    assert cmd[cmd.index("--worker-urls") + 1:cmd.index("--worker-urls") + 3] == inst.collocated
    with pytest.raises(Unsupported, match="bootstrap"):
        command(s, Instances(prefill=["http://p"], decode=["http://d"]), 9000, 9001)
    with pytest.raises(ValueError, match="policies here are"):
        parse_spec("smg:kv_aware")
