"""The omni-passes commands as a user runs them: JSON on stdout only, the documented keys."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def run_cli(*args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "omni_passes.cli", *args], capture_output=True, text=True, timeout=timeout)
    return proc


def test_inspect_tiny_check_json_reports_every_moe_layer(tmp_path):
    proc = run_cli("inspect", "--model-config", "tiny", "--passes", "redundant_experts", "--check", "--json",
                   "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # stdout holds exactly one JSON document
    assert result["passes"]["redundant_experts"]["matched_layers"] == [1, 2, 3]
    assert result["check"]["ok"] is True and result["check"]["max_abs_diff"] < 1e-4
    svgs = sorted(p.name for p in tmp_path.glob("*.svg"))
    assert len(svgs) == 3 and all(p.read_text().startswith("<?xml") for p in tmp_path.glob("*.svg"))
    assert "omni.expert_dispatch" in (tmp_path / "graph0_after.py").read_text()
    assert "omni.expert_dispatch" not in (tmp_path / "graph0_before.py").read_text()


def test_inspect_rejects_bad_pass_config_in_one_line(tmp_path):
    bad = tmp_path / "passes.json"
    bad.write_text(json.dumps({"passes": ["redundant_experts"], "placment": "x.json"}))
    proc = run_cli("inspect", "--model-config", "tiny", "--pass-config", str(bad), "--json")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert f"pass config {bad}: unknown key(s) 'placment'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_graph_cpu_json_schema(tmp_path):
    proc = run_cli("bench", "graph", "--device", "cpu", "--shape", "tiny", "--json", "--repeats", "3",
                   "--plot", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["device"] == "cpu" and result["shape"] == "tiny"
    names = set(result["variants"])
    assert {"eager", "compiled", "compiled+dispatch", "compiled+dispatch-redundant",
            "compiled+sparse@1024", "compiled+all@1024"} <= names
    for name in names:
        entry = result["variants"][name]
        assert entry["decode_step_us"] > 0 and entry["prefill_ms"] > 0 and entry["kv_bytes"] > 0
        if name != "eager":
            assert entry["compile_s"] > 0
    assert result["variants"]["compiled+dispatch"]["report"]["redundant_experts"]["matched_layers"] == [1]
    assert result["variants"]["compiled+sparse@1024"]["report"]["sparse_attention"]["matched_layers"] == result["pattern"]
    assert 0 <= result["variants"]["compiled+sparse@1024"]["amdahl"]["attention_share"] <= 1
    assert list(tmp_path.glob("*.png"))


def _svg_nodes(path):
    """{node name: [texts]} of a Graphviz SVG, and the legend's lines."""
    import xml.etree.ElementTree as ET

    ns = {"svg": "http://www.w3.org/2000/svg"}
    nodes = {}
    for group in ET.parse(path).getroot().iter("{http://www.w3.org/2000/svg}g"):
        if group.get("class") == "node":
            title = group.find("svg:title", ns).text
            nodes[title] = [t.text for t in group.findall("svg:text", ns) if t.text and t.text.strip()]
    return nodes, nodes.pop("legend", [])


def test_inspect_gpt_oss_redundant_slots_sparse_refused_and_picture(tmp_path):
    """GPT-OSS (expert biases, sink logits, sliding windows) with every expert replicated:
    exact, every MoE layer matched, sparse attention refused per layer with the reason, and a
    picture that draws the dispatch, the load recording and the expert compute."""
    placement = tmp_path / "placement.json"
    placement.write_text(json.dumps({"num_layers": 4, "num_logical_experts": 8, "num_ranks": 1, "num_nodes": 1,
                                     "slots_per_rank": 12, "phy2log": [list(range(8)) + [0, 1, 2, 3]] * 4}))
    passes = tmp_path / "passes.json"
    passes.write_text(json.dumps({"passes": ["redundant_experts", "sparse_attention"], "placement": str(placement),
                                  "sparse_attention": {"sink": 2, "recent": 4, "pattern": [0, 1]}}))
    out = tmp_path / "out"
    proc = run_cli("inspect", "--model-config", "tiny-gpt-oss", "--pass-config", str(passes), "--check", "--json",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["model"]["class"] == "GptOssForCausalLM"
    assert result["passes"]["redundant_experts"]["matched_layers"] == [0, 1, 2, 3]
    sparse = result["passes"]["sparse_attention"]
    assert sparse["matched_layers"] == []
    reasons = {s["layer"]: s["reason"] for s in sparse["skipped"]}
    assert sorted(reasons) == [0, 1]
    assert "sliding-window attention (window 8)" in reasons[0] and "sink logits" in reasons[0]
    assert "sink logits" in reasons[1]
    check = result["check"]
    assert check["ok"] is True and check["pass_error"] <= check["tolerance"] < 1e-4
    assert {"compile_noise", "vs_eager", "rule", "tolerance", "max_abs_diff"} <= set(check)

    pictures = sorted(out.glob("*.svg"))
    assert [p.name for p in pictures] == [f"graph0_expert_dispatch_layer{i}.svg" for i in range(4)]
    assert all(p.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pictures)
    nodes, legend = _svg_nodes(pictures[1])
    ops = [texts[0] for texts in nodes.values()]
    for op in ("aten.topk", "omni.expert_dispatch", "omni.record_expert_load", "aten.sort", "aten.histc",
               "aten.cumsum"):
        assert ops.count(op) == 1, (op, ops)
    assert ops.count("transformers.grouped_mm_fallback") == 2            # up and down projections
    details = " ".join(texts[1] for texts in nodes.values() if len(texts) > 1)
    assert "float32[12, 64, 256]" in details                             # gate_up_proj in 12 slots
    assert "float32[12, 256]" in details and "float32[12, 64]" in details  # both biases in slots too
    assert "inserted by the pass (omni.*)" in legend and "expert compute (grouped GEMM / fused MoE)" in legend
    assert "attention" not in legend                                     # no attention node is drawn
    assert "rewired: reads physical slots, not logical expert ids" in legend
    assert "omni.expert_dispatch" in (out / "graph0_after.py").read_text()


def test_inspect_bf16_check_is_ok_for_an_exact_rewrite(tmp_path):
    proc = run_cli("inspect", "--model-config", "tiny-qwen3-moe", "--dtype", "bfloat16", "--check", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    check = json.loads(proc.stdout)["check"]
    assert check["ok"] is True and check["max_abs_diff"] == check["pass_error"]
    assert check["compile_noise"] >= 0 and check["tolerance"] >= check["compile_noise"]


@pytest.mark.parametrize("overrides,field", [({"hidden_size": "big"}, "hidden_size"),
                                             ({"model_type": "deepseek_v2", "topk_method": "group_limited_greedy",
                                               "n_group": 3}, "n_group")])
def test_inspect_bad_model_config_is_one_line_exit_2(tmp_path, overrides, field):
    from omni_passes.models import TINY_CONFIGS

    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TINY_CONFIGS["tiny"], **overrides}))
    proc = run_cli("inspect", "--model-config", str(path), "--check", "--json")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("omni-passes inspect: error:")]
    assert len(errors) == 1 and f"model config {path}: field '{field}'" in errors[0], proc.stderr


def test_inspect_refuses_an_architecture_it_cannot_rewrite(tmp_path):
    """JetMoE's experts are its own per-expert loop, not transformers' experts interface."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "jetmoe", "vocab_size": 256, "hidden_size": 64,
                                "num_hidden_layers": 2, "num_key_value_heads": 2, "kv_channels": 16,
                                "intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2}))
    proc = run_cli("inspect", "--model-config", str(path), "--json")
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert "omni-passes inspect: error: redundant_experts cannot rewrite this model: JetMoeForCausalLM" in proc.stderr
