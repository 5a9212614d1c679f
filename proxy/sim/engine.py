"""The simulated engine: continuous batching under a token budget, prefix cache, timing model.

One asyncio task per instance runs steps (see ``proxy.sim.profile`` for the step time). Each
step: every running decode sequence makes one token; the rest of the token budget goes to
prompt chunks, first of requests already prefilling, then of waiting ones in arrival order,
admitted while ``max_num_seqs`` and KV blocks allow. A request's blocks are reserved at
admission for its prompt and all of its ``max_tokens`` (so no preemption is needed). Full
prompt blocks enter the prefix cache when the prefill completes; the step that completes a
prefill samples the first token. A request sent for remote decode (PD prefill) finishes after
that token and keeps its blocks until a decode instance pulls them (or ``kv_hold_s`` passes).
A request with ``stop`` strings finishes (reason ``stop``) at the first token whose text
completes one; its output is cut before that string, as vLLM does.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections import OrderedDict, deque
from typing import Any, Callable

from scheduling.block_hash import BlockHasher
from proxy.sim.cache import BlockCache
from proxy.sim.profile import SimProfile

WORDS = [f" w{k}" for k in range(4096)]
WORD_JSON = [('"' + w + '"').encode() for w in WORDS]

WAITING, RUNNING, FINISHED, ABORTED = "waiting", "running", "finished", "aborted"


def output_token(base: int, position: int) -> int:
    """Index into WORDS of the token a request generates at ``position`` (deterministic)."""
    return (base + position * 7919) % len(WORDS)


class SimRequest:
    __slots__ = (
        "rid", "prompt_ids", "digests", "prompt_len", "max_tokens", "remote_decode", "kv_ready",
        "computed", "cached_tokens", "outputs", "state", "wake", "finish_reason", "base",
        "cached_blocks", "anon_blocks", "generation", "arrived", "first_token_at", "finished_at",
        "kv_source", "hold_deadline", "stop", "stop_at", "stop_reason", "kv_params_in",
    )

    def __init__(self, rid: str, prompt_ids: list[int], digests: list[bytes], max_tokens: int,
                 remote_decode: bool = False, kv_ready: bool = False, stop: tuple[str, ...] = ()):
        self.rid = rid
        self.prompt_ids = prompt_ids
        self.digests = digests
        self.prompt_len = len(prompt_ids)
        self.max_tokens = max_tokens
        self.remote_decode = remote_decode
        self.kv_ready = kv_ready      # KV arrived from a prefill instance: no local prefill
        self.computed = 0
        self.cached_tokens = 0
        self.outputs: list[int] = []
        self.state = WAITING
        self.wake = asyncio.Event()
        self.finish_reason: str | None = None
        self.base = zlib.crc32(rid.encode())
        self.cached_blocks: list[bytes] = []
        self.anon_blocks = 0
        self.generation = 0
        self.arrived = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.kv_source = "remote" if kv_ready else "local"
        self.hold_deadline = 0.0
        self.stop = tuple(x for x in stop if x)
        self.stop_at: int | None = None        # output text is cut here (a stop string began)
        self.stop_reason: str | None = None
        self.kv_params_in: dict | None = None   # the kv_transfer_params the request arrived with

    @property
    def prefilled(self) -> bool:
        return self.computed >= self.prompt_len

    @property
    def done(self) -> bool:
        return self.state in (FINISHED, ABORTED)

    def text(self) -> str:
        text = "".join(WORDS[t] for t in self.outputs)
        return text if self.stop_at is None else text[: self.stop_at]

    def hit_stop(self) -> bool:
        """Whether the last token completed a stop string (then ``stop_at``/``stop_reason`` are set)."""
        longest = max(len(x) for x in self.stop)
        tail_words = longest // 3 + 2  # every word is at least 3 characters (" wN")
        tail = "".join(WORDS[t] for t in self.outputs[-tail_words:])
        if not any(x in tail for x in self.stop):
            return False
        text = "".join(WORDS[t] for t in self.outputs)
        self.stop_at, self.stop_reason = min((text.find(x), x) for x in self.stop if x in text)
        return True


class SimEngine:
    def __init__(self, profile: SimProfile, publish: Callable[[list], None] | None = None):
        self.profile = profile
        self.hasher = BlockHasher(profile.block_size, profile.hash_algo)
        self.cache = BlockCache(profile.num_kv_blocks, profile.block_size)
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.held: dict[str, SimRequest] = {}   # finished prefills keeping KV for a remote decode
        self.records: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.max_records = 20000
        self.slowdown = 1.0
        self.steps = 0
        self.busy_s = 0.0
        self.counters = {"finished": 0, "aborted": 0, "prompt_tokens": 0, "cached_tokens": 0,
                         "generated_tokens": 0, "kv_pulled": 0, "kv_expired": 0}
        self._publish = publish
        self._work = asyncio.Event()
        self._task: asyncio.Task | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    # -- requests ---------------------------------------------------------------------------
    def digests_of(self, prompt_ids: list[int]) -> list[bytes]:
        return self.hasher.digests(prompt_ids)

    def add(self, request: SimRequest) -> None:
        self.waiting.append(request)
        self._work.set()

    def abort(self, request: SimRequest) -> None:
        if request.done:
            return
        if request.state == WAITING:
            try:
                self.waiting.remove(request)
            except ValueError:
                pass
        else:
            try:
                self.running.remove(request)
            except ValueError:
                pass
            self._free(request)
        self._finish(request, ABORTED, "abort")

    def pull(self, rid: str) -> SimRequest | None:
        """A decode instance takes the KV a finished prefill holds for it (None if not held)."""
        request = self.held.pop(rid, None)
        if request is not None:
            self._free(request)
            self.counters["kv_pulled"] += 1
        return request

    def stats(self) -> dict[str, Any]:
        return {
            "running": len(self.running), "waiting": len(self.waiting), "held_for_transfer": len(self.held),
            "free_blocks": self.cache.free_blocks(), "cached_blocks": len(self.cache.refs) + len(self.cache.free_cached),
            "steps": self.steps, "busy_s": round(self.busy_s, 6), "slowdown": self.slowdown, **self.counters,
        }

    def reset_prefix_cache(self) -> None:
        self.cache.clear()
        self._emit()

    # -- the loop ---------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.running and not self.waiting:
                self._expire_held(loop.time())
                self._work.clear()
                try:
                    await asyncio.wait_for(self._work.wait(), timeout=1.0 if self.held else None)
                except asyncio.TimeoutError:
                    pass
                continue
            step_start = loop.time()
            decodes, chunks = self._schedule()
            if not decodes and not chunks:
                # nothing fits (KV full of held prefills, or all admitted requests wait): idle a bit
                self._expire_held(loop.time())
                self._work.clear()
                try:
                    await asyncio.wait_for(self._work.wait(), timeout=0.05)
                except asyncio.TimeoutError:
                    pass
                continue
            context = sum(r.prompt_len + len(r.outputs) for r in decodes)
            seconds = self.profile.step_time([(r.computed, c) for r, c in chunks], context, len(decodes))
            seconds *= self.slowdown
            # the step ends step_start + seconds: the time spent scheduling is part of it
            await asyncio.sleep(max(0.0, step_start + seconds - loop.time()))
            self.steps += 1
            self.busy_s += seconds
            self._complete(decodes, chunks)
            self._expire_held(loop.time())
            self._emit()

    def _schedule(self) -> tuple[list[SimRequest], list[tuple[SimRequest, int]]]:
        p = self.profile
        decodes = [r for r in self.running if r.prefilled]
        budget = p.max_num_batched_tokens - len(decodes)
        chunks: list[tuple[SimRequest, int]] = []
        for r in self.running:
            if budget <= 0:
                break
            if not r.prefilled:
                take = min(r.prompt_len - r.computed, budget)
                chunks.append((r, take))
                budget -= take
        while self.waiting and budget > 0 and len(self.running) < p.max_num_seqs:
            r = self.waiting[0]
            if not self._admit(r):
                break
            self.waiting.popleft()
            r.state = RUNNING
            self.running.append(r)
            if r.prefilled:
                decodes.append(r)  # remote KV: decodes at once
                budget -= 1
                continue
            take = min(r.prompt_len - r.computed, budget)
            chunks.append((r, take))
            budget -= take
        return decodes, chunks

    def _admit(self, r: SimRequest) -> bool:
        bs = self.profile.block_size
        total_blocks = -(-(r.prompt_len + r.max_tokens) // bs)
        hit = self.cache.match(r.digests)
        hit_digests = r.digests[:hit]
        if not self.cache.acquire(hit_digests, total_blocks - hit):
            return False
        r.generation = self.cache.generation
        r.cached_blocks = list(hit_digests)
        r.anon_blocks = total_blocks - hit
        if r.kv_ready:
            r.computed = r.prompt_len
            self._commit_prompt(r, hit)
        else:
            # at least the last prompt token is computed, as vLLM does on a full hit
            r.cached_tokens = min(hit * bs, r.prompt_len - 1)
            r.computed = r.cached_tokens
        self.counters["prompt_tokens"] += r.prompt_len
        self.counters["cached_tokens"] += r.cached_tokens
        return True

    def _commit_prompt(self, r: SimRequest, hit: int) -> None:
        new = r.digests[hit:]
        if not new:
            return
        parent = r.digests[hit - 1] if hit else None
        stored = self.cache.commit(new, parent, r.prompt_ids[hit * self.profile.block_size :])
        r.cached_blocks.extend(stored)
        r.anon_blocks -= len(stored)

    def _complete(self, decodes: list[SimRequest], chunks: list[tuple[SimRequest, int]]) -> None:
        now = time.monotonic()
        for r in decodes:
            if r.done:
                continue
            r.outputs.append(output_token(r.base, len(r.outputs)))
            r.wake.set()
            if r.stop and r.hit_stop():
                self._retire(r, now, "stop")
            elif len(r.outputs) >= r.max_tokens:
                self._retire(r, now)
        for r, take in chunks:
            if r.done:
                continue
            r.computed += take
            if r.prefilled:
                self._commit_prompt(r, len(r.cached_blocks))
                r.outputs.append(output_token(r.base, 0))
                r.first_token_at = now
                r.wake.set()
                if r.stop and r.hit_stop():
                    self._retire(r, now, "stop")
                elif len(r.outputs) >= r.max_tokens:
                    self._retire(r, now)
        if any(r.done for r in self.running):
            self.running = [r for r in self.running if not r.done]
        for r in decodes:
            if r.first_token_at is None and r.outputs:
                r.first_token_at = now

    def _retire(self, r: SimRequest, now: float, reason: str = "length") -> None:
        if r.remote_decode:
            r.hold_deadline = asyncio.get_running_loop().time() + self.profile.kv_hold_s
            self.held[r.rid] = r
        else:
            self._free(r)
        self._finish(r, FINISHED, reason)

    def _free(self, r: SimRequest) -> None:
        self.cache.release(r.cached_blocks, r.anon_blocks, r.generation)
        r.cached_blocks = []
        r.anon_blocks = 0
        self._work.set()

    def _finish(self, r: SimRequest, state: str, reason: str) -> None:
        r.state = state
        r.finish_reason = reason
        r.finished_at = time.monotonic()
        r.wake.set()
        self.counters["finished" if state == FINISHED else "aborted"] += 1
        self.counters["generated_tokens"] += len(r.outputs)
        self.records[r.rid] = {
            "request_id": r.rid, "status": state, "output": r.text(), "prompt_tokens": r.prompt_len,
            "completion_tokens": len(r.outputs), "cached_tokens": r.cached_tokens, "kv_source": r.kv_source,
            "remote_decode": r.remote_decode, "finish_reason": reason, "stop_reason": r.stop_reason,
            "kv_transfer_params_in": r.kv_params_in,
        }
        while len(self.records) > self.max_records:
            self.records.popitem(last=False)

    def _expire_held(self, now: float) -> None:
        if not self.held:
            return
        for rid in [rid for rid, r in self.held.items() if r.hold_deadline <= now]:
            r = self.held.pop(rid)
            self._free(r)
            self.counters["kv_expired"] += 1

    def _emit(self) -> None:
        if self.cache.events:
            events = self.cache.take_events()
            if self._publish is not None:
                self._publish(events)
