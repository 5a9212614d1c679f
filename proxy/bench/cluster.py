"""Cluster files for ``omni-proxy bench`` and ``plan-pd``: which simulated instances to start.

    {"instances": [{"role": "prefill", "count": 2, "profile": {...}},
                   {"role": "decode", "count": 2}]}

``profile`` (optional) holds simulator timing-model fields (``proxy.sim.profile.SimProfile``;
omitted fields keep their defaults). A cluster is either all ``collocated`` or ``prefill`` +
``decode`` (pd mode). Every instance must use the same ``block_size`` and
``chars_per_token``, since one router hashes prompts for all of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.sim.profile import SimProfile

ROLES = ("prefill", "decode", "collocated")


@dataclass(frozen=True)
class InstanceGroup:
    role: str
    count: int
    profile: SimProfile


@dataclass(frozen=True)
class ClusterSpec:
    groups: tuple[InstanceGroup, ...]
    source: str = "cluster"

    @property
    def mode(self) -> str:
        return "collocated" if any(g.role == "collocated" for g in self.groups) else "pd"

    def count(self, role: str) -> int:
        return sum(g.count for g in self.groups if g.role == role)

    @property
    def block_size(self) -> int:
        return self.groups[0].profile.block_size

    @property
    def chars_per_token(self) -> int:
        return self.groups[0].profile.chars_per_token

    def instances(self) -> list[tuple[str, SimProfile]]:
        """(role, profile) per instance, prefill first, then decode, then collocated."""
        out = []
        for role in ROLES:
            for g in self.groups:
                if g.role == role:
                    out += [(role, g.profile)] * g.count
        return out

    @property
    def max_model_len(self) -> int:
        """The longest request (prompt + output) every instance accepts."""
        return min(g.profile.max_model_len for g in self.groups)

    def label(self) -> str:
        if self.mode == "collocated":
            return f"{self.count('collocated')} collocated"
        return f"{self.count('prefill')}P{self.count('decode')}D"

    def to_dict(self) -> dict[str, Any]:
        default = SimProfile().to_dict()
        return {"instances": [
            {"role": g.role, "count": g.count,
             "profile": {k: v for k, v in g.profile.to_dict().items() if v != default[k]}}
            for g in self.groups]}

    @classmethod
    def from_dict(cls, data: Any, source: str = "cluster") -> "ClusterSpec":
        if not isinstance(data, dict):
            raise ValueError(f"{source}: a cluster must be a JSON object with 'instances', got {type(data).__name__}")
        unknown = sorted(set(data) - {"instances", "comment"})
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {', '.join(unknown)}; expected 'instances'")
        items = data.get("instances")
        if not isinstance(items, list) or not items:
            raise ValueError(f"{source}: 'instances' must be a non-empty list")
        groups = []
        for k, item in enumerate(items):
            where = f"{source}: instances[{k}]"
            if not isinstance(item, dict):
                raise ValueError(f"{where} must be an object, got {type(item).__name__}")
            extra = sorted(set(item) - {"role", "count", "profile"})
            if extra:
                raise ValueError(f"{where}: unknown field(s) {', '.join(extra)}; known: role, count, profile")
            role = item.get("role")
            if role not in ROLES:
                raise ValueError(f"{where}: 'role' must be one of {', '.join(ROLES)}, got {role!r}")
            count = item.get("count", 1)
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise ValueError(f"{where}: 'count' must be a positive integer, got {count!r}")
            profile = SimProfile.from_dict(item.get("profile") or {}, source=f"{where}.profile")
            groups.append(InstanceGroup(role, count, profile))
        roles = {g.role for g in groups}
        if "collocated" in roles and roles != {"collocated"}:
            raise ValueError(f"{source}: mixes collocated with prefill/decode instances; use one mode per cluster")
        if roles == {"prefill"}:
            raise ValueError(f"{source}: a pd cluster needs at least one decode instance")
        for attr in ("block_size", "chars_per_token"):
            values = {getattr(g.profile, attr) for g in groups}
            if len(values) > 1:
                raise ValueError(f"{source}: all instances must share one {attr}, got {sorted(values)}")
        return cls(tuple(groups), source)

    @classmethod
    def load(cls, path: str | Path) -> "ClusterSpec":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"cluster file {path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"cluster file {path} is not valid JSON: {exc}") from None
        return cls.from_dict(data, source=str(path))
