"""Data-parallel calibration under ``torchrun`` (``torch.distributed``; gloo on CPU, nccl on CUDA).

``torchrun --nproc-per-node N -m llmopt.cli compress ...`` starts N copies of the command. Each holds the
model and takes every N-th calibration window (:func:`shard`); the layer-wise engine runs its forwards on
its own windows only, so the statistics work (the forwards, the Gram matrices) is split N ways. Before a
kernel runs, the statistics are summed across the processes (``StatsAccumulator.all_reduce``): every
process then holds those of all windows. Each Linear's kernel runs on one *owner* process, the Linears
of a group dealt to the processes by cost (:func:`owners`, longest first to the least loaded), and its
result (new weight, codes, mask, report) is broadcast, so every process continues with the same model.
Only process 0 writes the output.

This is llm-compressor's scheme (per-rank partial Hessians, an owner per Linear, a broadcast); here the
statistics are all-reduced rather than reduced to the owner, because the engine's next step, the
layer's outputs on each process's own windows, needs the compressed layer everywhere anyway.

Reduction order: a Hessian summed from N partial sums differs from the one-process running average in the
last bits of float32 (relative ~1e-7), which can move a GPTQ code that sits on a rounding boundary;
``tests/test_parallel.py`` pins how many.

Multi-node: the same command under ``torchrun --nnodes M --nproc-per-node N --rdzv-backend c10d
--rdzv-endpoint HOST:PORT`` on every node (or a hostfile with ``accelerate launch``); nothing here
depends on the processes sharing a machine except the output folder, which process 0 writes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where used: the CLI imports this module before any command runs
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True inside a multi-process launch (torchrun / accelerate launch set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def main_process() -> bool:
    """True in process 0 of a launch, and in a plain run (before or after :func:`init`): the one that
    prints, writes and goes on to export and evaluate."""
    return int(os.environ.get("RANK", "0")) == 0


def init(device: str | torch.device | None = None) -> Ranks:
    """Join the launch's process group (once per process; gloo for a CPU run, nccl for CUDA) and return
    this process's rank; a plain single-process run returns Ranks(0, 1) and starts nothing."""
    import torch
    import torch.distributed as dist

    if not launched():
        return current()
    if not dist.is_initialized():
        cuda = device is not None and torch.device(device).type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo")
        log.info("process %d of %d (%s)", dist.get_rank(), dist.get_world_size(), dist.get_backend())
    return current()


def current() -> Ranks:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def shard(windows: torch.Tensor) -> torch.Tensor:
    """This process's calibration windows: every ``world``-th, starting at its rank (all of them alone)."""
    from llmopt.errors import LLMOptError

    r = current()
    if not r.active:
        return windows
    if windows.shape[0] < r.world:
        raise LLMOptError(
            f"{windows.shape[0]} calibration windows for {r.world} processes: give at least one window per "
            "process (--calib-samples)"
        )
    return windows[r.rank :: r.world]


def owners(costs: dict[str, float]) -> dict[str, int]:
    """Deal Linears to processes by cost: the costliest first, each to the least loaded process (ties:
    the lowest rank). The same on every process (a pure function of the names and costs)."""
    world = current().world
    load = [0.0] * world
    out = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        r = min(range(world), key=lambda k: (load[k], k))
        out[name] = r
        load[r] += costs[name]
    return out


def all_gather_objects(obj) -> list:
    import torch.distributed as dist

    out = [None] * current().world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int):
    """``obj`` from process ``src`` on every process (pickled; tensors travel on the CPU)."""
    import torch.distributed as dist

    box = [obj if current().rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the processes in place (float64 on the wire for float tensors, so the sum of N
    float32 parts rounds once, at the end)."""
    import torch
    import torch.distributed as dist

    if t.is_floating_point() and t.dtype != torch.float64:
        wide = t.to(torch.float64)
        dist.all_reduce(wide)
        t.copy_(wide)
    else:
        dist.all_reduce(t)
    return t


def barrier() -> None:
    import torch.distributed as dist

    if current().active:
        dist.barrier()
