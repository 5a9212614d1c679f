"""Shared pytest fixtures. Keep each one small and generic; add new ones below."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random DeepSeek-V3 (4 layers: 1 dense + 3 MoE, 16 experts, top-4) with tokenizer.

    Built once per test session (about 4 s); treat it as read-only.
    """
    from omni_passes.testing.tiny_checkpoint import make_tiny_deepseek_checkpoint

    return make_tiny_deepseek_checkpoint(tmp_path_factory.mktemp("tiny_deepseek_v3"))
