"""Prompt token ids in the proxy, for prefix matching.

With ``--tokenizer PATH`` (a local Hugging Face tokenizer directory, e.g. the model's) the proxy
tokenizes as vLLM does: chat messages through the tokenizer's chat template
(``add_generation_prompt`` as the request says, default true) and then without special tokens;
completion prompts with special tokens (BOS) unless the request sets ``add_special_tokens``
false. Without it, the character-block tokenizer of ``proxy.wire.text`` (what the simulated
engine uses).
"""

from __future__ import annotations

import logging
from typing import Any

from proxy.wire.openai import RequestError
from proxy.wire.text import DEFAULT_CHARS_PER_TOKEN, content_text, prompt_ids, render_chat

log = logging.getLogger("omni_proxy")


class CharBlockTokenizer:
    name = "char-block"

    def __init__(self, chars_per_token: int = DEFAULT_CHARS_PER_TOKEN):
        if chars_per_token < 1:
            raise ValueError(f"chars_per_token must be at least 1, got {chars_per_token}")
        self.chars_per_token = chars_per_token

    def prompt_ids(self, body: dict[str, Any], chat: bool) -> list[int]:
        return prompt_ids(body, chat, self.chars_per_token)


class HFTokenizer:
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

    def _chat_text(self, body: dict[str, Any]) -> str:
        messages = [dict(m, content=content_text(m.get("content"))) for m in body["messages"]]
        kwargs = dict(body.get("chat_template_kwargs") or {})
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=body.get("add_generation_prompt", True), **kwargs)
        except Exception as exc:
            if not self._warned_template:
                log.warning("chat template of %s failed (%s); routing on a plain rendering", self.name, exc)
                self._warned_template = True
            return render_chat(body["messages"])

    def prompt_ids(self, body: dict[str, Any], chat: bool) -> list[int]:
        if chat:
            return list(self.tokenizer.encode(self._chat_text(body), add_special_tokens=False))
        prompt = body["prompt"]
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            return [int(t) for t in prompt]
        if isinstance(prompt, list):
            prompt = prompt[0]
            if isinstance(prompt, list):
                return [int(t) for t in prompt]
        if not isinstance(prompt, str):
            raise RequestError(f"field 'prompt' has an unsupported form: {prompt!r:.60}", param="prompt")
        return list(self.tokenizer.encode(prompt, add_special_tokens=body.get("add_special_tokens", True)))


def make_tokenizer(path: str | None, chars_per_token: int = DEFAULT_CHARS_PER_TOKEN):
    return HFTokenizer(path) if path else CharBlockTokenizer(chars_per_token)
