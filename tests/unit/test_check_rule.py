"""The check rule (omni_passes.numerics): in bf16 an exact rewrite is ok and a wrong one is not,
although compile alone moves bf16 logits; the rule's arithmetic on hand-made tensors."""

import pytest
import torch

import omni_passes
from omni_passes.models import build_model, load_hf_config
from omni_passes.numerics import RELATIVE_EPS, check_rewrite, max_abs_diff
from omni_passes.placement.layout import RowLayout
from omni_passes.placement.placement import Placement


def doubled(experts: int, layers: int, replica_order: torch.Tensor) -> Placement:
    phy2log = torch.cat([torch.arange(experts), replica_order]).repeat(layers, 1)
    return Placement(num_layers=layers, num_logical_experts=experts, num_ranks=1, num_nodes=1,
                     slots_per_rank=2 * experts, phy2log=phy2log)


@pytest.mark.parametrize("arch", ["tiny", "tiny-qwen3-moe"])
def test_bf16_check_ok_for_exact_rewrite_and_not_ok_for_corrupted_table(arch):
    config = load_hf_config(arch, layers=3)
    model = build_model(config, dtype=torch.bfloat16, seed=1)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    experts = config.n_routed_experts if arch == "tiny" else config.num_experts
    layers = 2
    with torch.no_grad():
        eager = model(tokens).logits
        torch._dynamo.reset()
        plain = omni_passes.compile(model, {"passes": []})(tokens).logits
        torch._dynamo.reset()
        compiled = omni_passes.compile(model, {"passes": ["redundant_experts"]},
                                       placement=doubled(experts, layers, torch.arange(experts)))
        rewritten = compiled(tokens).logits
        exact = check_rewrite(rewritten, plain, eager, torch.bfloat16)
        # Corrupt the tables behind the controller's back: they now say storage row E + e holds
        # expert e + 1, while it still holds e (the controller itself would have moved the slot
        # to the row that holds e + 1, or copied the row).
        bad = doubled(experts, layers, torch.arange(experts).roll(-1))
        lying = RowLayout(slot_row=torch.arange(2 * experts).repeat(layers, 1), row_expert=bad.phy2log.clone())
        compiled.omni.controller._write_tables(bad, lying)
        corrupted = check_rewrite(compiled(tokens).logits, plain, eager, torch.bfloat16)
    assert exact["ok"] is True, exact
    assert exact["pass_error"] <= exact["tolerance"]
    assert corrupted["ok"] is False, corrupted
    assert corrupted["pass_error"] > corrupted["tolerance"] > 0
    assert exact["compile_noise"] == corrupted["compile_noise"]


def test_rule_arithmetic():
    eager = torch.tensor([1.0, -2.0, 4.0])
    compiled = eager + torch.tensor([0.0, 0.01, 0.0])
    result = check_rewrite(compiled + torch.tensor([0.0, 0.0, 0.02]), compiled, eager, torch.bfloat16)
    assert result["compile_noise"] == pytest.approx(0.01, abs=1e-6)
    assert result["output_scale"] == 4.0
    assert result["tolerance"] == pytest.approx(0.01 + RELATIVE_EPS[torch.bfloat16] * 4.0, abs=1e-6)
    assert result["ok"] is True and result["max_abs_diff"] == result["pass_error"]
    result = check_rewrite(compiled + torch.tensor([0.0, 0.0, 0.05]), compiled, eager, torch.bfloat16)
    assert result["ok"] is False
    # fp32: no compile noise, one unit of 1e-5 at scale 4
    result = check_rewrite(eager + 3e-5, eager, eager, torch.float32)
    assert result["tolerance"] == pytest.approx(4e-5) and result["ok"] is True
    assert check_rewrite(eager + 5e-5, eager, eager, torch.float32)["ok"] is False


def test_nan_and_shape_mismatches_are_never_ok():
    eager = torch.ones(3)
    assert check_rewrite(torch.tensor([1.0, float("nan"), 1.0]), eager, eager, torch.float32)["ok"] is False
    assert check_rewrite(torch.ones(4), eager, eager, torch.float32)["ok"] is False
    assert max_abs_diff(torch.tensor([float("nan")]), torch.tensor([float("nan")])) == 0.0
    assert max_abs_diff(torch.tensor([float("inf")]), torch.tensor([1.0])) == float("inf")
    with pytest.raises(ValueError, match="no rule for dtype"):
        check_rewrite(eager, eager, eager, torch.int64)


# --------------------------------------------------------------------------- bench graph's sparse check
def _sparse_logits(model, steps, context, window, wrong=None):
    """Logits of the sparse pass compiled on ``model`` (``wrong``: a different window)."""
    torch._dynamo.reset()
    compiled = omni_passes.compile(model, {"passes": ["sparse_attention"], "sparse_attention": wrong or window},
                                   dynamic=False)
    return steps.logits(compiled, context)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bench_sparse_check_exact_rewrite_ok_wrong_window_not_ok(dtype):
    """bench graph's check of a sink+recent variant: against compiled+masked (the masked model
    compiled the same way), an exact rewrite is ok in bf16 and fp32, a rewrite with the wrong
    window (recent 12 instead of 16) is not, in every token."""
    from omni_passes.bench.graph import DecodeSteps, check, model_config
    from omni_passes.models import build_model

    config = model_config("tiny")
    model = build_model(config, dtype=dtype, seed=0)
    ids = torch.randint(0, config.vocab_size, (8, 1), generator=torch.Generator().manual_seed(3))
    steps = DecodeSteps(config, ids, "cpu", dtype)
    context, window = 48, {"sink": 4, "recent": 16, "pattern": [1]}
    references = check.reference_logits(model, steps, [context], window, [context])
    torch._dynamo.reset()
    plain = omni_passes.compile(model, {"passes": []}, dynamic=False)
    logits = {("compiled", context): steps.logits(plain, context)}
    torch._dynamo.reset()
    logits[("compiled+masked", context)] = check.masked_peer_logits(
        model, lambda m: omni_passes.compile(m, {"passes": []}, dynamic=False), steps, [context], window)[context]
    logits[("compiled+sparse", context)] = _sparse_logits(model, steps, context, window)
    exact = check.check_variant("compiled+sparse@48", context, logits, references, dtype)
    logits[("compiled+sparse", context)] = _sparse_logits(model, steps, context, window, dict(window, recent=12))
    wrong = check.check_variant("compiled+sparse@48", context, logits, references, dtype)
    assert exact["vs"] == "compiled+masked" and exact["reference"] == "masked eager"
    assert exact["ok"] is True, exact
    assert wrong["ok"] is False, wrong
    assert wrong["rows_over_tolerance"] == wrong["rows"] == 8
    assert len(exact["compile_noise_samples"]) == 2  # compiled vs eager, compiled+masked vs masked eager
    assert wrong["pass_error"] > 3 * wrong["tolerance"]
    # the masked eager reference is the sink+recent function the op computes (fp32: to rounding)
    agreement = check.agreement(logits, references, context)
    if dtype == torch.float32:
        assert agreement["masked_eager_vs_op_eager"] <= 1e-5 * max(1.0, exact["output_scale"]), agreement
    assert agreement["masked_eager_vs_eager"] > 10 * agreement["masked_eager_vs_op_eager"]  # the window matters


def test_bench_check_peer_of_each_variant():
    from omni_passes.bench.graph.check import peer_of

    assert peer_of("compiled") == ("compiled", "eager")
    assert peer_of("compiled+latent") == ("compiled", "eager")
    assert peer_of("compiled+dispatch-redundant") == ("compiled", "eager")
    for kind in ("sparse", "all", "latent+sparse"):
        assert peer_of(f"compiled+{kind}@4096") == ("compiled+masked", "masked eager")
    with pytest.raises(ValueError, match="no peer"):
        peer_of("compiled+unknown")


def test_more_noise_takes_the_largest_sample():
    eager = torch.tensor([1.0, -2.0, 4.0])
    compiled = eager + torch.tensor([0.0, 0.01, 0.0])
    other_eager = torch.tensor([0.5, 0.5, 0.5])
    flipped = other_eager + torch.tensor([0.2, 0.0, 0.0])  # the other function's compile flipped a token
    rewritten = compiled + torch.tensor([0.0, 0.0, 0.15])
    alone = check_rewrite(rewritten, compiled, eager, torch.bfloat16)
    pooled = check_rewrite(rewritten, compiled, eager, torch.bfloat16, more_noise=[(flipped, other_eager)])
    assert alone["ok"] is False and alone["compile_noise"] == pytest.approx(0.01, abs=1e-6)
    assert pooled["compile_noise"] == pytest.approx(0.2, abs=1e-6) and pooled["ok"] is True
    assert pooled["compile_noise_samples"] == [pytest.approx(0.01, abs=1e-6), pytest.approx(0.2, abs=1e-6)]


def test_bf16_bench_verdict_is_float32_exact_rewrite_ok_wrong_window_not_ok():
    """A bf16 `bench graph` run takes its verdict from float32 copies (bench/graph/exactness.py):
    in bf16 the compile noise of DeepSeek-V2-Lite-sized graphs (0.2-0.5 on the H100) is as large
    as a wrong attention function's error. The exact sink+recent rewrite is ok there; the same
    rewrite with the wrong window (recent 12 instead of 16) is not, in every token."""
    import argparse

    import omni_passes
    from omni_passes.bench.graph import cli, exactness
    from omni_passes.models import build_model

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    s = cli.settings(parser.parse_args(["--device", "cpu", "--shape", "tiny", "--dtype", "bf16", "--passes", "sparse",
                                        "--context", "48", "--sink", "4", "--recent", "16", "--pattern", "1"]))
    assert exactness.needed(s) and not exactness.needed(cli.settings(parser.parse_args(["--device", "cpu"])))

    def sparse(window):
        config = {"passes": ["sparse_attention"], "sparse_attention": window}
        return lambda model: omni_passes.compile(model, config, dynamic=False)

    planned = [("compiled", [48], lambda model: omni_passes.compile(model, {"passes": []}, dynamic=False)),
               ("compiled+sparse@48", [48], sparse(s.window)),
               ("compiled+all@48", [48], sparse(dict(s.window, recent=12)))]  # named as a windowed kind: same peer
    ids = torch.randint(0, s.hf_config.vocab_size, (s.batch, 1), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    verdicts = exactness.float32_checks(s, ids, planned,
                                        lambda dtype: build_model(s.hf_config, dtype=dtype, device="cpu", seed=0))
    exact, wrong = verdicts["compiled+sparse@48"]["48"], verdicts["compiled+all@48"]["48"]
    assert exact["ok"] is True and exact["vs"] == "compiled+masked", exact
    assert exact["pass_error"] < 1e-4 * max(1.0, exact["output_scale"])
    assert wrong["ok"] is False and wrong["rows_over_tolerance"] == wrong["rows"] == s.batch, wrong
    assert verdicts["compiled"]["48"]["ok"] is True and verdicts["compiled"]["48"]["pass_error"] == 0
    # the run's entry: its bf16 checks become drift (no verdict), the float32 ones its checks
    entry = {"check_by_context": {"48": {"max_abs_diff": 0.3, "ok": False}}}
    exactness.as_drift(entry, torch.bfloat16)
    assert entry == {"drift_by_context": {"48": {"max_abs_diff": 0.3, "dtype": "bfloat16"}},
                     "drift": {"max_abs_diff": 0.3, "dtype": "bfloat16"}}
    exactness.set_verdict(entry, verdicts["compiled+sparse@48"])
    assert entry["check"]["ok"] is True and entry["check"]["dtype"] == "float32"
