"""Sink+recent KV in vLLM 0.26 CUDA (skipped without CUDA and vLLM's CUDA build).

1. The prefill kernel on the GPU without an engine (``kernels.triton_sink_recent_prefill``, one
   pass over the new tokens and the visible cached rows), bf16, 16 and 128 heads, against masked
   attention over every visible key in float32. (Which cached rows it gets, never a freed one,
   is tested on CPU: tests/unit/test_sink_recent_prefill_triton_interpret.py.)
2. Real engines (``omni_passes.hosts.vllm.kv_probe`` in a child process each, bf16, CUDA graphs,
   chunked prefill with a 256-token budget so long prompts get cached context, a 128-token
   window tail so some chunks take the decode path) on a tiny random DeepSeek-V3 with sm_90 MLA
   dims, layers 1 and 3 compressed (sink 64, recent 128, 16-token blocks):
   * ``dense``: vLLM as it is; ``nofree``: sink+recent attention over dense KV
     (``free_kv: false``); ``compressed``: the same attention with blocks freed.
   * live blocks per request in the compressed group stay within the window's blocks over a
     long generation (and every block is accounted for in the pool);
   * tokens of ``compressed`` equal ``nofree`` exactly (same kernels, bf16), for prompts within
     and far beyond the window;
   * within the window ``compressed`` stays as close to ``dense`` as vLLM's own TRITON_MLA decode
     does (``dense_triton``): chosen tokens' log-probabilities within twice that drift (at least
     ``LOGPROB_TOL``) while the sequences agree, and where they part, dense's top-2 gap is below
     it (float32 is not available there: vLLM 0.26's MLA backends take bf16/fp16 only);
   * refusals name the setting: prefix caching (vLLM's default on CUDA) stops the engine;
     sink/recent that are not multiples of the real block size name the nearest values.

Runtime on an H100: about four minutes (four engine starts sharing one compile cache).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu  # skipped without CUDA and vLLM's CUDA build: conftest.py

from kernels.triton_sink_recent_prefill import prefill_plan, sink_recent_prefill_attention
from omni_passes.hosts.vllm.kv_prefill import context_positions, sink_recent_prefill_reference

SINK, RECENT, BS = 64, 128, 16
PATTERN = [1, 3]
LOGPROB_TOL = 0.25    # bf16: least bound on the chosen token's log-probability, compressed vs dense, in the window
CHUNK = 256
SHORT = [20, 33, 47]          # prompts that stay within sink + recent with SHORT_NEW tokens
SHORT_NEW = 96
LONG = [600, 1000]            # 600 = 2 x 256 + 88: a last chunk of 88 <= recent takes the decode path
LONG_NEW = 400
TIMEOUT = 900


# ----------------------------------------------------------------------------- 1. prefill kernel
@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("sink, recent", [(64, 128), (128, 384), (0, 128), (16, 2048)])
def test_prefill_kernel_matches_masked_attention(sink, recent, heads):
    """The prefill the engine runs for a batch beyond the window (``sink_recent_prefill_attention``
    over the new tokens and the visible cached rows), bf16 with DeepSeek's head dims, against
    masked attention over every visible key in float32."""
    torch.manual_seed(0)
    dev, dqk, dv, scale = torch.device("cuda"), 192, 128, 192 ** -0.5
    lens, contexts = ([700, 33, 1500, 300], [0, 0, 900, 5000]) if heads == 16 else ([300, 17], [0, 2000])
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    q, k = (torch.randn(starts[-1], heads, dqk, device=dev, dtype=torch.bfloat16) for _ in range(2))
    kv = torch.randn(starts[-1], heads, 128 + dv, device=dev, dtype=torch.bfloat16)
    v = kv[..., 128:]  # a view, as vLLM splits it out of the up-projection
    cache = [(torch.randn(c, heads, dqk, device=dev, dtype=torch.bfloat16),
              torch.randn(c, heads, dv, device=dev, dtype=torch.bfloat16)) for c in contexts]
    positions = [context_positions(c, sink, recent).to(dev) for c in contexts]
    k_ctx = torch.cat([cache[r][0][p] for r, p in enumerate(positions)])
    v_ctx = torch.cat([cache[r][1][p] for r, p in enumerate(positions)])
    plan = prefill_plan(starts, contexts, [len(p) for p in positions], dev)
    ours = sink_recent_prefill_attention(q, k, v, k_ctx, v_ctx, plan, sink, recent, scale, 128)
    ref = sink_recent_prefill_reference(q, k, v, starts, contexts, sink, recent, scale,
                                        lambda r, p: (cache[r][0][p.to(dev)], cache[r][1][p.to(dev)]))
    rel = ((ours.double() - ref.double()).norm() / ref.double().norm()).item()
    assert rel < 1e-2, f"sink+recent prefill kernel vs masked attention: relative error {rel:.2e}"


# ----------------------------------------------------------------------------- 2. engines
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from omni_passes.testing.vllm_cuda_dump import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("tiny_dsv3_sm90"))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sink_recent_cuda")


def _prompts() -> list[dict]:
    import random

    rng = random.Random(0)
    return ([{"prompt_token_ids": [rng.randrange(8, 500) for _ in range(n)], "max_tokens": SHORT_NEW} for n in SHORT]
            + [{"prompt_token_ids": [rng.randrange(8, 500) for _ in range(n)], "max_tokens": LONG_NEW} for n in LONG])


def _pass_config(work: Path, free_kv: bool, sink: int = SINK, recent: int = RECENT) -> str:
    path = work / f"passes_{free_kv}_{sink}_{recent}.json"
    path.write_text(json.dumps({"passes": ["sparse_attention"], "sparse_attention": {
        "sink": sink, "recent": recent, "pattern": PATTERN, "free_kv": free_kv}}))
    return str(path)


def _probe(model_dir: Path, work: Path, pass_config: str | None, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "omni_passes.hosts.vllm.kv_probe", "--model", str(model_dir),
           "--prompts-json", json.dumps(_prompts()), "--max-model-len", "2048", "--max-num-seqs", "8",
           "--chunked-prefill-tokens", str(CHUNK), "--gpu-memory-utilization", "0.15",
           "--cudagraph-capture-sizes", "1,2,4,8", "--trace", "--logprobs", "2", *extra]
    if pass_config:
        cmd += ["--pass-config", pass_config]
    env = dict(os.environ, VLLM_CACHE_ROOT=str(work / "vllm-cache"), VLLM_USE_FLASHINFER_SAMPLER="0")
    env.pop("OMNI_PASSES_CONFIG", None)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False)


def _run(model_dir: Path, work: Path, pass_config: str | None, *extra: str) -> dict:
    proc = _probe(model_dir, work, pass_config, "--no-prefix-caching", *extra)
    if proc.returncode != 0:
        pytest.fail(f"engine failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}\n{proc.stdout[-3000:]}")
    # vLLM logs to stdout too: the result is the line kv_probe prints, whatever follows it.
    line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith('{"startup_s"')), None)
    if line is None:
        pytest.fail(f"no result line from kv_probe:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line)


@pytest.fixture(scope="module")
def dense(model_dir, work):
    return _run(model_dir, work, None)


@pytest.fixture(scope="module")
def dense_triton(model_dir, work):
    """vLLM as it is, decoding through its TRITON_MLA backend: how far two correct kernels drift."""
    return _run(model_dir, work, None, "--attention-backend", "TRITON_MLA")


@pytest.fixture(scope="module")
def nofree(model_dir, work):
    return _run(model_dir, work, _pass_config(work, free_kv=False))


@pytest.fixture(scope="module")
def compressed(model_dir, work):
    return _run(model_dir, work, _pass_config(work, free_kv=True))


def _group(layout: dict, spec: str) -> tuple[int, dict]:
    found = [(i, g) for i, g in enumerate(layout["groups"]) if g["spec"] == spec]
    assert len(found) == 1, layout["groups"]
    return found[0]


def test_compressed_layers_get_their_own_kv_group(compressed, nofree):
    _, ours = _group(compressed["layout"], "SinkRecentMLASpec")
    _, full = _group(compressed["layout"], "MLAAttentionSpec")
    assert ours["manager"] == "SinkRecentManager" and (ours["sink"], ours["recent"]) == (SINK, RECENT)
    assert sorted(int(n.split(".")[2]) for n in ours["layers"]) == PATTERN
    assert full["manager"] == "FullAttentionManager"
    assert sorted(int(n.split(".")[2]) for n in full["layers"]) == [0, 2]
    assert ours["block_size"] == full["block_size"] == BS
    # free_kv false keeps vLLM's single dense group: only the attention changes.
    assert [g["spec"] for g in nofree["layout"]["groups"]] == ["MLAAttentionSpec"]


def test_live_blocks_stay_within_the_window_over_a_long_generation(compressed):
    layout = compressed["layout"]
    ours, _ = _group(layout, "SinkRecentMLASpec")
    dense_group, _ = _group(layout, "MLAAttentionSpec")
    prompt_len = {f"r{i}": len(p) for i, p in enumerate(compressed["prompt_token_ids"])}
    decode_bound = SINK // BS + RECENT // BS + 1
    # Chunked prefill under pipelined (async) scheduling: the cached context's window, the
    # running chunk's tail and this chunk's tail (omni_passes.kvcache.window).
    prefill_bound = SINK // BS + 3 * (RECENT // BS + 1)
    longest_dense = 0
    decode_snapshots = 0
    for snap in compressed["steps"]:
        held = 0
        for rid, live in snap["live_blocks"].items():
            held += sum(live)
            computed = snap["computed_tokens"][rid]
            external = rid.rsplit("-", 1)[0]
            assert live[ours] <= prefill_bound, (rid, computed, live)
            if computed >= prompt_len[external] + 2:  # decoding: this step and the one before
                assert live[ours] <= decode_bound, (rid, computed, live)
                decode_snapshots += 1
            assert live[dense_group] >= (computed - 1) // BS  # the dense group keeps everything
            longest_dense = max(longest_dense, live[dense_group])
        assert snap["free_blocks"] + held == layout["num_blocks"] - 1  # every freed block is back (block 0: null)
    assert decode_snapshots > 200
    assert longest_dense >= (max(LONG) + LONG_NEW - 1) // BS  # dense holds the 1400-token sequence ...
    assert decode_bound < longest_dense / 4                     # ... ours a window of it
    assert compressed["preemptions"] == 0


def test_tokens_equal_the_same_attention_without_freeing(compressed, nofree):
    assert compressed["prompt_token_ids"] == nofree["prompt_token_ids"]
    for i, (a, b) in enumerate(zip(compressed["token_ids"], nofree["token_ids"])):
        assert a == b, f"prompt {i} ({len(compressed['prompt_token_ids'][i])} tokens): tokens differ at " \
                       f"{next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)}"
    # Bit-identical numerics, not only the same argmax.
    assert compressed["top_logprobs"] == nofree["top_logprobs"]


def _agreement(a: dict, b: dict, i: int) -> dict:
    """Prompt i of two runs: where their greedy tokens part (None: never), the largest difference
    of the chosen token's log-probability before that, and a's top-2 gap where they part."""
    x, y = a["token_ids"][i], b["token_ids"][i]
    top_a, top_b = a["top_logprobs"][i], b["top_logprobs"][i]
    part = next((j for j, (s, t) in enumerate(zip(x, y)) if s != t), None)
    same = len(x) if part is None else part
    return {"part": part, "same": same, "max_diff": max((abs(top_a[j][0] - top_b[j][0]) for j in range(same)), default=0.0),
            "gap": None if part is None else top_a[part][0] - top_a[part][1]}


def test_tokens_within_the_window_equal_dense_as_closely_as_vllms_own_kernels_agree(compressed, dense, dense_triton):
    """Within the window the compressed layers compute dense attention, through another kernel
    (prefill: vLLM's own, bit for bit; decode: the paged sink+recent kernel instead of FA3-MLA),
    so bf16 sums differ and a random model amplifies them. How far two correct kernels drift is
    measured, not guessed: ``dense_triton`` is vLLM as it is with its TRITON_MLA decode. The
    compressed run must stay as close to dense as that (twice its largest drift, at least
    ``LOGPROB_TOL``), and where its tokens part from dense's, dense's top-2 gap is below that bound."""
    for run in (compressed, dense_triton):
        for i in range(len(SHORT)):
            assert len(run["token_ids"][i]) + len(run["prompt_token_ids"][i]) <= SINK + RECENT
    ours = [_agreement(dense, compressed, i) for i in range(len(SHORT))]
    vllm = [_agreement(dense, dense_triton, i) for i in range(len(SHORT))]
    bound = max(LOGPROB_TOL, 2 * max(v["max_diff"] for v in vllm))
    print(f"within the window, against dense (FA3-MLA): sink+recent {ours}; vLLM TRITON_MLA {vllm}; bound {bound:.3f}")
    for i, a in enumerate(ours):
        assert a["max_diff"] < bound, (i, a, vllm)
        if a["part"] is not None:
            assert a["gap"] < bound, f"prompt {i}: tokens part at {a['part']} where dense's top-2 gap is {a['gap']:.3f}"
    assert sum(a["same"] for a in ours) >= SHORT_NEW, f"only {[a['same'] for a in ours]} tokens agree before parting"


def test_prefix_caching_is_refused_naming_the_setting(model_dir, work):
    proc = _probe(model_dir, work, _pass_config(work, free_kv=True), "--enable-prefix-caching")  # CUDA's default
    assert proc.returncode != 0
    said = proc.stderr + proc.stdout
    assert "prefix caching is on" in said and "enable_prefix_caching=False" in said, said[-3000:]


def test_window_not_a_multiple_of_the_real_block_size_is_refused(model_dir):
    """Checked against the block size vLLM uses with the backend it picks here (set to 64, as
    FlashMLA would force); the message names the backend and the nearest valid values. The
    facts are vLLM's own on this machine (backend, prefill backend, FA version)."""
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.attention.backends.fa_utils import (
        flash_attn_supports_mla,
        get_flash_attn_version,
    )
    from vllm.v1.attention.backends.mla.prefill.selector import get_mla_prefill_backend
    from vllm.v1.attention.selector import get_attn_backend

    from omni_passes.config import SparseAttentionConfig
    from omni_passes.hosts.vllm.kv_checks import CudaLayerFacts, cuda_startup_problem

    config = EngineArgs(model=str(model_dir), dtype="bfloat16", block_size=64, enable_prefix_caching=False,
                        max_model_len=2048).create_engine_config()
    with set_current_vllm_config(config):
        backend = get_attn_backend(576, torch.bfloat16, "auto", use_mla=True, num_heads=4)
        prefill = get_mla_prefill_backend(config)
    facts = CudaLayerFacts(backend=backend.get_name(), block_size=config.cache_config.block_size,
                           prefill_backend=prefill.get_name(),
                           fa_version=get_flash_attn_version(head_size=192, head_size_v=128),
                           fa3_mla=bool(flash_attn_supports_mla()), sparse=False)
    assert facts.block_size == 64
    assert cuda_startup_problem(config, SparseAttentionConfig(128, 384, tuple(PATTERN)), facts) is None, facts
    problem = cuda_startup_problem(config, SparseAttentionConfig(32, 100, tuple(PATTERN)), facts)
    assert "sink=32 is not a multiple of the KV block size 64 (use 0 or 64)" in problem, problem
    assert "recent=100 is not a multiple of the KV block size 64 (use 64 or 128)" in problem
    assert backend.get_name() in problem
    # Without the freeing any window works: the kernel reads positions, not blocks.
    assert cuda_startup_problem(config, SparseAttentionConfig(32, 100, tuple(PATTERN), free_kv=False), facts) is None
