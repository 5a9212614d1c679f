"""Public production traces as benchmark workloads, read as they are published.

* **Mooncake** (FAST'25 release, JSONL), one request a line::

      {"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, ...]}

  ``timestamp`` is the arrival in milliseconds; ``hash_ids`` name the prompt's blocks of 512
  tokens (remapped prefix-block hashes: equal ids are identical, reusable KV blocks).
* **Azure LLM inference 2023** (CSV)::

      TIMESTAMP,ContextTokens,GeneratedTokens
      2023-11-16 18:17:03.9799600,4808,10

  no prefix information: every prompt is unique.

Both become :class:`proxy.bench.workload.WorkloadRequest` lists in the benchmark's scaled
units: lengths are divided by ``token_scale`` real tokens per simulated token (16, as the
synthetic workloads, whose simulator profiles are set for such tokens) and a Mooncake block
becomes ``block_tokens`` simulated tokens (default ``512 / token_scale``), each block's text
drawn from a stream named by its id, so equal hash ids give identical token blocks (the
simulator's prefix cache and every router's prefix matching see exactly the trace's reuse).
``max_len`` (the cluster's ``max_model_len``) cuts prompts so prompt + output fits, keeping
their leading blocks. Arrivals start at 0. A bad row is refused naming the file and line.
"""

from __future__ import annotations

import csv
import io
import json
import math
from datetime import datetime
from pathlib import Path

from .workload import (
    WorkloadError,
    WorkloadRequest,
    json_lines,
    load_jsonl,
    read_workload_text,
)

MOONCAKE_BLOCK = 512  # real tokens per hash id in the Mooncake traces
DEFAULT_SCALE = 16
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
MOONCAKE_FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")


def scaled(tokens: int, scale: float) -> int:
    """Real tokens -> simulated tokens (rounded half up, at least 1)."""
    return max(1, math.floor(tokens / scale + 0.5))


def _block_tokens(token_scale: float, block_tokens: int | None) -> int:
    if token_scale <= 0:
        raise WorkloadError(f"token scale must be positive, got {token_scale}")
    block = block_tokens if block_tokens is not None else max(1, round(MOONCAKE_BLOCK / token_scale))
    if block < 1:
        raise WorkloadError(f"block tokens must be at least 1, got {block}")
    return block


def _fit(prompt: int, output: int, max_len: int | None) -> tuple[int, int]:
    """Cut a prompt so prompt + output <= max_len (output first kept, at most half of it)."""
    if max_len is None or prompt + output <= max_len:
        return prompt, output
    output = min(output, max_len // 2)
    return max(1, min(prompt, max_len - output)), output


def mooncake_request(doc: object, where: str, token_scale: float, block: int,
                     max_len: int | None) -> WorkloadRequest:
    """One Mooncake row -> request (``where`` names it in errors)."""
    if not isinstance(doc, dict):
        raise WorkloadError(f"{where}: a Mooncake row must be a JSON object, got {type(doc).__name__}")
    missing = [f for f in MOONCAKE_FIELDS if f not in doc]
    if missing:
        raise WorkloadError(f"{where}: missing field(s) {', '.join(missing)} (Mooncake rows have "
                            f"{', '.join(MOONCAKE_FIELDS)})")
    ts = doc["timestamp"]
    if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not 0 <= ts < math.inf:
        raise WorkloadError(f"{where}: field 'timestamp' must be a number of milliseconds >= 0, got {ts!r}")
    lengths = []
    for name in ("input_length", "output_length"):
        v = doc[name]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise WorkloadError(f"{where}: field '{name}' must be an integer >= 1, got {v!r}")
        lengths.append(v)
    ids = doc["hash_ids"]
    if not isinstance(ids, list) or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in ids):
        raise WorkloadError(f"{where}: field 'hash_ids' must be a list of integers >= 0, got {ids!r:.80}")
    prompt, output = _fit(scaled(lengths[0], token_scale), scaled(lengths[1], token_scale), max_len)
    kept = tuple(ids[: -(-prompt // block)])
    return WorkloadRequest(ts / 1000.0, prompt, output, hash_ids=kept, block_tokens=block if kept else 0)


def load_mooncake(path: str | Path, token_scale: float = DEFAULT_SCALE, block_tokens: int | None = None,
                  max_len: int | None = None) -> list[WorkloadRequest]:
    """A Mooncake-format JSONL trace (module docstring); requests sorted by arrival, first at 0."""
    path = Path(path)
    block = _block_tokens(token_scale, block_tokens)
    out = [mooncake_request(doc, where, token_scale, block, max_len) for doc, where in json_lines(path)]
    return _from_zero(out, path)


def _timestamp(text: str, where: str) -> float:
    """Azure's ``2023-11-16 18:17:03.9799600`` (7 fractional digits) -> POSIX seconds."""
    head, _, frac = text.strip().partition(".")
    try:
        whole = datetime.fromisoformat(head)
        if frac and not frac.isdigit():
            raise ValueError(frac)
    except ValueError:
        raise WorkloadError(f"{where}: TIMESTAMP must look like 2023-11-16 18:17:03.9799600, got {text!r}") from None
    return whole.timestamp() + (int(frac) / 10 ** len(frac) if frac else 0.0)


def load_azure(path: str | Path, token_scale: float = DEFAULT_SCALE, max_len: int | None = None) -> list[WorkloadRequest]:
    """An Azure LLM inference CSV trace (module docstring); requests sorted by arrival, first at 0."""
    path = Path(path)
    reader = csv.reader(io.StringIO(read_workload_text(path)))
    header = next(reader, None)
    if header is None or tuple(h.strip() for h in header) != AZURE_COLUMNS:
        raise WorkloadError(f"{path} line 1: expected the header {','.join(AZURE_COLUMNS)}, got "
                            f"{','.join(header) if header else 'nothing'!r}")
    out = []
    for row in reader:
        where = f"{path} line {reader.line_num}"
        if not row or not any(c.strip() for c in row):
            continue
        if len(row) != 3:
            raise WorkloadError(f"{where}: expected 3 columns ({','.join(AZURE_COLUMNS)}), got {len(row)}")
        at = _timestamp(row[0], where)
        lengths = []
        for name, cell in zip(AZURE_COLUMNS[1:], row[1:]):
            try:
                v = int(cell)
            except ValueError:
                v = None
            if v is None or v < 1:
                raise WorkloadError(f"{where}: {name} must be an integer >= 1, got {cell!r}")
            lengths.append(v)
        prompt, output = _fit(scaled(lengths[0], token_scale), scaled(lengths[1], token_scale), max_len)
        out.append(WorkloadRequest(at, prompt, output))
    return _from_zero(out, path)


def load_workload(path: str | Path, token_scale: float = DEFAULT_SCALE, block_tokens: int | None = None,
                  max_len: int | None = None) -> list[WorkloadRequest]:
    """Any workload file the benchmark replays: an Azure CSV (``.csv``), a Mooncake JSONL (its
    first row has ``hash_ids`` and ``timestamp``) or the project's own JSONL (already scaled)."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return load_azure(path, token_scale, max_len)
    first = next((line for line in read_workload_text(path).splitlines() if line.strip()), "")
    try:
        doc = json.loads(first)
    except json.JSONDecodeError:
        doc = None
    if isinstance(doc, dict) and "hash_ids" in doc and "timestamp" in doc:
        return load_mooncake(path, token_scale, block_tokens, max_len)
    return load_jsonl(path)


def _from_zero(requests: list[WorkloadRequest], path: Path) -> list[WorkloadRequest]:
    if not requests:
        raise WorkloadError(f"workload file {path} holds no requests")
    requests.sort(key=lambda r: r.arrival_s)
    t0 = requests[0].arrival_s
    return [WorkloadRequest(r.arrival_s - t0, r.prompt_tokens, r.output_tokens, hash_ids=r.hash_ids,
                            block_tokens=r.block_tokens) for r in requests]
