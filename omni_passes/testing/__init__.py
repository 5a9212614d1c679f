"""Test helpers that ship with the package: tiny random checkpoints built locally (no downloads).

Submodules import transformers/tokenizers lazily, so `import omni_passes.testing` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["make_tiny_deepseek_checkpoint"]

if TYPE_CHECKING:
    from omni_passes.testing.tiny_checkpoint import make_tiny_deepseek_checkpoint


def __getattr__(name: str) -> Any:
    if name == "make_tiny_deepseek_checkpoint":
        from omni_passes.testing.tiny_checkpoint import make_tiny_deepseek_checkpoint

        return make_tiny_deepseek_checkpoint
    raise AttributeError(f"module 'omni_passes.testing' has no attribute {name!r}")
