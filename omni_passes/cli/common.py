"""Helpers every subcommand shares: JSON on stdout only, logs on stderr, clear errors."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(document, indent=2, default=_json_default) + "\n")


def publish(result: dict, out: str | Path | None, as_json: bool, print_summary: Callable[[dict], None]) -> None:
    """``--out FILE``, then the document on stdout (``--json``) or the summary for people."""
    if out:
        write_json(out, result)
    if as_json:
        emit_json(result)
    else:
        print_summary(result)


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
