"""The set of processes a job runs on, and the few collective operations the engine needs.

A W2 attack couples the samples of a set: its normaliser Υ and its projection radius are means
over the whole set (or the whole global batch). When a job is split over N processes (one per
GPU, torch.distributed), each holds a shard, and these means must be global: every rank adds
up its shard's sum and count, one all-reduce combines them, and all ranks then compute exactly
what one process would on the whole set. `World` carries that; the single-process `SINGLE`
makes every operation a no-op, so the engine's code is the same either way.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from core.engine.oom import AdaptiveBatch

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ reductions
    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `t` over all ranks (a new tensor; `t` is left alone)."""
        if not self.distributed:
            return t
        out = t.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean of `values` over every rank's elements (shards may differ in size), float64, 0-d."""
        v = values.double()
        if not self.distributed:
            return v.mean()
        both = torch.stack([v.sum(), torch.tensor(float(v.numel()), device=v.device, dtype=torch.float64)])
        both = self.sum(both)
        return both[0] / both[1]

    def max(self, values: torch.Tensor) -> torch.Tensor:
        m = values.double().max()
        if not self.distributed:
            return m
        out = m.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return out

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t` (equal shapes) concatenated along the leading dimension in rank order: the
        inverse of `shard` for a leading dimension that splits evenly."""
        if not self.distributed:
            return t
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any (so all ranks take the same branch)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def eval_batch(self, batch: AdaptiveBatch) -> AdaptiveBatch:
        """`batch` itself in one process; across ranks a batch that never halves: one rank retrying
        alone after a CUDA out-of-memory error would pair its collectives with the other ranks'
        later steps, so the error ends the rank instead (and the task fails the job with it)."""
        return batch if not self.distributed else _FixedBatch(batch.size)

    # ------------------------------------------------------------------ data and model
    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of the leading dimension (sizes differ by at most one)."""
        if not self.distributed:
            return t
        n = t.shape[0]
        return t[n * self.rank // self.size: n * (self.rank + 1) // self.size]

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel around `model` (gradients averaged across ranks in backward).

        On CUDA, BatchNorm layers become SyncBatchNorm (in place, keeping their parameters), so batch
        statistics are the global batch's, as in one process; gloo on the CPU has no SyncBatchNorm,
        so there they are each shard's.
        """
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)  # buffers (BN running stats) follow rank 0


SINGLE = World()


class _FixedBatch(AdaptiveBatch):
    def run(self, what: str, attempt: Callable[[int], T]) -> T:
        return attempt(self.size)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module of a DDP-wrapped model: attacks take input gradients on it, which must not
    touch DDP's gradient synchronisation."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def init_world(rank: int, size: int, store_path: str, *, backend: str | None = None, timeout_s: float = 3600.0
               ) -> World:
    """Join the process group through a file rendezvous (one node: no port to pick or collide on).

    NCCL on CUDA, gloo on the CPU. The timeout is long because rank 0 alone writes checkpoints
    (to object storage, possibly gigabytes) while the other ranks wait at the next collective.
    """
    from datetime import timedelta

    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    store = dist.FileStore(store_path, size)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s))
    return World(rank=rank, size=size)


def shutdown_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()

