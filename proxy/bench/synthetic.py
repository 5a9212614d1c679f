"""Synthetic serving workloads, seeded and scaled to fit a 2-core machine.

Lengths are drawn in *real* tokens, shaped like the traffic they stand for, then divided by
``TOKEN_SCALE`` (16): one simulated token stands for 16 real ones. The simulator profiles in
``proxy/bench/data/`` are set for these "fat" tokens (docs/serving_bench.md gives the
mapping), so a run streams 16x fewer chunks than the real traffic would and the simulator,
the client and a Python router stay well under the CPU ceiling.

* ``long_prompt`` - reasoning traffic shaped like OmniInfer's deployment report: input
  lognormal with mean 3.5k real tokens, clipped to [128, 16k]; output lognormal with mean
  1.2k, clipped to [32, 32k]; 70 % of requests start with one of 4 system prompts
  (1k-2k tokens, Zipf-weighted). Poisson arrivals.
* ``multi_turn`` - chat with shared system prompts and growing histories (prefix-heavy):
  conversations start as a Poisson process, each with one of 4 system prompts (1.5k-3k
  tokens) and 2-8 turns; a turn's prompt is the system prompt, the whole history (earlier
  user messages and answers) and a new user message (lognormal, mean 200); answers mean 400.
  The next turn arrives a think time (1 s + exponential, mean 2 s) after the previous one
  was sent. The request rate counts turns; conversations start 30 s before the window so
  it opens in steady state (turns before 0 are not sent: their histories start cold).
* ``bursty`` - template-driven API traffic arriving in bursts: 8 few-shot templates
  (prefix 60 % of a lognormal prompt with mean 1.5k), output mean 300; inter-arrival gaps
  from a gamma distribution with coefficient of variation 3 (bursts and lulls), same mean
  rate.
* ``bursty_long`` - ``long_prompt``'s requests (same lengths and system prompts) arriving
  in ``bursty``'s gamma bursts (CV 3): long prefills pile up in bursts.
* ``rag`` - retrieval-augmented questions (prefix-heavy, added after the policy was built
  and not used to tune it): 24 documents (2k-6k tokens, Zipf 1.1 popularity) behind one of 2
  instruction prompts (400-800 tokens); a request is instruction + document + question
  (lognormal mean 120), answers mean 250. Poisson arrivals.
* ``tiny`` - short unique prompts (64 tokens, not scaled) and 2 output tokens at a steady
  rate: for measuring what a router adds to latency.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from .workload import WorkloadRequest

TOKEN_SCALE = 16


def _lognormal(rng: random.Random, mean: float, sigma: float, lo: float, hi: float) -> float:
    mu = math.log(mean) - sigma * sigma / 2  # so the unclipped mean is ``mean``
    return min(hi, max(lo, rng.lognormvariate(mu, sigma)))


def _scaled(real_tokens: float, minimum: int = 1) -> int:
    return max(minimum, round(real_tokens / TOKEN_SCALE))


def _zipf_choice(rng: random.Random, n: int, s: float = 1.0) -> int:
    weights = [1.0 / (k + 1) ** s for k in range(n)]
    return rng.choices(range(n), weights=weights)[0]


def long_prompt(rate: float, duration_s: float, seed: int = 0) -> list[WorkloadRequest]:
    rng = random.Random(seed)
    system = [_scaled(rng.uniform(1000, 2000)) for _ in range(4)]
    out, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration_s:
            return out
        prompt = _scaled(_lognormal(rng, 3500, 0.8, 128, 16384))
        output = _scaled(_lognormal(rng, 1200, 1.0, 32, 32768), minimum=2)
        group = tokens = None
        if rng.random() < 0.7:
            k = _zipf_choice(rng, len(system))
            group, tokens = f"sys-{k}", min(system[k], prompt - 1)
        out.append(WorkloadRequest(t, prompt, output, group, tokens or 0))


def multi_turn(rate: float, duration_s: float, seed: int = 0) -> list[WorkloadRequest]:
    rng = random.Random(seed)
    system = [_scaled(rng.uniform(1500, 3000)) for _ in range(4)]
    mean_turns = 5.0
    warm = 30.0  # conversations start this long before 0, so the window sees steady state
    out: list[WorkloadRequest] = []
    t, conv = -warm, 0
    while True:
        t += rng.expovariate(rate / mean_turns)
        if t >= duration_s:
            break
        k = _zipf_choice(rng, len(system), 0.5)
        turns = rng.randint(2, 8)
        history, arrival = 0, t
        for _ in range(turns):
            user = _scaled(_lognormal(rng, 200, 0.7, 16, 2000))
            answer = _scaled(_lognormal(rng, 400, 0.7, 32, 4000), minimum=2)
            prompt = system[k] + history + user
            if 0 <= arrival < duration_s:
                # the whole non-system part comes from the conversation's stream, so each turn
                # extends the previous turn's prompt (its history) token for token
                out.append(WorkloadRequest(arrival, prompt, answer, f"conv-{seed}-{conv}", prompt - system[k],
                                           f"sys-{k}", system[k]))
            history += user + answer
            arrival += 1.0 + rng.expovariate(1 / 2.0)
        conv += 1
    out.sort(key=lambda r: r.arrival_s)
    return out


def bursty(rate: float, duration_s: float, seed: int = 0) -> list[WorkloadRequest]:
    rng = random.Random(seed)
    cv = 3.0
    shape = 1 / (cv * cv)  # gamma with this shape and mean 1/rate has the wanted CV
    out, t = [], 0.0
    while True:
        t += rng.gammavariate(shape, 1 / (rate * shape))
        if t >= duration_s:
            return out
        prompt = _scaled(_lognormal(rng, 1500, 0.6, 128, 8192), minimum=8)
        output = _scaled(_lognormal(rng, 300, 0.8, 32, 4096), minimum=2)
        k = _zipf_choice(rng, 8)
        out.append(WorkloadRequest(t, prompt, output, f"tpl-{k}", int(prompt * 0.6)))


def bursty_long(rate: float, duration_s: float, seed: int = 0) -> list[WorkloadRequest]:
    rng = random.Random(seed + 7919)  # its own arrival stream; lengths as long_prompt's
    shape = 1 / 9.0
    spaced = long_prompt(rate, 10 * duration_s + 60, seed)
    out, t = [], 0.0
    for req in spaced:
        t += rng.gammavariate(shape, 1 / (rate * shape))
        if t >= duration_s:
            break
        out.append(WorkloadRequest(t, req.prompt_tokens, req.output_tokens, req.prefix_group, req.prefix_tokens))
    return out


def rag(rate: float, duration_s: float, seed: int = 0) -> list[WorkloadRequest]:
    rng = random.Random(seed)
    instructions = [_scaled(rng.uniform(400, 800)) for _ in range(2)]
    documents = [_scaled(rng.uniform(2000, 6000)) for _ in range(24)]
    out, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration_s:
            return out
        k = rng.randrange(len(instructions))
        d = _zipf_choice(rng, len(documents), 1.1)
        question = _scaled(_lognormal(rng, 120, 0.6, 16, 1000))
        answer = _scaled(_lognormal(rng, 250, 0.7, 32, 2000), minimum=2)
        shared = documents[d]
        out.append(WorkloadRequest(t, instructions[k] + shared + question, answer, f"doc-{k}-{d}", shared,
                                   f"inst-{k}", instructions[k]))


def tiny(rate: float, duration_s: float, seed: int = 0) -> list[WorkloadRequest]:
    n = max(1, int(rate * duration_s))
    return [WorkloadRequest(k / rate, 64, 2) for k in range(n)]


GENERATORS: dict[str, Callable[[float, float, int], list[WorkloadRequest]]] = {
    "long_prompt": long_prompt,
    "multi_turn": multi_turn,
    "bursty": bursty,
    "bursty_long": bursty_long,
    "rag": rag,
    "tiny": tiny,
}


def generate(name: str, rate: float, duration_s: float, seed: int = 0) -> list[WorkloadRequest]:
    try:
        gen = GENERATORS[name]
    except KeyError:
        raise ValueError(f"unknown synthetic workload {name!r}; choose one of {', '.join(GENERATORS)}") from None
    if not rate > 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if not duration_s > 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    return gen(rate, duration_s, seed)
