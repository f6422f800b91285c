"""PSIS-LOO of the guide's draws (Vehtari, Gelman & Gabry 2017), plain and corrected for q (Magnusson et al. 2019)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .arviz_util import az, quiet
from .psis import KHAT_USABLE, MIN_PSIS_DRAWS

__all__ = ["LooReport", "loo_report"]


@dataclass(frozen=True)
class LooReport:
    """PSIS-LOO of the guide's draws: ``az.loo`` as if they were posterior draws, and corrected for q.

    The corrected estimate weighs draw s for observation i by
    ``p(theta_s | x) / (q(theta_s) p(x_i | theta_s))`` (Magnusson, Andersen, Jonasson & Vehtari
    2019, section 3), smoothed by ``az.psislw``; it stays sound where q's tails are heavier than the
    posterior's, which sends ``az.loo``'s ratios ``1 / p(x_i | theta_s)`` out of control.
    """

    var_name: str
    elpd_loo: float  # az.loo
    se: float
    p_loo: float
    num_points: int
    num_high_k: int  # observations with Pareto k > 0.7 in az.loo
    max_k: float
    elpd_loo_corrected: float  # with the p / q correction
    se_corrected: float
    max_k_corrected: float
    note: str


def _corrected_loo(idata, name: str) -> tuple[float, float, float]:
    from scipy.special import logsumexp

    log_lik = idata.log_likelihood[name].stack(__sample__=("chain", "draw")).astype(np.float64)
    stats = idata.sample_stats.stack(__sample__=("chain", "draw")).astype(np.float64)
    log_ratio = stats["log_p"] - stats["log_q"] - log_lik  # log p(theta | x) / (q(theta) p(x_i | theta)) + const
    with quiet():
        log_weights, pareto_k = az.psislw(log_ratio.transpose(..., "__sample__"), reff=1.0)
    log_lik = log_lik.transpose(..., "__sample__").values
    elpd_i = logsumexp(log_weights.values + log_lik, axis=-1)  # weights are normalised over the draws
    return float(elpd_i.sum()), float(np.sqrt(elpd_i.size * np.var(elpd_i))), float(np.max(pareto_k.values))


def _why_not(idata, names: list) -> str | None:
    point_sites = idata.sample_stats.attrs.get("ppvi_point_estimate_sites", "")
    if point_sites:
        return f"not applicable: the guide is a point estimate at {point_sites}, so there are no posterior draws to leave one out of"
    if idata.sample_stats.sizes["draw"] < MIN_PSIS_DRAWS:
        return f"not computed: PSIS needs at least {MIN_PSIS_DRAWS} draws per restart (--num-samples)"
    if len(names) != 1:
        return "not computed: " + ("no observed site has a per-observation log-likelihood" if not names else f"several observed sites ({', '.join(names)})")
    return None


def loo_report(idata) -> LooReport:
    """PSIS-LOO of the one observed site with a per-observation log-likelihood (NaNs and a note where there is none)."""
    names = []
    if "log_likelihood" in idata.groups():
        names = [name for name, array in idata.log_likelihood.data_vars.items() if set(array.dims) - {"chain", "draw"}]
    reason = _why_not(idata, names)
    if reason is not None:
        nan = math.nan
        return LooReport(names[0] if len(names) == 1 else "", nan, nan, nan, 0, 0, nan, nan, nan, nan, reason)
    with quiet():
        elpd = az.loo(idata, pointwise=True, var_name=names[0], reff=1.0)
    pareto_k = np.asarray(elpd.pareto_k)
    high = int((pareto_k > KHAT_USABLE).sum())
    corrected = _corrected_loo(idata, names[0])
    note = "every observation's Pareto k <= 0.7" if not high else f"{high} observation(s) with Pareto k > 0.7 in az.loo: its estimate is unreliable"
    if corrected[2] > KHAT_USABLE:
        note += f"; the q-corrected estimate has observation(s) with Pareto k > 0.7 (max {corrected[2]:.2f})"
    return LooReport(names[0], float(elpd.elpd_loo), float(elpd.se), float(elpd.p_loo), int(pareto_k.size), high, float(pareto_k.max()), *corrected, note)
