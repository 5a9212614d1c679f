"""Sink+recent KV under vLLM without an engine: the block arithmetic, vLLM's real KV cache manager
and grouping code driven with our spec and manager, the start-up checks on a real VllmConfig,
and the ``free_kv`` config key.

What every schedule must keep (A query at p reads keys [0, sink) ∪ (p − recent, p]):
* during a step that computes tokens [C, N): every key a query of the step reads *from the
  cache* has storage (decode reads its window, position p included; a prefill reads only the
  cached context; its new tokens attend over their fresh keys);
* after the step: every key a later query can read, [0, sink) ∪ [N + 1 − recent, N), has storage;
* a request never holds more than sink/bs + recent/bs + 1 blocks, except during a chunked
  prefill step, which needs the cached context's window and its own tail (R + 1 more blocks).
"""

from __future__ import annotations

import json

import pytest
import torch

from omni_passes.config import ConfigError, PassConfig, SparseAttentionConfig
from omni_passes.kvcache.window import SinkRecentWindow, block_multiple_problem

BS = 16


# ----------------------------------------------------------------------------- pure arithmetic
def cache_reads(window: SinkRecentWindow, computed: int, num_tokens: int) -> set[int]:
    """Positions the step [computed, num_tokens) reads from the cache (vLLM's MLA: one new token
    is a decode, which reads its window from the cache; more are a prefill over fresh keys)."""
    if num_tokens - computed == 1:
        p = computed
        return {k for k in range(p + 1) if window.visible(p, k)}
    return {k for k in range(computed) for p in range(computed, num_tokens) if window.visible(p, k)}


def later_reads(window: SinkRecentWindow, num_tokens: int) -> set[int]:
    return {k for k in range(num_tokens) if window.visible(num_tokens, k)}


def simulate(window: SinkRecentWindow, chunks: list[int]):
    """Steps of one request as vLLM orders them (free, then allocate); yields the block table
    (True = storage) after each step's allocation, with the step's [computed, num_tokens)."""
    table: list[bool] = []
    computed = 0
    for new in chunks:
        for i in window.freeable_blocks(computed):
            if i < len(table):
                table[i] = False
        num_tokens = computed + new
        table += window.new_blocks(len(table), num_tokens)
        yield table, computed, num_tokens
        computed = num_tokens


@pytest.mark.parametrize("sink", [0, 16, 32, 64])
@pytest.mark.parametrize("recent", [16, 32, 48])
@pytest.mark.parametrize("prompt", [1, 5, 16, 47, 48, 49, 100, 161])
@pytest.mark.parametrize("chunk", [None, 16, 40])
def test_window_keeps_every_read_block_and_stays_bounded(sink, recent, prompt, chunk):
    window = SinkRecentWindow(sink, recent, BS)
    prefill = [prompt] if chunk is None else [min(chunk, prompt - i) for i in range(0, prompt, chunk)]
    bound = sink // BS + recent // BS + 1
    for table, computed, num_tokens in simulate(window, prefill + [1] * 120):
        stored = {i for i, s in enumerate(table) if s}
        needed = cache_reads(window, computed, num_tokens) | later_reads(window, num_tokens)
        missing = sorted(p for p in needed if p // BS not in stored)
        assert not missing, f"step [{computed}, {num_tokens}): positions {missing} have no storage"
        chunked_step = computed > 0 and num_tokens - computed > 1
        assert len(stored) <= bound + (recent // BS + 1 if chunked_step else 0)
        assert len(table) == -(-num_tokens // BS)  # one table entry per block position


def test_window_frees_everything_outside_the_window_eventually():
    window = SinkRecentWindow(32, 48, BS)
    *_, (table, _, num_tokens) = simulate(window, [200] + [1] * 100)
    assert num_tokens == 300
    kept = [i for i, s in enumerate(table) if s]
    assert kept[:2] == [0, 1] and all(i * BS >= num_tokens - 48 - BS for i in kept[2:])
    assert len(kept) <= 2 + 3 + 1


def test_prompt_middle_gets_no_storage():
    window = SinkRecentWindow(16, 32, BS)
    table = window.new_blocks(0, 201)  # a 201-token prompt: blocks 0..12
    assert table == [True] + [False] * 9 + [True] * 3


def simulate_pipelined(window: SinkRecentWindow, chunks: list[int]):
    """As ``simulate``, with vLLM CUDA's pipelined (async) scheduling: a step is scheduled while
    the previous one still runs, so freeing goes by the tokens processed before that one."""
    table: list[bool] = []
    computed = processed = 0
    for new in chunks:
        for i in window.freeable_blocks(processed):
            if i < len(table):
                table[i] = False
        num_tokens = computed + new
        table += window.new_blocks(len(table), num_tokens)
        yield table, processed, computed, num_tokens
        processed, computed = computed, num_tokens


@pytest.mark.parametrize("sink, recent", [(0, 16), (16, 32), (64, 48)])
@pytest.mark.parametrize("prompt, chunk", [(5, None), (161, None), (300, 40), (300, 64), (500, 16)])
def test_pipelined_scheduling_keeps_what_both_running_steps_read(sink, recent, prompt, chunk):
    window = SinkRecentWindow(sink, recent, BS)
    prefill = [prompt] if chunk is None else [min(chunk, prompt - i) for i in range(0, prompt, chunk)]
    bounds = {"decode": window.max_live_blocks(10**6), "prefill": window.max_live_blocks(10**6, True, True)}
    assert bounds["prefill"] == sink // BS + 3 * (recent // BS + 1)
    decoding = 0
    for table, processed, computed, num_tokens in simulate_pipelined(window, prefill + [1] * 120):
        stored = {i for i, s in enumerate(table) if s}
        # The step still running ([processed, computed)) and this one both read from the cache.
        needed = (cache_reads(window, processed, computed) | cache_reads(window, computed, num_tokens)
                  | later_reads(window, num_tokens))
        missing = sorted(p for p in needed if p // BS not in stored)
        assert not missing, f"step [{computed}, {num_tokens}) after [{processed}, {computed}): {missing} freed"
        assert len(stored) <= bounds["prefill"]
        if processed >= prompt:  # both running steps are decodes
            assert len(stored) <= bounds["decode"]
            decoding += 1
    assert decoding > 100


@pytest.mark.parametrize("sink, recent, message", [
    (20, 32, "sink=20 is not a multiple of the KV block size 16 (use 16 or 32)"),
    (16, 8, "recent=8 is not a multiple of the KV block size 16 (use 16)"),
    (16, 0, "recent=0 is not a multiple of the KV block size 16 (use 16)"),
    (4, 40, "sink=4 is not a multiple of the KV block size 16 (use 0 or 16); recent=40"),
])
def test_block_multiples_are_required_with_a_message(sink, recent, message):
    assert message in block_multiple_problem(sink, recent, BS)
    with pytest.raises(ValueError, match="sink\\+recent KV"):
        SinkRecentWindow(sink, recent, BS)
    assert block_multiple_problem(32, 48, BS) is None


# ----------------------------------------------------------------------------- config key
def test_free_kv_config_key(tmp_path):
    path = tmp_path / "passes.json"
    path.write_text(json.dumps({"passes": ["sparse_attention"], "sparse_attention": {"pattern": [1]}}))
    assert PassConfig.load(path).sparse_attention.free_kv is True
    path.write_text(json.dumps({"sparse_attention": {"free_kv": False}}))
    config = PassConfig.load(path)
    assert config.sparse_attention.free_kv is False and config.to_dict()["sparse_attention"]["free_kv"] is False
    path.write_text(json.dumps({"sparse_attention": {"free_kv": "yes"}}))
    with pytest.raises(ConfigError, match="free_kv must be true or false, got 'yes'"):
        PassConfig.load(path)


# ----------------------------------------------------------------------------- vLLM's own classes
vllm = pytest.importorskip("vllm")


def mla_spec():
    from vllm.v1.kv_cache_interface import MLAAttentionSpec

    return MLAAttentionSpec(block_size=BS, num_kv_heads=1, max_tp_shards=1, head_size=576, dtype=torch.float32,
                            cache_dtype_str="auto")


def layer_specs(pattern, sink=16, recent=32, layers=4):
    from omni_passes.hosts.vllm.kv_spec import SinkRecentMLASpec

    base = mla_spec()
    return {f"model.layers.{i}.self_attn.attn": (SinkRecentMLASpec.from_mla_spec(base, sink, recent)
                                                  if i in pattern else base) for i in range(layers)}


@pytest.fixture(scope="module")
def registered():
    from omni_passes.hosts.vllm.kv_register import register_sink_recent_kv

    config = PassConfig.from_dict({"passes": ["sparse_attention"],
                                   "sparse_attention": {"sink": 16, "recent": 32, "pattern": [1, 3]}})
    assert register_sink_recent_kv(config)
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    # vLLM's own specs are still registered next to ours.
    assert KVCacheSpecRegistry.get_uniform_type_base_spec(mla_spec()) is FullAttentionSpec
    yield
    from omni_passes.hosts.vllm.kv_layer import uninstall

    uninstall()  # later tests in this process build vLLM's own MLA layers


@pytest.fixture(scope="module")
def vllm_config(tiny_checkpoint, registered):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(tiny_checkpoint), dtype="float32", max_model_len=2048,
                      compilation_config={"inductor_passes": {"post_grad_custom_post_pass": "omni_passes.vllm_post_grad_pass"}})
    config = args.create_engine_config()
    # The engine core resolves the KV cache layout from the workers' backends (CPU MLA here).
    from vllm.v1.attention.backends.mla.cpu_mla import CPUMLABackend
    from vllm.v1.attention.backends.utils import (
        get_supported_kv_cache_layouts,
        resolve_kv_cache_layout,
    )

    layouts = [[layout.name for layout in get_supported_kv_cache_layouts([CPUMLABackend])]]
    resolve_kv_cache_layout(config, layouts, layer_specs([1, 3]).values())
    return config


def test_spec_has_the_mla_page_layout_and_a_bounded_footprint(vllm_config):
    from omni_passes.hosts.vllm.kv_spec import SinkRecentMLASpec

    spec = SinkRecentMLASpec.from_mla_spec(mla_spec(), 16, 32)
    assert spec.page_size_bytes == mla_spec().page_size_bytes == BS * 576 * 4
    assert spec.max_memory_usage_bytes(vllm_config) == (1 + 2 + 1) * spec.page_size_bytes
    assert mla_spec().max_memory_usage_bytes(vllm_config) == 2048 // BS * spec.page_size_bytes
    # With chunked prefill a step holds the cached context's window and its own tail.
    vllm_config.scheduler_config.enable_chunked_prefill = True
    try:
        assert spec.max_memory_usage_bytes(vllm_config) == (1 + 2 * (2 + 1)) * spec.page_size_bytes
    finally:
        vllm_config.scheduler_config.enable_chunked_prefill = False


def test_only_a_plain_mla_spec_is_compressed_naming_the_layer_otherwise():
    from vllm.v1.kv_cache_interface import HiddenStateCacheSpec

    from omni_passes.hosts.vllm.kv_checks import SinkRecentKVError
    from omni_passes.hosts.vllm.kv_spec import plain_mla_spec

    spec = mla_spec()
    assert plain_mla_spec(spec, "model.layers.1.self_attn.attn") is spec
    subclass = HiddenStateCacheSpec(block_size=BS, num_kv_heads=1, max_tp_shards=1, head_size=576,
                                    dtype=torch.float32, cache_dtype_str="auto")
    with pytest.raises(SinkRecentKVError, match=r"^model.layers.3.self_attn.attn: KV cache spec HiddenStateCacheSpec; "
                                                r"sink\+recent KV needs a plain MLAAttentionSpec"):
        plain_mla_spec(subclass, "model.layers.3.self_attn.attn")


@pytest.mark.parametrize("pattern, groups", [
    ([1, 3], [("MLAAttentionSpec", [0, 2]), ("SinkRecentMLASpec", [1, 3])]),
    ([1], [("MLAAttentionSpec", [0]), ("MLAAttentionSpec", [2]), ("MLAAttentionSpec", [3]), ("SinkRecentMLASpec", [1])]),
    ([1, 2, 3], [("MLAAttentionSpec", [0]), ("SinkRecentMLASpec", [1]), ("SinkRecentMLASpec", [2]),
                 ("SinkRecentMLASpec", [3])]),
    ([0, 1, 2, 3], [("SinkRecentMLASpec", [0, 1, 2, 3])]),
    ([], [("MLAAttentionSpec", [0, 1, 2, 3])]),
])
def test_vllm_groups_compressed_layers_apart_and_counts_their_blocks(vllm_config, pattern, groups):
    from vllm.v1.core.kv_cache_utils import (
        get_kv_cache_configs,
        get_max_concurrency_for_kv_cache_config,
    )

    memory = 1 << 30
    config = get_kv_cache_configs(vllm_config, [layer_specs(pattern)], [memory])[0]
    found = sorted((type(g.kv_cache_spec).__name__, sorted(int(n.split(".")[2]) for n in g.layer_names))
                   for g in config.kv_cache_groups)
    assert found == sorted(groups)
    page = BS * 576 * 4
    layers_per_block = 4 // len(groups) if len(groups) > 1 else 4
    assert config.num_blocks == memory // (page * layers_per_block)
    per_request = sum(2048 // BS if name == "MLAAttentionSpec" else 4 for name, _ in groups)
    concurrency = get_max_concurrency_for_kv_cache_config(vllm_config, config)
    assert concurrency == pytest.approx(config.num_blocks / per_request)


def test_half_the_layers_compressed_nearly_doubles_concurrency(vllm_config):
    """vLLM's own capacity figure at 2048 tokens, same memory: dense vs layers 1 and 3 compressed."""
    from vllm.v1.core.kv_cache_utils import (
        get_kv_cache_configs,
        get_max_concurrency_for_kv_cache_config,
    )

    def concurrency(pattern, sink, recent):
        config = get_kv_cache_configs(vllm_config, [layer_specs(pattern, sink, recent)], [1 << 30])[0]
        return get_max_concurrency_for_kv_cache_config(vllm_config, config)

    dense = concurrency([], 16, 32)
    # 128 blocks per request in each group vs 128 + (S + R + 1): ratio 2 * 128 / (128 + S + R + 1)
    assert concurrency([1, 3], 64, 128) / dense == pytest.approx(2 * 128 / (128 + 4 + 8 + 1), rel=1e-3)
    assert concurrency([1, 3], 128, 384) / dense == pytest.approx(2 * 128 / (128 + 8 + 24 + 1), rel=1e-3)


def make_manager(num_blocks=400, sink=16, recent=32):
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.kv_cache_interface import (
        KVCacheConfig,
        KVCacheGroupSpec,
        KVCacheTensor,
    )

    specs = layer_specs([1, 3], sink, recent)
    names = list(specs)
    groups = [KVCacheGroupSpec([names[0], names[2]], specs[names[0]]),
              KVCacheGroupSpec([names[1], names[3]], specs[names[1]])]
    page = specs[names[0]].page_size_bytes
    tensors = [KVCacheTensor(size=page * num_blocks, layers=[names[i], names[i + 1]], layer_stride=0,
                             block_stride=page) for i in (0, 2)]
    config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=tensors, kv_cache_groups=groups)
    return KVCacheManager(config, max_model_len=2048, scheduler_block_size=BS, hash_block_size=BS,
                          enable_caching=False)


def make_request(rid, prompt_len):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    params = SamplingParams(max_tokens=1000, temperature=0.0)
    return Request(rid, list(range(3, 3 + prompt_len)), params, None)


@pytest.mark.parametrize("chunk", [None, 32, 40, 64])
def test_vllm_kv_cache_manager_with_our_manager_over_a_long_generation(registered, chunk):
    """vLLM's real KVCacheManager (hybrid coordinator, one block pool) running our manager next to
    the full-attention one: allocate_slots per step as the scheduler calls it."""
    from omni_passes.hosts.vllm.kv_manager import SinkRecentManager

    kv = make_manager()
    full, ours = kv.coordinator.single_type_managers
    assert isinstance(ours, SinkRecentManager)
    window = ours.window
    prompts = {"a": 5, "b": 47, "c": 161, "d": 300}
    requests = {rid: make_request(rid, n) for rid, n in prompts.items()}
    total = kv.block_pool.get_num_free_blocks()
    schedule = {rid: ([n] if chunk is None else [min(chunk, n - i) for i in range(0, n, chunk)]) + [1] * 150
                for rid, n in prompts.items()}
    for step in range(max(map(len, schedule.values()))):
        for rid, request in requests.items():
            if step >= len(schedule[rid]):
                continue
            new = schedule[rid][step]
            computed = request.num_computed_tokens
            assert kv.allocate_slots(request, new) is not None
            table = ours.req_to_blocks[rid]
            stored = {i for i, b in enumerate(table) if not b.is_null}
            needed = cache_reads(window, computed, computed + new) | later_reads(window, computed + new)
            assert all(p // BS in stored for p in needed), (rid, computed, new)
            chunked_step = computed > 0 and new > 1
            assert ours.live_blocks(rid) <= 1 + 2 + 1 + (3 if chunked_step else 0)
            assert len(full.req_to_blocks[rid]) == -(-(computed + new) // BS)  # dense group keeps all
            request.num_computed_tokens += new
            if request.num_computed_tokens >= request.num_prompt_tokens:
                request.append_output_token_ids(7)
        live = sum(len(full.req_to_blocks[r]) + ours.live_blocks(r) for r in requests)
        assert kv.block_pool.get_num_free_blocks() == total - live  # every freed block is back in the pool
    for request in requests.values():
        kv.free(request)
    assert kv.block_pool.get_num_free_blocks() == total


def test_admission_counts_only_the_blocks_that_get_storage(registered):
    # 500 tokens: the dense group needs 32 blocks, ours the sink block and the 3 blocks of
    # positions >= 500 - 32; block 0 of the pool is the null block.
    kv = make_manager(num_blocks=37)
    assert kv.allocate_slots(make_request("long", 500), 500, full_sequence_must_fit=True) is not None
    assert kv.block_pool.get_num_free_blocks() == 36 - 32 - 4
    kv = make_manager(num_blocks=36)
    assert kv.allocate_slots(make_request("long", 500), 500, full_sequence_must_fit=True) is None


# ----------------------------------------------------------------------------- start-up checks
def test_startup_accepts_a_serving_config(vllm_config):
    from omni_passes.hosts.vllm.kv_layer import startup_problem

    assert startup_problem(vllm_config, SparseAttentionConfig(16, 32, (1, 3))) is None


@pytest.mark.parametrize("change, window, message", [
    (None, SparseAttentionConfig(20, 32, (1,)), "sink=20 is not a multiple of the KV block size 16 (use 16 or 32)"),
    (None, SparseAttentionConfig(16, 40, (1,)), "recent=40 is not a multiple of the KV block size 16 (use 32 or 48)"),
    (None, SparseAttentionConfig(16, 32, (1, 4, 9)), "pattern names layers [4, 9], but the model has 4 decoder layers"),
    (("cache_config", "enable_prefix_caching", True), None, "prefix caching is on"),
    (("compilation_config", "inductor_passes", {}), None, "post_grad_custom_post_pass is None"),
])
def test_startup_refuses_what_it_cannot_serve(vllm_config, change, window, message):
    from omni_passes.hosts.vllm.kv_layer import startup_problem

    window = window or SparseAttentionConfig(16, 32, (1, 3))
    if change is None:
        assert message in startup_problem(vllm_config, window)
        return
    section, key, value = change
    holder = getattr(vllm_config, section)
    before = getattr(holder, key)
    setattr(holder, key, value)
    try:
        assert message in startup_problem(vllm_config, window)
    finally:
        setattr(holder, key, before)


def test_startup_refuses_eager_mode(vllm_config):
    from vllm.config import CompilationMode

    from omni_passes.hosts.vllm.kv_layer import startup_problem

    before = vllm_config.compilation_config.mode
    vllm_config.compilation_config.mode = CompilationMode.NONE
    try:
        assert "compilation is off" in startup_problem(vllm_config, SparseAttentionConfig(16, 32, (1, 3)))
    finally:
        vllm_config.compilation_config.mode = before


# ----------------------------------------------------------------------------- CUDA start-up checks
def cuda_facts(**change):
    from omni_passes.hosts.vllm.kv_checks import CudaLayerFacts

    facts = {"backend": "FLASH_ATTN_MLA", "block_size": BS, "prefill_backend": "FLASH_ATTN", "fa_version": 3,
             "fa3_mla": True, "sparse": False}
    facts.update(change)
    return CudaLayerFacts(**facts)


@pytest.fixture
def cuda_like(vllm_config):
    """The CPU VllmConfig with what vLLM CUDA has: bf16, the hybrid KV cache manager on."""
    model, scheduler = vllm_config.model_config, vllm_config.scheduler_config
    before = model.dtype, scheduler.disable_hybrid_kv_cache_manager
    model.dtype, scheduler.disable_hybrid_kv_cache_manager = torch.bfloat16, False
    yield vllm_config
    model.dtype, scheduler.disable_hybrid_kv_cache_manager = before


def test_cuda_startup_accepts_a_serving_config(cuda_like):
    from omni_passes.hosts.vllm.kv_checks import cuda_startup_problem

    assert cuda_startup_problem(cuda_like, SparseAttentionConfig(16, 32, (1, 3)), cuda_facts()) is None
    # No graph pass on CUDA: compilation settings do not matter there.
    inductor = cuda_like.compilation_config.inductor_passes
    cuda_like.compilation_config.inductor_passes = {}
    try:
        assert cuda_startup_problem(cuda_like, SparseAttentionConfig(16, 32, (1, 3)), cuda_facts()) is None
    finally:
        cuda_like.compilation_config.inductor_passes = inductor


@pytest.mark.parametrize("window, facts, change, message", [
    (SparseAttentionConfig(32, 100, (1,)), {"block_size": 64, "backend": "FLASHMLA"}, None,
     ("sink=32 is not a multiple of the KV block size 64 (use 0 or 64); recent=100 is not a multiple of the KV block "
      "size 64 (use 64 or 128), the KV block size vLLM uses with its FLASHMLA attention backend")),
    (SparseAttentionConfig(16, 32, (1, 7)), {}, None, "pattern names layers [7], but the model has 4 decoder layers"),
    (None, {"sparse": True}, None, "sparse (indexer) MLA layer"),
    (None, {}, ("model_config", "dtype", torch.float32), "dtype is float32"),
    (None, {}, ("cache_config", "cache_dtype", "fp8"), "kv_cache_dtype is 'fp8'"),
    (None, {"fa3_mla": False}, None, "FlashAttention 3 MLA is not available here"),
    (None, {"prefill_backend": "FLASHINFER", "fa_version": None}, None, "the MLA prefill backend is FLASHINFER"),
    (None, {}, ("cache_config", "enable_prefix_caching", True), "enable_prefix_caching=False (--no-enable-prefix-caching)"),
    (None, {}, ("scheduler_config", "disable_hybrid_kv_cache_manager", True), "hybrid KV cache manager is off"),
    (None, {}, ("speculative_config", None, object()), "speculative decoding is on"),
    (None, {}, ("parallel_config", "decode_context_parallel_size", 2), "context parallelism is on"),
])
def test_cuda_startup_refuses_naming_the_setting(cuda_like, window, facts, change, message):
    from omni_passes.hosts.vllm.kv_checks import cuda_startup_problem

    window = window or SparseAttentionConfig(16, 32, (1, 3))
    if change is None:
        assert message in cuda_startup_problem(cuda_like, window, cuda_facts(**facts))
        return
    section, key, value = change
    holder = cuda_like if key is None else getattr(cuda_like, section)
    key = key or section
    before = getattr(holder, key)
    object.__setattr__(holder, key, value)
    try:
        assert message in cuda_startup_problem(cuda_like, window, cuda_facts(**facts))
    finally:
        object.__setattr__(holder, key, before)


def test_cuda_without_freeing_needs_no_block_multiples_and_allows_prefix_caching(cuda_like):
    from omni_passes.hosts.vllm.kv_checks import cuda_startup_problem

    window = SparseAttentionConfig(20, 100, (1, 3), free_kv=False)
    before = cuda_like.cache_config.enable_prefix_caching
    cuda_like.cache_config.enable_prefix_caching = True
    try:
        assert cuda_startup_problem(cuda_like, window, cuda_facts(block_size=64)) is None
    finally:
        cuda_like.cache_config.enable_prefix_caching = before


def test_pipelined_scheduling_counts_a_third_window_in_the_footprint(vllm_config):
    from omni_passes.hosts.vllm.kv_spec import SinkRecentMLASpec

    spec = SinkRecentMLASpec.from_mla_spec(mla_spec(), 16, 32)
    scheduler = vllm_config.scheduler_config
    before = scheduler.enable_chunked_prefill, scheduler.async_scheduling
    scheduler.enable_chunked_prefill, scheduler.async_scheduling = True, True
    try:
        assert spec.max_memory_usage_bytes(vllm_config) == (1 + 3 * (2 + 1)) * spec.page_size_bytes
    finally:
        scheduler.enable_chunked_prefill, scheduler.async_scheduling = before


def test_register_on_cpu_leaves_free_kv_false_to_the_graph_pass():
    from omni_passes.hosts.vllm.kv_register import (
        register_sink_recent_kv,
        wants_layer_hook,
    )

    config = PassConfig.from_dict({"passes": ["sparse_attention"],
                                   "sparse_attention": {"sink": 16, "recent": 32, "pattern": [1], "free_kv": False}})
    assert not register_sink_recent_kv(config)  # CPU: the sparse-attention pass does the attention
    assert wants_layer_hook(config, cuda=True)  # CUDA: the layer hook does it, over dense KV
    assert not wants_layer_hook(PassConfig.from_dict({"passes": ["sparse_attention"]}), cuda=True)  # no pattern
