"""Scheduling for OmniProxy: pure, synchronous decision logic (no I/O, time passed in).

* :mod:`scheduling.block_hash`  vLLM-compatible prefix-cache block hashes
* :mod:`scheduling.prefix_index` which instance caches which prompt blocks
* :mod:`scheduling.load`        per-instance load and a learned prefill-time model
* :mod:`scheduling.policies`    routing policies chosen by name (omni, round_robin, ...)
* :mod:`scheduling.queue_order` order of requests held in the proxy
"""

from .block_hash import BlockHasher, to_key
from .load import InstanceLoad, LoadModel, PrefillTimeModel, Ticket
from .policies import POLICIES, Choice, ClusterState, Observation, Policy, RequestInfo, make_policy
from .prefix_index import PrefixIndex
from .queue_order import Held, decode_order, prefill_order

__all__ = [
    "BlockHasher", "to_key", "InstanceLoad", "LoadModel", "PrefillTimeModel", "Ticket",
    "POLICIES", "Choice", "ClusterState", "Observation", "Policy", "RequestInfo", "make_policy",
    "PrefixIndex", "Held", "decode_order", "prefill_order",
]
