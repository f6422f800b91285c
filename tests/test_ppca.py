"""Probabilistic PCA: the fitted ELBO against the closed-form maximum log-likelihood (Tipping & Bishop 1999)."""

import math

import pytest
import torch

import ppvi
from ppvi.gallery import load_model

pytestmark = pytest.mark.statistical

# Tolerance on (max log-likelihood - ELBO) per point, in nats. The ELBO at the fitted parameters
# falls short of the maximum log-likelihood (-12.45 nats per point on the built-in data) by
# (a) the KL of the diagonal q from the exact posterior, -1/2 log(1 - rho^2) for a posterior
#     correlation rho, which the ELBO removes only slowly, by rotating W towards orthogonal columns
#     (the pull vanishes at 0 and at 45 degrees); with q = 2 it is at most -1/2 log(1 - rho_max^2),
#     rho_max = (l_1 - l_2) / (l_1 + l_2): 0.039 on the built-in data (l_1 = 62.0, l_2 = 35.4);
# (b) everything else: W, b, sigma off the ML values, the encoder off its optimum for the current
#     W, Adam's jitter in the last steps.
# Measured with the defaults (4000 steps, lr 0.2 decaying to 2e-4), seeds 0-7: total gaps
# 0.0022-0.0178 (seed 1 the largest: rho = -0.13, 0.0085 from (a) and 0.0093 from (b)).
# The test bounds (b) by 0.015 and the total by 0.025 (0.2% of the log-likelihood).
REST_TOLERANCE = 0.015
GAP_TOLERANCE = 0.025


def rotation_penalty_bound(x):
    """The largest KL per point of a diagonal q from the PPCA posterior at the ML solution, q = 2."""
    x = x.double()
    centred = x - x.mean(0)
    l1, l2 = torch.linalg.eigvalsh(centred.T @ centred / x.shape[0]).flip(0)[:2]
    rho = (l1 - l2) / (l1 + l2)
    return float(-0.5 * torch.log1p(-rho**2))


def max_log_likelihood_per_point(x, q):
    x = x.double()
    n, d = x.shape
    centred = x - x.mean(0)
    eigenvalues = torch.linalg.eigvalsh(centred.T @ centred / n).flip(0)
    sigma2 = eigenvalues[q:].mean()
    return float(-0.5 * (d * math.log(2 * math.pi) + eigenvalues[:q].log().sum() + (d - q) * sigma2.log() + d))


def exact_elbo_per_point(x, params):
    """E_q[log p(x | z)] - KL(q(z | x) || p(z)), in closed form for the linear-Gaussian pair (no Monte Carlo)."""
    x = x.double()
    p = {name: value.double() for name, value in params.items()}
    weight, bias, sigma2 = p["W"], p["b"], p["sigma"] ** 2
    mean, var = x @ p["A"].T + p["c"], p["s"] ** 2  # (n, q), (q,)
    d = x.shape[1]
    residual = (x - mean @ weight.T - bias).square().sum(1) + (weight.square().sum(0) * var).sum()
    expected_log_lik = -0.5 * d * torch.log(2 * math.pi * sigma2) - 0.5 * residual / sigma2
    kl = 0.5 * (var + mean.square() - 1 - var.log()).sum(1)
    return float((expected_log_lik - kl).mean())


def test_closed_form_matches_the_model_file():
    module = load_model("ppca").module
    x = module.synthetic_ppca()[0]
    assert module.max_log_likelihood(x, 2) / x.shape[0] == pytest.approx(max_log_likelihood_per_point(x, 2), rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_elbo_reaches_the_maximum_likelihood(seed):
    result = ppvi.fit("ppca", device="cpu", seed=seed)
    assert result.estimator == "reparam"
    x = result.data["x"]
    log_lik = max_log_likelihood_per_point(x, 2)
    elbo = exact_elbo_per_point(x, result.params)
    assert elbo <= log_lik + 1e-9  # a lower bound at any parameters, so at the fitted ones
    weight, sigma2 = result.params["W"].double(), result.params["sigma"].double() ** 2
    precision = weight.T @ weight + sigma2 * torch.eye(2, dtype=torch.float64)  # M; the posterior covariance is sigma^2 M^-1
    rho = precision[0, 1] / precision.diagonal().prod().sqrt()
    rotation_penalty = float(-0.5 * torch.log1p(-rho**2))  # (a) at the fitted W
    assert rotation_penalty <= rotation_penalty_bound(x) + 1e-3
    assert log_lik - elbo - rotation_penalty < REST_TOLERANCE
    assert log_lik - elbo < GAP_TOLERANCE
    # The trace (one-sample estimates of the ELBO) agrees: the median of its last tenth (400 steps)
    # per point is within 0.01 of the exact ELBO (measured, seeds 0-7: at most 0.0021 apart), and
    # not above the maximum log-likelihood beyond that Monte Carlo allowance.
    trace_elbo = result.best.final_elbo / x.shape[0]
    assert abs(trace_elbo - elbo) < 0.01
    assert trace_elbo < log_lik + 0.01


def test_auto_picks_reparam_with_analytic_kl():
    result = ppvi.fit("ppca", device="cpu", steps=5)
    assert result.estimator == "reparam"
    assert "analytic KL" in result.estimator_reason


def test_latent_dim_must_be_below_the_data_dimension(cli):
    assert cli("fit", "ppca", "--latent-dim", 10, "--steps", 2, "--device", "cpu").code == 2
    assert cli("fit", "ppca", "--latent-dim", 0, "--steps", 2, "--device", "cpu").code == 2
