"""Shared pytest fixtures. Keep each one small and generic; add new ones below."""

from __future__ import annotations

import getpass
import os
import tempfile
from pathlib import Path

import pytest


def _inductor_cache_of_this_ops_code() -> None:
    """Give the tests an Inductor cache of their own per version of the omni ops' code.

    Inductor keys a compiled graph by the graph, its config and torch, never by a custom op's
    code, and its cache (default ``/tmp/torchinductor_$USER``) outlives a run and is shared by
    every process on the machine. Code compiled by an older version of ``kernels/`` (whose
    lowering bound the placement tables as constants) was served to a newer one there: a test
    got the dispatch of a placement a run an hour earlier had compiled. A directory named by
    the hash of ``kernels/*.py`` reuses entries across runs of the same ops code and never
    across versions. A cache directory set by the caller is kept."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return
    from omni_passes.pass_manager import source_hash  # of no pass: the omni ops' code alone

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(
        Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}_omni_ops_{source_hash([])}")


_inductor_cache_of_this_ops_code()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random DeepSeek-V3 (4 layers: 1 dense + 3 MoE, 16 experts, top-4) with tokenizer.

    Built once per test session (about 4 s); treat it as read-only.
    """
    from omni_passes.testing.tiny_checkpoint import make_tiny_deepseek_checkpoint

    return make_tiny_deepseek_checkpoint(tmp_path_factory.mktemp("tiny_deepseek_v3"))
