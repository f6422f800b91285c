"""Data on the device, cut into minibatches: the batch stream every part of ppvi shares.

:class:`Batches` gives the indices of any step from ``(seed, step)`` alone, which is
what makes ``--resume`` exact; :func:`batch_at` turns indices into the
:class:`~ppvi.data.Batch` that models and guides receive.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .data import Batch

__all__ = ["Batches", "batch_at", "load_data_tensors", "num_points"]


def load_data_tensors(model_file, data, options, device: torch.device) -> tuple[str | None, dict]:
    """``(source, tensors on device)``: a source string (or None, built-in) goes through the model's loader;
    tensors are used as given (``source`` "in-memory")."""
    if data is None or isinstance(data, (str, Path)):
        source = None if data is None else str(data)
        tensors = model_file.load_data(source, options)
    elif getattr(model_file, "loads_in_memory", False):  # plain Pyro: tensors, dicts and tuples map to arguments
        source = "in-memory"
        tensors = model_file.load_data(data, options)
    else:
        source = "in-memory"
        tensors = data if isinstance(data, dict) else {"x": data}
    return source, {name: value.to(device) for name, value in tensors.items()}


def num_points(data: dict) -> int:
    """The number of data points: the leading size of the per-point tensors, or 1 for a model without any
    (``def model(): ...`` over module-level data or none: the whole data set is one point)."""
    return int(next(iter(data.values())).shape[0]) if data else 1


class Batches:
    """Minibatch indices for a step: a stream of per-epoch permutations cut into equal batches.

    Batch ``s`` covers positions ``[s*B, (s+1)*B)`` of the stream, so every batch has B points,
    each epoch visits every point once, and the batch of any step can be rebuilt from
    ``(seed, step)`` alone, which is what makes ``--resume`` exact.
    """

    def __init__(self, num_data: int, batch_size: int | None, seed: int, device: torch.device):
        self.num_data, self.seed, self.device = num_data, seed, device
        self.batch_size = batch_size if batch_size and batch_size < num_data else None
        self.full = torch.arange(num_data, device=device)
        self._cache: dict[int, torch.Tensor] = {}

    def steps_per_epoch(self) -> int:
        return 1 if self.batch_size is None else math.ceil(self.num_data / self.batch_size)

    def epoch_of(self, step: int) -> int:
        return step if self.batch_size is None else (step * self.batch_size) // self.num_data

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            generator = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = {key: value for key, value in self._cache.items() if key >= epoch - 1}
            self._cache[epoch] = torch.randperm(self.num_data, generator=generator, device=self.device)
        return self._cache[epoch]

    def index(self, step: int) -> torch.Tensor:
        if self.batch_size is None:
            return self.full
        start, stop = step * self.batch_size, (step + 1) * self.batch_size
        pieces = [
            self._permutation(epoch)[max(start - epoch * self.num_data, 0) : stop - epoch * self.num_data]
            for epoch in range(start // self.num_data, (stop - 1) // self.num_data + 1)
        ]  # a batch straddles at most a few epochs; slicing first keeps a step O(batch size)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def batch_at(data: dict, index: torch.Tensor, num_data: int, full: bool) -> Batch:
    if full:
        return Batch(data, index, num_data)
    return Batch({name: value.index_select(0, index) for name, value in data.items()}, index, num_data)
