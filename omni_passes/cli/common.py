"""Helpers every subcommand shares: JSON on stdout only, logs on stderr, clear errors."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("omni_passes")


class UserError(Exception):
    """Bad input from the user: printed as one line naming the problem, exit status 2."""


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )


def emit_json(document: Any) -> None:
    """The one JSON document a `--json` run prints on stdout."""
    json.dump(document, sys.stdout, indent=2, sort_keys=False, default=_json_default)
    sys.stdout.write("\n")
    sys.stdout.flush()


def write_json(path: str | Path, document: Any) -> None:
    """A result document written to ``--out FILE``: the same JSON a ``--json`` run prints."""
    Path(path).write_text(json.dumps(document, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:  # pragma: no cover
        pass
    try:
        import torch

        if isinstance(value, torch.Tensor):
            return value.tolist()
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def say(message: str) -> None:
    """Human-readable progress: always stderr, so stdout stays clean for --json."""
    print(message, file=sys.stderr, flush=True)
