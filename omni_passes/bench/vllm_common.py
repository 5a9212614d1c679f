"""What the vLLM benchmarks share: engine child processes (both ends), GPU facts, the device copy
bandwidth, the request loop's pieces and decode step times, a partial JSON after every result,
and the run's outputs.

Every engine runs in a process of its own (``ctx.Process``, spawn) that reports on one results
queue shared by all engines as ``(engine name, kind, value)``; the parent sends ``(kind,
payload)`` commands on the engine's own queue and ``None`` to stop it:

    parent                                   engine process
    EngineProcess(ctx, name, target, ...)    target(name, *args, commands, results):
      .receive("ready")                        with reported_errors(name, results):
      .ask(kind, payload)                        start; measure_each(ready, ...); put "ready"
      .stop()  -> None, waits for "stopped"      serve(name, commands, results, handlers)
                                                 put "stopped"

Parent side (never touches CUDA: the engines own the device): ``start_run``, ``comma_names``,
``work_dir``, ``EngineProcess``, ``gpu_total_bytes`` and ``gpu_name`` (nvidia-smi),
``partial_saver``, ``goal``, ``add_plot``, ``print_failure``, ``print_goals``, ``publish``.
Engine side: ``reported_errors``, ``measure_each``, ``serve``, ``copy_bandwidth``, and the
request loop's ``add_greedy``, ``DecodeSteps`` (with ``steady_tpot``) and ``abort_all`` (vLLM
and torch imported when called).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import queue
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from omni_passes.cli.common import UserError, say, setup_logging, write_json


# --------------------------------------------------------------------------- parent side
class EngineProcess:
    """One engine process and its command queue; ``receive`` waits at most ``timeout`` s."""

    def __init__(self, ctx: Any, name: str, target: Callable[..., None], args: tuple, results: Any,
                 timeout: float) -> None:
        self.name, self.results, self.timeout = name, results, timeout
        self.commands = ctx.Queue()
        self.proc = ctx.Process(target=target, args=(name, *args, self.commands, results))
        self.proc.start()

    def receive(self, kind: str, timeout: float | None = None) -> Any:
        """The next result, which must be this engine's ``kind``; an engine that failed, exited or
        said nothing in time raises, naming itself."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            try:
                who, got, value = self.results.get(timeout=15)
            except queue.Empty:  # is the process still there?
                if not self.proc.is_alive():
                    raise RuntimeError(f"engine {self.name} exited (code {self.proc.exitcode}) without a result; "
                                       "see its log above") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"engine {self.name}: no {kind} in {timeout:.0f} s") from None
                continue
            if got == "error":
                raise RuntimeError(f"engine {who} failed: {value}")
            if (who, got) != (self.name, kind):
                raise RuntimeError(f"expected {kind} from engine {self.name}, got {got} from {who}")
            return value

    def ask(self, kind: str, payload: dict | None = None) -> Any:
        self.commands.put((kind, payload or {}))
        return self.receive(kind)

    def stop(self) -> None:
        self.commands.put(None)
        try:
            self.receive("stopped", timeout=120)
        except Exception as exc:  # noqa: BLE001  (an engine that failed has said so already)
            say(f"engine {self.name} did not stop cleanly: {str(exc)[:300]}")
        self.proc.join(timeout=60)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=30)


def start_run() -> None:
    """Logs on stderr; SIGTERM leaves through ``sys.exit`` so that ``finally`` blocks stop the
    engine processes."""
    import signal

    setup_logging()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def comma_names(option: str, value: str, known: tuple[str, ...], noun: str) -> list[str]:
    """The names of a comma list (blanks dropped), each one of ``known``; else a ``UserError``
    naming the option and what it knows."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    if unknown := [n for n in names if n not in known]:
        raise UserError(f"{option}: unknown {noun}(s) {unknown}; known: {', '.join(known)}")
    return names


def work_dir(path: str | None, prefix: str) -> Path:
    """``path`` (made if missing), else a fresh temporary folder named ``prefix...``."""
    work = Path(path or tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    return work


def _nvidia_smi(query: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return out.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def gpu_total_bytes() -> int | None:
    """GPU 0's memory, None where nvidia-smi does not say."""
    found = _nvidia_smi("memory.total")
    try:
        return int(float(found) * 2**20) if found else None
    except ValueError:
        return None


def gpu_name() -> str | None:
    return _nvidia_smi("name")


def partial_saver(out: str | Path | None, fallback: Path, result: dict) -> Callable[[], None]:
    """A call that writes ``result`` to ``<out>.partial.json`` (``fallback`` without ``--out``):
    a run cut off keeps what it measured."""
    return functools.partial(write_json, Path(str(out) + ".partial.json") if out else fallback, result)


def add_plot(result: dict, plot: Callable[[dict, Path], str], out_dir: str | Path) -> None:
    """``result["plot"]``: the figure's path; a plot that fails leaves ``plot_error`` and the figures."""
    try:
        result["plot"] = plot(result, Path(out_dir))
    except Exception as exc:  # noqa: BLE001
        result["plot_error"] = repr(exc)


def print_failure(name: str, engine: dict) -> None:
    """``  NAME: FAILED: <the error's first line>`` where the engine's record holds an error."""
    if "error" in engine:
        print(f"  {name}: FAILED: {engine['error'].splitlines()[0] if engine['error'] else ''}")


def goal(what: str, value: float | None, op: str, target: float, why: str) -> dict:
    """One of the issue's goals: met where ``value`` is known and ``op`` (``">="`` or ``"<="``)
    ``target``; ``why_not`` (where not met) says why."""
    met = value is not None and (value >= target if op == ">=" else value <= target)
    return {"goal": what, "value": value, "target": f"{op} {target}", "met": met, "why_not": None if met else why}


def print_goals(goals: list[dict], digits: int) -> None:
    """``  GOAL met|NOT met: what = value (target ...)`` and, where not met, why."""
    for entry in goals:
        value = "n/a" if entry["value"] is None else f"{entry['value']:.{digits}f}"
        print(f"  GOAL {'met' if entry['met'] else 'NOT met'}: {entry['goal']} = {value} (target {entry['target']})"
              + ("" if entry["met"] else f" - {entry['why_not']}"))


# --------------------------------------------------------------------------- engine side
@contextlib.contextmanager
def reported_errors(name: str, results: Any) -> Iterator[None]:
    """Whatever stops the engine goes to the parent as ``(name, "error", text)`` with the
    traceback's tail; the parent goes on with the next engine or stops the run."""
    try:
        yield
    except BaseException as exc:  # noqa: BLE001
        import traceback

        results.put((name, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-4000:]}"))


def measure_each(ready: dict, figures: dict[str, Callable[[], Any]]) -> None:
    """``ready[key] = figure()`` for each, on its own: one that fails leaves ``key_error`` and the
    other figures (and the engine's work) standing."""
    for key, figure in figures.items():
        try:
            ready[key] = figure()
        except Exception as exc:  # noqa: BLE001
            ready[f"{key}_error"] = f"{type(exc).__name__}: {exc}"


def serve(name: str, commands: Any, results: Any, handlers: dict[str, Callable[..., Any]]) -> None:
    """Answer ``(kind, payload)`` commands with ``(name, kind, handlers[kind](**payload))`` until
    the parent sends ``None``."""
    while (command := commands.get()) is not None:
        kind, payload = command
        if kind not in handlers:
            raise ValueError(f"unknown command {kind!r}; known: {', '.join(handlers)}")
        results.put((name, kind, handlers[kind](**payload)))


def copy_bandwidth(size: int = 1 << 30) -> dict:
    """The device's copy bandwidth as the engines report it (``omni_passes.bench.measure``'s
    measurement: bytes read + written per second copying ``size`` bytes, median of 10)."""
    from omni_passes.bench.measure import copy_bandwidth as measured

    rate = measured("cuda", size)
    return {"bytes": size, "seconds": 2 * size / rate, "bytes_per_s": rate}


def add_greedy(engine: Any, tag: str, prompts: list[dict], max_tokens: int) -> list[str]:
    """Requests ``tag0, tag1, ...``, one per prompt: greedy, ``max_tokens`` each (EOS ignored),
    token ids only. Returns their ids."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    ids = [f"{tag}{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, params)
    return ids


class DecodeSteps:
    """What a batch of requests got from each engine step: ``produced`` (tokens per request id so
    far), ``prefilled_at`` (the time of the step that gave the last of them its first token) and,
    from the step after it on, ``returns`` [(time, requests that got a token)]: ``steady_tpot``'s
    input."""

    def __init__(self, ids: list[str]) -> None:
        self.batch = len(ids)
        self.produced = dict.fromkeys(ids, 0)
        self.prefilled_at: float | None = None
        self.returns: list[tuple[float, int]] = []

    def add(self, now: float, outputs: list[Any]) -> None:
        """One step's outputs, returned at ``now``."""
        got = 0
        for out in outputs:
            tokens = len(out.outputs[0].token_ids)
            got += tokens > self.produced.get(out.request_id, 0)
            self.produced[out.request_id] = tokens
        if self.prefilled_at is None:
            if all(self.produced.values()):
                self.prefilled_at = now
        elif got:
            self.returns.append((now, got))

    def steady_steps(self) -> int:
        """Returns in which every request got a token."""
        return sum(n == self.batch for _, n in self.returns)

    def tpot(self) -> dict:
        return steady_tpot(self.returns, self.batch)


def steady_tpot(returns: list[tuple[float, int]], batch: int) -> dict:
    """TPOT from the engine's step returns [(time, requests that got a token)]: the median time
    between consecutive returns in which every one of the ``batch`` requests got one token."""
    gaps = [t1 - t0 for (t0, n0), (t1, n1) in itertools.pairwise(returns) if n0 == batch and n1 == batch]
    if not gaps:
        return {"tpot_s": None, "steps": 0}
    return {"tpot_s": statistics.median(gaps), "mean_s": statistics.fmean(gaps), "min_s": min(gaps),
            "max_s": max(gaps), "steps": len(gaps)}


def abort_all(engine: Any, ids: list[str]) -> None:
    """Abort ``ids`` and step the engine until it holds no request."""
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
