"""Start one process per expert-parallel rank (no torchrun): ``run_workers(fn, world_size, backend)``.

Each worker gets an initialised default process group and an ``EPGroup`` (its rank and
device: ``cuda:rank`` with NCCL, CPU with gloo), calls ``fn(group, *args)`` and hands its
return value (anything picklable) back; ``run_workers`` returns them in rank order. A worker
that raises makes ``run_workers`` raise with the worker's traceback.

NVLink multicast (NVLS) stays off in every worker, always: the machines this runs on require
it (a multicast object left behind can hurt a shared host), and nothing here needs it.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from omni_passes.ep.comm import EPGroup

NVLINK_MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
BACKENDS = ("nccl", "gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_world(world_size: int, backend: str) -> None:
    """Raise ValueError naming the problem if ``world_size`` ranks cannot run on ``backend`` here."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    if backend == "nccl":
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available < world_size:
            raise ValueError(f"backend nccl with world size {world_size} needs {world_size} CUDA devices; {available} visible")


def _worker(rank: int, fn: Callable, world_size: int, backend: str, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update(NVLINK_MULTICAST_OFF)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=device, timeout=timedelta(minutes=10))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(minutes=10))
    try:
        result = fn(EPGroup(rank=rank, world_size=world_size, device=device), *args)
        Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_workers(fn: Callable[..., Any], world_size: int, backend: str = "gloo", args: tuple = ()) -> list[Any]:
    """Run ``fn(group, *args)`` on ``world_size`` spawned ranks; their results in rank order.

    ``fn`` must be importable by name (a module-level function): workers are spawned fresh.
    """
    check_world(world_size, backend)
    import torch.multiprocessing as mp

    # Children inherit the parent's environment at spawn; set it here too so that anything the
    # CUDA/NCCL libraries read before our worker function runs already sees multicast off.
    os.environ.update(NVLINK_MULTICAST_OFF)
    with tempfile.TemporaryDirectory(prefix="omni_ep_") as out_dir:
        mp.spawn(_worker, args=(fn, world_size, backend, _free_port(), out_dir, args), nprocs=world_size, join=True)
        return [pickle.loads(Path(out_dir, f"rank{r}.pkl").read_bytes()) for r in range(world_size)]
