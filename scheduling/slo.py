"""The latency targets a deployment states, which the ``omni`` policy schedules against.

``--slo ttft=S,tpot=S`` on ``omni-proxy serve``. Without it the defaults are OmniInfer's
deployment SLO (TTFT < 2 s, TPOT < 50 ms). The policy learns per instance how much load keeps
TTFT and TPOT within these targets; it needs no caps in requests or tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TTFT_S = 2.0
DEFAULT_TPOT_S = 0.05


def parse_pairs(text: str, keys: tuple[str, ...], flag: str = "--slo") -> dict[str, float]:
    """``"ttft=1,tpot=0.1"`` -> {"ttft": 1.0, "tpot": 0.1}; positive numbers, known keys only."""
    values: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in keys:
            raise ValueError(f"{flag} takes {','.join(k + '=S' for k in keys)}, got {item!r}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{flag} {key} must be a number, got {value!r}") from None
        if not number > 0 or number != number or number == float("inf"):
            raise ValueError(f"{flag} {key} must be a positive number, got {value!r}")
        values[key] = number
    return values


@dataclass(frozen=True)
class SLOTarget:
    """Seconds to the first token and per output token after it."""

    ttft: float = DEFAULT_TTFT_S
    tpot: float = DEFAULT_TPOT_S

    def __post_init__(self):
        for name in ("ttft", "tpot"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and value != float("inf")):
                raise ValueError(f"SLO {name} must be a positive number of seconds, got {value!r}")

    @classmethod
    def parse(cls, text: str) -> "SLOTarget":
        return cls(**parse_pairs(text, ("ttft", "tpot")))

    def to_dict(self) -> dict[str, float]:
        return {"ttft": self.ttft, "tpot": self.tpot}
