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

Reduction order does not matter: the statistics are float64 sums of float32 terms (exact), rounded to
float32 once all are in, and every window runs in the same batch as in one process; ``tests/test_parallel.py``
checks the codes against the one-process run.

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
        cuda = str(device).startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        dist.init_process_group("nccl" if cuda else "gloo")
        log.info("process %d of %d (%s)", dist.get_rank(), dist.get_world_size(), dist.get_backend())
    return current()


def current() -> Ranks:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def shard(windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """This process's calibration windows: the engine's batches of ``batch_size`` windows (in order) dealt
    round-robin, every ``world``-th batch starting at this rank's (all of them in a plain run). Whole batches,
    so each window runs through each layer in the very batch it runs in one process."""
    import torch

    from llmopt.errors import LLMOptError

    r = current()
    if not r.active:
        return windows
    starts = list(range(0, windows.shape[0], batch_size))
    if len(starts) < r.world:
        raise LLMOptError(
            f"{windows.shape[0]} calibration windows make {len(starts)} batches of {batch_size} for {r.world} "
            "processes: give at least one batch per process (--calib-samples, or calibration.batch_size)"
        )
    return torch.cat([windows[b : b + batch_size] for b in starts[r.rank :: r.world]])


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
    """Sum ``t`` over the processes, in place (the statistics are float64 sums: exact in any order)."""
    import torch.distributed as dist

    dist.all_reduce(t)
    return t


def barrier() -> None:
    import torch.distributed as dist

    if current().active:
        dist.barrier()
