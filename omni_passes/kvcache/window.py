"""Which KV blocks a sink + recent layer needs: pure block arithmetic, no vLLM.

A query at position p of a compressed layer attends to keys [0, sink) ∪ (p − recent, p]. Its KV
lives in a paged cache of ``block_size``-token blocks; block i holds positions
[i·bs, (i+1)·bs). With ``sink`` and ``recent`` multiples of ``bs`` (``S = sink / bs``,
``R = recent / bs`` blocks), a request's blocks over time::

    positions:  [0, sink)     [sink, N − recent)                [N − recent, N)
    blocks:     0 .. S−1      S .. ⌊(N − recent)/bs⌋ − 1        the rest
    state:      kept          freed (or never allocated)        kept: the next queries read them

The scheduler calls two things per step of a request (N = tokens with a slot after the step):

* ``needs_storage(i, N)``: does a *new* block i need real storage? Yes if it holds a sink
  position or a position ≥ N − recent (decode reads [N − recent, N) from the cache, and the
  positions ≥ N + 1 − recent are read by the next step). A prompt's middle blocks are written by
  the prefill but never read from the cache (prefill attends over its own fresh keys), so they
  get no storage at all.
* ``freeable_blocks(P)``: once P tokens are processed, the next query (at P) reads
  [0, sink) ∪ [P + 1 − recent, P]; blocks entirely inside [sink, P + 1 − recent) go back to the
  pool.

Live blocks per request therefore never exceed ``S + R + 1`` (``max_live_blocks``): the window
[N − recent, N) spans R + 1 blocks when it does not start on a block boundary. A chunked-prefill
step computing [C, N) also reads the cached context's window [C + 1 − recent, C): up to
``S + 2(R + 1)`` blocks during that step. With pipelined (async) scheduling, as vLLM CUDA does
by default, the next chunk is scheduled while the previous one [C', C) still runs, and vLLM frees
only by the tokens processed (P = C'): the previous chunk's tail is still held then, up to
``S + 3(R + 1)``. A decode step stays within ``S + R + 1`` either way (P lags by one token, whose
query reads from C − recent on).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SinkRecentWindow", "block_multiple_problem"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_multiple_problem(sink: int, recent: int, block_size: int) -> str | None:
    """Why (sink, recent) cannot free whole blocks of ``block_size`` tokens, or None if they can.

    Freeing works on whole blocks, so both must be multiples of the block size (recent ≥ one
    block); the message names the nearest values that work.
    """
    problems = []
    for name, value, least in (("sink", sink, 0), ("recent", recent, block_size)):
        if value % block_size or value < least:
            down = max(least, value // block_size * block_size)
            up = max(least, _cdiv(value, block_size) * block_size)
            nearest = f"{down}" if down == up else f"{down} or {up}"
            problems.append(f"{name}={value} is not a multiple of the KV block size {block_size} (use {nearest})")
    return "; ".join(problems) or None


@dataclass(frozen=True)
class SinkRecentWindow:
    """The window of one compressed layer group, in tokens, over blocks of ``block_size``."""

    sink: int
    recent: int
    block_size: int

    def __post_init__(self) -> None:
        problem = block_multiple_problem(self.sink, self.recent, self.block_size)
        if problem:
            raise ValueError(f"sink+recent KV: {problem}")

    @property
    def sink_blocks(self) -> int:
        return self.sink // self.block_size

    @property
    def recent_blocks(self) -> int:
        return self.recent // self.block_size

    def max_live_blocks(self, max_len: int, chunked_prefill: bool = False, pipelined: bool = False) -> int:
        """Most blocks one request holds at once, for requests of up to ``max_len`` tokens. A
        chunked-prefill step also holds the cached context's window next to its own tail; with
        pipelined scheduling also the tail of the chunk still running."""
        windows = 1 + (1 + int(pipelined) if chunked_prefill else 0)
        return min(_cdiv(max_len, self.block_size), self.sink_blocks + (self.recent_blocks + 1) * windows)

    def needs_storage(self, block: int, num_tokens: int) -> bool:
        """Whether block ``block`` needs storage in a step after which ``num_tokens`` tokens have
        slots (only asked for blocks the request does not hold yet)."""
        if block < self.sink_blocks:
            return True
        return (block + 1) * self.block_size > num_tokens - self.recent

    def new_blocks(self, held: int, num_tokens: int) -> list[bool]:
        """For blocks ``held .. ⌈num_tokens / bs⌉ − 1`` (the ones a step appends): storage or not."""
        return [self.needs_storage(i, num_tokens) for i in range(held, _cdiv(num_tokens, self.block_size))]

    def freeable_blocks(self, processed_tokens: int) -> range:
        """Blocks no future query reads once ``processed_tokens`` tokens are in the cache."""
        first = self.sink_blocks
        last = (processed_tokens + 1 - self.recent) // self.block_size
        return range(first, max(first, last))

    def visible(self, position: int, key: int) -> bool:
        """The attention rule itself: does the query at ``position`` see the key at ``key``?"""
        return key <= position and (key < self.sink or key > position - self.recent)
