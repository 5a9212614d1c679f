"""`omni-passes bench vllm` KV mode without engines: which runs select it, the two pass configs it
derives, and reading vLLM's capacity line (the engines themselves run in the benchmark and in
tests/integration/test_vllm_sparse_attention.py)."""

import argparse
import io
import json

import pytest

from omni_passes.bench import vllm_kv


def config_file(tmp_path, **attn):
    path = tmp_path / "passes.json"
    path.write_text(json.dumps({"passes": ["redundant_experts", "sparse_attention"],
                                "sparse_attention": {"sink": 64, "recent": 128, "pattern": [1, 3], **attn}}))
    return str(path)


def test_kv_mode_is_selected_by_a_free_kv_config_or_the_flag(tmp_path):
    assert vllm_kv.wants_kv_bench(argparse.Namespace(pass_config=config_file(tmp_path), kv=False))
    assert not vllm_kv.wants_kv_bench(argparse.Namespace(pass_config=config_file(tmp_path, free_kv=False), kv=False))
    assert not vllm_kv.wants_kv_bench(argparse.Namespace(pass_config=None, kv=False))
    assert vllm_kv.wants_kv_bench(argparse.Namespace(pass_config=None, kv=True))


def test_dense_config_drops_only_sparse_attention(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    paths = vllm_kv._configs(config_file(tmp_path), work)
    dense = json.loads(open(paths["dense"]).read())
    compressed = json.loads(open(paths["compressed"]).read())
    assert dense["passes"] == ["redundant_experts"] and "sparse_attention" not in dense
    assert compressed["passes"] == ["redundant_experts", "sparse_attention"]
    assert compressed["sparse_attention"] == {"sink": 64, "recent": 128, "pattern": [1, 3], "free_kv": True}
    only_sparse = tmp_path / "only.json"
    only_sparse.write_text(json.dumps({"passes": ["sparse_attention"], "sparse_attention": {"pattern": [1]}}))
    assert vllm_kv._configs(str(only_sparse), work)["dense"] is None  # no omni pass at all


def test_kv_mode_needs_sparse_attention_with_a_pattern(tmp_path):
    path = tmp_path / "passes.json"
    path.write_text(json.dumps({"passes": ["sparse_attention"]}))
    with pytest.raises(vllm_kv.UserError, match="needs 'sparse_attention' in passes and a non-empty pattern"):
        vllm_kv._configs(str(path), tmp_path)


def test_capacity_line_is_read_from_the_engine_output():
    sink = io.StringIO()
    stream = vllm_kv._CapacityLog(sink)
    line = ("(EngineCore pid=1) INFO 12-01 11:47:56 [kv_cache_utils.py:2327] CPU KV cache size: 9,295 tokens, "
            "Maximum concurrency for 2,048 tokens per request: 4.54x\n")
    stream.write("unrelated\n")
    stream.write(line)
    assert sink.getvalue() == "unrelated\n" + line  # everything passes through
    assert stream.lines == [{"tokens": 9295, "max_model_len": 2048, "max_concurrency": 4.54,
                             "line": "KV cache size: 9,295 tokens, Maximum concurrency for 2,048 tokens per request: 4.54x"}]
