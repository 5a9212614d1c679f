"""Scheduling for OmniProxy: pure, synchronous decision logic (no I/O, time passed in).

* :mod:`scheduling.block_hash`  vLLM-compatible prefix-cache block hashes
* :mod:`scheduling.prefix_index` which instance caches which prompt blocks
* :mod:`scheduling.load`        per-instance load and the prefill/decode-time models learned from it
* :mod:`scheduling.learn`       online ridge least squares (the models' fitting)
* :mod:`scheduling.predict`     forecast TTFT/TPOT of a request on an instance; TPOT capacity
* :mod:`scheduling.slo`         the deployment's latency targets
* :mod:`scheduling.policies`    routing policies chosen by name (omni, round_robin, ...)
* :mod:`scheduling.queue_order` order of requests held in the proxy (starvation bound)
"""

from .block_hash import BlockHasher, to_key
from .load import DecodeTimeModel, InstanceLoad, LoadModel, PrefillTimeModel, Ticket
from .policies import POLICIES, Choice, ClusterState, Observation, Policy, RequestInfo, make_policy
from .prefix_index import PrefixIndex
from .queue_order import Held, aged_shortest_first, decode_order, prefill_order
from .slo import SLOTarget

__all__ = [
    "BlockHasher", "to_key", "DecodeTimeModel", "InstanceLoad", "LoadModel", "PrefillTimeModel", "Ticket",
    "POLICIES", "Choice", "ClusterState", "Observation", "Policy", "RequestInfo", "make_policy",
    "PrefixIndex", "Held", "aged_shortest_first", "decode_order", "prefill_order", "SLOTarget",
]
