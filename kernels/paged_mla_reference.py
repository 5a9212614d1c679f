"""Sink+recent MLA decode on vLLM's paged latent cache: argument checks and the PyTorch reference.

vLLM's MLA backends keep one cache tensor per layer, ``kv_cache [num_blocks, block_size, R + Dr]``:
row ``kv_cache[blk, slot]`` holds one token's latent ``c`` (``[:R]``, R = kv_lora_rank = 512)
and its rope key (``[R:]``, Dr = 64). Request b's position p lives at
``(block_table[b, p // block_size], p % block_size)``. The decode query arrives with W_UK already
absorbed: ``q_nope [T, H, R]`` (q_nope·W_UK) and ``q_pe [T, H, Dr]``; every head attends to the
same latent rows (multi-query attention, key dim R + Dr, value = the latent ``c``) and the
output stays in latent space, ``[T, H, R]``, for vLLM to bring back through W_UV.

Which rows a query sees. A query whose causal length is L (it sits at position L - 1) sees

    [0, min(sink, L))  ∪  [max(sink, L - recent), L)

which is every position when L <= sink + recent. With one token per request (decode) L is
``seq_lens[b]``. With ``query_start_loc`` (vLLM's varlen decode: a request may bring several
query tokens, the last of them at position seq_lens[b] - 1), token i of request b, counted
from its last token, has L = seq_lens[b] - (query_start_loc[b + 1] - 1 - i). A token past
``query_start_loc[-1]`` (padding) and a request with L = 0 see nothing: output 0, lse -inf.

This module is pure torch (no Triton): ``validate_paged_mla_args`` (shapes and dtypes only, so it
never syncs with the device) is shared by the Triton launcher, and
``paged_sink_recent_mla_reference`` gathers each query's visible rows through the block table and
attends in float32 (the tests' ground truth; it loops in Python and reads lengths to the host).
"""

from __future__ import annotations

import torch

__all__ = ["SUPPORTED_DTYPES", "validate_paged_mla_args", "sink_recent_positions", "token_lengths",
           "gather_latent_rows", "paged_sink_recent_mla_reference"]

_OP = "paged_sink_recent_mla_decode"
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)


def validate_paged_mla_args(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                            block_table: torch.Tensor, seq_lens: torch.Tensor, sink: int, recent: int,
                            query_start_loc: torch.Tensor | None = None, op: str = _OP) -> None:
    """Raise ``ValueError`` naming the bad argument. Shapes, dtypes and devices only: lengths are
    data (reading them would sync with the device)."""
    if not isinstance(sink, int) or isinstance(sink, bool) or sink < 0:
        raise ValueError(f"{op}: sink must be an int >= 0, got {sink!r}")
    if not isinstance(recent, int) or isinstance(recent, bool) or recent < 1:
        raise ValueError(f"{op}: recent must be an int >= 1, got {recent!r}")
    if kv_cache.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{op}: kv_cache dtype {kv_cache.dtype} is not supported: only a bf16/fp16 (or fp32) cache "
            f"holding the latent and rope key as they are (vLLM kv_cache_dtype 'auto'); fp8 caches "
            f"(uint8/float8 storage with a per-layer scale, or DeepSeek-V3.2's 656-byte 'fp8_ds_mla' "
            f"rows) are refused")
    for name, t, dims in (("q_nope", q_nope, "[T, H, R]"), ("q_pe", q_pe, "[T, H, Dr]"),
                          ("kv_cache", kv_cache, "[num_blocks, block_size, R + Dr]")):
        if t.dim() != 3:
            raise ValueError(f"{op}: {name} must be 3-D {dims}, got shape {tuple(t.shape)}")
        if t.dtype != kv_cache.dtype:
            raise ValueError(f"{op}: q_nope, q_pe and kv_cache must share a dtype, got "
                             f"{q_nope.dtype}, {q_pe.dtype}, {kv_cache.dtype}")
        if t.numel() > 0 and t.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must have unit stride along its last dim, got strides {t.stride()}")
    T, H, R = q_nope.shape
    if tuple(q_pe.shape[:2]) != (T, H):
        raise ValueError(f"{op}: q_pe's [T, H] {tuple(q_pe.shape[:2])} != q_nope's {(T, H)}")
    if kv_cache.shape[-1] != R + q_pe.shape[-1]:
        raise ValueError(f"{op}: kv_cache rows hold {kv_cache.shape[-1]} values, but q_nope's R {R} + "
                         f"q_pe's Dr {q_pe.shape[-1]} = {R + q_pe.shape[-1]}")
    if kv_cache.shape[1] < 1:
        raise ValueError(f"{op}: kv_cache block_size must be >= 1, got shape {tuple(kv_cache.shape)}")
    if block_table.dim() != 2 or block_table.dtype not in _INDEX_DTYPES:
        raise ValueError(f"{op}: block_table must be 2-D [B, max_blocks] int32/int64, got "
                         f"{tuple(block_table.shape)} {block_table.dtype}")
    B = block_table.shape[0]
    if seq_lens.dim() != 1 or seq_lens.shape[0] != B or seq_lens.dtype not in _INDEX_DTYPES:
        raise ValueError(f"{op}: seq_lens must be 1-D [B] = [{B}] int32/int64 (B = block_table rows), got "
                         f"{tuple(seq_lens.shape)} {seq_lens.dtype}")
    if query_start_loc is None:
        if T != B:
            raise ValueError(f"{op}: without query_start_loc there is one query token per request, but q has "
                             f"{T} tokens and block_table {B} requests")
    elif query_start_loc.dim() != 1 or query_start_loc.shape[0] != B + 1 or query_start_loc.dtype not in _INDEX_DTYPES:
        raise ValueError(f"{op}: query_start_loc must be 1-D [B + 1] = [{B + 1}] int32/int64, got "
                         f"{tuple(query_start_loc.shape)} {query_start_loc.dtype}")
    tensors = [("q_pe", q_pe), ("kv_cache", kv_cache), ("block_table", block_table), ("seq_lens", seq_lens)]
    if query_start_loc is not None:
        tensors.append(("query_start_loc", query_start_loc))
    for name, t in tensors:
        if t.device != q_nope.device:
            raise ValueError(f"{op}: all tensors must be on one device, got q_nope {q_nope.device}, {name} {t.device}")


def sink_recent_positions(length: int, sink: int, recent: int) -> torch.Tensor:
    """Positions a query of causal length ``length`` sees, ascending: [0, min(sink, L)) then
    [max(sink, L - recent), L). int64 [n]."""
    length = max(length, 0)
    start = max(sink, length - recent)
    head = torch.arange(min(sink, length), dtype=torch.int64)
    tail = torch.arange(start, max(start, length), dtype=torch.int64)
    return torch.cat([head, tail])


def token_lengths(seq_lens: torch.Tensor, num_tokens: int,
                  query_start_loc: torch.Tensor | None = None) -> list[tuple[int, int]]:
    """(request, causal length) of each query token, host-side. Padding tokens: (-1, 0)."""
    lens = [int(x) for x in seq_lens.tolist()]
    if query_start_loc is None:
        return list(enumerate(lens))
    starts = [int(x) for x in query_start_loc.tolist()]
    out = []
    for tok in range(num_tokens):
        req = next((b for b in range(len(lens)) if starts[b] <= tok < starts[b + 1]), -1)
        out.append((-1, 0) if req < 0 else (req, max(0, lens[req] - (starts[req + 1] - 1 - tok))))
    return out


def gather_latent_rows(kv_cache: torch.Tensor, block_table_row: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """kv_cache [num_blocks, block_size, D], one request's block_table row [max_blocks], positions
    [n] -> [n, D]: row p is kv_cache[block_table_row[p // block_size], p % block_size]."""
    block_size = kv_cache.shape[1]
    positions = positions.to(kv_cache.device)
    blocks = block_table_row.to(torch.int64)[positions // block_size]
    return kv_cache[blocks, positions % block_size]


def paged_sink_recent_mla_reference(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                                    block_table: torch.Tensor, seq_lens: torch.Tensor, sink: int, recent: int,
                                    scale: float, query_start_loc: torch.Tensor | None = None,
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA attention over each query's sink + recent rows, gathered through the block
    table, in float32.

    q_nope [T, H, R], q_pe [T, H, Dr], kv_cache [num_blocks, block_size, R + Dr],
    block_table [B, max_blocks], seq_lens [B], query_start_loc [B + 1] or None (then T = B)
    -> (out [T, H, R] in q's dtype, lse [T, H] float32, natural log of the softmax denominator
    of scale·q·k, -inf where nothing is visible).
    """
    validate_paged_mla_args(q_nope, q_pe, kv_cache, block_table, seq_lens, sink, recent, query_start_loc)
    T, H, R = q_nope.shape
    out = torch.zeros(T, H, R, dtype=torch.float32, device=q_nope.device)
    lse = torch.full((T, H), float("-inf"), dtype=torch.float32, device=q_nope.device)
    q = torch.cat([q_nope, q_pe], dim=-1).float()
    for tok, (req, length) in enumerate(token_lengths(seq_lens, T, query_start_loc)):
        positions = sink_recent_positions(length, sink, recent)
        if positions.numel() == 0:
            continue
        rows = gather_latent_rows(kv_cache, block_table[req], positions).float()   # [n, R + Dr]
        scores = scale * (q[tok] @ rows.T)                                           # [H, n]
        lse[tok] = torch.logsumexp(scores, dim=-1)
        out[tok] = torch.softmax(scores, dim=-1) @ rows[:, :R]
    return out.to(q_nope.dtype), lse
