"""Plots: ELBO traces (one run's restarts, several runs overlaid) and saving figures as PNG.

Nothing here calls ``matplotlib.use`` or touches pyplot's global state when writing files: figures
meant for files are bare :class:`matplotlib.figure.Figure` objects, which need no backend, so a
notebook that imports ppvi keeps showing its own figures. Functions that return axes for the user
(``ax=None``) draw on a new pyplot figure, as seaborn does, so that notebooks display them.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .rundir import PLOT, atomic_write

__all__ = ["clip_transients", "rolling_mean", "plot_traces", "trace_figure", "save_figure", "save_trace_plot"]


def rolling_mean(frame: pd.DataFrame, column: str, by, window: int) -> pd.Series:
    """Centred rolling mean of ``frame[column]`` over ``window`` rows, within each group of ``by``."""
    return frame.groupby(by)[column].transform(lambda s: s.rolling(window, center=True, min_periods=1).mean())


def clip_transients(ax, elbo: pd.Series) -> None:
    """Keep early transients from flattening the picture.

    When the lowest ELBO lies more than the upper range (5% quantile to maximum) below the 5%
    quantile, the y-axis is limited to that range, padded by 10% below and 5% above.
    """
    low, high = elbo.quantile([0.05, 1.0])
    if elbo.min() < low - (high - low):
        ax.set_ylim(low - 0.1 * (high - low), high + 0.05 * (high - low))


def plot_traces(frame: pd.DataFrame, *, ax=None, hue: str = "run", smooth: int = 1):
    """Overlay ELBO traces (one line per ``hue`` value, restarts as a band) and return the axes.

    Parameters
    ----------
    frame : DataFrame
        Columns ``step``, ``elbo``, ``restart`` and ``hue`` (as :func:`ppvi.compare.compare_runs` returns).
    ax : matplotlib axes, optional
        Where to draw; by default a new pyplot figure (shown in notebooks).
    hue : str
        The column whose values get one line each.
    smooth : int
        Above 1: a centred rolling mean of that many steps per ``hue`` value and restart.
    """
    import seaborn as sns

    if smooth > 1:
        frame = frame.assign(elbo=rolling_mean(frame, "elbo", [hue, "restart"], smooth))
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    sns.lineplot(data=frame, x="step", y="elbo", hue=hue, errorbar=("pi", 100), ax=ax, linewidth=0.9)
    clip_transients(ax, frame["elbo"])
    ax.set(xlabel="step", ylabel="ELBO")
    return ax


def trace_figure(trace: pd.DataFrame, title: str):
    """One run's ELBO against the step, one line per restart, as a bare Figure (no pyplot state).

    The per-step values are drawn faintly; over them a centred rolling mean of about a fiftieth of
    each restart's steps shows the trend under the per-step Monte Carlo noise.
    """
    import seaborn as sns
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.5), layout="constrained")
    axes = figure.subplots()
    frame = trace.assign(restart=trace["restart"].astype(str))
    window = max(1, len(frame) // (50 * frame["restart"].nunique()))
    frame["smoothed"] = rolling_mean(frame, "elbo", "restart", window)
    hue = "restart" if frame["restart"].nunique() > 1 else None
    sns.lineplot(data=frame, x="step", y="elbo", hue=hue, ax=axes, linewidth=0.6, alpha=0.35, legend=False)
    if window > 1:
        sns.lineplot(data=frame, x="step", y="smoothed", hue=hue, ax=axes, linewidth=1.4)
    clip_transients(axes, frame["elbo"])
    axes.set(title=title, xlabel="step", ylabel="ELBO")
    return figure


def save_figure(figure, path, *, dpi: int = 110) -> None:
    """Write a Figure (or the Figure of an Axes) to ``path`` as PNG, atomically.

    A figure that pyplot manages (made by ``plt.subplots``) is closed afterwards, so that saving
    many does not accumulate open figures; a bare Figure needs no closing.
    """
    if not _is_figure(figure):
        figure = figure.figure  # an Axes
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=dpi))
    finally:
        if getattr(figure.canvas, "manager", None) is not None:  # a pyplot figure
            import matplotlib.pyplot as plt

            plt.close(figure)


def _is_figure(figure) -> bool:
    from matplotlib.figure import Figure

    return isinstance(figure, Figure)


def save_trace_plot(run_dir, trace: pd.DataFrame, title: str) -> None:
    """Save a run directory's elbo.png: :func:`trace_figure` of its trace."""
    save_figure(trace_figure(trace, title), Path(run_dir) / PLOT)
