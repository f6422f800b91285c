"""Knowing when a fit has converged: stationarity, iterate averaging and learning-rate cuts; held-out early stopping.

Stochastic optimisation for VI does not converge to a point: with a fixed step
size the iterates settle into a stationary cloud around the optimum, and the
Polyak-Ruppert average of the cloud estimates the optimum much better than the
last iterate, with a Monte Carlo standard error (MCSE) that says how well
(Dhaka et al. 2020). :class:`Stationarity` detects the cloud (the ELBO no longer
rises, or R-hat over windows of the iterates), averages it, and stops once the
average is precise in units of q's own scale and cutting the learning rate no
longer moves it (the accuracy-gain idea of RAABBVI, Welandawe et al. 2022);
otherwise it cuts the learning rate and goes on from the average. It is device
resident: :meth:`Stationarity.observe` only copies iterates into a device buffer
and adds to a device running sum; :meth:`Stationarity.check`, called at the
loop's buffered reads, reads them back once.

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
from scipy import stats

import pyro

__all__ = [
    "Decision", "Stationarity", "EarlyStopping", "split_rhat", "linear_trend", "mcse_of_mean", "q_scales", "default_threads", "threads_scope",
    "heldout_split", "load_unconstrained_", "fixed_budget_summary", "elbo_trend",
]

TREND_BATCHES = 8  # batch means for the trend test (6 degrees of freedom)
TREND_WINDOW = 100  # fewest steps a fixed budget's end is judged over
NOT_CONVERGED = "not converged within the budget: raise --max-steps"


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


def linear_trend(iterates: np.ndarray, batches: int = TREND_BATCHES) -> tuple[np.ndarray, np.ndarray]:
    """``(change, se)`` per coordinate of ``iterates`` (T, D): the rise over the T steps of the least-squares line
    through the means of ``batches`` consecutive batches, and its standard error from those means' residuals
    (``batches - 2`` degrees of freedom). Batch means make the error honest for autocorrelated iterates: a slow
    wander moves the batch means about and widens the error, where a steady drift lines them up."""
    size = iterates.shape[0] // batches
    means = iterates[-size * batches :].reshape(batches, size, -1).mean(axis=1)
    time = np.arange(batches) - (batches - 1) / 2
    centred = means - means.mean(axis=0)
    slope = time @ centred / (time @ time)
    residuals = centred - np.outer(time, slope)
    se_slope = np.sqrt((residuals**2).sum(axis=0) / (batches - 2) / (time @ time))
    return slope * batches, se_slope * batches


class Stationarity:
    """Stop a fit once the average of its stationary iterates is precise and no longer moves when the step shrinks.

    The rule, after Dhaka et al. (2020) and Welandawe et al. (2022, RAABBVI), runs in phases at a fixed
    Adam learning rate:

    1. **Stationary?** At each buffered read, every coordinate of the iterates must be settled over a
       window of the last 50-95% of the phase: its split R-hat over 4 sub-windows is below
       ``rhat_threshold`` (Dhaka et al.), or its linear trend is not significant (see
       :func:`linear_trend`), or it moved less than ``drift_tolerance`` of its scale. In the first phase
       a flat ELBO is also enough (the mean of the last quarter of the history is within twice its MCSE of
       the quarter before), to leave the start's transient at a large learning rate quickly; later phases
       start from an average after a cut and must settle, so that a slow drift the cut left is waited out.
    2. **Average** (Polyak-Ruppert) the iterates from there on, with their MCSE (where an ESS under 10 is not
       to be trusted, the iterates' own sd bounds it).
    3. **Cut and compare.** Once every coordinate's MCSE is below ``mcse_threshold`` of its scale, or would
       need more than ``phase_length`` windows of iterates to get there, cut the learning rate by ``shrink``
       and restart from the average (RAABBVI): Adam's stationary spread shrinks with its step. **Stop**
       when two phases in a row are precise and their averages differ by no more than
       ``change_threshold`` of the scale beyond what their MCSEs explain: a smaller step no longer changes
       the answer (RAABBVI's accuracy-gain idea, with q's scale as the yardstick).

    The scale of a coordinate is q's sd for a location (see :func:`q_scales`) and ``unscaled`` (1) for
    everything else, in its unconstrained units: a log-scale's MCSE must be under 0.1 (q's sd known within
    10%); a point parameter's or a network weight's under 0.1 of its own units, which is why a model
    whose point parameters need more (ppca) keeps a fixed schedule.

    Use::

        monitor = Stationarity(params, optimizer=optimizer)   # dict name -> unconstrained tensor (the optimizer's)
        for step in range(max_steps):
            ...optimizer step...
            monitor.observe(step, params)                      # device ops only, no sync
            if (step + 1) % SYNC_EVERY == 0 and monitor.check(step):
                break
        averaged, mcse = monitor.averaged()                    # the last phase's average, its MCSE
    """

    def __init__(
        self,
        params: dict,
        *,
        optimizer=None,
        rhat_threshold: float = 1.1,
        drift_tolerance: float = 0.1,
        mcse_threshold: float = 0.1,
        change_threshold: float = 0.1,
        min_window: int = 100,
        phase_length: int = 2,
        shrink: float = 0.5,
        max_phases: int = 12,
        capacity: int = 1000,
        max_tracked: int = 4096,
        scale_fn=None,
        unscaled: float = 1.0,
        seed: int = 0,
    ):
        self.params, self.optimizer = params, optimizer
        self.names = list(params)
        self.shapes = {name: value.shape for name, value in params.items()}
        self.offsets = np.cumsum([0, *[value.numel() for value in params.values()]])
        first = next(iter(params.values()))
        total = int(self.offsets[-1])
        generator = torch.Generator().manual_seed(seed)
        self.tracked = None if total <= max_tracked else torch.randperm(total, generator=generator)[:max_tracked].sort().values.to(first.device)
        self.buffer = torch.zeros(capacity, min(total, max_tracked), dtype=first.dtype, device=first.device)
        self.rhat_threshold, self.drift_tolerance = rhat_threshold, drift_tolerance
        self.mcse_threshold, self.change_threshold = mcse_threshold, change_threshold
        self.min_window, self.phase_length, self.shrink, self.max_phases, self.scale_fn = min_window, phase_length, shrink, max_phases, scale_fn
        self.unscaled = unscaled
        self.lr = optimizer.param_groups[0]["lr"] if optimizer is not None else None
        self.phase = 0
        self.previous: tuple | None = None  # (average, MCSE, precise?) of the tracked coordinates in the previous phase
        self.stopped: Decision | None = None
        self.last_rhat = self.last_mcse = self.last_change = math.inf
        self.last_step = -1
        self.sum = {name: torch.zeros_like(value) for name, value in params.items()}
        self._new_phase()

    def _new_phase(self) -> None:
        self.count, self.thin = 0, 1  # rows of the buffer in use; keep every thin-th iterate
        self.buffer_steps = np.full(self.buffer.shape[0], -1)
        self.stationary_step: int | None = None  # first step averaged in this phase
        self.num_averaged = 0
        self.elbos: list[float] = []
        for value in self.sum.values():
            value.zero_()

    def observe(self, step: int, params: dict | None = None) -> None:
        """Record the iterate after ``step``: device copies and adds only (no host sync).

        The buffer keeps the phase's history, thinned: when it is full, every other row is dropped and
        the thinning doubles, so R-hat's windows can grow with the fit at a fixed memory cost.
        """
        params = params if params is not None else self.params
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

    def check(self, step: int, rows=None) -> Decision | None:
        """At a buffered read: detect stationarity, then stop, or shrink the learning rate and start a new phase.

        ``rows`` (the trace rows read back at this sync, a DataFrame with an ``elbo`` column) gain an ``lr`` column:
        the learning rate they were run at.
        """
        if rows is not None:
            rows["lr"] = self.lr
            self.elbos.extend(rows["elbo"].to_numpy(dtype=float).tolist())
        if self.stopped is not None:
            return self.stopped
        scales = self._scales()
        if self.stationary_step is None:
            self._check_stationary(step, scales)
            return None
        recent = self._recent(self.stationary_step)
        if len(recent) < self._window() // 2:
            return None
        mcse, ess = self._mcse(recent)
        mean = self._average_tracked()
        self.last_mcse = float(np.max(mcse / scales))
        if self.previous is not None:  # the change since the last phase, less what the two averages' noise explains
            noise = 2 * np.sqrt(mcse**2 + self.previous[1] ** 2)
            self.last_change = float(np.max((np.abs(mean - self.previous[0]) - noise) / scales))
        precise = self.last_mcse < self.mcse_threshold
        can_cut = self.optimizer is not None and self.phase < self.max_phases
        agrees = self.previous is not None and self.previous[2] and self.last_change < self.change_threshold
        if precise and (agrees or not can_cut):  # (no optimizer to cut: Dhaka et al.'s rule alone)
            since = "" if self.previous is None else f", moved {max(self.last_change, 0.0):.3f} scales beyond noise since the last cut"
            self.stopped = Decision(step, f"converged at step {step + 1} (stationary from step {self.stationary_step}{self._lr_words()}; "
                                          f"average of {self.num_averaged} iterates: MCSE/scale {self.last_mcse:.3f}{since})")
        elif (precise or self._hopeless()) and can_cut:
            self._shrink_step(mean, mcse, precise)
        return self.stopped

    def _hopeless(self) -> bool:
        """Time to shrink the step: at this MCSE, the average would need more than ``phase_length`` windows of
        iterates in all (MCSE falls as 1 / sqrt(iterates)), or it already has them."""
        needed = self.num_averaged * (self.last_mcse / self.mcse_threshold) ** 2
        return self.num_averaged >= self._window() and needed > self.phase_length * self._window()

    @staticmethod
    def _mcse(recent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(mcse, ess)`` of the mean of ``recent`` iterates (thinning an autocorrelated series loses little ESS:
        this errs safe). Where the ESS is under 10 its estimate is not trusted and the iterates' own sd stands
        in: the variance of a mean of correlated draws is never above the draws' variance."""
        ess, _ = mcse_of_mean(recent)
        sd = recent.std(axis=0, ddof=1)
        return np.where(ess >= 10, sd / np.sqrt(ess), sd), ess

    def _window(self) -> int:
        """Fewest iterates for a phase's windows: ``min_window``, divided by the learning rate's cuts so far (Adam's
        time constants grow as its step shrinks: a drift left after a cut is as slow as the step is small)."""
        return int(round(self.min_window / self.shrink**self.phase)) if self.phase else self.min_window

    def _check_stationary(self, step: int, scales: np.ndarray) -> None:
        """Stationary when, over some window of the last 50-95% of the phase's iterates, every coordinate is settled:
        its split R-hat is below ``rhat_threshold`` (Dhaka et al.), or its linear trend across the window is not
        significant (:func:`linear_trend` over 8 batch means, a two-sided 5% t-test Bonferroni-corrected over
        the D coordinates), or it moves less than ``drift_tolerance`` of its scale. At the large learning
        rates a fixed-step start needs, Adam's iterates wander slowly around the optimum, and R-hat over
        windows shorter than that wander calls the cloud non-stationary long after it is; the trend test
        lets a wander through and still stops a slow, steady drift (a concentration still growing)."""
        upper = int(0.95 * self.count)
        lower = max(self._window(), self.count // 2)
        if upper < lower:
            return
        iterates = self._recent()
        critical = float(stats.t.ppf(1 - 0.025 / iterates.shape[1], TREND_BATCHES - 2))  # two-sided 5%, Bonferroni over coordinates
        worst = []
        for window in np.unique(np.linspace(lower, upper, num=3).astype(int)):
            recent = iterates[-window:]
            rhat = split_rhat(recent)
            trend, se = linear_trend(recent)
            unsettled = (rhat >= self.rhat_threshold) & (np.abs(trend) >= critical * se) & (np.abs(trend) >= self.drift_tolerance * scales)
            if not unsettled.any():
                self.last_rhat, self.stationary_step = float(np.max(rhat)), step + 1  # average from the next iterate on
                return
            worst.append(float(np.max(rhat[unsettled])))
        self.last_rhat = min(worst)  # the most stationary window's worst unsettled coordinate
        if self.phase == 0 and self._elbo_flat():  # out of the start's transient; later phases must settle
            self.stationary_step = step + 1

    def _elbo_flat(self) -> bool:
        """The ELBO has stopped rising: over the last half of the history (at least ``min_window`` steps), the
        trend of its 8 batch means (:func:`linear_trend`) is not significantly positive (one-sided 5% t-test).
        Batch means keep the test honest for an autocorrelated trace, and a steady rise, however noisy
        step to step, lines them up. At a large learning rate the iterates wander slowly around the optimum
        (a long autocorrelation), and R-hat over windows shorter than that wander calls the cloud
        non-stationary long after the ELBO is flat."""
        length = max(self.min_window, len(self.elbos) // 2)
        return len(self.elbos) >= length and not elbo_trend(self.elbos[-length:])[2]

    def _shrink_step(self, mean: np.ndarray, mcse: np.ndarray, precise: bool) -> None:
        """Cut the learning rate and restart from the average (RAABBVI): a new phase."""
        load_unconstrained_(None, self._average_all(), params=self.params)
        self.previous = (mean, mcse, precise)
        self.lr *= self.shrink
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.phase += 1
        self._new_phase()

    def _average_all(self) -> dict:
        return {name: self.sum[name] / self.num_averaged for name in self.names}

    def _average_tracked(self) -> np.ndarray:
        flat = torch.cat([self.sum[name].reshape(-1) for name in self.names]) / self.num_averaged
        return (flat if self.tracked is None else flat[self.tracked]).double().cpu().numpy()

    def _scales(self) -> np.ndarray:
        """The scale of each tracked coordinate its MCSE and drift are divided by (1 where none is known)."""
        scales = np.full(int(self.offsets[-1]), self.unscaled)
        if self.scale_fn is not None:
            for name, scale in self.scale_fn().items():
                if name in self.names:
                    index = self.names.index(name)
                    scales[self.offsets[index] : self.offsets[index + 1]] = scale.detach().reshape(-1).cpu().double().numpy()
        return scales if self.tracked is None else scales[self.tracked.cpu().numpy()]

    def averaged(self) -> tuple[dict, dict]:
        """``(params, mcse)``: the Polyak-Ruppert average of this phase's iterates since stationarity (unconstrained,
        on device) and each coordinate's MCSE (numpy, tracked coordinates only; NaN where untracked).

        Before stationarity there is no average: ``({}, {})``, and the last iterate stands.
        """
        if not self.num_averaged:
            return {}, {}
        recent = self._recent(self.stationary_step)
        full = np.full(int(self.offsets[-1]), np.nan)
        if len(recent) > 3:
            full[slice(None) if self.tracked is None else self.tracked.cpu().numpy()] = self._mcse(recent)[0]
        return self._average_all(), {name: full[self.offsets[i] : self.offsets[i + 1]].reshape(self.shapes[name]) for i, name in enumerate(self.names)}

    @property
    def status(self) -> str:
        """One line for the restart's log and config.json."""
        if self.stopped is not None:
            return self.stopped.reason
        lr = self._lr_words()
        if self.stationary_step is not None:
            return (f"{NOT_CONVERGED} or --num-particles, which quietens the gradient noise that limits the average "
                    f"(stationary from step {self.stationary_step}{lr}, but MCSE/scale of the average is "
                    f"{self.last_mcse:.3g} (< {self.mcse_threshold} needed) and it moved {self.last_change:.3g} scales since the last phase)")
        return (f"{NOT_CONVERGED}; the iterates still drift one way, a larger --lr gets there sooner "
                f"(not stationary{lr}: largest window R-hat {self.last_rhat:.3g} >= {self.rhat_threshold})")

    def _lr_words(self) -> str:
        return "" if self.lr is None else f" at lr {self.lr:.3g}" + (f" (cut {self.phase}x by {self.shrink})" if self.phase else "")

    @property
    def converged(self) -> bool:
        return self.stopped is not None

    _STATE = ("phase", "lr", "count", "thin", "stationary_step", "num_averaged", "elbos", "last_rhat", "last_mcse", "last_change", "last_step")

    def state_dict(self) -> dict:
        """What ``--resume`` needs to go on where the rule was (tensors and plain values: params.pt loads weights_only)."""
        state = {name: getattr(self, name) for name in self._STATE} | {"elbos": list(self.elbos)}  # copies: the rule goes on
        state.update(buffer=self.buffer[: self.count].clone(), buffer_steps=torch.tensor(self.buffer_steps[: self.count]),
                     sum={name: value.clone() for name, value in self.sum.items()}, stopped=None if self.stopped is None else
                     [self.stopped.step, self.stopped.reason], previous=None if self.previous is None else
                     [torch.as_tensor(self.previous[0]), torch.as_tensor(self.previous[1]), bool(self.previous[2])])
        return state

    def load_state_dict(self, state: dict) -> None:
        for name in self._STATE:
            setattr(self, name, state[name])
        self.buffer[: self.count] = state["buffer"].to(self.buffer.device)
        self.buffer_steps[: self.count] = state["buffer_steps"].numpy()
        for name, value in state["sum"].items():
            self.sum[name].copy_(value)
        self.stopped = None if state["stopped"] is None else Decision(*state["stopped"])
        self.previous = None if state["previous"] is None else (state["previous"][0].numpy(), state["previous"][1].numpy(), state["previous"][2])

    def summary(self) -> dict:
        """Plain data for config.json and FitResult."""
        return {
            "converged": self.converged,
            "status": self.status,
            "stop_step": None if self.stopped is None else self.stopped.step + 1,
            "stationary_step": self.stationary_step,
            "rhat": self.last_rhat,
            "mcse_over_scale": self.last_mcse,
            "change_over_scale": self.last_change,
            "final_lr": self.lr,
            "lr_halvings": self.phase,
            "num_averaged": self.num_averaged,
            "reported": "iterate average" if self.num_averaged else "last iterate",
        }


def elbo_trend(elbo) -> tuple[float, float, bool]:
    """``(rise, se, significant)`` of an ELBO trace: the rise over it of the line through its 8 batch means
    (:func:`linear_trend`), its standard error, and whether it is significantly positive (one-sided 5% t-test).
    Batch means keep the test honest for an autocorrelated trace; a steady rise, however noisy, lines them up."""
    trend, se = (float(value[0]) for value in linear_trend(np.asarray(elbo, dtype=float)[:, None]))
    return trend, se, trend > stats.t.ppf(0.95, TREND_BATCHES - 2) * se


def fixed_budget_summary(elbo: np.ndarray, *, min_rise: float = 0.1, budget_option: str = "--steps") -> dict:
    """How a fixed budget (``--steps``, ``--epochs`` or a model file's schedule) ended, from its ELBO trace alone:
    is the ELBO still rising over the last quarter of the steps (at least ``TREND_WINDOW``)? Rising means the
    trend of 8 batch means is significantly positive (one-sided 5% t-test, honest for an autocorrelated trace)
    and larger than ``min_rise`` nats (a KL gain of 0.1 nats is one Gaussian mean moving 0.45 sd). No stopping
    rule ran, so a flat ELBO is necessary, not sufficient: ``converged`` is None, never True."""
    window = min(len(elbo), max(TREND_WINDOW, len(elbo) // 4))
    if window < 2 * TREND_BATCHES:
        return {"converged": None, "rule": "fixed budget", "elbo_rising": None, "status": f"fixed budget of {len(elbo)} steps: too few to judge"}
    trend, se, significant = elbo_trend(elbo[-window:])
    rising = significant and trend > min_rise
    words = (f"the ELBO is still rising over the last {window} steps ({trend:+.3g} +- {se:.2g} nats): raise {budget_option}, or leave the "
             "budget out and let the stopping rule decide" if rising else
             f"the ELBO is flat over the last {window} steps ({trend:+.3g} +- {se:.2g} nats); no stopping rule ran, so that is all that is known")
    return {"converged": None, "rule": "fixed budget", "elbo_rising": bool(rising), "elbo_trend": trend, "elbo_trend_se": se,
            "status": f"fixed budget of {len(elbo)} steps: {words}"}


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


def load_unconstrained_(store, values: dict, params: dict | None = None) -> None:
    """Write unconstrained ``values`` (e.g. :meth:`Stationarity.averaged`) in place into the param store's
    parameters, or into ``params`` (name -> the unconstrained tensors), so the optimizer keeps its references."""
    with torch.no_grad():
        for name, value in values.items():
            (params[name] if params is not None else store[name].unconstrained()).copy_(value)


class EarlyStopping:
    """Early stopping on a held-out split's ELBO with patience, keeping the best parameters (as Keras'
    ``EarlyStopping(restore_best_weights=True)`` and Lightning's callback do).

    The loop calls :meth:`check` at its buffered reads; once a full epoch has passed since the last
    evaluation, ``evaluate()`` (the held-out ELBO per point, under fixed random numbers so successive
    evaluations differ by the parameters only) is compared with the best so far. ``patience`` evaluations
    without a gain of more than ``min_delta`` nats per point stop the fit; :meth:`averaged` then gives the
    best parameters, which the fit restores and reports.

    Parameters
    ----------
    params : dict of str to Tensor
        The unconstrained parameters the optimizer moves (copied at each new best).
    evaluate : callable, optional
        ``evaluate() -> float``, the held-out ELBO per point; without it, call :meth:`update` yourself.
    epoch_of : callable, optional
        ``epoch_of(step) -> int``: evaluate once per epoch (default: at every check).
    """

    def __init__(self, params: dict | None = None, *, evaluate=None, epoch_of=None, patience: int = 5, min_delta: float = 0.0):
        self.params, self.evaluate, self.epoch_of = params or {}, evaluate, epoch_of
        self.patience, self.min_delta = patience, min_delta
        self.best_elbo, self.best_step, self.best_params = -math.inf, None, {}
        self.checks_since_best = 0
        self.last_epoch = 0
        self.lr = None  # not this rule's business: the learning rate stays the model's
        self.stopped: Decision | None = None

    def check(self, step: int, rows=None) -> Decision | None:
        """At a buffered read: evaluate the held-out ELBO once an epoch has passed (recorded in ``rows``'s
        last row as ``heldout_elbo``) and stop after ``patience`` evaluations without a gain."""
        epoch = self.epoch_of(step + 1) if self.epoch_of is not None else step + 1
        if self.stopped is not None or self.evaluate is None or epoch <= self.last_epoch:
            return self.stopped
        self.last_epoch = epoch
        value = float(self.evaluate())
        if rows is not None:
            rows.loc[rows.index[-1], "heldout_elbo"] = value
        return self.update(step, value, self.params)

    def update(self, step: int, heldout_elbo: float, params: dict) -> Decision | None:
        """Take one held-out ELBO for the parameters after ``step``."""
        if self.stopped is not None:
            return self.stopped
        if heldout_elbo > self.best_elbo + self.min_delta:
            self.best_elbo, self.best_step, self.checks_since_best = float(heldout_elbo), step, 0
            self.best_params = {name: value.detach().clone() for name, value in params.items()}
        else:
            self.checks_since_best += 1
        if self.checks_since_best >= self.patience:
            self.stopped = Decision(step, f"converged at step {step + 1} (held-out ELBO {self.best_elbo:.4g} per point at step "
                                          f"{self.best_step + 1}, not beaten in {self.patience} evaluations; best restored)")
        return self.stopped

    def observe(self, step: int, params: dict | None = None) -> None:
        """Nothing to record per step: this rule looks at the held-out ELBO only."""

    def averaged(self) -> tuple[dict, dict]:
        """``(best parameters, {})``: what the fit restores and reports (no MCSE: one checkpoint, not an average)."""
        return self.best_params, {}

    @property
    def converged(self) -> bool:
        return self.stopped is not None

    @property
    def status(self) -> str:
        if self.stopped is not None:
            return self.stopped.reason
        best = "" if self.best_step is None else f" (held-out ELBO still improving: best {self.best_elbo:.4g} per point at step {self.best_step + 1}, restored)"
        return f"{NOT_CONVERGED}{best}"

    def state_dict(self) -> dict:
        """What ``--resume`` needs: the best evaluation and parameters so far, the patience spent, the last epoch."""
        return {"best_elbo": self.best_elbo, "best_step": self.best_step, "checks_since_best": self.checks_since_best,
                "last_epoch": self.last_epoch, "best_params": {name: value.clone() for name, value in self.best_params.items()},
                "stopped": None if self.stopped is None else [self.stopped.step, self.stopped.reason]}

    def load_state_dict(self, state: dict) -> None:
        self.best_elbo, self.best_step, self.checks_since_best = state["best_elbo"], state["best_step"], state["checks_since_best"]
        self.last_epoch, self.best_params = state["last_epoch"], dict(state["best_params"])
        self.stopped = None if state["stopped"] is None else Decision(*state["stopped"])

    def summary(self) -> dict:
        return {"converged": self.converged, "status": self.status, "stop_step": None if self.stopped is None else self.stopped.step + 1,
                "best_step": None if self.best_step is None else self.best_step + 1, "best_heldout_elbo": self.best_elbo,
                "reported": "best held-out checkpoint" if self.best_params else "last iterate"}


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
