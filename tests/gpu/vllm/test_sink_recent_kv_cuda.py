"""Sink+recent KV in vLLM 0.26 CUDA (skipped without CUDA and vLLM's CUDA build).

1. The prefill path on the GPU without an engine: the sliding window over the new tokens (FA3
   where ``kv_prefill.fa3_window_usable``, else the PyTorch window) plus the side keys (sink,
   visible cached rows), merged by log-sum-exp (``omni_passes.hosts.vllm.kv_prefill`` as
   ``kv_cuda`` calls it), against masked attention over every visible key in float32; and it
   asks the cache only for visible rows. FA3 at a 384-token window is kept as a strict xfail: it
   differed on the H100.
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
   * within the window ``compressed`` equals ``dense`` up to bf16 near-ties: the chosen tokens'
     log-probabilities agree within ``LOGPROB_TOL`` while the sequences agree, and where they
     part, dense's top-2 gap is below ``NEAR_TIE`` (float32 is not available there: FA3 MLA
     takes bf16/fp16 only);
   * refusals name the setting: prefix caching (vLLM's default on CUDA) stops the engine;
     sink/recent that are not multiples of the real block size name the nearest values.

Runtime on an H100: about two minutes (three engine starts sharing one compile cache).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu  # skipped without CUDA and vLLM's CUDA build: conftest.py

from omni_passes.hosts.vllm.kv_prefill import (
    context_positions,
    fa3_window_usable,
    sink_recent_prefill,
    sink_recent_prefill_reference,
    window_attention_chunked,
)

SINK, RECENT, BS = 64, 128, 16
PATTERN = [1, 3]
LOGPROB_TOL = 0.25    # bf16: the chosen token's log-probability, compressed vs dense, within the window
NEAR_TIE = 0.25       # where greedy sequences part, dense's top-2 gap must be a near-tie
CHUNK = 256
SHORT = [20, 33, 47]          # prompts that stay within sink + recent with SHORT_NEW tokens
SHORT_NEW = 96
LONG = [600, 1000]            # 600 = 2 x 256 + 88: a last chunk of 88 <= recent takes the decode path
LONG_NEW = 400
TIMEOUT = 900


# ----------------------------------------------------------------------------- 1. prefill math
def _fa3_window(q, k, v, starts, recent, scale):
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    cu = torch.tensor(starts, dtype=torch.int32, device=q.device)
    longest = max(b - a for a, b in itertools.pairwise(starts))
    out, lse = flash_attn_varlen_func(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest,
                                      max_seqlen_k=longest, softmax_scale=scale, causal=True,
                                      window_size=[recent - 1, 0], return_softmax_lse=True, fa_version=3)
    return out, lse


def _prefill_case(sink, recent, window_fn):
    """The prefill of four requests (two with cached context) through ``window_fn`` against
    masked attention over every visible key (float32): (relative error, rows asked per request,
    contexts)."""
    torch.manual_seed(0)
    dev, heads, dqk, dv, scale = torch.device("cuda"), 16, 192, 128, 192 ** -0.5
    lens, contexts = [700, 33, 1500, 300], [0, 0, 900, 5000]
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    q, k = (torch.randn(starts[-1], heads, dqk, device=dev, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(starts[-1], heads, dv, device=dev, dtype=torch.bfloat16)
    cache_k = [torch.randn(c, heads, dqk, device=dev, dtype=torch.bfloat16) for c in contexts]
    cache_v = [torch.randn(c, heads, dv, device=dev, dtype=torch.bfloat16) for c in contexts]
    asked: dict[int, list[int]] = {}

    def context_kv(r, positions):
        asked.setdefault(r, []).extend(positions.tolist())
        return cache_k[r][positions.to(dev)], cache_v[r][positions.to(dev)]

    def everything(r, positions):
        return cache_k[r][positions.to(dev)], cache_v[r][positions.to(dev)]

    window = {"fa3": lambda *x: _fa3_window(*x, starts, recent, scale),
              "chunked": lambda *x: window_attention_chunked(*x, starts, recent, scale)}[window_fn]
    ours = sink_recent_prefill(q, k, v, starts, contexts, sink, recent, scale, window, context_kv)
    ref = sink_recent_prefill_reference(q, k, v, starts, contexts, sink, recent, scale, everything)
    rel = ((ours.double() - ref.double()).norm() / ref.double().norm()).item()
    return rel, {r: sorted(set(asked.get(r, []))) for r in range(len(contexts))}, contexts


@pytest.mark.parametrize("sink, recent", [(64, 128), (128, 384), (0, 128), (16, 2048)])
def test_prefill_as_the_engine_runs_it_matches_masked_attention(sink, recent):
    """The window the engine picks (FA3 where ``fa3_window_usable``, else the PyTorch window)
    plus the side keys, merged by log-sum-exp; the cache is asked only for visible rows."""
    for window_fn in ["fa3", "chunked"] if fa3_window_usable(recent) else ["chunked"]:
        rel, asked, contexts = _prefill_case(sink, recent, window_fn)
        assert rel < 1e-2, f"{window_fn} window + side keys vs masked attention: relative error {rel:.2e}"
        for r, context in enumerate(contexts):
            assert asked[r] == context_positions(context, sink, recent).tolist()


@pytest.mark.xfail(strict=True, reason="FA3's window at window_size [383, 0] (head dims 192 / 128) differed from "
                                       "masked attention by 5.2e-2 on the H100 (2026-12-07); if it passes, FA3 can "
                                       "run longer windows: raise kv_prefill.FA3_WINDOW_MAX_RECENT")
def test_fa3_window_beyond_the_verified_length_matches_masked_attention():
    assert not fa3_window_usable(384)
    rel, _, _ = _prefill_case(128, 384, "fa3")
    assert rel < 1e-2, f"FA3 window at recent 384: relative error {rel:.2e}"


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


def _run(model_dir: Path, work: Path, pass_config: str | None) -> dict:
    proc = _probe(model_dir, work, pass_config, "--no-prefix-caching")
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


def test_tokens_within_the_window_equal_dense(compressed, dense):
    agreed = 0
    for i in range(len(SHORT)):
        a, b = dense["token_ids"][i], compressed["token_ids"][i]
        assert len(a) + len(dense["prompt_token_ids"][i]) <= SINK + RECENT
        top_a, top_b = dense["top_logprobs"][i], compressed["top_logprobs"][i]
        part = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        same = len(a) if part is None else part
        for j in range(same):
            assert abs(top_a[j][0] - top_b[j][0]) < LOGPROB_TOL, (i, j, top_a[j], top_b[j])
        if part is not None:
            gap = top_a[part][0] - top_a[part][1]
            assert gap < NEAR_TIE, f"prompt {i}: tokens part at {part} where dense's top-2 gap is {gap:.3f}"
        agreed += same
    assert agreed >= SHORT_NEW, f"only {agreed} tokens agree before near-ties"


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
