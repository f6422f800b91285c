"""Knowing when a fit has converged: stationarity by R-hat over windows of iterates, then iterate averaging.

Stochastic optimisation for VI does not converge to a point: with a fixed step
size the iterates settle into a stationary cloud around the optimum. Dhaka et
al. (2020) detect that cloud with R-hat: split the last W iterates into
windows, treat the windows as chains, and call the iterates stationary once
the largest split R-hat is below a threshold. From then on the Polyak-Ruppert
average of the iterates estimates the optimum much better than the last
iterate, and its Monte Carlo standard error (MCSE, from the iterates'
effective sample size) says how well: the fit stops when the MCSE is small
relative to q's own scale. :class:`Stationarity` implements this, device
resident: :meth:`Stationarity.observe` only copies iterates into a device
buffer and adds to a device running sum, and :meth:`Stationarity.check`, called
at the loop's buffered reads, reads them back once.

For minibatch amortized models (the VAE family) the parameters are network
weights that never settle into a small cloud; :class:`EarlyStopping` instead
watches a held-out split's ELBO and keeps the best parameters, with patience.

References
----------
Dhaka, A. K., Catalina, A., Welandawe, M., Andersen, M. R., Huggins, J., Vehtari, A. (2020).
Robust, accurate stochastic optimization for variational inference. NeurIPS 33.
Welandawe, M., Andersen, M. R., Vehtari, A., Huggins, J. H. (2022). Robust, automated,
and accurate black-box variational inference (RAABBVI). arXiv:2203.15945.
Vehtari, A., Gelman, A., Simpson, D., Carpenter, B., Buerkner, P.-C. (2021). Rank-normalization,
folding, and localization: an improved R-hat. Bayesian Analysis 16(2).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch

import pyro

__all__ = [
    "Decision", "Stationarity", "EarlyStopping", "split_rhat", "mcse_of_mean", "q_scales", "default_threads", "threads_scope",
    "heldout_split", "load_unconstrained_",
]

NOT_CONVERGED = "not converged within the budget: raise --max-steps or lower --lr"


@dataclass(frozen=True)
class Decision:
    """What a monitor decided at a buffered read: stop at ``step``, and why (one line for the log)."""

    step: int
    reason: str


def split_rhat(iterates: np.ndarray, num_windows: int = 4) -> np.ndarray:
    """Per-coordinate R-hat of ``iterates`` (T, D) cut into ``num_windows`` consecutive windows used as chains.

    R-hat = sqrt(((n - 1) / n * W + B / n) / W), W the mean within-window variance and B / n the
    variance of the window means (Gelman et al. 2013, eq. 11.4). A coordinate that does not move
    at all (W = 0 and B = 0) has R-hat 1.
    """
    length = iterates.shape[0] // num_windows
    chains = iterates[-length * num_windows :].reshape(num_windows, length, -1)
    within = chains.var(axis=1, ddof=1).mean(axis=0)
    between_over_n = chains.mean(axis=1).var(axis=0, ddof=1)
    pooled = (length - 1) / length * within + between_over_n
    with np.errstate(divide="ignore", invalid="ignore"):
        rhat = np.sqrt(pooled / within)
    return np.where(pooled == 0, 1.0, np.where(within == 0, np.inf, rhat))


def mcse_of_mean(iterates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ess, mcse)`` per coordinate of the mean of ``iterates`` (T, D): Geyer's initial positive sequence.

    ESS = T / (1 + 2 sum_k rho_k), summing autocorrelations in pairs while the pair sums stay
    positive (Geyer 1992); MCSE = sd / sqrt(ESS). This is ArviZ's ``ess_mean`` for one chain, written
    vectorised over thousands of coordinates.
    """
    num_steps = iterates.shape[0]
    centred = iterates - iterates.mean(axis=0)
    size = 2 ** math.ceil(math.log2(2 * num_steps))
    spectrum = np.fft.rfft(centred, n=size, axis=0)
    autocov = np.fft.irfft(spectrum * np.conj(spectrum), n=size, axis=0)[:num_steps] / num_steps
    variance = autocov[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.where(variance > 0, autocov / variance, 0.0)
    pairs = rho[0 : num_steps - 1 : 2] + rho[1:num_steps:2]  # Gamma_k = rho_2k + rho_2k+1
    positive = np.cumprod(pairs > 0, axis=0).astype(bool)
    tau = -1.0 + 2.0 * np.where(positive, pairs, 0.0).sum(axis=0)
    ess = num_steps / np.maximum(tau, 1.0 / np.log10(max(num_steps, 10)))
    mcse = np.sqrt(variance * num_steps / (num_steps - 1) / ess)
    return ess, mcse


class Stationarity:
    """Stop a fit once its iterates are stationary (R-hat) and their average is precise (MCSE).

    Use::

        monitor = Stationarity(params)                   # dict name -> unconstrained tensor
        for step in range(max_steps):
            ...optimizer step...
            monitor.observe(step, params)                # device ops only, no sync
            if (step + 1) % SYNC_EVERY == 0:
                decision = monitor.check(step, elbo_values)  # numpy ELBOs read back this time
                if decision: break
        averaged, mcse = monitor.averaged()              # Polyak-Ruppert average, its MCSE

    Parameters
    ----------
    params : dict of str to Tensor
        The unconstrained parameters the optimizer moves (``ppvi.pyro_util.trainable_params``).
    rhat_threshold : float
        Stationarity when the largest window R-hat is below it (Dhaka et al. use 1.1).
    mcse_threshold : float
        Stop when every averaged coordinate's MCSE, divided by its scale (see ``scale_fn``), is below it.
    min_window : int
        Fewest buffered iterates used for R-hat (half as many averaged ones before stopping).
    capacity : int
        Iterates kept in the device buffer; when full it is thinned by two (see :meth:`observe`).
    max_tracked : int
        Coordinates kept in the buffer for R-hat and MCSE: all of them up to this many, else a fixed
        random subset (the average itself always covers every coordinate).
    scale_fn : callable, optional
        ``scale_fn() -> dict name -> Tensor``: the scale each parameter's MCSE is measured in
        (q's sd for a location, see :func:`q_scales`); parameters not in it are measured in their
        own unconstrained units (a log-scale: relative error).
    thin : int
        Keep every ``thin``-th iterate at first.
    """

    def __init__(
        self,
        params: dict,
        *,
        rhat_threshold: float = 1.1,
        mcse_threshold: float = 0.1,
        min_window: int = 100,
        capacity: int = 1000,
        max_tracked: int = 4096,
        scale_fn=None,
        thin: int = 1,
        seed: int = 0,
    ):
        self.names = list(params)
        self.shapes = {name: value.shape for name, value in params.items()}
        sizes = [value.numel() for value in params.values()]
        self.offsets = np.cumsum([0, *sizes])
        first = next(iter(params.values()))
        total = int(self.offsets[-1])
        generator = torch.Generator().manual_seed(seed)
        self.tracked = None if total <= max_tracked else torch.randperm(total, generator=generator)[:max_tracked].sort().values.to(first.device)
        self.buffer = torch.zeros(capacity, min(total, max_tracked), dtype=first.dtype, device=first.device)
        self.buffer_steps = np.full(capacity, -1)
        self.count = 0  # rows of the buffer in use
        self.rhat_threshold, self.mcse_threshold = rhat_threshold, mcse_threshold
        self.min_window, self.thin, self.scale_fn = min_window, thin, scale_fn
        self.stationary_step: int | None = None  # first step averaged
        self.stopped: Decision | None = None
        self.sum = {name: torch.zeros_like(value) for name, value in params.items()}
        self.num_averaged = 0
        self.last_rhat = math.inf
        self.last_mcse = math.inf
        self.last_step = -1

    def observe(self, step: int, params: dict) -> None:
        """Record the iterate after ``step``: device copies and adds only (no host sync).

        The buffer keeps the whole history since the first step, thinned: when it is full, every
        other row is dropped and the thinning doubles, so that R-hat's windows can grow with the fit
        (Dhaka et al. use windows up to 95% of the history) at a fixed memory cost.
        """
        self.last_step = step
        with torch.no_grad():
            if self.stationary_step is not None:
                for name in self.names:
                    self.sum[name] += params[name].detach()
                self.num_averaged += 1
            if step % self.thin:
                return
            if self.count == self.buffer.shape[0]:
                half = self.count // 2
                self.buffer[:half] = self.buffer[1::2].clone()
                self.buffer_steps[:half] = self.buffer_steps[1::2]
                self.count, self.thin = half, self.thin * 2
            flat = torch.cat([params[name].detach().reshape(-1) for name in self.names])
            self.buffer[self.count] = flat if self.tracked is None else flat[self.tracked]
            self.buffer_steps[self.count] = step
            self.count += 1

    def _recent(self, since_step: int | None = None) -> np.ndarray:
        """The buffered iterates in step order (one device read), optionally only those from ``since_step`` on."""
        rows = self.buffer[: self.count].cpu().numpy().astype(np.float64)
        if since_step is not None:
            rows = rows[self.buffer_steps[: self.count] >= since_step]
        return rows

    def check(self, step: int, elbo_values: np.ndarray | None = None) -> Decision | None:
        """At a buffered read: start averaging once stationary; stop once the average is precise.

        ``elbo_values`` (the ELBOs read back at this sync) are not needed by this rule; they are
        accepted so that every monitor has one signature.
        """
        if self.stopped is not None:
            return self.stopped
        if self.stationary_step is None:
            self._check_stationary(step)
            return None
        if len(self._recent(self.stationary_step)) < self.min_window // 2:
            return None
        ess, mcse = self._mcse()
        relative = mcse / self._scales()
        self.last_mcse = float(np.max(relative))
        if self.last_mcse < self.mcse_threshold and float(np.min(ess)) >= self.min_window / 10:
            self.stopped = Decision(step, f"converged at step {step + 1} (R-hat {self.last_rhat:.3f} from step {self.stationary_step}, "
                                          f"MCSE/scale {self.last_mcse:.3f} over {self.num_averaged} averaged iterates)")
        return self.stopped

    def _mcse(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ess, mcse)`` of the running average, from the buffered (thinned) iterates since stationarity;
        thinning an autocorrelated series loses little ESS, so this errs on the safe side."""
        recent = self._recent(self.stationary_step)
        ess, _ = mcse_of_mean(recent)
        return ess, np.sqrt(recent.var(axis=0, ddof=1) / ess)

    def _check_stationary(self, step: int) -> None:
        upper = int(0.95 * self.count)  # Dhaka et al.: windows from min_window up to 95% of the history
        if upper < self.min_window:
            return
        iterates = self._recent()
        windows = np.unique(np.linspace(self.min_window, upper, num=5).astype(int))
        self.last_rhat = min(float(np.max(split_rhat(iterates[-window:]))) for window in windows)  # the most stationary window
        if self.last_rhat < self.rhat_threshold:
            self.stationary_step = step + 1  # average from the next iterate on

    def _scales(self) -> np.ndarray:
        """The scale of each tracked coordinate its MCSE is divided by (1 where none is known)."""
        total = int(self.offsets[-1])
        scales = np.ones(total)
        if self.scale_fn is not None:
            for name, scale in self.scale_fn().items():
                if name in self.names:
                    index = self.names.index(name)
                    scales[self.offsets[index] : self.offsets[index + 1]] = scale.detach().reshape(-1).cpu().double().numpy()
        return scales if self.tracked is None else scales[self.tracked.cpu().numpy()]

    def averaged(self) -> tuple[dict, dict]:
        """``(params, mcse)``: the Polyak-Ruppert average of the iterates since stationarity (unconstrained,
        on device) and each coordinate's MCSE (numpy, tracked coordinates only; NaN where untracked).

        Before stationarity there is no average: ``({}, {})``, and the last iterate stands.
        """
        if not self.num_averaged:
            return {}, {}
        params = {name: self.sum[name] / self.num_averaged for name in self.names}
        _, mcse = self._mcse()
        full = np.full(int(self.offsets[-1]), np.nan)
        full[slice(None) if self.tracked is None else self.tracked.cpu().numpy()] = mcse
        return params, {name: full[self.offsets[i] : self.offsets[i + 1]].reshape(self.shapes[name]) for i, name in enumerate(self.names)}

    @property
    def status(self) -> str:
        """One line for the restart's log and config.json."""
        if self.stopped is not None:
            return self.stopped.reason
        if self.stationary_step is not None:
            return (f"{NOT_CONVERGED} (stationary from step {self.stationary_step}, R-hat {self.last_rhat:.3f}, "
                    f"but MCSE/scale of the average is {self.last_mcse:.3g} > {self.mcse_threshold})")
        return f"{NOT_CONVERGED} (largest window R-hat {self.last_rhat:.3g} >= {self.rhat_threshold})"

    @property
    def converged(self) -> bool:
        return self.stopped is not None

    def summary(self) -> dict:
        """Plain data for config.json and FitResult."""
        return {
            "converged": self.converged,
            "status": self.status,
            "stop_step": None if self.stopped is None else self.stopped.step + 1,
            "stationary_step": self.stationary_step,
            "rhat": self.last_rhat,
            "mcse_over_scale": self.last_mcse,
            "num_averaged": self.num_averaged,
            "reported": "iterate average" if self.num_averaged else "last iterate",
        }


def q_scales(store=None) -> dict:
    """q's standard deviation for each location parameter of Pyro's Gaussian autoguides and of
    hand-written ``<site>_loc`` / ``<site>_scale`` pairs: the unit in which a location's MCSE is small.

    ``AutoNormal.locs.z`` gets ``AutoNormal.scales.z``; ``<Auto...>.loc`` of AutoMultivariateNormal gets
    ``scale * ||row of scale_tril||`` and of AutoLowRankMultivariateNormal ``scale * sqrt(1 + ||row of
    cov_factor||^2)`` (Pyro's parameterisations); ``foo_loc`` gets ``foo_scale``. Other parameters
    (log-scales, network weights) have no entry.
    """
    store = store if store is not None else pyro.get_param_store()
    names = set(store.keys())
    scales = {}
    with torch.no_grad():
        for name in names:
            prefix, _, leaf = name.rpartition(".")
            if ".locs." in name and name.replace(".locs.", ".scales.", 1) in names:
                scales[name] = store[name.replace(".locs.", ".scales.", 1)]
            elif leaf == "loc" and f"{prefix}.scale_tril" in names:
                scales[name] = store[f"{prefix}.scale"] * store[f"{prefix}.scale_tril"].norm(dim=-1)
            elif leaf == "loc" and f"{prefix}.cov_factor" in names:
                scales[name] = store[f"{prefix}.scale"] * (1 + store[f"{prefix}.cov_factor"].square().sum(-1)).sqrt()
            elif name.endswith("_loc") and name[:-4] + "_scale" in names:
                scales[name] = store[name[:-4] + "_scale"]
    return {name: value.expand(store[name].shape) for name, value in scales.items() if value.numel() == store[name].numel() or value.numel() == 1}


def load_unconstrained_(store, params: dict) -> None:
    """Write unconstrained values (e.g. :meth:`Stationarity.averaged`) into the param store, in place
    (the optimizer keeps its references)."""
    with torch.no_grad():
        for name, value in params.items():
            store[name].unconstrained().copy_(value)


class EarlyStopping:
    """Early stopping on a held-out split's ELBO with patience, keeping the best parameters.

    Use at each buffered read (or epoch end) after computing ``heldout_elbo`` on the held-out points::

        decision = stopper.check(step, heldout_elbo, params)   # params: unconstrained, device
        if decision: break
        load_unconstrained_(store, stopper.best_params)        # after the loop: restore the best

    Parameters
    ----------
    patience : int
        Checks without an improvement of more than ``min_delta`` (nats per point) before stopping.
    min_delta : float
        Smallest gain that counts as an improvement.
    """

    def __init__(self, *, patience: int = 5, min_delta: float = 0.0):
        self.patience, self.min_delta = patience, min_delta
        self.best_elbo, self.best_step, self.best_params = -math.inf, None, {}
        self.checks_since_best = 0
        self.stopped: Decision | None = None

    def check(self, step: int, heldout_elbo: float, params: dict) -> Decision | None:
        if self.stopped is not None:
            return self.stopped
        if heldout_elbo > self.best_elbo + self.min_delta:
            self.best_elbo, self.best_step, self.checks_since_best = float(heldout_elbo), step, 0
            self.best_params = {name: value.detach().clone() for name, value in params.items()}
        else:
            self.checks_since_best += 1
        if self.checks_since_best >= self.patience:
            self.stopped = Decision(step, f"converged at step {step + 1} (held-out ELBO {self.best_elbo:.4g} at step {self.best_step + 1} "
                                          f"not beaten in {self.patience} checks; best restored)")
        return self.stopped

    @property
    def converged(self) -> bool:
        return self.stopped is not None

    @property
    def status(self) -> str:
        if self.stopped is not None:
            return self.stopped.reason
        best = "" if self.best_step is None else f" (held-out ELBO still improving: best {self.best_elbo:.4g} at step {self.best_step + 1})"
        return f"{NOT_CONVERGED}{best}"

    def summary(self) -> dict:
        return {"converged": self.converged, "status": self.status, "stop_step": None if self.stopped is None else self.stopped.step + 1,
                "best_step": None if self.best_step is None else self.best_step + 1, "best_heldout_elbo": self.best_elbo,
                "reported": "best held-out checkpoint"}


def heldout_split(num_data: int, *, fraction: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_index, heldout_index)``: a seeded random ``fraction`` of the points held out (at least one)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_data, generator=generator)
    num_heldout = max(1, int(round(fraction * num_data)))
    return order[num_heldout:].sort().values, order[:num_heldout].sort().values


def default_threads(num_param_elements: int) -> int:
    """torch intra-op threads for a model with this many parameter elements: 1 for small models
    (thread hand-offs cost more than the work: a full-rank eight-schools step took 4.3 ms on 1 thread
    and 20.8 ms on 2), torch's default otherwise."""
    return 1 if num_param_elements < SMALL_MODEL_ELEMENTS else torch.get_num_threads()


SMALL_MODEL_ELEMENTS = 100_000


@contextlib.contextmanager
def threads_scope(threads: int):
    """torch's intra-op threads set to ``threads`` inside, restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
