"""Placing requests on instances through the policy, the one place routing decisions are made
(which instance of a stage, and in PD mode whether a request skips prefill).

``place`` asks the policy among the usable instances of a stage (minus those that already
failed this request), takes the load, and holds the request in the proxy while every
candidate is over the policy's limits (``proxy.server.holding``). When none is usable but some
are merely behind an open circuit (not declared down by the prober), those are the candidates
(Envoy calls this panic routing): a circuit keeps traffic off an instance while others can
take it, not at the price of failing requests. The observation helpers pass what the proxy
sees to the policy's hooks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from proxy.server.errors import NoInstance
from proxy.server.holding import HoldQueue
from proxy.server.instances import Registry
from proxy.server.metrics import ProxyMetrics
from scheduling.load import LoadModel, Ticket
from scheduling.policies import Choice, ClusterState, Observation, Policy, RequestInfo
from scheduling.prefix_index import PrefixIndex

GUESS_SLICE = 512  # block keys inserted into the prefix index per loop turn


class Router:
    def __init__(self, policy: Policy, registry: Registry, loads: LoadModel, index: PrefixIndex, block_size: int,
                 stages: tuple[str, ...], queue_timeout: float, metrics: ProxyMetrics, now: Callable[[], float],
                 refresh: Callable[[], None] = lambda: None):
        self.policy = policy
        self.refresh = refresh  # brings the prefix index up to date (applies waiting KV events)
        self.registry = registry
        self.loads = loads
        self.index = index
        self.block_size = block_size
        self.queue_timeout = queue_timeout
        self.metrics = metrics
        self.now = now
        self.queues = {s: HoldQueue(policy.hold_order(s)) for s in stages}
        self._choose = {"prefill": policy.choose_prefill, "decode": policy.choose_decode,
                        "collocated": policy.choose_collocated}
        self._background: set[asyncio.Task] = set()
        # hooks the policy overrides (the others are not worth building an Observation for)
        self._hooks = {h for h in ("on_first_byte", "on_prefill_done", "on_complete")
                       if getattr(type(policy), h) is not getattr(Policy, h)}

    def state(self) -> ClusterState:
        """What a decision sees, the KV events received until now applied."""
        self.refresh()
        return ClusterState(self.loads, self.index, self.block_size, self.now())

    def usable(self, stage: str) -> list[str]:
        return self.registry.usable(stage, self.now())

    def no_instance(self, stage: str, exclude: set[str]) -> NoInstance:
        """The error for "nothing to send to": counts for the client, names for the log."""
        insts = self.registry.of_role(stage)
        now = self.now()
        failed = [i for i in insts if i.url in exclude]
        unusable = [i for i in insts if i.url not in exclude and not i.usable(now)]
        err = NoInstance(f"no usable {stage} instance: {len(insts)} registered, {len(unusable)} down or with an open "
                         f"circuit, {len(failed)} already failed this request")
        err.detail = "; ".join(f"{i.url} {i.state()}" + (f" ({i.last_error})" if i.last_error else "") for i in insts)
        return err

    async def place(self, stage: str, info: RequestInfo, exclude: set[str], prefill_work: bool,
                    pinned: str | None = None) -> tuple[Choice, Ticket]:
        """A placement (choice and the load it took); NoInstance / NoCapacity otherwise.

        ``pinned`` skips the policy: the request must go to that instance (it holds state the
        request refers to).
        """
        choose, bs = self._choose[stage], self.block_size

        def try_place():
            state = self.state()
            candidates = [u for u in self.registry.usable(stage, state.now) if u not in exclude]
            if not candidates:  # panic routing: open circuits only shield an instance while others can serve
                candidates = [i.url for i in self.registry.of_role(stage) if not i.down and i.url not in exclude]
            if pinned is not None:
                candidates = [u for u in candidates if u == pinned]
            if not candidates:
                raise self.no_instance(stage, exclude)
            choice = Choice(pinned, "pinned") if pinned is not None else choose(info, candidates, state)
            if choice is None:
                return None
            work = choice.uncached_tokens(info, bs) if prefill_work else 0
            return choice, self.loads.acquire(choice.instance, work, info.prompt_tokens, state.now, info.max_tokens)

        def held():  # the queue entry, made only if the request has to wait
            return self.policy.held(stage, info, self.state())

        choice, ticket = await self.queues[stage].place(held, try_place, self.queue_timeout, self.now(),
                                                        on_orphan=lambda placed: self.release(placed[1]))
        inst = self.registry.instances.get(choice.instance)
        if inst is not None:
            inst.breaker.dispatched()
        m = self.metrics
        m.labelled(m.decisions, stage, choice.instance, choice.reason).inc()
        if info.block_keys:
            self._guess(choice.instance, info.block_keys)
        if stage != "decode" or prefill_work:
            m.prompt_tokens.inc(info.prompt_tokens)
            m.matched_tokens.inc(min(info.prompt_tokens, choice.matched_blocks * bs))
        return choice, ticket

    def bypass_prefill(self, info: RequestInfo) -> bool:
        """PD mode: whether the policy sends this request straight to decode, skipping prefill
        (counted as a decision)."""
        bypass = self.policy.bypass_prefill(info, self.usable("decode"), self.state(), self.usable("prefill"))
        if bypass:
            self.metrics.decisions.labels("bypass", "-", "short_uncached_prompt").inc()
        return bypass

    def _guess(self, instance: str, keys) -> None:
        """Record the routing-time guess; a long prompt's in slices, yielding between them, so
        one huge prompt does not hold the loop (the guess is approximate anyway)."""
        if len(keys) <= GUESS_SLICE:
            self.index.insert_approx(instance, keys, self.now())
            return

        async def insert() -> None:
            for start in range(0, len(keys), GUESS_SLICE):
                self.index.insert_approx(instance, keys[start:start + GUESS_SLICE], self.now())
                await asyncio.sleep(0)

        task = asyncio.get_running_loop().create_task(insert())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def close(self) -> None:
        for task in self._background:
            task.cancel()

    def release(self, ticket: Ticket) -> None:
        ticket.release(self.now())
        self.kick()

    def kick(self) -> None:
        now = self.now()
        for q in self.queues.values():
            if q.waiters:
                q.kick(now)

    # -- observations for the policy ------------------------------------------------------------
    def observe(self, hook: str, info: RequestInfo, instance: str, stage: str, sent_at: float, ok: bool = True,
                usage: dict | None = None, chunks: int | None = None, ticket: Ticket | None = None) -> None:
        if hook not in self._hooks:
            return
        usage = usage if isinstance(usage, dict) else {}
        completion = usage.get("completion_tokens", chunks)
        getattr(self.policy, hook)(Observation(info, instance, stage, sent_at, self.now(), ok,
                                               usage.get("prompt_tokens"), completion, ticket))
