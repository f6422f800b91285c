"""ppvi.losses.MeanFieldELBO against Pyro's TraceMeanField_ELBO: the same loss value and the same
gradients for the same random draws (same seed), on the gallery VAE (analytic KL, subsampled
plate), a latent site without a registered KL (Monte Carlo term), vectorized and looped particles,
a masked observed site, and scaled/masked latent sites; plus the refusal of model-only latents."""

import pytest
import torch

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO

from ppvi.data import Batch
from ppvi.gallery import load_model
from ppvi.losses import MeanFieldELBO


def _loss_and_grads(elbo, model, guide, params, *args, seed=0, validate=False):
    torch.manual_seed(seed)
    with pyro.validation_enabled(validate):
        loss = elbo.differentiable_loss(model, guide, *args)
    return loss.detach(), torch.autograd.grad(loss, params)


def assert_same_as_pyro(model, guide, params, *args, validate=False, **elbo_kwargs):
    """Both ELBOs, seeded alike, give the same loss and gradients; returns the loss."""
    expected, expected_grads = _loss_and_grads(TraceMeanField_ELBO(**elbo_kwargs), model, guide, params, *args, validate=validate)
    actual, actual_grads = _loss_and_grads(MeanFieldELBO(**elbo_kwargs), model, guide, params, *args, validate=validate)
    assert actual.shape == () and actual.requires_grad is False
    torch.testing.assert_close(actual, expected)
    for got, want in zip(actual_grads, expected_grads):
        torch.testing.assert_close(got, want)
    return actual


@pytest.mark.parametrize("beta", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("validate", [False, True])
def test_gallery_vae(beta, validate):
    model_file = load_model("vae")
    options = model_file.make_options({"latent_dim": 3, "hidden_dim": 16, "beta": beta})
    torch.manual_seed(1)
    data = {"x": torch.rand(40, 64)}
    model, guide = model_file.module.Model(options, data), model_file.module.Amortized(options, data)
    index = torch.randperm(40)[:8]
    batch = Batch({"x": data["x"][index]}, index, 40)
    params = [*model.decoder.parameters(), *guide.encoder.parameters()]
    loss = assert_same_as_pyro(model, guide, params, batch, options, validate=validate, max_plate_nesting=1)
    assert torch.isfinite(loss)


def gamma_model(x):
    rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
    with pyro.plate("data", 50, subsample_size=10) as index:
        pyro.sample("x", dist.Normal(loc, rate.rsqrt()), obs=x[index])


def gamma_guide(x):
    pyro.sample("rate", dist.Gamma(pyro.param("a", torch.tensor(3.0)), pyro.param("b", torch.tensor(1.5))))
    pyro.sample("loc", dist.Normal(pyro.param("m", torch.tensor(0.3)), pyro.param("s", torch.tensor(0.7))))


def _params(names):
    return [pyro.param(name).unconstrained() for name in names]


def test_monte_carlo_term_without_registered_kl():
    # Gamma || Gamma has a registered KL in torch; a LogNormal guide for a Gamma prior does not.
    def guide(x):
        pyro.sample("rate", dist.LogNormal(pyro.param("a", torch.tensor(0.2)), pyro.param("b", torch.tensor(0.5))))
        pyro.sample("loc", dist.Normal(pyro.param("m", torch.tensor(0.3)), pyro.param("s", torch.tensor(0.7))))

    pyro.clear_param_store()
    x = torch.randn(50)
    guide(x)
    with pytest.raises(NotImplementedError):
        torch.distributions.kl_divergence(dist.LogNormal(0.0, 1.0), dist.Gamma(2.0, 1.0))
    assert_same_as_pyro(gamma_model, guide, _params("abms"), x, max_plate_nesting=1)
    assert_same_as_pyro(gamma_model, guide, _params("abms"), x, validate=True, max_plate_nesting=1)


def test_registered_kl_with_subsample_scale():
    pyro.clear_param_store()
    x = torch.randn(50)
    gamma_guide(x)
    assert_same_as_pyro(gamma_model, gamma_guide, _params("abms"), x, max_plate_nesting=1)


def local_model(x):
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0], dim=-1):
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        pyro.sample("x", dist.Normal(z, 0.5), obs=x)


def local_guide(x):
    pyro.sample("loc", dist.Normal(pyro.param("m", torch.tensor(0.1)), pyro.param("s", torch.tensor(0.8))))
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("z", dist.Normal(pyro.param("zm", torch.zeros(x.shape[0])), pyro.param("zs", torch.ones(x.shape[0]))))


@pytest.mark.parametrize("max_plate_nesting", [1, float("inf")])
def test_vectorized_particles(max_plate_nesting):
    pyro.clear_param_store()
    x = torch.randn(6)
    local_guide(x)
    params = _params(["m", "s", "zm", "zs"])
    assert_same_as_pyro(local_model, local_guide, params, x, num_particles=4, vectorize_particles=True, max_plate_nesting=max_plate_nesting)


def test_looped_particles():
    pyro.clear_param_store()
    x = torch.randn(6)
    local_guide(x)
    params = _params(["m", "s", "zm", "zs"])
    assert_same_as_pyro(local_model, local_guide, params, x, num_particles=3, max_plate_nesting=1)


def test_masked_observed_and_latent_sites():
    mask = torch.tensor([True, False, True, True, False, True])

    def model(x):
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=0.3), poutine.mask(mask=mask):
                z = pyro.sample("z", dist.Normal(loc, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5).mask(mask), obs=x)
            pyro.sample("y", dist.Normal(z, 2.0), obs=x, infer={})
            with poutine.mask(mask=~mask):
                pyro.sample("w", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        pyro.sample("loc", dist.Normal(pyro.param("m", torch.tensor(0.1)), pyro.param("s", torch.tensor(0.8))))
        with pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=0.3), poutine.mask(mask=mask):
                pyro.sample("z", dist.Normal(pyro.param("zm", torch.zeros(6)), pyro.param("zs", torch.ones(6))))

    pyro.clear_param_store()
    x = torch.randn(6)
    guide(x)
    assert_same_as_pyro(model, guide, _params(["m", "s", "zm", "zs"]), x, max_plate_nesting=1)


def test_model_latent_missing_from_guide_is_refused():
    def model(x):
        pyro.sample("loc", dist.Normal(0.0, 1.0))
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        pyro.sample("x", dist.Normal(0.0, scale), obs=x)

    def guide(x):
        pyro.sample("loc", dist.Normal(pyro.param("m", torch.tensor(0.1)), 1.0))

    pyro.clear_param_store()
    with pyro.validation_enabled(False), pytest.raises(ValueError, match="'scale'.*not sampled by the guide"):
        MeanFieldELBO(max_plate_nesting=0).differentiable_loss(model, guide, torch.tensor(1.0))


def test_svi_interface():
    pyro.clear_param_store()
    x = torch.randn(6)
    svi = pyro.infer.SVI(local_model, local_guide, pyro.optim.Adam({"lr": 0.01}), MeanFieldELBO(max_plate_nesting=1))
    losses = [svi.step(x) for _ in range(3)]
    assert all(isinstance(value, float) for value in losses)


@pytest.mark.parametrize("value_shape", [(5, 7), (7,)])
def test_bernoulli_log_prob_sum_fast_path(value_shape):
    from ppvi.losses import _log_prob_sum

    logits = torch.randn(5, 7, requires_grad=True)
    value = torch.bernoulli(torch.full(value_shape, 0.5))
    fn = dist.Bernoulli(logits=logits).to_event(1)
    with pyro.validation_enabled(False):
        fast = _log_prob_sum({"fn": fn, "value": value, "args": (), "kwargs": {}})
    torch.testing.assert_close(fast, fn.log_prob(value).sum())
    torch.testing.assert_close(torch.autograd.grad(fast, logits)[0], torch.autograd.grad(fn.log_prob(value).sum(), logits)[0])
