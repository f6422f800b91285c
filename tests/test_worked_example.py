"""The lecture's worked example: z ~ N(theta, 1), f(z) = z**2, theta = 2, gradient 4; score variance 87/N, pathwise 4/N.

Tolerances come from the sampling distributions, with moments computed exactly by Gauss-Hermite quadrature.
"""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
from numpy.polynomial.hermite_e import hermegauss

import ppvi
from ppvi.worked_example import format_table, pathwise_variance, plot_worked_example, score_variance, worked_example

THETA = 2.0
SIZES = (10, 100, 1000, 10000, 100000)


def single_sample_moments(estimator: str, theta: float) -> tuple[float, float, float]:
    """Mean, variance and excess kurtosis of the single-sample estimator, exactly.

    With z = theta + x, x ~ N(0, 1), both estimators are polynomials in x (degree 3 and 1), so their fourth
    central moments are polynomials of degree at most 12; probabilists' Gauss-Hermite quadrature with k nodes
    is exact up to degree 2k - 1, and 20 nodes leave plenty of room.
    """
    nodes, weights = hermegauss(20)
    weights = weights / weights.sum()  # the weights integrate exp(-x**2 / 2): normalise to the N(0, 1) density
    z = theta + nodes
    g = z**2 * (z - theta) if estimator == "score" else 2 * z
    mean = weights @ g
    variance = weights @ (g - mean) ** 2
    kurtosis = weights @ (g - mean) ** 4 / variance**2 - 3
    return float(mean), float(variance), float(kurtosis)


def sd_of_sample_variance(sigma2: float, kurtosis: float, repetitions: int) -> float:
    """Standard deviation of the sample variance (ddof=1) of R iid draws with variance sigma2 and excess kurtosis kappa.

    Var(s**2) = sigma**4 (2 / (R - 1) + kappa / R), exactly, for any distribution with a fourth moment.
    """
    return sigma2 * math.sqrt(2 / (repetitions - 1) + kurtosis / repetitions)


@pytest.fixture(scope="module")
def table():
    return worked_example(theta=THETA, sizes=SIZES, repetitions=100, seed=0)


@pytest.mark.parametrize("theta", [-3.0, 0.0, 0.5, 2.0])
def test_closed_forms_match_quadrature(theta):
    mean, variance, _ = single_sample_moments("score", theta)
    assert mean == pytest.approx(2 * theta, abs=1e-9)  # unbiased
    assert variance == pytest.approx(score_variance(theta), rel=1e-12)
    mean, variance, kurtosis = single_sample_moments("pathwise", theta)
    assert mean == pytest.approx(2 * theta, abs=1e-9)
    assert variance == pytest.approx(pathwise_variance(theta), rel=1e-12)
    assert kurtosis == pytest.approx(0, abs=1e-9)  # 2z is Gaussian


def test_lecture_numbers():
    assert single_sample_moments("score", THETA)[1] == pytest.approx(87, rel=1e-12)
    assert score_variance(THETA) == 87
    assert pathwise_variance(THETA) == 4
    # The score estimator is heavy-tailed: excess kurtosis ~23.8 at theta = 2, which is what makes its sample
    # variance noisy at small N.
    assert single_sample_moments("score", THETA)[2] == pytest.approx(23.797, abs=1e-3)


def test_columns_and_analytic_values(table):
    assert list(table.columns) == [
        "estimator", "N", "mean", "variance", "analytic_mean", "analytic_variance", "variance_ratio", "se_mean",
    ]
    assert len(table) == 2 * len(SIZES)
    for row in table.itertuples(index=False):
        per_sample = 87 if row.estimator == "score" else 4
        assert row.analytic_mean == 4
        assert row.analytic_variance == pytest.approx(per_sample / row.N)
        assert row.variance_ratio == pytest.approx(row.variance / row.analytic_variance)
        assert row.se_mean == pytest.approx(math.sqrt(row.variance / 100))


def test_means_within_three_standard_errors(table):
    # Each row's mean averages R = 100 independent N-sample estimates: its standard error is
    # sqrt(analytic variance / R) (the analytic one, since the measured variance is itself noisy), and the mean of
    # R * N >= 1000 draws is close to normal, so 3 standard errors fail by chance with probability ~0.3% per row.
    for row in table.itertuples(index=False):
        se = math.sqrt(row.analytic_variance / 100)
        assert abs(row.mean - 4) <= 3 * se, row


def check_variance(row, repetitions: int) -> None:
    # The sample variance s**2 of R estimates has Var(s**2) = sigma_N**4 (2 / (R - 1) + kappa_N / R), where
    # sigma_N**2 = sigma_1**2 / N and kappa_N = kappa_1 / N is the excess kurtosis of an average of N iid draws
    # (kappa_1 exact from quadrature: ~23.8 for score at theta = 2, 0 for pathwise). We allow 4 of those standard
    # deviations: s**2 is roughly normal at these R (right-skewed at small N, which makes low values rarer than
    # normal), so a correct estimator fails a row by chance with probability of order 1e-4. The same bound in
    # units of the analytic variance is a bound on variance_ratio - 1.
    _, sigma2, kappa1 = single_sample_moments(row.estimator, THETA)
    sd = sd_of_sample_variance(sigma2 / row.N, kappa1 / row.N, repetitions)
    assert row.analytic_variance == pytest.approx(sigma2 / row.N)
    assert abs(row.variance - row.analytic_variance) <= 4 * sd, (row, sd)
    assert abs(row.variance_ratio - 1) <= 4 * sd / row.analytic_variance


def test_variances_within_four_sds_of_the_sample_variance(table):
    # At R = 100 that is a ratio within 1 +- 0.84 for score at N = 10 (heavy tails) down to 1 +- 0.57 for
    # pathwise and for score at large N: loose, but what 100 repetitions can tell.
    for row in table.itertuples(index=False):
        check_variance(row, repetitions=100)


def test_many_repetitions_pin_the_ratio():
    # R = 2000 at N = 10: the ratio's tolerance shrinks to 4 * sqrt(2/1999 + 2.38/2000) = 0.19 for score and
    # 4 * sqrt(2/1999) = 0.13 for pathwise.
    frame = worked_example(theta=THETA, sizes=(10,), repetitions=2000, seed=1)
    for row in frame.itertuples(index=False):
        check_variance(row, repetitions=2000)
        assert abs(row.mean - 4) <= 3 * math.sqrt(row.analytic_variance / 2000)
    ratio = frame.set_index("estimator")["variance"]
    assert ratio["score"] / ratio["pathwise"] > 10  # 87 / 4 = 21.75 in expectation


def test_seeded_reproducible_and_global_rng_untouched():
    state = torch.get_rng_state()
    first = worked_example(sizes=(10, 100), repetitions=20, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    again = worked_example(sizes=(100,), repetitions=20, seed=3)  # a row does not depend on the other sizes
    assert np.array_equal(first[first["N"] == 100]["mean"].to_numpy(), again["mean"].to_numpy())
    other = worked_example(sizes=(10, 100), repetitions=20, seed=4)
    assert not np.array_equal(first["mean"].to_numpy(), other["mean"].to_numpy())


def test_chunked_estimates_agree_with_the_spec():
    # N larger than one chunk (2**20 samples over all repetitions) at R = 1000 takes two chunks per estimate;
    # the pathwise estimates must still average to 4 within 3 standard errors and have the right variance.
    frame = worked_example(sizes=(1500,), repetitions=1000, seed=5)
    for row in frame.itertuples(index=False):
        assert abs(row.mean - 4) <= 3 * math.sqrt(row.analytic_variance / 1000)
        check_variance(row, repetitions=1000)


def test_format_table(table):
    text = format_table(table)
    for n in SIZES:
        assert str(n) in text
    assert "score" in text and "pathwise" in text
    lines = text.splitlines()
    assert len(lines) == 2 + len(SIZES)
    assert len({len(line) for line in lines}) == 1  # fixed width


def test_plot_writes_png(table, tmp_path):
    path = tmp_path / "plots" / "worked_example.png"
    figure = plot_worked_example(table, path=path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = figure.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert len(ax.lines) == 4  # measured points and analytic line, per estimator


def test_plot_on_given_axes(table):
    from matplotlib.figure import Figure

    figure = Figure()
    ax = figure.add_subplot()
    assert plot_worked_example(table, ax=ax) is figure


def test_autograd_gradients_equal_the_closed_forms_on_the_same_draws(monkeypatch):
    # The estimates come from backward passes through torch.distributions; on the same draws they must equal
    # the textbook estimators z**2 (z - theta) and 2 z averaged over N (N = 7, R = 3, in chunks of 4 and 3
    # samples per repetition, so the accumulation of gradients over chunks is checked too).
    from torch.distributions import Normal

    module = importlib.import_module("ppvi.worked_example")  # the attribute ppvi.worked_example is the function

    monkeypatch.setattr(module, "_CHUNK_ELEMENTS", 3 * 4)
    with torch.random.fork_rng(devices=[]):
        for estimator, closed_form in [("score", lambda z: z**2 * (z - THETA)), ("pathwise", lambda z: 2 * z)]:
            torch.manual_seed(11)
            z = torch.cat([Normal(torch.full((3, size), THETA), 1.0).sample() for size in (4, 3)], dim=1)
            torch.manual_seed(11)
            estimates = module._estimates(estimator, THETA, 7, 3, torch.device("cpu"))
            torch.testing.assert_close(estimates, closed_form(z).mean(dim=1))


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"repetitions": 1}, "--repetitions must be >= 2"),
        ({"sizes": (10, 0)}, "--sizes must be a positive integer"),
        ({"theta": float("inf")}, "--theta must be a finite number"),
    ],
)
def test_bad_arguments_are_usage_errors(kwargs, words):
    with pytest.raises(ppvi.UsageError, match=words):
        worked_example(**kwargs)
