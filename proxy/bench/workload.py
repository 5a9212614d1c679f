"""Serving workloads: the JSONL request format, its validation, and prompt text.

One request a line, the project's fixed workload format (docs/interfaces.md, "Serving: cluster
and workload files")::

    {"arrival_s": 0.25, "prompt_tokens": 900, "output_tokens": 120,
     "prefix_group": "sys-1", "prefix_tokens": 512}

Requests of one ``prefix_group`` share their first ``prefix_tokens`` tokens (two of them
share ``min`` of their counts). Two optional fields add a second level of sharing, used by
multi-turn chat where conversations share a system prompt and each turn extends its
conversation's history: ``"system_group": str`` and ``"system_tokens": int``. A prompt is
then laid out as::

    [system_tokens of system_group] [prefix_tokens of prefix_group] [unique tokens ...]

with ``system_tokens + prefix_tokens <= prompt_tokens``. Public traces name their prompts'
blocks instead (Mooncake's ``hash_ids``, ``proxy.bench.traces``): ``"hash_ids": [int, ...]``
with ``"block_tokens": int`` lays a prompt out as those blocks of ``block_tokens`` tokens each,
equal ids giving identical blocks, cut at ``prompt_tokens`` (unique tokens after the last
block if the prompt is longer); it excludes the group fields. Unknown fields are errors.

Prompt text: every token is 4 characters (a space and 3 base-36 characters drawn from a
stream seeded by the group name), which is exactly one token of the simulator's
character-block tokenizer (``chars_per_token=4``), so the simulator sees ``prompt_tokens``
tokens and the routers that match text prefixes (vllm-router's and sglang-router's
cache_aware) see the same sharing as the ones that match token blocks.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

CHARS_PER_TOKEN = 4
_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
FIELDS = ("arrival_s", "prompt_tokens", "output_tokens", "prefix_group", "prefix_tokens",
          "system_group", "system_tokens", "hash_ids", "block_tokens")
REQUIRED = ("arrival_s", "prompt_tokens", "output_tokens")


class WorkloadError(ValueError):
    """A workload file or request is malformed; the message names the line and field."""


@dataclass(frozen=True)
class WorkloadRequest:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    prefix_group: str | None = None
    prefix_tokens: int = 0
    system_group: str | None = None
    system_tokens: int = 0
    hash_ids: tuple[int, ...] = ()   # the prompt's blocks, by id (equal ids: identical blocks)
    block_tokens: int = 0            # tokens per hash block

    def to_json(self) -> str:
        d = asdict(self)
        d["arrival_s"] = round(self.arrival_s, 6)  # microseconds are plenty
        if self.system_group is None and not self.system_tokens:
            del d["system_group"], d["system_tokens"]
        if self.hash_ids:
            d["hash_ids"] = list(self.hash_ids)
        else:
            del d["hash_ids"], d["block_tokens"]
        return json.dumps(d)


def _int_field(doc: dict, name: str, where: str, minimum: int) -> int:
    value = doc.get(name, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise WorkloadError(f"{where}: field '{name}' must be an integer >= {minimum}, got {value!r}")
    return value


def parse_request(doc: object, where: str) -> WorkloadRequest:
    """One decoded JSONL line -> request; ``where`` names it in errors ("FILE line N")."""
    if not isinstance(doc, dict):
        raise WorkloadError(f"{where}: a request must be a JSON object, got {type(doc).__name__}")
    unknown = sorted(set(doc) - set(FIELDS))
    if unknown:
        raise WorkloadError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
    missing = [f for f in REQUIRED if f not in doc]
    if missing:
        raise WorkloadError(f"{where}: missing field(s) {', '.join(missing)}")
    arrival = doc["arrival_s"]
    if not isinstance(arrival, (int, float)) or isinstance(arrival, bool) or not arrival >= 0 or arrival == float("inf"):
        raise WorkloadError(f"{where}: field 'arrival_s' must be a finite number >= 0, got {arrival!r}")
    prompt = _int_field(doc, "prompt_tokens", where, 1)
    output = _int_field(doc, "output_tokens", where, 1)
    groups = {}
    for kind in ("prefix", "system"):
        group = doc.get(f"{kind}_group")
        tokens = _int_field(doc, f"{kind}_tokens", where, 0)
        if group is not None and (not isinstance(group, str) or not group):
            raise WorkloadError(f"{where}: field '{kind}_group' must be a non-empty string or null, got {group!r}")
        if group is None and tokens:
            raise WorkloadError(f"{where}: field '{kind}_tokens' is {tokens} but '{kind}_group' is null")
        groups[kind] = (group, tokens)
    if groups["prefix"][1] + groups["system"][1] > prompt:
        raise WorkloadError(f"{where}: shared tokens (prefix_tokens {groups['prefix'][1]} + system_tokens "
                            f"{groups['system'][1]}) exceed prompt_tokens {prompt}")
    hash_ids, block_tokens = _hash_blocks(doc, where)
    if hash_ids and (groups["prefix"][0] is not None or groups["system"][0] is not None):
        raise WorkloadError(f"{where}: 'hash_ids' lay out the whole prompt; they exclude prefix_group and system_group")
    return WorkloadRequest(float(arrival), prompt, output, groups["prefix"][0], groups["prefix"][1],
                           groups["system"][0], groups["system"][1], hash_ids, block_tokens)


def _hash_blocks(doc: dict, where: str) -> tuple[tuple[int, ...], int]:
    ids = doc.get("hash_ids", [])
    if not isinstance(ids, list) or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in ids):
        raise WorkloadError(f"{where}: field 'hash_ids' must be a list of integers >= 0, got {ids!r:.80}")
    block = _int_field(doc, "block_tokens", where, 1 if ids else 0)
    return tuple(ids), block


def read_workload_text(path: Path) -> str:
    """A workload file's text; a missing or unreadable file is a WorkloadError naming it."""
    try:
        return path.read_text()
    except FileNotFoundError:
        raise WorkloadError(f"workload file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkloadError(f"workload file {path} cannot be read: {exc}") from None


def json_lines(path: Path) -> Iterator[tuple[dict, str]]:
    """Each non-blank line of a JSON-lines file, parsed, with where it is ("FILE line N") for
    errors; a line that is not JSON is a WorkloadError naming it."""
    for number, line in enumerate(read_workload_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            yield json.loads(line), where
        except json.JSONDecodeError as exc:
            raise WorkloadError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None


def load_jsonl(path: str | Path) -> list[WorkloadRequest]:
    """Read and check a workload file; requests sorted by arrival (stable)."""
    path = Path(path)
    out = [parse_request(doc, where) for doc, where in json_lines(path)]
    if not out:
        raise WorkloadError(f"workload file {path} holds no requests")
    out.sort(key=lambda r: r.arrival_s)
    return out


def save_jsonl(requests: Iterable[WorkloadRequest], path: str | Path) -> None:
    Path(path).write_text("".join(r.to_json() + "\n" for r in requests))


def mean_rate(requests: Sequence[WorkloadRequest]) -> float:
    """Requests per second over the arrival span ((n - 1) / span; inf for a single instant)."""
    if len(requests) < 2:
        return float("inf")
    span = requests[-1].arrival_s - requests[0].arrival_s
    return (len(requests) - 1) / span if span > 0 else float("inf")


def at_rate(requests: Sequence[WorkloadRequest], rate: float) -> list[WorkloadRequest]:
    """The same requests with arrivals stretched or squeezed so the mean rate is ``rate``
    (the pattern of gaps, bursts included, is kept; the first request arrives at 0)."""
    if rate <= 0:
        raise WorkloadError(f"rate must be positive, got {rate}")
    if not requests:
        return []
    t0 = requests[0].arrival_s
    current = mean_rate(requests)
    factor = current / rate if current != float("inf") else 0.0
    return [replace(r, arrival_s=(r.arrival_s - t0) * factor) for r in requests]


# -- prompt text -------------------------------------------------------------------------------
class PromptBuilder:
    """Deterministic prompt text for requests; group streams are generated once and cached."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._streams: dict[str, list[str]] = {}

    def _stream(self, key: str, length: int) -> list[str]:
        tokens = self._streams.get(key)
        if tokens is None or len(tokens) < length:
            rng = random.Random(f"{self.seed}/{key}")
            tokens = [" " + "".join(rng.choices(_ALPHABET, k=CHARS_PER_TOKEN - 1)) for _ in range(max(length, 64))]
            self._streams[key] = tokens
        return tokens

    def text(self, request: WorkloadRequest, index: int) -> str:
        """Prompt of ``request`` (the ``index``-th of its workload): 4 characters per token."""
        parts: list[str] = []
        if request.system_group is not None and request.system_tokens:
            parts += self._stream("system:" + request.system_group, request.system_tokens)[: request.system_tokens]
        if request.prefix_group is not None and request.prefix_tokens:
            parts += self._stream("group:" + request.prefix_group, request.prefix_tokens)[: request.prefix_tokens]
        for h in request.hash_ids:
            if len(parts) >= request.prompt_tokens:
                break
            parts += self._stream(f"block:{h}", request.block_tokens)[: request.block_tokens]
        del parts[request.prompt_tokens:]
        rest = request.prompt_tokens - len(parts)
        if rest > 0:
            rng = random.Random(f"{self.seed}/unique/{index}")
            parts += [" " + "".join(rng.choices(_ALPHABET, k=CHARS_PER_TOKEN - 1)) for _ in range(rest)]
        return "".join(parts)


def describe(requests: Sequence[WorkloadRequest]) -> dict[str, float | int]:
    """Shape of a workload: counts, mean/max lengths, rate, share of prompt tokens that come
    from a group stream (shared with other requests of the group where they overlap), and
    for hash-block prompts the share of block references that repeat an earlier one."""
    if not requests:
        return {"requests": 0}
    prompts = [r.prompt_tokens for r in requests]
    outputs = [r.output_tokens for r in requests]
    shared = sum(r.prefix_tokens + r.system_tokens for r in requests)
    seen: set[int] = set()
    refs = repeats = 0
    for r in requests:
        for h in r.hash_ids:
            refs += 1
            repeats += h in seen
            seen.add(h)
    extra = {"repeated_block_share": repeats / refs} if refs else {}
    return {
        "requests": len(requests),
        "duration_s": requests[-1].arrival_s - requests[0].arrival_s,
        "mean_rate": mean_rate(requests),
        "prompt_tokens_mean": sum(prompts) / len(prompts), "prompt_tokens_max": max(prompts),
        "output_tokens_mean": sum(outputs) / len(outputs), "output_tokens_max": max(outputs),
        "grouped_prompt_share": shared / sum(prompts),
        **extra,
    }
