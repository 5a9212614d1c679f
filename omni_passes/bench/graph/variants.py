"""The variants a graph bench compares, and which compiled graph each is checked against.

    --passes name       passes                                   one per context  peer
    dispatch            redundant_experts (identity placement)   no               compiled
    dispatch-redundant  redundant_experts (hottest replicated)   no               compiled
    latent              latent_attention                         no               compiled
    sparse              sparse_attention                         yes              compiled+masked@C
    all                 redundant_experts, sparse_attention      yes              compiled+masked@C
    latent+sparse       sparse_attention, latent_attention       yes              compiled+masked@C

A variant's peer is the compiled graph, without any omni pass, that computes the same function:
``compiled`` for the dense variants; for the sink+recent ones ``compiled+masked@C``, the model
with the sink+recent mask applied in its own attention (``omni_passes.kvcache.attention.
masked_reference``), compiled the same way. The peer is computed for the check only (not timed).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    name: str
    passes: tuple[str, ...]
    windowed: bool           # sink + recent attention: one variant per context, masked peer

    @property
    def peer(self) -> str:
        return "compiled+masked" if self.windowed else "compiled"


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("dispatch", ("redundant_experts",), False),
    Kind("dispatch-redundant", ("redundant_experts",), False),
    Kind("latent", ("latent_attention",), False),
    Kind("sparse", ("sparse_attention",), True),
    Kind("all", ("redundant_experts", "sparse_attention"), True),
    Kind("latent+sparse", ("sparse_attention", "latent_attention"), True),
)}
MASKED_PEER = "compiled+masked"


def family(name: str) -> str:
    """``compiled+sparse@4096`` -> ``compiled+sparse``."""
    return name.split("@")[0]


def kind_of(name: str) -> Kind | None:
    """The kind of a variant name (None for eager, compiled and the masked peer)."""
    return KINDS.get(family(name).removeprefix("compiled+"))


def parse_kinds(text: str) -> list[Kind]:
    """``--passes`` (comma list) -> kinds, in the order given. Raises ValueError on unknown names."""
    wanted = [v.strip() for v in text.split(",") if v.strip()]
    unknown = sorted(set(wanted) - set(KINDS))
    if unknown:
        raise ValueError(f"--passes: unknown variant(s) {unknown}; known: {', '.join(KINDS)}")
    return [KINDS[w] for w in wanted]
