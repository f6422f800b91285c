"""The autoguide gallery models against truths from outside ppvi.

linear_regression  closed-form Gaussian posterior (torch.linalg on the data): the full-rank guide
                   contains it; the mean-field optimum has the exact mean and the conditional
                   variances 1 / diag(precision) (Bishop 2006, section 10.1.2), below the marginal ones.
logistic_regression  scikit-learn's L2-penalised fit is the MAP; Laplace's sd (Hessian at the MAP)
                   sets the scale of how far the posterior mean may sit from the mode.
eight_schools      the NUTS reference posterior (posteriordb): mu mean 4.4, sd 3.3.

Where the error is optimisation noise, the tolerance is 2-4x the largest error measured over seeds
0-5 with these settings; where it is a systematic gap (posterior mean vs mode), the tolerance is a
stated modelling bound. Each test gives its numbers. Fits run single-threaded: the tensors are tiny, and a second intra-op thread only adds
synchronisation, which on a shared 2-core machine made them several times slower.
"""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

import pyro

import ppvi
from ppvi.data import Batch
from ppvi.estimators import choose_estimator, inspect_sites

pytestmark = pytest.mark.statistical


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Bayesian linear regression: closed form

# 8 vectorised particles and a decay to lr 2.5e-4 keep the optimisation noise at the end of the fit
# to a few percent of a posterior sd (Adam's steps scale with the learning rate, not the gradient).
LINEAR_SETTINGS = dict(steps=3000, lr=0.05, lr_decay=0.005, num_particles=8, vectorize_particles=True, device="cpu")


def exact_linear_posterior(data, noise_scale=1.0, prior_scale=10.0):
    """precision = F^T F / noise^2 + I / prior^2, mean = precision^-1 F^T y / noise^2 (F = [1, x])."""
    design = torch.cat([torch.ones(len(data["x"]), 1), data["x"]], dim=-1).double()
    y = data["y"].double()
    precision = design.T @ design / noise_scale**2 + torch.eye(design.shape[1], dtype=torch.float64) / prior_scale**2
    covariance = torch.linalg.inv(precision)
    return covariance @ design.T @ y / noise_scale**2, covariance, precision


@pytest.fixture(scope="module")
def linear_fits():
    return {guide: ppvi.fit("linear_regression", guide=guide, seed=1, **LINEAR_SETTINGS) for guide in ("meanfield", "fullrank")}


def test_linear_fullrank_mean_matches_closed_form(linear_fits):
    result = linear_fits["fullrank"]
    mean, covariance, _ = exact_linear_posterior(result.data)
    fitted = result.best.guide_fn.get_posterior().mean.double()
    # largest error seen over seeds 0-5: 0.034 posterior sd
    assert ((fitted - mean).abs() / covariance.diagonal().sqrt()).max() < 0.15


def test_linear_fullrank_covariance_matches_closed_form(linear_fits):
    result = linear_fits["fullrank"]
    _, covariance, _ = exact_linear_posterior(result.data)
    fitted = result.best.guide_fn.get_posterior().covariance_matrix.double()
    sd = covariance.diagonal().sqrt()
    # entry (i, j) in units of sd_i sd_j, so variances read as relative errors and covariances as
    # correlation errors; largest error seen over seeds 0-5: 0.045
    assert ((fitted - covariance).abs() / torch.outer(sd, sd)).max() < 0.15


def test_linear_meanfield_mean_matches_closed_form(linear_fits):
    # For a Gaussian posterior the mean-field optimum keeps the exact mean; largest error seen: 0.032 sd
    result = linear_fits["meanfield"]
    mean, covariance, _ = exact_linear_posterior(result.data)
    fitted = result.params["AutoNormal.locs.w"].double()
    assert ((fitted - mean).abs() / covariance.diagonal().sqrt()).max() < 0.15


def test_linear_meanfield_variances_are_the_conditional_variances(linear_fits):
    # The mean-field optimum for a Gaussian posterior: q_j = Normal(mean_j, 1 / precision_jj).
    # Largest relative error seen over seeds 0-5: 7.8%.
    result = linear_fits["meanfield"]
    _, _, precision = exact_linear_posterior(result.data)
    fitted = result.params["AutoNormal.scales.w"].double() ** 2
    assert ((fitted * precision.diagonal() - 1).abs()).max() < 0.2


def test_linear_meanfield_underestimates_the_marginal_variances(linear_fits):
    # With correlated features the conditional variance of a slope is about a third of its marginal
    # variance (fitted / marginal: 0.30-0.37 over seeds 0-5). The test asks for less than half on
    # every weight whose exact ratio is below 0.4 (0.4 x the 20% tolerance above = 0.48 < 0.5, so
    # optimisation noise cannot blur the gap): the five slopes, not the intercept (ratio ~0.94).
    result = linear_fits["meanfield"]
    _, covariance, precision = exact_linear_posterior(result.data)
    marginal = covariance.diagonal()
    correlated = (1 / precision.diagonal()) / marginal < 1 / 2.5
    fitted = result.params["AutoNormal.scales.w"].double() ** 2
    assert correlated.sum() == 5
    assert (fitted[correlated] < 0.5 * marginal[correlated]).all()


# ---------------------------------------------------------------------------------------------
# Bayesian logistic regression: scikit-learn's MAP

PRIOR_SCALE = 1.0


@pytest.fixture(scope="module")
def logistic_fit():
    result = ppvi.fit("logistic_regression", guide="meanfield", seed=0, device="cpu", options={"prior_scale": PRIOR_SCALE})
    design = np.hstack([np.ones((len(result.data["x"]), 1)), result.data["x"].double().numpy()])
    labels = result.data["y"].numpy()
    # MAP of the model: the intercept is a column of ones, penalised like the other weights as in the
    # prior; C = prior_scale^2 turns sklearn's 0.5 |w|^2 + C * logloss into the negative log posterior.
    classifier = LogisticRegression(C=PRIOR_SCALE**2, fit_intercept=False, tol=1e-10, max_iter=10_000).fit(design, labels)
    w_map = classifier.coef_[0]
    # Laplace's approximation at the MAP: Hessian of the negative log posterior
    probs = 1 / (1 + np.exp(-design @ w_map))
    hessian = design.T @ (design * (probs * (1 - probs))[:, None]) + np.eye(design.shape[1]) / PRIOR_SCALE**2
    laplace_sd = np.sqrt(np.diag(np.linalg.inv(hessian)))
    posterior_mean = result.best.guide_fn.median()["w"].double().numpy()  # the mean of a Normal guide
    return posterior_mean, w_map, laplace_sd


def test_logistic_posterior_mean_is_within_one_laplace_sd_of_the_map(logistic_fit):
    # The posterior mean and the mode differ by a fraction of a posterior sd when the posterior is
    # near Gaussian (569 points, 31 weights); largest gap seen: 0.56 sd (the mean sits further from
    # zero than the mode, as the logistic likelihood flattens away from the decision boundary).
    # The gap is systematic, not noise: 0.49-0.56 sd over seeds 0-5.
    posterior_mean, w_map, laplace_sd = logistic_fit
    assert (np.abs(posterior_mean - w_map) / laplace_sd).max() < 1.0


def test_logistic_posterior_mean_agrees_in_sign_with_the_map(logistic_fit):
    # On every weight whose MAP is at least one sd from zero (12 of 31); with the 0.56 sd gap
    # above, a flip would take a gap of twice that.
    posterior_mean, w_map, laplace_sd = logistic_fit
    clear = np.abs(w_map) > laplace_sd
    assert clear.sum() >= 10
    assert (np.sign(posterior_mean[clear]) == np.sign(w_map[clear])).all()


def test_logistic_posterior_mean_has_the_size_of_the_map(logistic_fit):
    # |mean - MAP| / |MAP| measured 0.24-0.26 over seeds 0-5 (the skew above; |mean| = 1.21 |MAP|);
    # half the MAP's norm is "roughly in size".
    posterior_mean, w_map, _ = logistic_fit
    assert np.linalg.norm(posterior_mean - w_map) / np.linalg.norm(w_map) < 0.5


# ---------------------------------------------------------------------------------------------
# Eight schools: the NUTS reference posterior

REFERENCE_MU_MEAN, REFERENCE_MU_SD = 4.4, 3.3  # posteriordb eight_schools_noncentered reference draws

EIGHT_SCHOOLS_SETTINGS = {
    # centered: mu and the theta[j] drift together along a ridge of the ELBO, slowly under noisy
    # gradients; 8 particles and a larger learning rate get there in 1500 steps
    ("centered", "meanfield"): dict(steps=1500, lr=0.5, lr_decay=0.01, num_particles=8),
    ("noncentered", "meanfield"): dict(steps=1000, lr=0.1, lr_decay=0.02),
    ("noncentered", "fullrank"): dict(steps=1000, lr=0.1, lr_decay=0.02),
    ("noncentered", "lowrank"): dict(steps=1000, lr=0.1, lr_decay=0.02),
}


@pytest.mark.parametrize("parameterization, guide", list(EIGHT_SCHOOLS_SETTINGS))
def test_eight_schools_posterior_mean_of_mu_is_the_reference(parameterization, guide):
    # within one reference sd: the centered mean-field fit is known to under-disperse (its q(mu) has
    # sd ~1.2, not 3.3), but its mean lands at 4.0-4.5 over seeds 0-5; the non-centered fits at 4.5-4.9
    result = ppvi.fit(
        "eight_schools", guide=guide, options={"parameterization": parameterization}, seed=0, device="cpu",
        **EIGHT_SCHOOLS_SETTINGS[(parameterization, guide)],
    )
    assert result.best.guide_fn.median()["mu"].item() == pytest.approx(REFERENCE_MU_MEAN, abs=REFERENCE_MU_SD)


def test_cli_fits_eight_schools_noncentered(cli, tmp_path):
    run = cli("fit", "eight_schools", "--parameterization", "noncentered", "--steps", 50, "--device", "cpu", "--out", tmp_path / "run")
    assert run.code == 0, run.text
    assert (tmp_path / "run" / "elbo.csv").exists()


def test_cli_rejects_an_unknown_parameterization(cli, tmp_path):
    run = cli("fit", "eight_schools", "--parameterization", "bogus", "--steps", 5, "--out", tmp_path / "run")
    assert run.code == 2
    assert "bogus" in run.text and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Estimator rules

MODELS = {"linear_regression": {}, "logistic_regression": {}, "eight_schools": {"parameterization": "noncentered"}}


@pytest.mark.parametrize("guide", ["meanfield", "fullrank", "lowrank"])
@pytest.mark.parametrize("name", list(MODELS))
def test_auto_picks_reparam_for_the_gaussian_guides(name, guide):
    model_file = ppvi.load_model(name)
    options = model_file.make_options(MODELS[name])
    data = model_file.load_data(None, options)
    num_data = len(next(iter(data.values())))
    pyro.clear_param_store()  # autoguide parameters are named by guide class, not by model
    guide_fn = model_file.guides[guide](options, data)
    sites, _ = inspect_sites(model_file.module.model, guide_fn, Batch(data, torch.arange(num_data), num_data), options)
    assert choose_estimator("auto", sites)[0] == "reparam"
