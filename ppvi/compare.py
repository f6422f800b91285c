"""Comparing ELBO traces of several runs: one tidy DataFrame, final ELBOs, one seaborn figure (:mod:`ppvi.plots`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import rundir
from .plots import plot_traces  # re-exported: ppvi.plot_traces

__all__ = ["compare_runs", "final_elbo", "final_elbos", "plot_traces"]


def compare_runs(run_dirs) -> pd.DataFrame:
    """Stack the ELBO traces of several run directories into one tidy DataFrame.

    Columns: run (the folder name, or its path where names repeat), model, guide, estimator, restart, step,
    epoch, elbo, time_s.
    """
    frames = []
    run_dirs = [Path(run_dir) for run_dir in run_dirs]
    names = [run_dir.name for run_dir in run_dirs]
    if len(set(names)) < len(names):  # same folder name in different places: label by path
        names = [str(run_dir) for run_dir in run_dirs]
    for run_dir, label in zip(run_dirs, names):
        config = rundir.read_config(run_dir)
        trace = rundir.read_trace(run_dir)
        frames.append(
            trace.assign(
                run=label,
                model=Path(config["model"]).stem,
                guide=config["guide"],
                estimator=config.get("estimator", "?"),
            )
        )
    frame = pd.concat(frames, ignore_index=True)
    first = ["run", "model", "guide", "estimator"]
    return frame[first + [column for column in frame.columns if column not in first]]


def final_elbo(elbo: pd.Series) -> float:
    """The final ELBO of one restart: the median over the last tenth of its steps.

    One step is noisy, and heavy-tailed importance weights can throw single steps far off: a median
    is not moved by them. (``FitResult.restarts[r].final_elbo`` is the same number.)
    """
    tail = max(1, len(elbo) // 10)
    return float(elbo.iloc[-tail:].median())


def final_elbos(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per run of :func:`compare_runs`' frame: run, model, guide, estimator, steps and final_elbo.

    ``final_elbo`` is a list with :func:`final_elbo` of each restart, in restart order.
    """
    rows = []
    for (run, model, guide, estimator), group in frame.groupby(["run", "model", "guide", "estimator"], sort=False):
        finals = [final_elbo(restart["elbo"]) for _, restart in group.groupby("restart")]
        rows.append(dict(run=run, model=model, guide=guide, estimator=estimator, steps=int(group["step"].max()) + 1, final_elbo=finals))
    return pd.DataFrame(rows, columns=["run", "model", "guide", "estimator", "steps", "final_elbo"])
