"""DistributedDataParallel set-up under torchrun, and the helpers the loop needs.

`python -m trainer ...` is one process (world size 1). The same command
under `torchrun --nproc_per_node=N -m trainer ...` sees RANK / WORLD_SIZE /
LOCAL_RANK in its environment and joins a process group: gloo on CPU, nccl
on CUDA (one GPU per process, cuda:LOCAL_RANK). Rank 0 writes the run
folder; metrics are summed over ranks with `all_reduce_sums`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def from_env(environ=os.environ) -> DistInfo:
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return DistInfo()
    return DistInfo(int(environ["RANK"]), int(environ["WORLD_SIZE"]),
                    int(environ.get("LOCAL_RANK", environ["RANK"])))


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init(info: DistInfo, device: torch.device) -> None:
    if not info.enabled or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend_for(device), **kwargs)
    log.info("process group: rank %d of %d (%s)", info.rank, info.world_size, backend_for(device))


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sums(values: Sequence[float], device: torch.device) -> list[float]:
    """Sum each value over every process (identity in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class ShardSampler(torch.utils.data.Sampler):
    """Every index exactly once across ranks (rank::world), with no padding,
    so validation metrics summed over ranks are those of the whole split.
    (DistributedSampler pads with repeats, which is right for training only.)"""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


SAMPLER_POWERS = {"sqrt": 0.5, "balanced": 0.0}


class ClassBalancedSampler(torch.utils.data.Sampler):
    """Training indices drawn with replacement so that class c is drawn in
    proportion to n_c ** power (0.5 "sqrt": square-root sampling, small
    classes seen more often without repeating them as much as 0 "balanced"
    does). An epoch is as many draws as there are images, so it has as many
    steps as a shuffled one. Every rank draws the same sequence (seed +
    epoch, like DistributedSampler) and takes its rank::world share, padded to
    equal length."""

    def __init__(self, targets, power: float, *, rank: int = 0, world_size: int = 1, seed: int = 0):
        targets = torch.as_tensor(list(targets), dtype=torch.long)
        counts = torch.bincount(targets).double()
        self.weights = counts[targets] ** (power - 1.0)
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, 0
        self.per_rank = -(-len(targets) // world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        drawn = torch.multinomial(self.weights, self.per_rank * self.world_size, replacement=True, generator=g)
        return iter(drawn[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return self.per_rank


def all_gather_arrays(array: np.ndarray) -> np.ndarray:
    """Every process's rows, concatenated in rank order (identity in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return array
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, array)
    return np.concatenate(parts)


def average_gradients(module: torch.nn.Module) -> None:
    """Average `module`'s gradients over every process (what DDP does for the
    model; here for parameters outside it, such as a loss's class weights)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    for p in module.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            # This process's batch did not reach the parameter (an empty batch: its loss is a zero
            # that skips the criterion), but every process must join each all_reduce, in order.
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad /= world
