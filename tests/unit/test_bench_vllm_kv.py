"""`omni-passes bench vllm` KV mode without engines: which runs select it, the two pass configs it
derives, and reading vLLM's capacity line (the engines themselves run in the benchmark and in
tests/integration/test_vllm_sparse_attention.py)."""

import argparse
import io
import json
from pathlib import Path

import pytest

from omni_passes.bench import vllm_kv

ROOT = Path(__file__).resolve().parents[2]


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
    dense = json.loads(Path(paths["dense"]).read_text())
    compressed = json.loads(Path(paths["compressed"]).read_text())
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


# ----------------------------------------------------------------------------- --device cuda, without a GPU
def test_cuda_mode_is_selected_by_the_device():
    args = argparse.Namespace(pass_config=None, kv=False, device="cuda")
    assert vllm_kv.wants_kv_bench(args)


def test_v2_lite_config_has_its_published_size():
    from omni_passes.bench.vllm_kv_cuda import (
        V2_LITE_CONFIG,
        deepseek_weight_bytes,
        half_pattern,
    )

    # DeepSeek-V2-Lite: 15.7B parameters (its bf16 safetensors hold 31.4 GB).
    assert deepseek_weight_bytes(V2_LITE_CONFIG) == 2 * 15_706_484_224
    assert half_pattern(27) == list(range(1, 27, 2)) and len(half_pattern(27)) == 13


def test_tpot_batch_is_the_dense_kv_limit_rounded_down_to_a_captured_size():
    from omni_passes.bench.vllm_kv_cuda import tpot_batch

    sizes = [1, 2, 4, 8, 12, 16, 24, 32]
    # 1 null block + 10 requests of 2049 tokens (129 blocks each): the limit is 10 -> 8.
    assert tpot_batch(1 + 10 * 129, 16, 2049, sizes) == 8
    assert tpot_batch(1 + 12 * 129, 16, 2049, sizes) == 12
    assert tpot_batch(1 + 12 * 129 - 1, 16, 2049, sizes) == 8
    assert tpot_batch(100, 16, 2049, sizes) == 0


def test_decode_floor_counts_top_k_experts_and_visible_kv_rows():
    from omni_passes.bench.vllm_kv_cuda import decode_step_bytes

    weights = {"dense_bytes": 1000, "expert_bytes": 6400, "experts": 64, "top_k": 6}
    dense = decode_step_bytes(weights, 1, 4096, 1152, 27, 0, 512)
    assert dense == {"weights": 1000 + 600, "kv": 1152 * 27 * 4096, "total": 1600 + 1152 * 27 * 4096}
    compressed = decode_step_bytes(weights, 1, 4096, 1152, 14, 13, 512)
    assert compressed["kv"] == 1152 * (14 * 4096 + 13 * 512)
    short = decode_step_bytes(weights, 1, 300, 1152, 14, 13, 512)  # within the window: every row
    assert short["kv"] == 1152 * 27 * 300
    batch = decode_step_bytes(weights, 64, 4096, 1152, 27, 0, 512)  # a floor: still top_k experts per layer
    assert batch["weights"] == 1600 and batch["kv"] == 64 * dense["kv"]


def test_cuda_capacity_lines_are_read_from_vllm_026():
    from omni_passes.bench.vllm_kv_cuda import parse_capacity

    lines = ["(EngineCore pid=9) INFO 12-07 10:00:01 [kv_cache_utils.py:2177] GPU KV cache size: 1,245,424 tokens",
             ("(EngineCore pid=9) INFO 12-07 10:00:01 [kv_cache_utils.py:2179] Maximum concurrency for 36,864 tokens "
              "per request: 33.78x")]
    assert parse_capacity(lines) == {"tokens": 1245424, "max_model_len": 36864, "max_concurrency": 33.78,
                                     "line": "Maximum concurrency for 36,864 tokens per request: 33.78x"}


def test_summary_states_every_goal_with_its_reason():
    from omni_passes.bench.vllm_kv_cuda import summarize

    def ready(concurrency, groups, dense_bytes=10e9):
        return {"capacity_32k": {"max_concurrency": concurrency}, "logged": {"max_concurrency": concurrency / 2},
                "copy_bandwidth": {"bytes_per_s": 3e12}, "layout": {"groups": groups, "block_size": 16},
                "weights": {"dense_bytes": dense_bytes, "expert_bytes": 28e9, "experts": 64, "top_k": 6}}

    def tpot(ms, context=32768, batch=24, prefill_s=10.0):
        return {"context": context, "batch": batch, "tpot_s": ms / 1e3, "prefill_s": prefill_s}

    result = {"model_config": {"num_hidden_layers": 27, "kv_lora_rank": 512, "qk_rope_head_dim": 64},
              "sink": 128, "recent": 384, "pattern": list(range(1, 27, 2)), "engines": {
                  "dense": {"ready": ready(10.0, [{"layers": ["x"] * 27}]), "tpot": [tpot(20.0)],
                            "long": [{"output_tokens_per_s": 100.0, "requests": 8, "mean_running": 4.0, "seconds": 40.96,
                                      "prompt_tokens": 8 * 24000, "output_tokens": 8 * 512}]},
                  "compressed": {"ready": ready(18.5, [{"layers": ["x"] * 14, "max_blocks_per_request": 4112},
                                                       {"layers": ["y"] * 13, "sink": 128,
                                                        "max_blocks_per_request": 83}]),
                                 "tpot": [tpot(15.0, prefill_s=8.0)], "long": [{"output_tokens_per_s": 160.0, "requests": 8,
                                                                 "seconds": 25.6,
                                                                 "mean_running": 7.5, "prompt_tokens": 8 * 24000,
                                                                 "output_tokens": 8 * 512}]}}}
    summary = summarize(result)
    goals = {g["goal"].split(",")[0]: g for g in summary["goals"]}
    assert summary["capacity_32k"]["ratio"] == pytest.approx(1.85)
    assert not goals["max concurrency at 32k (vLLM's figure)"]["met"]
    why = goals["max concurrency at 32k (vLLM's figure)"]["why_not"]
    assert "same number of layers ([14, 13]" in why and "27/14 = 1.929" in why
    assert "window (33 blocks of 16 against 2048) 1.898" in why and "(83 blocks" in why and "1.853" in why
    pair = summary["tpot"][32768]
    assert pair["ratio"] == pytest.approx(0.75) and not goals["TPOT at 32k"]["met"]
    assert pair["floor_ratio"] > 0.64 and "even the HBM floors are in ratio" in goals["TPOT at 32k"]["why_not"]
    floor_ms = pair["compressed_floor_ms"]
    assert goals["compressed TPOT at 32k: floor / measured"]["value"] == pytest.approx(floor_ms / 15.0)
    assert goals["long-context output tokens/s"]["met"] and goals["long-context output tokens/s"]["why_not"] is None
    # prompts of 192k tokens at 24 x 32k tokens per 8 s: 1.95 s of prefill; 40.96 s of dense over it
    assert summary["long"]["prefill_estimate_s"]["compressed"] == pytest.approx(192000 / (24 * 32768 / 8.0))
    assert summary["long"]["ratio_if_decode_were_free"] == pytest.approx(40.96 / (192000 / (24 * 32768 / 8.0)))
    assert summary["tpot"][32768]["prefill_ratio"] == pytest.approx(0.8)
    # Fewer weight bytes per step: the floors alone would meet the goal, so the reason is the kernels' share.
    for engine in result["engines"].values():
        engine["ready"]["weights"]["dense_bytes"] = 2e9
    goals = {g["goal"].split(",")[0]: g for g in summarize(result)["goals"]}
    why = goals["TPOT at 32k"]["why_not"]
    assert why.startswith("the floors are in ratio 0.60") and "but the compressed step runs at" in why
    pair = summarize(result)["tpot"][32768]
    beyond = 20.0 - pair["dense_floor_ms"]
    assert pair["dense_beyond_floor_ms"] == pytest.approx(beyond)
    assert pair["ratio_at_dense_overhead"] == pytest.approx((pair["compressed_floor_ms"] + beyond) / 20.0)
    assert f"spending dense's, the ratio would be {pair['ratio_at_dense_overhead']:.3f}" in why


def test_capacity_bounds_reproduce_vllms_figure_on_the_h100():
    """vLLM's max concurrency at 32k, compressed over dense, as the H100 run measured it
    (docs/gpu/vllm_kv_cuda_h100.json), from the groups' layer counts and blocks per request alone."""
    from omni_passes.bench.vllm_kv_cuda import capacity_bounds

    run = json.loads((ROOT / "docs" / "gpu" / "vllm_kv_cuda_h100.json").read_text())
    groups = run["engines"]["compressed"]["ready"]["layout"]["groups"]
    bounds = capacity_bounds(27, groups, 32768, 16, 128, 384)
    assert bounds["counted"] == pytest.approx(run["summary"]["capacity_32k"]["ratio"], rel=1e-4)
    assert (bounds["group_size"], bounds["window_blocks"], bounds["counted_blocks"]) == (14, 33, 83)
    assert bounds["counted"] < bounds["decode_window"] < 1.9 < bounds["padding"] == pytest.approx(27 / 14)


def test_the_plan_times_the_first_contexts_batch_again_at_a_short_context():
    from omni_passes.bench.vllm_kv_cuda import REFERENCE_CONTEXT, _plan

    args = argparse.Namespace(kv_max_num_batched_tokens=16384, kv_decode_steps=64, kv_long_output=512,
                              kv_long_max_requests=40, kv_long_factor=1.6)
    ready = {"layout": {"num_blocks": 40427, "block_size": 16}}
    plan = _plan(["tpot", "long"], [32768, 8192], ready, args, [16384, 32768], 102400, 128)
    tpots = [(p["context"], p["batch"]) for kind, p in plan if kind == "tpot"]
    assert [kind for kind, _ in plan] == ["tpot", "tpot", "long", "tpot"]
    assert tpots[0][0] == 32768 and tpots[1] == (REFERENCE_CONTEXT, tpots[0][1])


def test_step_anatomy_splits_a_step_into_its_part_without_kv_and_what_the_kv_adds():
    from omni_passes.bench.vllm_kv_cuda import step_anatomy

    short = {"batch": 16, "dense_ms": 4.3, "dense_floor_ms": 1.9, "compressed_ms": 4.5, "compressed_floor_ms": 1.8}
    long = {"batch": 16, "dense_ms": 9.66, "dense_floor_ms": 7.15, "compressed_ms": 7.19, "compressed_floor_ms": 4.52}
    a = step_anatomy(short, long)
    assert a["dense"]["kv_added_ms"] == pytest.approx(5.36) and a["dense"]["kv_added_floor_ms"] == pytest.approx(5.25)
    assert a["dense"]["kv_efficiency"] == pytest.approx(5.25 / 5.36)
    assert a["compressed"]["base_beyond_floor_ms"] == pytest.approx(2.7)
    with pytest.raises(ValueError, match="batches differ"):
        step_anatomy(dict(short, batch=8), long)
