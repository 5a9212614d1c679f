"""`omni-passes bench graph`: graph-mode DeepSeek decode and prefill, eager vs compiled vs
compiled with each pass, in one run.

    omni-passes bench graph --device cpu --shape tiny --json
    omni-passes bench graph --device cuda --shape v2-lite --layers 4 --batch 16 --context 4096 32768 --json --plot out/

Model: transformers DeepSeek-V3 with random weights in the chosen shape (``model.py``); a
static cache so a decode step is one compiled graph with static shapes; on CUDA, bf16 and every
compiled decode step captured in a CUDA graph.

Variants (``variants.py``): ``eager``, ``compiled``, ``compiled+dispatch`` (identity
placement), ``compiled+dispatch-redundant`` (redundant slots for the hottest experts),
``compiled+latent``, and per context C ``compiled+sparse@C`` (sink+recent attention on the
pattern layers), ``compiled+all@C`` and ``compiled+latent+sparse@C``.

Checks (``check.py``): each compiled variant's logits against the compiled graph without omni
passes that computes the same function, under ``omni_passes.numerics``'s rule.

Timing (``timing.py``): each variant in interleaved rounds with its bases; ratios to
``compiled`` per round, reported as median and spread, so a busy machine's load changes fall on
both sides of every ratio.

Amdahl bound for sparse attention (``report.py``): the attention share f of the compiled step at
context C is measured as (step(C) - step(C0)) / step(C) with C0 a short context (attention work
is what grows with context; the rest of the step does not); compressing a fraction p of the
layers can at best remove f * p of the step, so the bound is 1 / (1 - f * p).

Steps of a run: ``run.py``; the HBM floor (CUDA): ``floor.py``; options: ``cli.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omni_passes.bench.graph import report
from omni_passes.bench.graph.cli import add_arguments
from omni_passes.bench.graph.model import SHAPES, DecodeSteps, model_config
from omni_passes.bench.graph.run import run
from omni_passes.cli.common import emit_json, setup_logging, write_json

__all__ = ["SHAPES", "DecodeSteps", "add_arguments", "main", "model_config", "run"]


def main(args: argparse.Namespace) -> int:
    setup_logging()
    result = run(args)
    if args.plot:
        result["plot"] = report.plot(result, Path(args.plot))
    if args.out:
        write_json(args.out, result)
    if args.json:
        emit_json(result)
    else:
        print(report.table(result))
    return 0
