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
