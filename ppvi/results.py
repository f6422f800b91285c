"""What a fit returns: plain data (one :class:`RestartResult` per restart, gathered in a :class:`FitResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

__all__ = ["FitResult", "RestartResult"]


@dataclass
class RestartResult:
    """One independent fit (one chain, in ArviZ's terms)."""

    restart: int
    seed: int
    params: dict  # site name -> constrained value
    unconstrained: dict  # what the optimizer moved; loads back into Pyro's param store
    elbo_trace: pd.DataFrame
    model_fn: Callable = field(repr=False)
    guide_fn: Callable = field(repr=False)

    @property
    def final_elbo(self) -> float:
        """Median ELBO over the last tenth of the steps (one step is noisy, and heavy-tailed
        importance weights can throw single steps far off: a median is not moved by them)."""
        tail = max(1, len(self.elbo_trace) // 10)
        return float(self.elbo_trace["elbo"].iloc[-tail:].median())


@dataclass
class FitResult:
    """What :func:`fit` returns: plain data, nothing hidden in global state."""

    params: dict | None  # of the best restart (highest final ELBO); None: filled in from the restarts
    elbo_trace: pd.DataFrame  # restart, step, epoch, elbo, time_s
    estimator: str
    estimator_reason: str
    device: torch.device
    seed: int
    config: dict
    restarts: list[RestartResult]
    model_file: Any = field(repr=False)  # the ModelFile (or plain-Pyro pair) that was fitted
    options: Any = None
    data: dict = field(default=None, repr=False)
    run_dir: Path | None = None

    @property
    def best(self) -> RestartResult:
        return max(self.restarts, key=lambda restart: restart.final_elbo)

    def __post_init__(self):
        if self.params is None and self.restarts:
            self.params = self.best.params


