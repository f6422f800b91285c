"""Comparing ELBO traces of several runs: one tidy DataFrame, one seaborn figure."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import rundir

__all__ = ["compare_runs", "plot_traces"]


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


def plot_traces(frame: pd.DataFrame, *, ax=None, hue: str = "run", smooth: int = 1):
    """Overlay ELBO traces (one line per ``hue`` value, restarts as a band) and return the axes.

    ``smooth`` > 1 applies a centred rolling mean of that many steps per run and restart.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    if smooth > 1:
        frame = frame.assign(
            elbo=frame.groupby([hue, "restart"])["elbo"].transform(lambda s: s.rolling(smooth, center=True, min_periods=1).mean())
        )
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    sns.lineplot(data=frame, x="step", y="elbo", hue=hue, errorbar=("pi", 100), ax=ax, linewidth=0.9)
    low, high = frame["elbo"].quantile([0.05, 1.0])
    if frame["elbo"].min() < low - (high - low):
        ax.set_ylim(low - 0.1 * (high - low), high + 0.05 * (high - low))
    ax.set(xlabel="step", ylabel="ELBO")
    return ax
