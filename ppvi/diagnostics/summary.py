"""ArviZ's summary table of the posterior group, with PSIS-corrected means where k-hat trusts them."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .arviz_util import az, quiet
from .psis import PsisReport, trusted

__all__ = ["summarize"]


def summarize(idata, psis: PsisReport | None = None) -> pd.DataFrame:
    """``az.summary`` of the posterior, with a ``psis_mean`` column (PSIS-corrected mean) beside ``mean``.

    The column is there only where k-hat's verdict says the correction can be trusted (good or
    usable with care); an empty posterior (every latent site local and left out) gives an empty table.
    """
    if "posterior" not in idata.groups() or not idata.posterior.data_vars:
        return pd.DataFrame()
    stat_funcs = None
    if trusted(psis):
        weights = np.exp(psis.log_weights).reshape(-1)  # chain-major, as ArviZ ravels (chain, draw)
        stat_funcs = {"psis_mean": lambda values: float(np.dot(weights, values))}
    with quiet():
        frame = az.summary(idata, round_to="none", stat_funcs=stat_funcs, extend=True)
    if "psis_mean" in frame.columns:
        columns = [c for c in frame.columns if c != "psis_mean"]
        columns.insert(columns.index("mean") + 1, "psis_mean")
        frame = frame[columns]
    return frame
