"""The engine-process protocol the vLLM benchmarks share (omni_passes.bench.vllm_common), run with
real spawned processes and a pure-Python engine: ready with each figure on its own, commands
answered by name, an unknown command and a failure reported with the engine's name, a clean stop;
goals, failures, the partial JSON and the run's outputs; options; decode steps and TPOT from the
engine's step returns."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path
from types import SimpleNamespace

import pytest

from omni_passes.bench import vllm_common as common
from omni_passes.cli.common import UserError


def _repeat(text: str, times: int) -> str:
    return text * times


def _no_figure() -> float:
    return 1 / 0


def _text_engine(name: str, greeting: str, commands, results) -> None:
    """An engine process without an engine: the protocol alone."""
    with common.reported_errors(name, results):
        ready = {"greeting": greeting}
        common.measure_each(ready, {"broken": _no_figure, "answer": lambda: 42})
        results.put((name, "ready", ready))
        common.serve(name, commands, results, {"repeat": _repeat})
        results.put((name, "stopped", None))


def test_an_engine_process_answers_its_commands_and_stops():
    ctx = mp.get_context("spawn")
    engine = common.EngineProcess(ctx, "a", _text_engine, ("hello",), ctx.Queue(), timeout=120)
    try:
        assert engine.receive("ready") == {"greeting": "hello", "broken_error": "ZeroDivisionError: division by zero",
                                           "answer": 42}
        assert engine.ask("repeat", {"text": "ab", "times": 3}) == "ababab"
    finally:
        engine.stop()
    assert engine.proc.exitcode == 0


def test_an_unknown_command_comes_back_as_the_engines_error():
    ctx = mp.get_context("spawn")
    engine = common.EngineProcess(ctx, "b", _text_engine, ("hello",), ctx.Queue(), timeout=120)
    engine.receive("ready")
    with pytest.raises(RuntimeError, match=r"engine b failed: ValueError: unknown command 'tokens'; known: repeat"):
        engine.ask("tokens", {})
    engine.proc.join(timeout=60)
    assert engine.proc.exitcode == 0  # the failure went to the parent, not to the exit status


def test_partial_json_and_outputs(tmp_path: Path, capsys):
    result: dict = {"engines": {}}
    save = common.partial_saver(tmp_path / "r.json", tmp_path / "fallback.json", result)
    result["engines"]["off"] = {"rounds": [1]}
    save()
    assert json.loads((tmp_path / "r.json.partial.json").read_text()) == {"engines": {"off": {"rounds": [1]}}}
    common.partial_saver(None, tmp_path / "fallback.json", result)()
    assert (tmp_path / "fallback.json").exists()

    def broken_plot(result: dict, out_dir: Path) -> str:
        raise OSError(f"no room in {out_dir.name}")

    common.add_plot(result, broken_plot, tmp_path / "figs")
    assert result["plot_error"] == "OSError('no room in figs')" and "plot" not in result
    common.add_plot(result, lambda r, d: str(d / "x.png"), tmp_path)
    assert result["plot"] == str(tmp_path / "x.png")

    from omni_passes.cli.common import publish

    publish(result, tmp_path / "new" / "out.json", True, print_summary=lambda r: print("summary"))
    assert json.loads(capsys.readouterr().out) == json.loads((tmp_path / "new" / "out.json").read_text()) == result
    publish(result, None, False, print_summary=lambda r: print("summary", len(r["engines"])))
    assert capsys.readouterr().out == "summary 1\n"


def test_goals_and_failures_are_printed_with_their_reasons(capsys):
    goals = [common.goal("ratio", 1.23456, ">=", 1.2, "never shown"),
             common.goal("time", 0.7, "<=", 0.64, "weights dominate"),
             common.goal("unknown", None, ">=", 1.0, "not measured")]
    assert [g["met"] for g in goals] == [True, False, False] and goals[0]["why_not"] is None
    assert goals[1] == {"goal": "time", "value": 0.7, "target": "<= 0.64", "met": False, "why_not": "weights dominate"}
    common.print_goals(goals, digits=3)
    common.print_failure("dense", {"error": "engine dense failed: OOM\ntraceback"})
    common.print_failure("compressed", {"ready": {}})
    assert capsys.readouterr().out.splitlines() == [
        "  GOAL met: ratio = 1.235 (target >= 1.2)",
        "  GOAL NOT met: time = 0.700 (target <= 0.64) - weights dominate",
        "  GOAL NOT met: unknown = n/a (target >= 1.0) - not measured",
        "  dense: FAILED: engine dense failed: OOM"]


def test_options_name_what_they_do_not_know(tmp_path: Path):
    stages = ("capacity", "tpot", "long")
    assert common.comma_names("--kv-stages", " tpot,, long ", stages, "stage") == ["tpot", "long"]
    with pytest.raises(UserError, match=r"--moe-engines: unknown engine\(s\) \['of'\]; known: off, identity$"):
        common.comma_names("--moe-engines", "off,of", ("off", "identity"), "engine")
    made = common.work_dir(str(tmp_path / "a" / "b"), "x-")
    assert made == tmp_path / "a" / "b" and made.is_dir()
    fresh = common.work_dir(None, "omni-test-")
    assert fresh.is_dir() and fresh.name.startswith("omni-test-")
    fresh.rmdir()


def test_steady_tpot_uses_only_steps_where_every_request_got_a_token():
    returns = [(0.0, 3), (1.0, 1), (1.5, 3), (1.51, 3), (1.53, 3), (1.6, 2), (1.7, 3)]
    result = common.steady_tpot(returns, 3)
    assert result["steps"] == 2 and result["tpot_s"] == pytest.approx(0.015)
    assert common.steady_tpot([(0.0, 1), (1.0, 2)], 3) == {"tpot_s": None, "steps": 0}


def _outputs(**tokens: int) -> list[SimpleNamespace]:
    """One step's outputs as vLLM's ``RequestOutput`` gives them (the fields ``DecodeSteps`` reads)."""
    return [SimpleNamespace(request_id=rid, outputs=[SimpleNamespace(token_ids=list(range(n)))])
            for rid, n in tokens.items()]


def test_decode_steps_start_after_the_last_first_token():
    decode = common.DecodeSteps(["a", "b", "c"])
    decode.add(1.0, _outputs(a=1))                      # prefill: a has its first token
    decode.add(2.0, _outputs(a=2, b=1))
    assert decode.prefilled_at is None and decode.returns == []
    decode.add(3.0, _outputs(a=3, b=2, c=1))             # the last first token: prefill is over
    assert decode.prefilled_at == 3.0 and decode.returns == []
    decode.add(3.1, _outputs(a=4, b=3, c=2))
    decode.add(3.2, _outputs(a=5, b=3, c=3))             # b got nothing this step
    decode.add(3.25, _outputs(a=6, b=4, c=4))
    decode.add(3.3, _outputs(a=7, b=5, c=5))
    assert decode.returns == [(3.1, 3), (3.2, 2), (3.25, 3), (3.3, 3)]
    assert decode.produced == {"a": 7, "b": 5, "c": 5} and decode.steady_steps() == 3
    assert decode.tpot()["steps"] == 1 and decode.tpot()["tpot_s"] == pytest.approx(0.05)
