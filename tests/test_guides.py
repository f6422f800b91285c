"""ppvi.guides: Pyro autoguides as GUIDES entries, built per fit as Guide(options, data)."""

import pytest
import torch

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoLowRankMultivariateNormal, AutoMultivariateNormal, AutoNormal

import ppvi
from ppvi.data import Batch
from ppvi.errors import UsageError
from ppvi.estimators import choose_estimator, inspect_sites, make_estimator
from ppvi.guides import auto, standard_guides
from ppvi.losses import MeanFieldELBO


def regression_model(batch, options):
    w = pyro.sample("w", dist.Normal(0.0, 10.0).expand([2]).to_event(1))
    with pyro.plate("data", batch.num_data, subsample=batch.index):
        pyro.sample("y", dist.Normal((batch.x * w).sum(-1), 1.0), obs=batch.y)


def local_model(batch, options):
    """One latent per data point (inside the data plate), as in the non-centered eight schools."""
    with pyro.plate("data", batch.num_data, subsample=batch.index):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(z, 1.0), obs=batch.y)


def _regression_data(num_data=20):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(num_data, 2, generator=generator)
    return {"x": x, "y": x @ torch.tensor([1.0, -1.0]) + torch.randn(num_data, generator=generator)}


def _full_batch(data):
    num_data = next(iter(data.values())).shape[0]
    return Batch(data, torch.arange(num_data), num_data)


def test_auto_builds_the_autoguide_from_options_and_data():
    guide_class = auto(AutoNormal, regression_model)
    guide = guide_class(None, _regression_data())
    assert isinstance(guide, AutoNormal)
    assert guide.model is not None and type(guide).__name__ == "AutoNormal"  # parameter names as in Pyro


def test_standard_guides_are_meanfield_fullrank_lowrank_in_that_order():
    guides = standard_guides(regression_model)
    assert list(guides) == ["meanfield", "fullrank", "lowrank"]
    bases = [AutoNormal, AutoMultivariateNormal, AutoLowRankMultivariateNormal]
    assert all(issubclass(guides[name], base) for name, base in zip(guides, bases))


def test_guides_start_at_the_feasible_point_with_the_small_init_scale():
    data = _regression_data()
    pyro.clear_param_store()
    guide = standard_guides(regression_model)["meanfield"](None, data)
    guide(_full_batch(data), None)
    store = pyro.get_param_store()
    assert torch.equal(store["AutoNormal.locs.w"], torch.zeros(2))  # unconstrained 0 for a real site
    assert torch.allclose(store["AutoNormal.scales.w"], torch.full((2,), 0.1))


@pytest.mark.parametrize("guide", ["meanfield", "fullrank", "lowrank"])
def test_fit_optimizer_moves_the_autoguide_parameters(guide):
    # The autoguide creates its parameters on the probe call; if the optimizer missed them, the
    # fitted location would still be the initial zero. Least squares gives w ~ (1, -1) on these data.
    data = _regression_data()
    model_file = ppvi.load_model("linear_regression")
    result = ppvi.fit(model_file, guide=guide, data=data, options={"intercept": False}, steps=300, lr=0.05, seed=0, device="cpu")
    fitted = result.best.guide_fn.median()["w"]
    assert fitted[0] > 0.5 and fitted[1] < -0.5
    assert all(name.startswith(type(result.best.guide_fn).__name__ + ".") for name in result.params)


def test_meanfield_guide_samples_the_local_latents_of_the_batch_index():
    # Under minibatches the guide's data plate must subsample the points of batch.index (not its own
    # random draw), else the model would pair the latents of some points with the data of others.
    data = {"y": torch.zeros(10)}
    pyro.clear_param_store()
    guide = auto(AutoNormal, local_model, init_scale=1e-6)(None, data)
    guide(_full_batch(data), None)
    pyro.get_param_store()["AutoNormal.locs.z"] = torch.arange(10.0)  # q(z[i]) concentrated at i
    index = torch.tensor([7, 2, 5])
    trace = poutine.trace(guide).get_trace(Batch({"y": data["y"][index]}, index, 10), None)
    assert torch.allclose(trace.nodes["z"]["value"], index.float(), atol=1e-3)


def test_joint_guide_refuses_local_latents_under_minibatches():
    with pytest.raises(UsageError, match="'eta'.*subsampled plate 'data'"):
        ppvi.fit("eight_schools", guide="fullrank", options={"parameterization": "noncentered"}, batch_size=4, steps=1, device="cpu")


def test_auto_passes_keyword_arguments_to_the_autoguide():
    data = _regression_data()
    pyro.clear_param_store()
    guide = auto(AutoLowRankMultivariateNormal, regression_model, rank=1)(None, data)
    guide(_full_batch(data), None)
    assert pyro.get_param_store()["AutoLowRankMultivariateNormal.cov_factor"].shape == (2, 1)


def test_auto_builds_other_autoguides_too():
    # AutoDelta (a MAP guide) takes create_plates like AutoNormal, and gets the data plate the same way.
    data = _regression_data()
    pyro.clear_param_store()
    guide = auto(AutoDelta, regression_model)(None, data)
    assert guide(_full_batch(data), None)["w"].shape == (2,)


def _elbo_class(guide_class):
    data = _regression_data()
    pyro.clear_param_store()
    guide = guide_class(None, data)
    batch = _full_batch(data)
    sites, depth = inspect_sites(regression_model, guide, batch, None)
    name, reason = choose_estimator("auto", sites)
    return type(make_estimator(name, reason, sites, regression_model, guide, batch, None, max_plate_nesting=depth).elbo)


def test_autoguides_get_monte_carlo_kl_since_their_sites_are_deltas():
    # An autoguide samples auxiliary latents and emits Delta sites; KL(Delta || Normal) has no
    # closed form, so claiming "analytic KL" (TraceMeanField_ELBO) would be a wrong reason.
    for name in ("meanfield", "fullrank", "lowrank"):
        assert _elbo_class(standard_guides(regression_model)[name]) is Trace_ELBO


def test_hand_written_mean_field_guide_gets_the_analytic_kl():
    from pyro.distributions import constraints

    def guide(batch, options):
        loc = pyro.param("w_loc", lambda: torch.zeros(2))
        scale = pyro.param("w_scale", lambda: torch.ones(2), constraint=constraints.positive)
        pyro.sample("w", dist.Normal(loc, scale).to_event(1))

    assert _elbo_class(lambda options, data: guide) is MeanFieldELBO
