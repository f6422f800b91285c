"""The lecture's worked example of gradient estimators (score function against pathwise), reproduced by autograd.

Take ``z ~ N(theta, 1)`` and ``f(z) = z**2``, so ``E[f(z)] = theta**2 + 1`` and its gradient in theta is
``2 * theta`` (4 at theta = 2). Two single-sample estimators of that gradient:

* score function (REINFORCE, Williams 1992): ``f(z) * d/dtheta log N(z; theta, 1) = z**2 (z - theta)``,
  variance ``theta**4 + 14 theta**2 + 15``, 87 at theta = 2;
* pathwise (reparameterization, Kingma & Welling 2014): ``z = theta + eps``, ``d/dtheta f(theta + eps) = 2 z``,
  variance 4.

An N-sample estimate averages N single-sample ones, so its variance is the single-sample variance over N:
87/N against 4/N at theta = 2: the same 1/N slope, a constant factor of ~22 apart. :func:`worked_example` measures
both by differentiating the usual surrogates through ``torch.distributions`` (not by evaluating the formulas above).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import torch
from torch.distributions import Normal

from .pyro_util import finite, positive

__all__ = ["format_table", "pathwise_variance", "plot_worked_example", "score_variance", "worked_example"]

ESTIMATORS = ("score", "pathwise")
_CHUNK_ELEMENTS = 2**20  # samples held at once, over all repetitions: bounds memory whatever N is


def score_variance(theta: float) -> float:
    """Variance of the single-sample score-function estimator ``g = z**2 (z - theta)``, ``z ~ N(theta, 1)``.

    Write ``z = theta + e`` with ``e ~ N(0, 1)`` (moments 1, 3, 15 for ``e**2, e**4, e**6``; odd ones vanish):

    * ``E[g] = E[(theta + e)**2 e] = 2 theta`` (unbiased);
    * ``E[g**2] = E[(theta + e)**4 e**2] = theta**4 E[e**2] + 6 theta**2 E[e**4] + E[e**6]
      = theta**4 + 18 theta**2 + 15``;
    * ``Var[g] = E[g**2] - (2 theta)**2 = theta**4 + 14 theta**2 + 15`` (87 at theta = 2).
    """
    return theta**4 + 14 * theta**2 + 15


def pathwise_variance(theta: float) -> float:
    """Variance of the single-sample pathwise estimator ``2 z``, ``z ~ N(theta, 1)``: ``4 Var[z] = 4`` for every theta."""
    return 4.0


def _seed_for(seed: int, n: int, estimator: str) -> int:
    # One stream per (N, estimator): a row does not depend on which other sizes were asked for.
    return (seed * 1_000_003 + n * len(ESTIMATORS) + ESTIMATORS.index(estimator)) % (2**63)


def _estimates(estimator: str, theta: float, n: int, repetitions: int, device: torch.device) -> torch.Tensor:
    """``repetitions`` independent N-sample gradient estimates, by one backward pass per chunk of samples.

    ``loc`` holds one copy of theta per repetition, so the gradient of the summed per-repetition surrogates is
    the vector of per-repetition gradients; chunks accumulate into ``loc.grad`` (each chunk's surrogate is
    divided by the full N, so the sum over chunks is the N-sample mean).
    """
    loc = torch.full((repetitions, 1), float(theta), device=device, requires_grad=True)
    chunk = max(1, _CHUNK_ELEMENTS // repetitions)
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        q = Normal(loc.expand(repetitions, size), 1.0)
        if estimator == "score":
            z = q.sample()  # no path from theta to z: the gradient flows only through log q
            surrogate = ((z**2).detach() * q.log_prob(z)).sum() / n
        else:
            surrogate = (q.rsample() ** 2).sum() / n
        surrogate.backward()
    return loc.grad.detach().squeeze(-1)


def worked_example(
    theta: float = 2.0,
    sizes=(10, 100, 1000, 10000, 100000),
    repetitions: int = 100,
    seed: int = 0,
    device="cpu",
) -> pd.DataFrame:
    """Measure the mean and variance of N-sample score and pathwise gradient estimates of ``d/dtheta E[z**2]``.

    For each N in ``sizes`` and each estimator, ``repetitions`` independent N-sample estimates. Columns:
    estimator, N, mean and variance (ddof=1) over the repetitions, analytic_mean (``2 theta``),
    analytic_variance (single-sample variance / N), variance_ratio (measured / analytic) and se_mean
    (``sqrt(variance / repetitions)``). Seeded in a forked RNG: the global torch RNG is left as it was.
    """
    finite("repetitions", repetitions, kind=int, low=2)  # two at least, to estimate a variance
    finite("theta", theta)
    sizes = [positive("sizes", n) for n in sizes]
    device = torch.device(device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    per_sample = {"score": score_variance(theta), "pathwise": pathwise_variance(theta)}
    rows = []
    with torch.random.fork_rng(devices=cuda):
        for n in sizes:
            for estimator in ESTIMATORS:
                torch.manual_seed(_seed_for(seed, n, estimator))
                estimates = _estimates(estimator, theta, n, repetitions, device).double()
                mean, variance = estimates.mean().item(), estimates.var(correction=1).item()
                analytic_variance = per_sample[estimator] / n
                rows.append(
                    {
                        "estimator": estimator,
                        "N": n,
                        "mean": mean,
                        "variance": variance,
                        "analytic_mean": 2 * theta,
                        "analytic_variance": analytic_variance,
                        "variance_ratio": variance / analytic_variance,
                        "se_mean": math.sqrt(variance / repetitions),
                    }
                )
    return pd.DataFrame(rows)


def format_table(df: pd.DataFrame) -> str:
    """One line per N: score mean, variance and its analytic value, then the same for pathwise."""
    columns = [
        ("N", 8),
        ("score mean", 11),
        ("score var", 11),
        ("analytic", 11),
        ("pathwise mean", 14),
        ("pathwise var", 13),
        ("analytic", 11),
    ]
    header = "".join(name.rjust(width) for name, width in columns)
    lines = [header, "-" * len(header)]
    by_key = {(row.estimator, row.N): row for row in df.itertuples(index=False)}
    for n in sorted(df["N"].unique()):
        cells = [str(n)]
        for estimator in ESTIMATORS:
            row = by_key.get((estimator, n))
            cells += ["-"] * 3 if row is None else [f"{row.mean:.4f}", f"{row.variance:.4g}", f"{row.analytic_variance:.4g}"]
        lines.append("".join(cell.rjust(width) for cell, (_, width) in zip(cells, columns)))
    return "\n".join(lines)


def plot_worked_example(df: pd.DataFrame, path=None, ax=None):
    """Log-log plot of measured variance against N for both estimators, over the analytic lines; returns the figure.

    Without ``ax`` the figure is built without pyplot (no backend is chosen or changed, nothing is shown);
    with ``path`` it is also saved as PNG.
    """
    import numpy as np
    from matplotlib.figure import Figure

    if ax is None:
        figure = Figure(figsize=(6, 4), layout="constrained")
        ax = figure.add_subplot()
    else:
        figure = ax.figure
    colors = {"score": "C3", "pathwise": "C0"}
    for estimator in ESTIMATORS:
        rows = df[df["estimator"] == estimator].sort_values("N")
        if rows.empty:
            continue
        ns = rows["N"].to_numpy(dtype=float)
        per_sample = float((rows["analytic_variance"] * rows["N"]).iloc[0])
        grid = np.geomspace(ns.min(), ns.max(), 50)
        ax.plot(grid, per_sample / grid, color=colors[estimator], linewidth=1, linestyle="--", label=f"{estimator}: {per_sample:.4g}/N")
        ax.plot(ns, rows["variance"], "o", color=colors[estimator], label=f"{estimator}, measured")
    theta = float(df["analytic_mean"].iloc[0]) / 2 if len(df) else float("nan")
    title = f"z ~ N(theta, 1), f(z) = z^2, theta = {theta:g}"
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(xlabel="N (samples per estimate)", ylabel="variance of the gradient estimate", title=title)
    ax.legend(fontsize="small")
    if path is not None:
        from .rundir import atomic_write

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=110))
    return figure
