"""From a client's request body to what routing and the upstream calls need (a pure function).

``prepare`` parses (JSON nested at most 400 deep), validates, drops the fields by which a
client could steer an engine, tokenizes and hashes the prompt's blocks, and builds the
upstream payloads. It runs inline for ordinary bodies and in a worker process for large ones
(``proxy.server.intake``), so it takes and returns only picklable values.

Fields dropped in every mode (the PD flow sets its own ``kv_transfer_params``):
``kv_transfer_params`` and ``ec_transfer_params``, at the top level and inside ``vllm_xargs``
(vLLM copies ``vllm_xargs`` into the same ``extra_args`` its connectors read). A client that
could set them would make an engine pull KV from a host and port of its choosing, or pin KV
blocks for a transfer that never comes.
"""

from __future__ import annotations

import json
from array import array
from dataclasses import dataclass
from typing import Any

from proxy.wire.openai import RequestError, choices_of, max_tokens_of, parse_json_body, validate_request

STEERING_FIELDS = ("kv_transfer_params", "ec_transfer_params")
PREFILL_KV_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                     "remote_block_ids": None, "remote_host": None, "remote_port": None}


@dataclass(frozen=True)
class PrepareSpec:
    """What ``prepare`` needs from the proxy's configuration (picklable)."""

    mode: str
    tokenizer: str | None
    chars_per_token: int
    block_size: int
    hash_algo: str
    hash_seed: str
    default_max_tokens: int
    hash_blocks: bool  # the policy uses the prefix index
    max_prefix_blocks: int = 16384  # routing looks at no more leading blocks than this


@dataclass
class Prepared:
    stream: bool
    max_tokens: int
    prompt_tokens: int
    keys: bytes                    # block keys, array('Q') bytes (compact across processes)
    payload: bytes | None          # collocated: the body to send (None: the client's bytes as they are)
    decode_base: bytes | None      # pd: the body for decode, without kv_transfer_params
    prefill_payload: bytes | None  # pd: the body for prefill
    dropped: tuple[str, ...] = ()

    def block_keys(self) -> list[int]:
        return array("Q", self.keys).tolist()

    def decode_payload(self, kv_params: dict | None) -> bytes:
        """The decode body, with the prefill's ``kv_transfer_params`` spliced in (no re-encoding)."""
        if kv_params is None:
            return self.decode_base
        extra = b'"kv_transfer_params":' + json.dumps(kv_params, separators=(",", ":")).encode()
        base = self.decode_base
        return base[:-1] + (b"," if len(base) > 2 else b"") + extra + b"}"


def scrub(body: dict[str, Any]) -> tuple[str, ...]:
    """Remove the engine-steering fields from ``body`` (in place); the names removed."""
    dropped = [name for name in STEERING_FIELDS if name in body]
    for name in dropped:
        del body[name]
    xargs = body.get("vllm_xargs")
    if isinstance(xargs, dict):
        for name in STEERING_FIELDS:
            if name in xargs:
                del xargs[name]
                dropped.append(f"vllm_xargs.{name}")
    return tuple(dropped)


def refuse_in_pd(body: dict[str, Any]) -> None:
    if choices_of(body) > 1:
        raise RequestError(
            f"'n'/'best_of' above 1 (got n={body.get('n')!r}, best_of={body.get('best_of')!r}) is not served in pd "
            "mode: one prefill's KV feeds one decode sequence; send separate requests", param="n")
    if body.get("use_beam_search"):
        raise RequestError("'use_beam_search' is not served in pd mode: one prefill's KV feeds one decode sequence",
                           param="use_beam_search")


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    doc = {k: v for k, v in body.items() if k not in ("stream_options", "min_tokens")}
    doc.update(max_tokens=1, stream=False, kv_transfer_params=dict(PREFILL_KV_PARAMS))
    if "max_completion_tokens" in doc:
        doc["max_completion_tokens"] = 1
    return doc


def prepare(raw: bytes, chat: bool, spec: PrepareSpec, tokenizer, hasher) -> Prepared:
    """Everything the proxy needs to route and forward one request; RequestError if it is wrong."""
    body = parse_json_body(raw)
    validate_request(body, chat)
    if spec.mode == "pd":
        refuse_in_pd(body)
    dropped = scrub(body)
    ids = tokenizer.prompt_ids(body, chat)
    prefix = ids[: spec.max_prefix_blocks * spec.block_size] if spec.hash_blocks else ()
    keys = array("Q", hasher.keys(prefix)).tobytes()
    stream = bool(body.get("stream"))
    max_tokens = max_tokens_of(body, spec.default_max_tokens)
    if spec.mode == "pd":
        return Prepared(stream, max_tokens, len(ids), keys, None, json.dumps(body).encode(),
                        json.dumps(prefill_body(body)).encode(), dropped)
    payload = json.dumps(body).encode() if dropped else None
    return Prepared(stream, max_tokens, len(ids), keys, payload, None, None, dropped)
