"""Run a Triton script under Triton's CPU interpreter (``TRITON_INTERPRET=1``), for the unit tests
of the kernels' index logic on machines without a GPU.

The interpreter is chosen when a kernel is defined (at import), so the script runs in a child
Python with the variable set, the repository on its path and as its working folder. fp16/fp32
only: the interpreter multiplies bf16 tiles as raw integers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_interpreted(script: str, timeout: float = 600) -> str:
    """``script``'s stdout; a script that fails raises ``AssertionError`` with the tail of its stderr."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout, check=False)
    if result.returncode != 0:
        raise AssertionError(f"the interpreted script exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result.stdout
