"""R-hat and bulk ESS across restarts (Vehtari, Gelman, Simpson, Carpenter & Buerkner 2021).

Restarts are the chains: draws within a restart are independent, so R-hat > 1.01 means the
restarts' guides disagree (different modes, or an unfinished fit).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .arviz_util import az, quiet

__all__ = ["RHAT_MAX", "RestartAgreement", "restart_agreement"]

RHAT_MAX = 1.01  # Vehtari et al. (2021)


@dataclass(frozen=True)
class RestartAgreement:
    """R-hat and bulk ESS per parameter element, with restarts as chains."""

    rhat: pd.Series
    ess_bulk: pd.Series
    flagged: tuple  # labels whose restarts disagree
    note: str


def _flatten(dataset) -> pd.Series:
    """One value per scalar element, labelled as ArviZ's summary labels rows (``locs[0, 1]``)."""
    values = {}
    for name, array in dataset.data_vars.items():
        if array.ndim == 0:
            values[name] = float(array.values)
            continue
        for index in np.ndindex(array.shape):
            coords = ", ".join(str(array.coords[dim].values[i]) if dim in array.coords else str(i) for dim, i in zip(array.dims, index))
            values[f"{name}[{coords}]"] = float(array.values[index])
    return pd.Series(values, dtype=float)


def restart_agreement(idata) -> RestartAgreement:
    """R-hat > 1.01 across restarts flags parameters where the restarts disagree (different modes?)."""
    chains = idata.sample_stats.sizes["chain"]
    empty = pd.Series(dtype=float)
    if chains < 2:
        return RestartAgreement(empty, empty, (), "one restart: R-hat across restarts needs 2 or more (--restarts)")
    if "posterior" not in idata.groups() or not idata.posterior.data_vars:
        return RestartAgreement(empty, empty, (), "no global latent sites in the posterior table to compare")
    with quiet():
        rhat = _flatten(az.rhat(idata))
        ess = _flatten(az.ess(idata))
    means = idata.posterior.mean("draw")
    spread = _flatten(means.max("chain") - means.min("chain"))
    undefined = rhat.isna() & (spread > 1e-6 * (1.0 + _flatten(abs(idata.posterior.mean(("chain", "draw"))))))
    flagged = tuple(rhat.index[(rhat > RHAT_MAX) | undefined])
    if flagged:
        note = f"restarts disagree (different modes?) at {len(flagged)} of {len(rhat)} parameter(s): R-hat > {RHAT_MAX}"
    else:
        note = f"restarts agree: every R-hat <= {RHAT_MAX}"
    if rhat.isna().any():
        note += "; R-hat is undefined where draws do not vary (point estimates): those are compared by their values"
    return RestartAgreement(rhat, ess, flagged, note)
