"""What the vLLM CUDA test modules here need, checked before pytest imports them.

A module named ``test_*_cuda.py`` runs vLLM's CUDA build (engines, FA3, vLLM's CUDA-only
modules imported at module level): on a machine without CUDA, or with vLLM missing or vLLM's
CPU build, it is reported as skipped with the reason instead of failing to import. The
kernel-only modules here (``test_paged_sink_recent_mla.py``) need CUDA alone and say so
themselves.

No ``__init__.py`` in this folder: pytest would then put ``tests/gpu`` on ``sys.path`` and this
folder, named ``vllm``, would shadow the real vLLM package.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest


@functools.cache
def missing() -> str | None:
    """Why vLLM's CUDA build cannot run here, or None (asked once per session)."""
    import torch

    if not torch.cuda.is_available():
        return "needs CUDA"
    try:
        from vllm.platforms import current_platform
    except ImportError as exc:
        return f"could not import 'vllm': {exc}"
    if not current_platform.is_cuda():
        return "needs vLLM's CUDA build"
    return None


class _SkippedModule(pytest.Module):
    """A module reported as skipped (``missing()`` says why) without being imported."""

    def collect(self) -> Any:
        pytest.skip(f"{missing()} ({self.path.name})", allow_module_level=True)


def pytest_pycollect_makemodule(module_path: Path, parent: Any) -> pytest.Module | None:
    if module_path.name.endswith("_cuda.py") and missing():
        return _SkippedModule.from_parent(parent, path=module_path)
    return None
