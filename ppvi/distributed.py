"""Data-parallel fits on ``torch.distributed``: the communication hooks the fit loop calls.

The loop calls the same five hooks whether it runs in one process or in N:
``shard`` (this rank's part of the global minibatch), ``broadcast_`` (start every
rank from rank 0's parameters), ``average_gradients_`` (after backward),
``mean`` (the ELBO buffer, at its buffered read) and ``is_writer`` (only rank 0
writes the run directory). :class:`LocalComm` is the one-process case;
:class:`DistComm` is the N-process case, made by :func:`connect` when the
process was started by ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set).

Why the averaged gradient is the one-process gradient of the global batch:
rank ``r`` holds ``b_r`` of the ``B`` points of the step's minibatch, and Pyro's
subsample plate scales its likelihood by ``N / b_r``. Its loss is
``L_r = (N / b_r) S_r + G`` (``S_r`` its points' log-likelihood terms, ``G`` the
global terms, the same on every rank when every rank draws the same global
latents). The weighted sum ``sum_r (b_r / B) L_r = (N / B) S + G`` is the
one-process loss of the global batch, for any split of ``B``; with equal shards
the weights are ``1 / W``, a plain mean. Gradients and the ELBO are summed with
these weights in one all-reduce each.

Randomness: every rank seeds Pyro with the fit's seed, so the global latents are drawn
identically on every rank and equal the one-process draws (the gradient is then exactly the
one-process gradient, up to float summation order). Local latents are drawn per shard from that
same stream, so position j of every rank's shard gets the same noise: unbiased, but correlated
across ranks. Decaying-average score baselines stay per rank (each averages its own shard's cost;
a baseline only has to be independent of the current draw to keep the gradient unbiased); the
neural baseline's networks are parameters: broadcast when created, gradients averaged.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid

import torch
import torch.distributed as dist

from .errors import UsageError

__all__ = ["LocalComm", "DistComm", "PeerLost", "connect", "is_launched", "env_rank", "local_device", "check_world_size", "launch"]


class PeerLost(RuntimeError):
    """A collective failed because another rank stopped (its own message says why); exit quietly."""


class LocalComm:
    """One process: every hook is the identity."""

    rank = 0
    world_size = 1
    is_writer = True

    def shard(self, index: torch.Tensor) -> torch.Tensor:
        return index

    def broadcast_(self, tensors) -> None:
        pass

    def average_gradients_(self, tensors) -> None:
        pass

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


class DistComm:
    """Rank ``rank`` of ``world_size`` data-parallel workers in an initialised process group.

    Parameters
    ----------
    rank, world_size : int
        From the environment torchrun sets.
    device : torch.device
        This rank's device (``cuda:LOCAL_RANK`` with NCCL, ``cpu`` with gloo).
    """

    def __init__(self, rank: int, world_size: int, device: torch.device):
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.is_writer = rank == 0
        self.weight = 1.0 / world_size  # b_r / B of the last shard; constant over a fit (every batch has B points)

    def shard(self, index: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of the global minibatch ``index`` (the same on every rank).

        The slices of all ranks are disjoint and their union is ``index``. A rank may get an
        empty slice only when the batch has fewer points than there are ranks, which
        :func:`check_world_size` refuses before training.
        """
        size = int(index.shape[0])  # a shape, not a value: no host-device sync
        start, stop = size * self.rank // self.world_size, size * (self.rank + 1) // self.world_size
        self.weight = (stop - start) / size
        return index[start:stop]

    def broadcast_(self, tensors) -> None:
        """Copy rank 0's values into ``tensors`` on every rank (one flattened broadcast per dtype)."""
        for group in _by_dtype(list(tensors)):
            flat = torch.cat([tensor.detach().reshape(-1) for tensor in group])
            self._collective(dist.broadcast, flat, src=0)
            with torch.no_grad():
                for tensor, value in zip(group, flat.split([tensor.numel() for tensor in group])):
                    tensor.copy_(value.view_as(tensor))

    def average_gradients_(self, tensors) -> None:
        """Replace each tensor's ``.grad`` by the weighted sum over ranks (one all-reduce per dtype).

        A tensor without a gradient on this rank contributes zeros, and every tensor gets the
        summed gradient, so that parameters stay identical on every rank (a parameter with no
        gradient on any rank gets zeros, which Adam turns into a zero first update).
        """
        for group in _by_dtype([tensor for tensor in tensors if tensor.requires_grad]):
            flat = torch.cat([
                (tensor.grad.reshape(-1) if tensor.grad is not None else tensor.new_zeros(tensor.numel())) * self.weight
                for tensor in group
            ])
            self._collective(dist.all_reduce, flat)
            for tensor, value in zip(group, flat.split([tensor.numel() for tensor in group])):
                tensor.grad = value.view_as(tensor)

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The global value of per-rank estimates (the ELBO buffer): their ``b_r / B``-weighted sum."""
        total = tensor.detach() * self.weight
        self._collective(dist.all_reduce, total)
        return total

    def _collective(self, operation, tensor, **kwargs) -> None:
        try:
            operation(tensor, **kwargs)
        except (dist.DistError, RuntimeError) as error:
            raise PeerLost(f"rank {self.rank}: a collective failed ({str(error).splitlines()[0]}); another rank has stopped") from error


def _by_dtype(tensors: list) -> list[list]:
    groups: dict = {}
    for tensor in tensors:
        groups.setdefault(tensor.dtype, []).append(tensor)
    return list(groups.values())


def is_launched() -> bool:
    """Whether torchrun started this process as one of several workers."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def env_rank() -> int:
    """This process's global rank (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0")) if is_launched() else 0


def local_device(device: torch.device) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` under torchrun on CUDA, else ``device`` unchanged."""
    device = torch.device(device)
    if not is_launched() or device.type != "cuda":
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank >= torch.cuda.device_count():
        raise UsageError(
            f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()} CUDA device(s); "
            "start at most that many processes per machine (torchrun --nproc-per-node), or use --device cpu."
        )
    return torch.device("cuda", local_rank)


def check_world_size(batch_size: int | None, num_data: int, previous_world_size: int | None = None) -> int:
    """Refuse (UsageError) what cannot run data-parallel at this world size; returns the world size.

    Call it after the inputs are checked and before :func:`connect`, on every rank: each rank
    refuses the same input the same way, and only rank 0 prints (see the command line).
    ``previous_world_size``, from the config of a run being resumed, must equal this one:
    the minibatch shards, and the RNG streams in the checkpoint, belong to that world size.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if is_launched() else 1
    points = batch_size or num_data
    if points < world_size:
        raise UsageError(
            f"{world_size} processes need at least {world_size} points per step; the batch has {points} "
            "(raise --batch-size or use fewer processes)."
        )
    if previous_world_size is not None and int(previous_world_size) != world_size:
        raise UsageError(
            f"--resume: the run was started with {previous_world_size} process(es) and is resumed with {world_size}; "
            f"resume it with the same number (torchrun --nproc-per-node {previous_world_size} or --nproc {previous_world_size})."
        )
    return world_size


def connect(device: torch.device) -> LocalComm | DistComm:
    """The comm of this process: :class:`LocalComm` alone, else join torchrun's process group.

    NCCL on CUDA (each rank on ``cuda:LOCAL_RANK``, see :func:`local_device`), gloo on CPU.
    Returns after every rank has joined (a barrier), so that nothing rank 0 writes can race a
    check another rank makes before it.
    """
    if not is_launched():
        return LocalComm()
    device = torch.device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        dist.barrier()
    return DistComm(dist.get_rank(), dist.get_world_size(), device)


def disconnect() -> None:
    """Leave the process group (at the end of a fit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``python -m ppvi ARGV`` as ``nproc`` workers on this machine (torchrun's engine, standalone).

    Returns the exit code: 0 when every rank succeeded; 2 when the ranks refused the input
    (rank 0 printed why); otherwise 1, after one message naming the first rank that failed
    and its cause (a rank that raised has printed its own message, prefixed with its rank).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if not isinstance(nproc, int) or nproc < 1:
        raise UsageError(f"--nproc must be a positive integer (got {nproc!r}).")
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
        rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
    )
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # one message, ours
    try:
        elastic_launch(config, sys.executable)("-m", "ppvi", *argv)
    except ChildFailedError as error:
        # the root cause: not a rank the agent stopped (SIGTERM) after the first failure, then the earliest
        failures = sorted(error.failures.items(), key=lambda item: (item[1].exitcode == -signal.SIGTERM, item[1].timestamp))
        rank, failure = failures[0]
        if failure.exitcode == 2:
            return 2
        if failure.exitcode < 0:
            try:
                cause = f"killed by {signal.Signals(-failure.exitcode).name}"
            except ValueError:
                cause = f"killed by signal {-failure.exitcode}"
            print(
                f"error: rank {rank} of {nproc} failed ({cause}); the other ranks were stopped. The run directory keeps "
                "its last checkpoint: continue with `ppvi fit --resume RUN_DIR --nproc "
                f"{nproc}`.",
                file=sys.stderr,
            )
        return 1
    return 0
