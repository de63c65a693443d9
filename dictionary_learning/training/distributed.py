"""Multi-process training on torch.distributed (launched with `torchrun --nproc_per_node N
script.py`, one process per GPU, or per CPU share with the gloo backend).

- `init_distributed()` starts the process group from torchrun's environment (NCCL on CUDA, gloo
  otherwise) and returns (rank, world_size); `shard(texts)` is this rank's share of a text stream
  (every world_size-th text); `exit_distributed()` ends a rank's process cleanly.
- `DataParallel` holds the collectives a trainer needs so that N ranks, each on its own share of
  every global batch, train exactly as one process on the global batch: gradients averaged,
  dead-feature statistics (tokens seen, which latents fired) summed / or-ed, batch statistics (the
  TopK inference threshold, AuxK's residual variance, the b_dec initialisation's batch, the
  normalisation factor) taken over the global batch.
Trainers receive a `DataParallel` as `trainer.distributed`; without one (the default) nothing here
runs.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

MODES = ("data", "trainers")


def world() -> tuple[int, int]:
    """(rank, world_size) of this process: (0, 1) unless a torch.distributed process group is
    initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(backend: str | None = None, timeout: float = 600) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, ...) unless it is initialised already; on CUDA also select this rank's GPU
    (LOCAL_RANK). Outside torchrun (no WORLD_SIZE): nothing, (0, 1). Returns (rank, world_size).
    `timeout` (seconds) bounds the wait for every rank to join and every later collective: a rank
    that never starts, or dies, ends the others with an error instead of a hang."""
    if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
            or not 0 < timeout < float("inf")):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not (dist.is_available() and dist.is_initialized()) and "WORLD_SIZE" in os.environ:
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        except Exception as error:  # torch raises DistStoreError / RuntimeError, by version
            raise RuntimeError(f"rank {os.environ.get('RANK')} of {os.environ['WORLD_SIZE']}: the "
                               f"process group did not form within the timeout of {timeout:g} s "
                               "(did every rank start, with the same MASTER_ADDR / MASTER_PORT?): "
                               f"{type(error).__name__}: "
                               f"{str(error).splitlines()[0] if str(error) else ''}") from error
    return world()


def check_same_on_every_rank(sync: Any, value: Any, what: str) -> None:
    """Refuse to start a data-parallel run whose ranks were given different `what` (e.g.
    trainer configs): their weights would silently diverge. `value` must be JSON-serialisable
    (with `default=str`)."""
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
    gathered = sync.gather_objects(digest)
    if len(set(map(str, gathered))) > 1:
        raise ValueError(f"the {what} differ between ranks (each rank's hash: {gathered}): every "
                         f"rank must be given the same {what} in a data-parallel run")


def exit_distributed(code: int = 0) -> None:
    """End a torch.distributed process: wait for every rank, destroy the process group, flush the
    output and exit without interpreter finalization, where gloo's worker threads sometimes abort a
    finished process with SIGABRT ("terminate called without an active exception"; about 1 exit in
    15 on this project's CPUs, torch 2.13)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def shard(items: Iterable[Any], rank: int | None = None,
          world_size: int | None = None) -> Iterator[Any]:
    """This rank's share of a stream (texts, token sequences): items rank, rank + world_size, ..."""
    if rank is None or world_size is None:
        rank, world_size = world()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    return itertools.islice(items, rank, None, world_size)


def check_mode(distributed: str | None) -> tuple[int, int]:
    """(rank, world_size) for trainSAE's `distributed` argument, with clear errors for a missing or
    unknown mode."""
    if distributed is not None and distributed not in MODES:
        raise ValueError(f"distributed must be None, 'data' or 'trainers', got {distributed!r}")
    rank, world_size = world()
    if distributed is None and world_size > 1:
        raise ValueError(f"this process is rank {rank} of {world_size} (torch.distributed is "
                         "initialised): pass distributed='data' (each rank trains every dictionary "
                         "on its own share of the data) or distributed='trainers' (each rank "
                         "trains its own share of the trainers on all of it)")
    if distributed is not None and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"distributed={distributed!r} needs a torch.distributed process group: "
                         "launch with torchrun and call "
                         "dictionary_learning.training.init_distributed() first")
    return rank, world_size


class DataParallel:
    """The collectives of data-parallel training over a process group (default: the world). Every
    rank must feed batches of the same size; each rank's batch is its share of the global batch."""

    def __init__(self, group: Any = None):
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)

    def _all_reduce(self, tensor: torch.Tensor, op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
        dist.all_reduce(tensor, op=op, group=self.group)
        return tensor

    @torch.no_grad()
    def average_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Replace every gradient by its mean over ranks (one flattened all-reduce per dtype and
        device)."""
        grads = [p.grad for p in parameters if p.grad is not None]
        for key, group in itertools.groupby(sorted(grads,
                                                   key=lambda g: (str(g.dtype), str(g.device))),
                                            key=lambda g: (str(g.dtype), str(g.device))):
            group = list(group)
            flat = self._all_reduce(_flatten_dense_tensors([g.contiguous() for g in group]))
            flat /= self.world_size
            for grad, synced in zip(group, _unflatten_dense_tensors(flat, group)):
                grad.copy_(synced)

    @torch.no_grad()
    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (a new tensor, on the input's device)."""
        return self._all_reduce(tensor.detach().to(self._device, copy=True)).to(tensor.device)

    @torch.no_grad()
    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a per-rank mean over equal-sized batches: the mean over the global
        batch."""
        return self.sum(tensor) / self.world_size

    @torch.no_grad()
    def min(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise minimum over ranks (a new tensor, on the input's device)."""
        return self._all_reduce(tensor.detach().to(self._device, copy=True),
                                dist.ReduceOp.MIN).to(tensor.device)

    @torch.no_grad()
    def any(self, mask: torch.Tensor) -> torch.Tensor:
        """Elementwise or over ranks of a bool tensor."""
        return self._all_reduce(mask.to(self._device, torch.uint8),
                                dist.ReduceOp.MAX).bool().to(mask.device)

    def all_true(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank (e.g. every rank has a next batch)."""
        return bool(self._all_reduce(torch.tensor([int(flag)], device=self._device),
                                     dist.ReduceOp.MIN).item())

    @torch.no_grad()
    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """The global batch: every rank's rows, rank 0's first."""
        local = tensor.to(self._device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts).to(tensor.device)

    @torch.no_grad()
    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers."""
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            dist.broadcast(tensor.data,
                           src=dist.get_global_rank(self.group, 0) if self.group else 0,
                           group=self.group)

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's `value` (any picklable object), in rank order."""
        gathered: list[Any] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(gathered, value, group=self.group)
        return gathered

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    @property
    def _device(self) -> torch.device:
        backend = dist.get_backend(self.group)
        return (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
                else torch.device("cpu"))

