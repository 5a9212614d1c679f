"""The pass configuration: one JSON format for vLLM (``OMNI_PASSES_CONFIG``) and the CLI.

    {"passes": ["redundant_experts", "sparse_attention"],
     "placement": "placement.json",
     "sparse_attention": {"sink": 128, "recent": 384, "pattern": [0, 3, 4]},
     "report_path": "report.json", "expert_load_path": "loads.npy",
     "expert_load_interval_steps": 100, "slot_load_path": "slot_loads.npy",
     "rebalance": {"interval_steps": 100, "window_steps": 500, "min_gain": 0.01,
                   "layer_min_gain": 0.005, "max_moves": 16, "max_replicas": null, "forecast": true}}

The placement file a configuration names is read when the configuration is (``placement_text``):
the fingerprint and the runtime use that text, so one process reads each file once, and a
compiled graph's cache key covers the placement it was built with.

Pass names: ``redundant_experts``, ``sparse_attention``, ``latent_attention`` (MLA decode
attention on the cached latent; no settings of its own, with ``sparse_attention`` its pattern
layers read only sink + recent latent rows). Unknown keys are errors (a typo must not silently
disable a pass). Relative paths are
resolved against the config file's directory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omni_passes.placement.placement import Placement

KNOWN_PASSES = ("redundant_experts", "sparse_attention", "latent_attention")
TOP_KEYS = {"passes", "placement", "sparse_attention", "report_path", "expert_load_path", "expert_load_interval_steps",
            "slot_load_path", "rebalance"}
ATTN_KEYS = {"sink", "recent", "pattern", "free_kv"}


class ConfigError(ValueError):
    """A pass configuration that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class SparseAttentionConfig:
    sink: int = 128
    recent: int = 384
    pattern: tuple[int, ...] = ()
    # Under vLLM: give the pattern layers sink+recent KV blocks (freed outside the window).
    free_kv: bool = True


@dataclass(frozen=True)
class RebalanceConfig:
    """Online rebalancing (the ``"rebalance"`` block): the one settings type of the rebalancer
    (``omni_passes.placement.rebalance``) in every host, validated here when it is built.

    Attributes:
        interval_steps: re-plan every this many serving forward steps.
        window_steps: plan on the loads of the last this many steps.
        min_gain: apply a plan only if it raises the predicted mean balancedness (mean/max
            rank load, over MoE layers) by at least this much (absolute).
        layer_min_gain: a layer changes only if its own predicted gain is at least this.
        max_moves: most (layer, slot) changes per rebalance, each one expert-row copy (null:
            no limit).
        max_replicas: most slots one expert may hold (null: up to the number of ranks).
        forecast: plan on an exponentially weighted forecast of the window (else its sum).

    Raises:
        ConfigError naming the key (``'rebalance.KEY'``) and the value.
    """

    interval_steps: int = 100
    window_steps: int = 500
    min_gain: float = 0.01
    layer_min_gain: float = 0.005
    max_moves: int | None = None
    max_replicas: int | None = None
    forecast: bool = True

    def __post_init__(self) -> None:
        for key, least, nullable in (("interval_steps", 1, False), ("window_steps", 1, False),
                                     ("max_moves", 0, True), ("max_replicas", 1, True)):
            value = getattr(self, key)
            if value is None and nullable:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                kind = f"an integer >= {least}" + (" or null" if nullable else "")
                raise ConfigError(f"'rebalance.{key}' must be {kind}, got {value!r}")
        for key in ("min_gain", "layer_min_gain"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
                raise ConfigError(f"'rebalance.{key}' must be a number in [0, 1], got {value!r}")
            object.__setattr__(self, key, float(value))
        if not isinstance(self.forecast, bool):
            raise ConfigError(f"'rebalance.forecast' must be true or false, got {self.forecast!r}")


@dataclass(frozen=True)
class PassConfig:
    passes: tuple[str, ...] = ("redundant_experts",)
    placement: str | None = None
    sparse_attention: SparseAttentionConfig = field(default_factory=SparseAttentionConfig)
    report_path: str | None = None
    expert_load_path: str | None = None
    expert_load_interval_steps: int = 100
    slot_load_path: str | None = None
    rebalance: RebalanceConfig | None = None
    source: str = "pass config"
    # the placement file's text as read with this configuration (None: no file, or not there yet)
    placement_text: str | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_dict(cls, data: Any, source: str = "pass config", base_dir: Path | None = None) -> "PassConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - TOP_KEYS)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(TOP_KEYS))}")
        passes = data.get("passes", ["redundant_experts"])
        if not isinstance(passes, list) or not all(isinstance(p, str) for p in passes):
            raise ConfigError(f"{source}: 'passes' must be a list of pass names")
        bad = [p for p in passes if p not in KNOWN_PASSES]
        if bad:
            raise ConfigError(f"{source}: unknown pass(es) {', '.join(map(repr, bad))}; known: {', '.join(KNOWN_PASSES)}")
        if len(set(passes)) != len(passes):
            raise ConfigError(f"{source}: 'passes' lists a pass twice")

        def path_value(key: str) -> str | None:
            value = data.get(key)
            if value is None:
                return None
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{source}: '{key}' must be a file path string, got {value!r}")
            path = Path(value)
            if base_dir is not None and not path.is_absolute():
                path = base_dir / path
            return str(path)

        interval = data.get("expert_load_interval_steps", 100)
        if not isinstance(interval, int) or isinstance(interval, bool) or interval <= 0:
            raise ConfigError(f"{source}: 'expert_load_interval_steps' must be a positive integer, got {interval!r}")
        rebalance = _rebalance(data["rebalance"], source) if data.get("rebalance") is not None else None
        needs_dispatch = [k for k in ("rebalance", "slot_load_path") if data.get(k) is not None]
        if needs_dispatch and "redundant_experts" not in passes:
            raise ConfigError(f"{source}: {' and '.join(map(repr, needs_dispatch))} require the 'redundant_experts' pass in 'passes'")
        placement = path_value("placement")
        return cls(
            passes=tuple(passes),
            placement=placement,
            placement_text=_read_if_present(placement),
            sparse_attention=_sparse_attention(data.get("sparse_attention", {}), source),
            report_path=path_value("report_path"),
            expert_load_path=path_value("expert_load_path"),
            expert_load_interval_steps=interval,
            slot_load_path=path_value("slot_load_path"),
            rebalance=rebalance,
            source=source,
        )

    @classmethod
    def load(cls, path: str | Path) -> "PassConfig":
        path = Path(path)
        source = f"pass config {path}"
        if not path.exists():
            raise ConfigError(f"{source}: file does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}: malformed JSON: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{source}: cannot be read: {exc}") from None
        return cls.from_dict(data, source=source, base_dir=path.parent)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passes": list(self.passes),
            "placement": self.placement,
            "sparse_attention": {
                "sink": self.sparse_attention.sink,
                "recent": self.sparse_attention.recent,
                "pattern": list(self.sparse_attention.pattern),
                "free_kv": self.sparse_attention.free_kv,
            },
            "report_path": self.report_path,
            "expert_load_path": self.expert_load_path,
            "expert_load_interval_steps": self.expert_load_interval_steps,
            "slot_load_path": self.slot_load_path,
            "rebalance": None if self.rebalance is None else dict(vars(self.rebalance)),
        }

    def fingerprint(self) -> str:
        """Hash of everything that changes the compiled graph, placement file contents included."""
        digest = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode())
        if self.placement_text is not None:
            digest.update(self.placement_text.encode())
        return digest.hexdigest()

    def graph_fingerprint(self) -> str:
        """Hash of what decides the rewritten graph's structure: the passes and the attention
        window. Placement, rebalancing and file paths only change run-time state, which the
        graph reaches through a handle; hosts whose graphs may come from a compile cache name
        their state after this (``kernels.state.stable_handle``), so a cached graph is served by
        any configuration that would have compiled the same graph."""
        structure = {"passes": list(self.passes), "sparse_attention": self.to_dict()["sparse_attention"]}
        return hashlib.sha256(json.dumps(structure, sort_keys=True).encode()).hexdigest()

    @cached_property
    def placement_object(self) -> "Placement | None":
        """The placement file parsed (once); None when the configuration names none.
        PlacementError naming the file when it is missing or malformed."""
        from omni_passes.placement.placement import Placement

        if self.placement is None:
            return None
        if self.placement_text is None:
            return Placement.load(self.placement)  # not there when the config was read: says so
        return Placement.parse(self.placement_text, self.placement)


def _read_if_present(path: str | None) -> str | None:
    try:
        return Path(path).read_text() if path else None
    except OSError:
        return None  # reported, naming the file, when the placement is needed


def _sparse_attention(data: Any, source: str) -> SparseAttentionConfig:
    where = f"{source}: 'sparse_attention'"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be an object with sink, recent, pattern")
    unknown = sorted(set(data) - ATTN_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(ATTN_KEYS))}")
    values = {}
    # recent counts the query's own position: recent >= 1 so that no query sees nothing.
    for key, default, least in (("sink", 128, 0), ("recent", 384, 1)):
        value = data.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ConfigError(f"{where}.{key} must be an integer >= {least}, got {value!r}")
        values[key] = value
    pattern = data.get("pattern", [])
    if not isinstance(pattern, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in pattern):
        raise ConfigError(f"{where}.pattern must be a list of decoder-layer indices >= 0, got {pattern!r}")
    if len(set(pattern)) != len(pattern):
        raise ConfigError(f"{where}.pattern lists a layer twice: {pattern}")
    free_kv = data.get("free_kv", True)
    if not isinstance(free_kv, bool):
        raise ConfigError(f"{where}.free_kv must be true or false, got {free_kv!r}")
    return SparseAttentionConfig(sink=values["sink"], recent=values["recent"], pattern=tuple(sorted(pattern)),
                                 free_kv=free_kv)


REBALANCE_KEYS = tuple(RebalanceConfig.__dataclass_fields__)


def _rebalance(data: Any, source: str) -> RebalanceConfig:
    where = f"{source}: 'rebalance'"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be an object with keys {', '.join(REBALANCE_KEYS)}, got {data!r}")
    unknown = sorted(set(data) - set(REBALANCE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(REBALANCE_KEYS)}")
    try:
        return RebalanceConfig(**data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
