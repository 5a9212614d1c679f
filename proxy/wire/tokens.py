"""A request's prompt as token ids, the way vLLM computes them (shared by proxy and simulator).

With a tokenizer directory (``--tokenizer PATH``, a local Hugging Face tokenizer, e.g. the
model's): chat messages go through the tokenizer's chat template (``add_generation_prompt`` as
the request says, default true) and are then encoded without special tokens; completion
prompts are encoded with special tokens (BOS) unless the request sets ``add_special_tokens``
false; token-id prompts are used as they are. Without one: the character-block tokenizer of
:mod:`proxy.wire.text`.

``prompts(body, chat)`` gives every prompt of a request (completions accept a list);
``prompt_ids(body, chat)`` the first, which is what routing looks at.
"""

from __future__ import annotations

import logging
from typing import Any

from proxy.wire.text import DEFAULT_CHARS_PER_TOKEN, char_block_ids, content_text, render_chat

log = logging.getLogger("omni_proxy")


def prompt_items(body: dict[str, Any]) -> list[Any]:
    """The prompts of a (validated) completions body: strings or token-id lists."""
    prompt = body["prompt"]
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


class _Tokenizer:
    name = ""

    def text_ids(self, text: str, add_special_tokens: bool) -> list[int]:
        raise NotImplementedError

    def chat_text(self, body: dict[str, Any]) -> str:
        return render_chat(body["messages"])

    def prompts(self, body: dict[str, Any], chat: bool) -> list[list[int]]:
        if chat:
            return [self.text_ids(self.chat_text(body), False)]
        special = body.get("add_special_tokens", True)
        return [[int(t) for t in p] if isinstance(p, list) else self.text_ids(p, special) for p in prompt_items(body)]

    def prompt_ids(self, body: dict[str, Any], chat: bool) -> list[int]:
        if chat:
            return self.text_ids(self.chat_text(body), False)
        first = prompt_items(body)[0]
        if isinstance(first, list):
            return [int(t) for t in first]
        return self.text_ids(first, body.get("add_special_tokens", True))


class CharBlockTokenizer(_Tokenizer):
    name = "char-block"

    def __init__(self, chars_per_token: int = DEFAULT_CHARS_PER_TOKEN):
        if chars_per_token < 1:
            raise ValueError(f"chars_per_token must be at least 1, got {chars_per_token}")
        self.chars_per_token = chars_per_token

    def text_ids(self, text: str, add_special_tokens: bool) -> list[int]:
        return char_block_ids(text, self.chars_per_token)

    def longest(self, body: dict[str, Any], chat: bool) -> int:
        """Tokens of the longest prompt, without tokenizing (one token per ``chars_per_token``)."""
        if chat:
            return -(-len(render_chat(body["messages"])) // self.chars_per_token)
        return max(len(p) if isinstance(p, list) else -(-len(p) // self.chars_per_token) for p in prompt_items(body))


class HFTokenizer(_Tokenizer):
    def __init__(self, path: str):
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:  # pragma: no cover - transformers is a core dependency
            raise ValueError(f"--tokenizer needs transformers: {exc}") from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as exc:
            raise ValueError(f"cannot load a tokenizer from {path!r}: {exc}") from None
        self.name = path
        self._warned_template = False

    def text_ids(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def chat_text(self, body: dict[str, Any]) -> str:
        messages = [dict(m, content=content_text(m.get("content"))) for m in body["messages"]]
        kwargs = dict(body.get("chat_template_kwargs") or {})
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=body.get("add_generation_prompt", True), **kwargs)
        except Exception as exc:
            if not self._warned_template:
                log.warning("chat template of %s failed (%s); using a plain rendering", self.name, exc)
                self._warned_template = True
            return render_chat(body["messages"])


def make_tokenizer(path: str | None, chars_per_token: int = DEFAULT_CHARS_PER_TOKEN) -> _Tokenizer:
    return HFTokenizer(path) if path else CharBlockTokenizer(chars_per_token)

