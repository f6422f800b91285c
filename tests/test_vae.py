"""The VAE model file: fits run for each architecture and likelihood, the ELBO improves, the
analytic KL agrees with its closed form and with Monte Carlo, and bad options exit 2."""

import contextlib
import math
from pathlib import Path

import pytest
import torch

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO

import ppvi
from ppvi.data import Batch
from ppvi.gallery import load_model
from ppvi.images import load_digits, load_mnist, write_idx
from ppvi.modeling import kl_weight

MNIST = Path(__file__).parents[2] / "shared" / "data" / "mnist"


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory):
    """A folder with a 'train' split of 64 real MNIST test images, written as IDX."""
    if not (MNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"the MNIST test set is not at {MNIST}")
    images, labels = load_mnist(MNIST, "test")
    folder = tmp_path_factory.mktemp("tiny_mnist")
    write_idx(folder / "train-images-idx3-ubyte", (images[:64] * 255).round().to(torch.uint8))
    write_idx(folder / "train-labels-idx1-ubyte", labels[:64].to(torch.uint8))
    return folder


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_mlp_fit_runs(cli, tmp_path, likelihood):
    result = cli("fit", "vae", "--likelihood", likelihood, "--steps", 3, "--batch-size", 64, "--device", "cpu", "--out", tmp_path / "run")
    assert result.code == 0, result.text
    assert "analytic KL" in result.text


def test_conv_fit_runs_on_28x28_images(cli, tmp_path, tiny_mnist):
    result = cli(
        "fit", "vae", "--architecture", "conv", "--data", tiny_mnist, "--steps", 3, "--batch-size", 16,
        "--device", "cpu", "--out", tmp_path / "run",
    )
    assert result.code == 0, result.text


def test_data_keeps_labels_and_shapes():
    module = load_model("vae").module
    mlp = module.load_data(None, module.Options())
    assert mlp["x"].shape == (1797, 64) and mlp["labels"].shape == (1797,)
    assert mlp["x"].min() >= 0 and mlp["x"].max() <= 1


def test_conv_data_shape(tiny_mnist):
    module = load_model("vae").module
    data = module.load_data(str(tiny_mnist), module.Options(architecture="conv"))
    assert data["x"].shape == (64, 1, 28, 28) and data["labels"].shape == (64,)


@pytest.mark.statistical
def test_elbo_improves_on_digits():
    # 10 epochs of 15 minibatches (128 images, about 0.5 s). Measured with seed 0, per image: the
    # first step (initial networks) -44.7 nats, the last 15 steps -26.2 on average, with a spread
    # of 0.29 between steps (one-sample minibatch estimates, binarization included). An
    # improvement of more than 5 nats is > 15 step standard deviations from "no improvement".
    # The fit must also beat the best model with independent pixels (each pixel Bernoulli with its
    # mean intensity: -27.1 nats on binarized digits) by 5 standard errors of the last steps' mean,
    # i.e. the latent code carries information about the image.
    result = ppvi.fit("vae", device="cpu", seed=0, epochs=10)
    elbo = result.elbo_trace["elbo"].to_numpy() / result.config["num_data"]
    first, last = elbo[0], elbo[-15:]
    assert last.std(ddof=1) < 1.0, last  # the tail is settled, so its mean is a fair summary
    assert last.mean() - first > 5.0, (first, last.mean())
    pixels = result.data["x"].double().mean(0)
    independent = float((pixels * pixels.clamp(min=1e-12).log() + (1 - pixels) * (1 - pixels).clamp(min=1e-12).log()).sum())
    standard_error = last.std(ddof=1) / math.sqrt(len(last))
    assert last.mean() > independent + 5 * standard_error, (last.mean(), independent, standard_error)


def _kl_closed_form(loc, scale):
    return -0.5 * (1 + (scale**2).log() - loc**2 - scale**2).sum(-1)


@pytest.mark.statistical
def test_analytic_kl_matches_closed_form_and_monte_carlo():
    result = ppvi.fit("vae", device="cpu", seed=0, steps=20, batch_size=64, options={"latent_dim": 3})
    assert result.estimator == "reparam"
    assert "analytic KL" in result.estimator_reason and "TraceMeanField_ELBO" in result.estimator_reason
    guide = result.best.guide_fn
    x = result.data["x"][:8]
    with torch.no_grad():
        loc, scale = guide.encode(x)
    loc, scale = loc.double(), scale.double()
    q, p = dist.Normal(loc, scale).to_event(1), dist.Normal(torch.zeros_like(loc), 1.0).to_event(1)
    analytic = torch.distributions.kl_divergence(q, p)  # what TraceMeanField_ELBO calls
    torch.testing.assert_close(analytic, _kl_closed_form(loc, scale), rtol=1e-10, atol=1e-10)
    # Monte Carlo: the mean of log q(z) - log p(z) over draws from q, within 5 standard errors
    generator_state = torch.get_rng_state()
    torch.manual_seed(0)
    draws = q.sample((20_000,))
    torch.set_rng_state(generator_state)
    log_ratio = q.log_prob(draws) - p.log_prob(draws)
    estimate, standard_error = log_ratio.mean(0), log_ratio.std(0) / math.sqrt(draws.shape[0])
    assert ((estimate - analytic).abs() <= 5 * standard_error).all(), (estimate, analytic, standard_error)


@pytest.mark.parametrize("beta", [1.0, 0.25])
def test_pyro_loss_without_the_likelihood_is_the_scaled_closed_form_kl(beta):
    """With the likelihood hidden, TraceMeanField_ELBO's loss is exactly beta * N/B * sum of the KLs:
    analytic (no Monte Carlo noise), scaled by the subsample and by beta in model and guide alike."""
    module = load_model("vae").module
    options = module.Options(latent_dim=2, beta=beta)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    data = {"x": load_digits().images.reshape(1797, -1)}
    model, guide = module.Model(options, data), module.Amortized(options, data)
    index = torch.arange(32)
    batch = Batch({"x": data["x"][index]}, index, 1797)
    loss = TraceMeanField_ELBO().differentiable_loss(poutine.block(model, hide=["x"]), guide, batch, options)
    with torch.no_grad():
        loc, scale = guide.encode(batch.x)
    expected = beta * 1797 / 32 * _kl_closed_form(loc, scale).sum()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-4)


def test_kl_weight_adds_no_handler_at_beta_one_and_masks_at_zero():
    """beta = 1 runs no messenger (it cost time every step); beta = 0 masks the site (scale must be positive)."""
    def site(beta):
        with poutine.trace() as tracer, kl_weight(beta):
            pyro.sample("z", dist.Normal(0.0, 1.0))
        return tracer.trace.nodes["z"]

    assert isinstance(kl_weight(1.0), contextlib.nullcontext)
    assert site(1.0)["scale"] == 1.0 and site(1.0)["mask"] is None
    assert site(0.25)["scale"] == 0.25
    assert site(0.0)["mask"] is False


def test_beta_zero_fits(cli):
    result = cli("fit", "vae", "--beta", 0, "--steps", 3, "--batch-size", 64, "--device", "cpu")
    assert result.code == 0, result.text


@pytest.mark.parametrize(
    "args, words",
    [
        (["--latent-dim", "0"], "--latent-dim"),
        (["--beta", "-1"], "--beta"),
        (["--architecture", "conv"], "28x28"),
        (["--hidden-dim", "0"], "--hidden-dim"),
    ],
)
def test_bad_options_exit_2(cli, args, words):
    result = cli("fit", "vae", *args, "--steps", 2, "--device", "cpu")
    assert result.code == 2, result.text
    assert words in result.text
    assert "Traceback" not in result.text
