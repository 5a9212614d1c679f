"""Timing model of the simulated engine: parameters, defaults, and the step-time formula.

One engine step runs every running decode sequence one token and up to the remaining token
budget of prompt tokens (chunked prefill). Its duration is::

    step_s = step_overhead_s
           + prefill_token_s   * sum(chunk)                       # prompt tokens computed
           + prefill_attn_s    * sum(chunk * (done + chunk / 2))  # their attention to context
           + decode_seq_s      * decodes                          # one token per running seq
           + decode_kv_token_s * sum(context of each decode)      # KV read by decode attention

all times in seconds, then multiplied by the ``slowdown`` fault factor. A remote-KV decode
(PD mode) waits ``kv_transfer_base_s + kv_transfer_token_s * prompt_tokens`` before it joins.
The defaults model a mid-size model on one accelerator: about 25k prompt tokens/s of prefill,
and a 24 ms step for 64 sequences of 4k context.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SimProfile:
    block_size: int = 16                  # tokens per KV block (prefix cache and events)
    num_kv_blocks: int = 16384            # KV cache capacity in blocks
    max_num_batched_tokens: int = 8192    # token budget of one step
    max_num_seqs: int = 256               # running requests at most
    max_model_len: int = 65536            # prompt + max_tokens at most (400 beyond)
    step_overhead_s: float = 0.004
    prefill_token_s: float = 4e-5
    prefill_attn_s: float = 1e-9
    decode_seq_s: float = 1e-4
    decode_kv_token_s: float = 5e-8
    kv_transfer_base_s: float = 0.002
    kv_transfer_token_s: float = 1e-6
    kv_hold_s: float = 60.0               # a prefill keeps KV for a remote decode this long
    default_max_tokens: int = 16          # when a request gives no max_tokens
    chars_per_token: int = 4              # character-block tokenizer
    hash_algo: str = "sha256"             # block hashes in KV events (as vLLM's default)
    int_block_hashes: bool = False        # publish hashes as 64-bit ints (vLLM's env option)

    def step_time(self, prefill_chunks: list[tuple[int, int]], decode_contexts_sum: int, decodes: int) -> float:
        """Seconds of one step. prefill_chunks: (tokens already done, tokens this step)."""
        if not prefill_chunks and not decodes:
            return 0.0
        computed = sum(c for _, c in prefill_chunks)
        attn = sum(c * (done + c / 2) for done, c in prefill_chunks)
        return (
            self.step_overhead_s
            + self.prefill_token_s * computed
            + self.prefill_attn_s * attn
            + self.decode_seq_s * decodes
            + self.decode_kv_token_s * decode_contexts_sum
        )

    def transfer_time(self, prompt_tokens: int) -> float:
        return self.kv_transfer_base_s + self.kv_transfer_token_s * prompt_tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "profile") -> "SimProfile":
        if not isinstance(data, dict):
            raise ValueError(f"{source}: a profile must be a JSON object, got {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{source}: unknown profile field(s) {', '.join(unknown)}; known: {', '.join(known)}")
        values: dict[str, Any] = {}
        for name, value in data.items():
            default = getattr(cls, name)
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, int):
                ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
            elif isinstance(default, float):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
            else:
                ok = isinstance(value, str)
            if not ok:
                raise ValueError(f"{source}: field '{name}' has bad value {value!r} (expected {type(default).__name__}"
                                 f"{', positive' if isinstance(default, int) and not isinstance(default, bool) else ''})")
            values[name] = float(value) if isinstance(default, float) else value
        if values.get("hash_algo", cls.hash_algo) not in ("sha256", "sha256_cbor"):
            raise ValueError(f"{source}: field 'hash_algo' must be sha256 or sha256_cbor, got {values['hash_algo']!r}")
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> "SimProfile":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"profile file {path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"profile file {path} is not valid JSON: {exc}") from None
        return cls.from_dict(data, source=str(path))
