"""Text to token ids without a real tokenizer: the character-block tokenizer.

Every ``chars_per_token`` characters of text make one token whose id is the CRC-32 of their
UTF-8 bytes. The proxy (without ``--tokenizer``) and the simulated engine use it alike, so the
block hashes the proxy computes for routing equal those the simulator publishes in its KV
events. Chat requests are first flattened with :func:`render_chat`.
"""

from __future__ import annotations

import zlib
from typing import Any

DEFAULT_CHARS_PER_TOKEN = 4


def char_block_ids(text: str, chars_per_token: int = DEFAULT_CHARS_PER_TOKEN) -> list[int]:
    step = chars_per_token
    data = text.encode("utf-8")
    crc32 = zlib.crc32
    if len(data) == len(text):  # ASCII: character slices are byte slices, encoded once
        return [crc32(data[i : i + step]) for i in range(0, len(data), step)]
    return [crc32(text[i : i + step].encode("utf-8")) for i in range(0, len(text), step)]


def content_text(content: Any) -> str:
    """The text of an OpenAI message ``content`` (string, list of parts, or null)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p if isinstance(p, str) else p.get("text", "") for p in content
                       if isinstance(p, str) or (isinstance(p, dict) and p.get("type") in ("text", "input_text")))
    return str(content)


def render_chat(messages: list[dict[str, Any]]) -> str:
    """A fixed plain-text chat template: ``<|role|>content`` per message, then the assistant."""
    return "".join(f"<|{m.get('role', 'user')}|>{content_text(m.get('content'))}\n" for m in messages) + "<|assistant|>"


def prompt_ids(body: dict[str, Any], chat: bool, chars_per_token: int = DEFAULT_CHARS_PER_TOKEN) -> list[int]:
    """Token ids of a (validated) request body's prompt under the character-block tokenizer.

    A completions ``prompt`` given as token ids is used as is; of a list of prompts, the first.
    """
    if chat:
        return char_block_ids(render_chat(body["messages"]), chars_per_token)
    prompt = body["prompt"]
    if isinstance(prompt, list) and prompt:
        prompt = prompt[0]
    if isinstance(prompt, list):
        return [int(t) for t in prompt]
    if isinstance(prompt, int):  # a single-token id prompt from a list of ints
        return [int(t) for t in body["prompt"]]
    return char_block_ids(prompt, chars_per_token)
