"""The serving loop (omni_passes.hosts.vllm.serving): the count gate per step, load files that
survive a SIGKILL of the process, and the online rebalancer applied through the controller."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import torch

import kernels  # noqa: F401
from kernels.state import add_step_hook, run_step_hooks
from omni_passes.config import RebalanceConfig
from omni_passes.placement.controller import PlacementController
from omni_passes.hosts.vllm.serving import LoadExport, OnlineRebalancer, ServingSteps
from omni_passes.placement.placement import Placement


def record(controller, ids: torch.Tensor, layer: int) -> None:
    """What the model's ops do in one MoE layer of a step, in the rewritten graph's order."""
    torch.ops.omni.expert_dispatch(ids, controller.handle, layer)
    torch.ops.omni.record_expert_load(ids, controller.handle, layer)


def test_gate_follows_the_host_and_files_hold_every_serving_step(tmp_path):
    controller = PlacementController(Placement.identity(2, 8, num_ranks=2, slots_per_rank=4))
    export = LoadExport(controller, str(tmp_path / "loads.npy"), str(tmp_path / "slots.npy"), interval=100)
    assert np.load(tmp_path / "loads.npy").shape == (2, 8) and np.load(tmp_path / "slots.npy").shape == (2, 8)
    serving = iter([False, True, True])  # a warm-up step, then two serving steps
    steps = ServingSteps(controller, lambda: next(serving), export)
    add_step_hook(controller.handle, steps)
    ids = torch.tensor([[0, 1], [1, 7], [3, 1]])
    for _ in range(3):
        # slot_fused_moe's form: the op of the first MoE layer opens the step, the last closes it
        run_step_hooks(controller.handle, "begin")
        for layer in range(2):
            torch.ops.omni.record_expert_load(ids, controller.handle, layer)
        run_step_hooks(controller.handle, "end")
    expected = 2 * torch.bincount(ids.flatten(), minlength=8)
    assert steps.steps == 2
    assert np.array_equal(np.load(tmp_path / "loads.npy"), torch.stack([expected, expected]).numpy())
    controller.close()


def test_eager_dispatch_kernels_drive_the_steps(tmp_path):
    """Where only the generic ops run eagerly (vllm-ascend), MoE layer 0's dispatch ends the
    previous step and opens the next: warm-ups count nothing, every serving step is exported,
    and the last step is closed by the host (here: a final "end")."""
    controller = PlacementController(Placement.identity(2, 8, num_ranks=2, slots_per_rank=4))
    export = LoadExport(controller, str(tmp_path / "loads.npy"), str(tmp_path / "slots.npy"), interval=100)
    serving = iter([False, True, True])  # a warm-up step, then two serving steps
    steps = ServingSteps(controller, lambda: next(serving), export)
    add_step_hook(controller.handle, steps)
    ids = torch.tensor([[0, 1], [1, 7], [3, 1]])
    for forward in range(3):
        for layer in range(2):
            record(controller, ids, layer)
        assert steps.steps == max(0, forward - 1)  # a step is exported when the next one starts
    run_step_hooks(controller.handle, "end")
    expected = 2 * torch.bincount(ids.flatten(), minlength=8)
    assert steps.steps == 2
    assert np.array_equal(np.load(tmp_path / "loads.npy"), torch.stack([expected, expected]).numpy())
    assert np.array_equal(np.load(tmp_path / "slots.npy"), torch.stack([expected, expected]).numpy())
    controller.close()


def test_load_file_survives_sigkill_without_a_flush(tmp_path):
    """The engine may be killed without warning (vLLM's api_server after SIGTERM): what the
    last completed step wrote is in the file."""
    script = textwrap.dedent(f"""
        import os, signal, torch, kernels
        from omni_passes.hosts.vllm.serving import LoadExport
        from omni_passes.placement.placement import Placement
        from omni_passes.placement.controller import PlacementController
        placement = Placement.identity(1, 4, slots_per_rank=6)  # counters only: no weights
        controller = PlacementController(placement, layout="slot")
        export = LoadExport(controller, {str(tmp_path / 'loads.npy')!r}, {str(tmp_path / 'slots.npy')!r}, interval=10**6)
        ids = torch.tensor([[0, 0, 3]])
        for _ in range(5):
            torch.ops.omni.record_expert_load(ids, controller.handle, 0)
            torch.ops.omni.expert_dispatch(ids, controller.handle, 0)
            export.step_end()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert np.load(tmp_path / "loads.npy").tolist() == [[10, 0, 0, 5]]
    slots = np.load(tmp_path / "slots.npy")
    assert slots.sum() == 15 and slots[0, [0, 4, 5]].sum() == 10  # expert 0: slots 0, 4, 5 share its tokens


def test_online_rebalancer_moves_replicas_to_the_hot_expert_through_the_controller():
    from torch import nn

    from omni_passes.placement.materialize import transformers_expert_rows

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.arange(8.0).view(8, 1, 1).repeat(1, 2, 2))
            self.num_experts = 8

    model = nn.Sequential(Experts())
    start = Placement.identity(1, 8, num_ranks=2, slots_per_rank=5)  # extras: experts 0, 1
    controller = PlacementController(start, rows=lambda layout: transformers_expert_rows(list(model), 8, layout))
    online = OnlineRebalancer(controller, RebalanceConfig(interval_steps=4, window_steps=4, min_gain=0.0,
                                                          layer_min_gain=0.0, max_moves=4))
    ids = torch.tensor([[5, 5], [5, 5], [5, 2], [5, 3]])  # expert 5 is hot
    for _ in range(4):
        record(controller, ids, 0)
        online.step_end()
    assert [e.applied for e in online.events] == [True]
    placement = controller.placement
    assert int(placement.replica_counts()[0, 5]) > 1 and placement.num_slots == 10
    # rows hold what the layout says, so the tables name the right weights
    weights = model[0].gate_up_proj[:, 0, 0]
    assert torch.equal(weights[controller.layout.slot_row[0]], placement.phy2log[0].float())
    assert json.dumps(online.events[0].to_dict())
    controller.close()


def test_batched_reads_decide_as_reading_every_step_does():
    """CUDA's rebalancer reads the counters once per re-plan interval (StepSnapshots): the loop
    must see the same step loads in the same order, so it makes the same decisions at the same
    steps as the per-step reader, and the cumulative loads stay exact."""
    config = RebalanceConfig(interval_steps=4, window_steps=8, min_gain=0.0, layer_min_gain=0.0, max_moves=6)
    rng = torch.Generator().manual_seed(0)
    steps = []
    for step in range(20):  # the hot expert moves from 5 to 2 halfway; step sizes vary 1..40 tokens
        tokens = int(torch.randint(1, 41, (1,), generator=rng))
        ids = torch.randint(0, 8, (tokens, 2), generator=rng)
        ids[: tokens // 2, 0] = 5 if step < 10 else 2
        steps.append(ids)

    def run(batched: bool):
        controller = PlacementController(Placement.identity(2, 8, num_ranks=2, slots_per_rank=5), layout="slot")
        online = OnlineRebalancer(controller, config, batched_reads=batched)
        placements = []
        for step, ids in enumerate(steps):
            for layer in range(2):
                record(controller, ids, layer)
            online.step_end()
            placements.append(controller.placement.phy2log.clone())
            if batched:  # nothing reaches the loop between re-plan steps
                assert len(online.loop.window) == 4 * ((step + 1) // 4) or len(online.loop.window) == 8
        totals = controller.total_expert_load(), controller.total_slot_load()
        controller.close()
        return [e.to_dict() | {"plan_ms": 0} for e in online.events], placements, totals

    events, placements, totals = run(batched=False)
    b_events, b_placements, b_totals = run(batched=True)
    assert [e["applied"] for e in events].count(True) >= 2
    assert b_events == events
    assert all(torch.equal(a, b) for a, b in zip(placements[3::4], b_placements[3::4]))  # at each re-plan step
    expected = torch.stack([sum(torch.bincount(ids.flatten(), minlength=8) for ids in steps)] * 2)
    assert torch.equal(b_totals[0], expected) and torch.equal(totals[0], expected)
    assert torch.equal(b_totals[1], totals[1])


def test_step_snapshots_return_each_steps_counts_once_per_interval():
    from omni_passes.hosts.vllm.serving import StepSnapshots

    counter = torch.zeros(2, 3, dtype=torch.int64)
    counter += 7  # counted before the snapshots start: not a step's load
    snapshots = StepSnapshots(counter, 3)
    taken = []
    for step in range(6):
        counter[step % 2, step % 3] += step + 1
        taken.append(snapshots.take())
    assert taken[0] is None and taken[1] is None and taken[3] is None and taken[4] is None
    loads = taken[2] + taken[5]
    assert len(loads) == 6
    for step, load in enumerate(loads):
        expected = torch.zeros(2, 3, dtype=torch.int64)
        expected[step % 2, step % 3] = step + 1
        assert torch.equal(load, expected)
