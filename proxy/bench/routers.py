"""Routers under test: parse ``--router`` specs and start/stop each router as its own process.

SPEC is one of

* ``omni[:POLICY[,OPTION=VALUE...]]`` - our proxy (``omni-proxy serve``), policy ``omni`` by
  default; options are the policy's (``omni:omni,bypass_tokens=16``). It subscribes to every
  instance's KV events.
* ``vllm-router:POLICY[,OPTION=VALUE...]`` - vllm-router (PyPI ``vllm-router``, Rust). On a pd cluster it runs
  with ``--vllm-pd-disaggregation``, which speaks vLLM's ``kv_transfer_params`` protocol as
  the simulator does; on a collocated cluster with ``--worker-urls``. ``kv_aware`` gets the
  instances' KV event streams (``--kv-event-source`` / ``--pd-kv-events``).
* ``sglang-router:POLICY[,OPTION=VALUE...]`` - sglang-router (PyPI ``sglang-router``, Rust), collocated clusters
  only: its PD mode (``--pd-disaggregation``) hands prefill and decode SGLang's bootstrap
  fields (``bootstrap_host``/``bootstrap_port``/``bootstrap_room``) instead of vLLM's
  ``kv_transfer_params``, which neither vLLM nor the simulator speak.
* ``smg:POLICY[,OPTION=VALUE...]`` - the Shepherd Model Gateway (PyPI ``smg``, Rust; SGLang's
  router since sglang-router 0.3.2), ``smg launch --worker-urls``; collocated clusters only:
  its PD mode sends prefill and decode the request at once, SGLang-style, without vLLM's
  ``kv_transfer_params`` (tried against the simulator: the decode instance recomputed the prompt).
* ``direct`` - no router: the client spreads requests round-robin straight over the
  (collocated) instances; the baseline that router overhead is measured against.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from scheduling.policies import POLICIES, policy_options

PEER_POLICIES = {
    "vllm-router": ("round_robin", "power_of_two", "cache_aware", "random", "consistent_hash", "kv_aware"),
    "sglang-router": ("round_robin", "power_of_two", "cache_aware", "random"),
    "smg": ("round_robin", "power_of_two", "cache_aware", "random", "least_load", "prefix_hash"),
}
# peer options passed through as --flag value (every peer names them alike)
PEER_OPTIONS = ("cache_threshold", "balance_abs_threshold", "balance_rel_threshold")
KINDS = ("omni", "direct", *PEER_POLICIES)


class Unsupported(Exception):
    """This router cannot run on this cluster (the reason is the message)."""


class RouterStartError(Exception):
    pass


@dataclass(frozen=True)
class RouterSpec:
    kind: str
    policy: str | None = None
    options: tuple[tuple[str, str], ...] = ()
    text: str = ""

    @property
    def name(self) -> str:
        return self.text or self.kind


def parse_spec(text: str) -> RouterSpec:
    """``--router`` value -> RouterSpec; a clear error for unknown routers, policies, options."""
    kind, _, rest = text.strip().partition(":")
    if kind not in KINDS:
        raise ValueError(f"--router {text!r}: unknown router {kind!r}; use omni[:POLICY], vllm-router:POLICY, "
                         f"sglang-router:POLICY, smg:POLICY or direct")
    if kind == "direct":
        if rest:
            raise ValueError(f"--router {text!r}: direct takes no policy")
        return RouterSpec("direct", text="direct")
    parts = [p.strip() for p in rest.split(",")] if rest else []
    policy = parts[0] if parts else ("omni" if kind == "omni" else "")
    if kind == "omni":
        if policy not in POLICIES:
            raise ValueError(f"--router {text!r}: unknown omni policy {policy!r}; choose one of {', '.join(POLICIES)}")
        allowed = tuple(policy_options(policy))
    else:
        if not policy:
            raise ValueError(f"--router {text!r}: give a policy, e.g. {kind}:cache_aware")
        if policy not in PEER_POLICIES[kind]:
            raise ValueError(f"--router {text!r}: {kind} policies here are {', '.join(PEER_POLICIES[kind])}")
        allowed = PEER_OPTIONS
    options = []
    for item in parts[1:]:
        key, sep, value = item.partition("=")
        if not sep or key not in allowed or not value:
            raise ValueError(f"--router {text!r}: {item!r} is not OPTION=VALUE with an option of {kind} policy "
                             f"{policy!r} ({', '.join(allowed) or 'none'})")
        try:
            float(value)
        except ValueError:
            raise ValueError(f"--router {text!r}: option {key} takes a number, got {value!r}") from None
        options.append((key, value))
    return RouterSpec(kind, policy, tuple(options), text.strip())


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the bench process dies (Linux), so a killed
    bench leaves no simulator or router behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def executable(name: str) -> str:
    """A console script installed next to this Python (the venv), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise RouterStartError(f"{name} is not installed (pip install {name}; it is in the 'dev' extra)")
    return found


@dataclass
class Instances:
    """The running simulated cluster as the routers see it."""

    prefill: list[str] = field(default_factory=list)
    decode: list[str] = field(default_factory=list)
    collocated: list[str] = field(default_factory=list)
    kv_endpoints: dict[str, str] = field(default_factory=dict)
    block_size: int = 16
    chars_per_token: int = 4

    @property
    def mode(self) -> str:
        return "collocated" if self.collocated else "pd"

    @property
    def all(self) -> list[str]:
        return self.prefill + self.decode + self.collocated


def _peer_flags(spec: RouterSpec) -> list[str]:
    return [a for key, value in spec.options for a in ("--" + key.replace("_", "-"), value)]


def command(spec: RouterSpec, inst: Instances, port: int, metrics_port: int, slo: str | None = None) -> list[str]:
    """The command line that starts ``spec`` in front of ``inst`` on ``port``; ours gets the
    run's SLO (``slo``, ``ttft=S,tpot=S``) as an operator states it to ``omni-proxy serve``."""
    if spec.kind == "omni":
        cmd = [sys.executable, "-m", "proxy.cli", "serve", "--mode", inst.mode, "--policy", spec.policy,
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
               "--block-size", str(inst.block_size), "--chars-per-token", str(inst.chars_per_token)]
        for url in inst.prefill:
            cmd += ["--prefill", url]
        for url in inst.decode:
            cmd += ["--decode", url]
        for url in inst.collocated:
            cmd += ["--instance", url]
        for url, endpoint in inst.kv_endpoints.items():
            cmd += ["--kv-events", f"{url}={endpoint}"]
        for key, value in spec.options:
            cmd += ["--" + key.replace("_", "-"), value]
        if slo:
            cmd += ["--slo", slo]
        return cmd
    if spec.kind == "vllm-router":
        cmd = [executable("vllm-router"), "--host", "127.0.0.1", "--port", str(port),
               "--prometheus-port", str(metrics_port), "--log-level", "warning", "--policy", spec.policy]
        if inst.mode == "pd":
            cmd.append("--vllm-pd-disaggregation")
            for url in inst.prefill:
                cmd += ["--prefill", url]
            for url in inst.decode:
                cmd += ["--decode", url]
            if spec.policy == "kv_aware":
                for url in inst.prefill:
                    cmd += ["--pd-kv-events", f"{url}={inst.kv_endpoints[url]}"]
        else:
            cmd += ["--worker-urls", *inst.collocated]
            if spec.policy == "kv_aware":
                for url in inst.collocated:
                    cmd += ["--kv-event-source", f"{url}={inst.kv_endpoints[url]}"]
                cmd += ["--kv-event-block-size", str(inst.block_size), "--kv-event-model", "sim-model"]
        return cmd + _peer_flags(spec)
    if spec.kind == "sglang-router":
        if inst.mode == "pd":
            raise Unsupported("sglang-router's PD mode uses SGLang's bootstrap protocol (bootstrap_host/port/room), "
                              "not vLLM's kv_transfer_params; it runs on collocated clusters only")
        return [executable("sglang-router"), "launch", "--host", "127.0.0.1", "--port", str(port),
                "--prometheus-port", str(metrics_port), "--log-level", "warn", "--policy", spec.policy,
                "--worker-urls", *inst.collocated] + _peer_flags(spec)
    if spec.kind == "smg":
        if inst.mode == "pd":
            raise Unsupported("smg's PD mode (--pd-disaggregation) sends a request to a prefill and a decode "
                              "instance at once with SGLang's bootstrap fields and no vLLM kv_transfer_params, so "
                              "the decode instance recomputes the prompt (tried: no KV pulled); collocated only")
        return [executable("smg"), "launch", "--host", "127.0.0.1", "--port", str(port),
                "--prometheus-port", str(metrics_port), "--log-level", "warn", "--policy", spec.policy,
                "--worker-urls", *inst.collocated] + _peer_flags(spec)
    raise ValueError(f"no command for router kind {spec.kind!r}")


class RouterProcess:
    """A router under test, started as a subprocess; ``targets`` are where the client sends."""

    def __init__(self, spec: RouterSpec, inst: Instances, log_dir: str | None = None, slo: str | None = None):
        self.spec = spec
        self.inst = inst
        self.slo = slo
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.log_path: str | None = None
        self._log_dir = log_dir

    @property
    def targets(self) -> list[str]:
        if self.spec.kind == "direct":
            if self.inst.mode != "collocated":
                raise Unsupported("direct needs collocated instances (a pd cluster needs a router to pair P and D)")
            return list(self.inst.collocated)
        return [self.url]

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def start(self, timeout: float = 60.0, attempts: int = 3) -> "RouterProcess":
        if self.spec.kind == "direct":
            self.targets  # raises Unsupported on a pd cluster
            return self
        last = ""
        for _ in range(attempts):  # another process may take the free port before the router binds it
            port, metrics_port = free_port(), free_port()
            cmd = command(self.spec, self.inst, port, metrics_port, self.slo)
            fd, self.log_path = tempfile.mkstemp(prefix=f"bench-{self.spec.kind}-", suffix=".log", dir=self._log_dir)
            env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
            self.proc = subprocess.Popen(cmd, stdout=fd, stderr=fd, stdin=subprocess.DEVNULL, env=env,
                                         start_new_session=True, preexec_fn=die_with_parent)
            os.close(fd)
            self.url = f"http://127.0.0.1:{port}"
            if await self._wait_healthy(timeout):
                return self
            last = self._log_tail()
            await self.stop()
            if "in use" not in last:
                break
        lines = [ln for ln in last.splitlines() if ln.strip()]
        raise RouterStartError(f"{self.spec.name} did not become healthy: {lines[-1] if lines else last}")

    async def _wait_healthy(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while loop.time() < deadline:
                if self.proc.poll() is not None:
                    return False
                try:
                    async with session.get(self.url + "/health") as r:
                        if r.status == 200 and await self._serves_a_model(session):
                            return True
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    pass
                await asyncio.sleep(0.1)
        return False

    async def _serves_a_model(self, session: aiohttp.ClientSession) -> bool:
        """smg answers /health before it has registered its workers' model (a request then gets
        404 "No worker available"): wait until its /v1/models lists one. Other routers: yes."""
        if self.spec.kind != "smg":
            return True
        async with session.get(self.url + "/v1/models") as r:
            if r.status != 200:
                return False
            doc = await r.json(content_type=None)
        return isinstance(doc, dict) and bool(doc.get("data"))

    def _log_tail(self, chars: int = 600) -> str:
        try:
            text = Path(self.log_path).read_text(errors="replace") if self.log_path else ""
        except OSError:
            text = ""
        return text[-chars:].strip() or f"exit status {self.proc.poll() if self.proc else None}"

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            for _ in range(50):
                if self.proc.poll() is not None:
                    break
                await asyncio.sleep(0.1)
            else:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        if self.log_path:
            try:
                os.unlink(self.log_path)
            except OSError:
                pass
        self.proc = None
