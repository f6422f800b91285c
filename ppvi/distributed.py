"""Data-parallel fits on ``torch.distributed``: the communication hooks the fit loop calls.

The loop calls the same five hooks whether it runs in one process or in N:
``shard`` (this rank's part of the global minibatch), ``broadcast_`` (start every
rank from rank 0's parameters), ``average_gradients_`` (after backward),
``mean`` (the ELBO buffer, at its buffered read) and ``is_writer`` (only rank 0
writes the run directory). :class:`LocalComm` is the one-process case.
"""

from __future__ import annotations

import torch

__all__ = ["LocalComm"]


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
