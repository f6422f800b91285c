"""Estimator rules: which estimator `auto` picks, why, and which forced choices are refused."""

import pytest
import torch

import pyro
import pyro.distributions as dist

import ppvi
from ppvi.data import Batch
from ppvi.estimators import ENUM_MAX_SUPPORT, choose_estimator, inspect_sites, make_estimator


def _batch(n=5):
    return Batch({"x": torch.randn(n)}, torch.arange(n), n)


def continuous_model(batch, options):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", batch.num_data, subsample=batch.index):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=batch.x)


def continuous_guide(batch, options):
    pyro.sample("mu", dist.Normal(pyro.param("loc", torch.tensor(0.0)), 1.0))


def discrete_model(num_values):
    def model(batch, options):
        probs = torch.full((num_values,), 1.0 / num_values)
        with pyro.plate("data", batch.num_data, subsample=batch.index):
            c = pyro.sample("c", dist.Categorical(probs))
            pyro.sample("x", dist.Normal(c.float(), 1.0), obs=batch.x)

    return model


def discrete_guide(num_values):
    def guide(batch, options):
        logits = pyro.param("logits", torch.zeros(batch.num_data, num_values))
        with pyro.plate("data", batch.num_data, subsample=batch.index):
            pyro.sample("c", dist.Categorical(logits=logits[batch.index]))

    return guide


def map_guide(batch, options):
    pass  # no latent site: 'c' is left to the model, to be summed out


def poisson_model(batch, options):
    rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
    with pyro.plate("data", batch.num_data, subsample=batch.index):
        k = pyro.sample("k", dist.Poisson(rate))
        pyro.sample("x", dist.Normal(k, 1.0), obs=batch.x)


def poisson_guide(batch, options):
    pyro.sample("rate", dist.Gamma(pyro.param("a", torch.tensor(2.0)), 1.0))
    with pyro.plate("data", batch.num_data, subsample=batch.index):
        pyro.sample("k", dist.Poisson(3.0))


def sites_of(model, guide):
    pyro.clear_param_store()
    sites, _ = inspect_sites(model, guide, _batch(), None)
    return sites


def test_auto_picks_reparam_when_every_site_is_reparameterizable():
    name, reason = choose_estimator("auto", sites_of(continuous_model, continuous_guide))
    assert name == "reparam"
    assert "'mu'" in reason


def test_auto_picks_enum_for_small_discrete_support():
    name, reason = choose_estimator("auto", sites_of(discrete_model(3), discrete_guide(3)))
    assert name == "enum"
    assert "'c'" in reason and "3 values" in reason


def test_auto_picks_enum_for_a_site_the_guide_leaves_to_the_model():
    name, reason = choose_estimator("auto", sites_of(discrete_model(3), map_guide))
    assert name == "enum"
    assert "absent from the guide" in reason


def test_auto_picks_score_when_support_is_too_large_to_enumerate():
    size = ENUM_MAX_SUPPORT + 1
    name, reason = choose_estimator("auto", sites_of(discrete_model(size), discrete_guide(size)))
    assert name == "score"
    assert "'c'" in reason


def test_auto_picks_score_for_infinite_discrete_support():
    name, reason = choose_estimator("auto", sites_of(poisson_model, poisson_guide))
    assert name == "score"
    assert "'k' (Poisson)" in reason and "'rate' (Gamma)" in reason


def test_reparam_on_a_discrete_guide_site_names_the_site_and_the_alternatives():
    with pytest.raises(ppvi.UsageError, match=r"'c'.*Estimators that work: enum, score"):
        choose_estimator("reparam", sites_of(discrete_model(3), discrete_guide(3)))


@pytest.mark.parametrize("estimator", ["reparam", "score"])
def test_only_enum_can_sum_out_a_model_only_site(estimator):
    with pytest.raises(ppvi.UsageError, match=r"'c'.*absent from the guide.*Estimators that work: enum\."):
        choose_estimator(estimator, sites_of(discrete_model(3), map_guide))


def test_enum_on_infinite_support_is_refused():
    with pytest.raises(ppvi.UsageError, match=r"'k' \(Poisson\).*no finite support.*Estimators that work: score"):
        choose_estimator("enum", sites_of(poisson_model, poisson_guide))


def test_unknown_estimator_lists_the_valid_names():
    with pytest.raises(ppvi.UsageError, match="auto, reparam, score, enum"):
        choose_estimator("gumbel-ish", sites_of(continuous_model, continuous_guide))


def test_reparam_uses_analytic_kl_for_a_mean_field_guide():
    sites = sites_of(continuous_model, continuous_guide)
    estimator = make_estimator("reparam", "r", sites, continuous_model, continuous_guide, _batch(), None)
    assert type(estimator.elbo).__name__ == "MeanFieldELBO"  # ppvi.losses: TraceMeanField_ELBO's estimator


def test_reparam_keeps_monte_carlo_kl_when_guide_sites_depend_on_each_other():
    def model(batch, options):
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Normal(a, 1.0))

    def guide(batch, options):
        a = pyro.sample("a", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))
        pyro.sample("b", dist.Normal(a, 1.0))  # q(b | a): not mean-field

    sites = sites_of(model, guide)
    estimator = make_estimator("reparam", "r", sites, model, guide, _batch(), None)
    assert type(estimator.elbo).__name__ == "Trace_ELBO"


def test_score_makes_continuous_sites_non_reparameterized():
    # `--estimator score` on a continuous model is REINFORCE at every site (the lecture's comparison).
    sites = sites_of(continuous_model, continuous_guide)
    estimator = make_estimator("score", "s", sites, continuous_model, continuous_guide, _batch(), None)
    trace = pyro.poutine.trace(estimator.guide_fn).get_trace(_batch(), None)
    assert trace.nodes["mu"]["fn"].has_rsample is False
    assert trace.nodes["mu"]["infer"]["baseline"]["use_decaying_avg_baseline"] is True


def test_score_keeps_pathwise_gradients_for_continuous_sites_of_a_mixed_guide():
    sites = sites_of(poisson_model, poisson_guide)
    estimator = make_estimator("score", "s", sites, poisson_model, poisson_guide, _batch(), None)
    trace = pyro.poutine.trace(estimator.guide_fn).get_trace(_batch(), None)
    assert trace.nodes["rate"]["fn"].has_rsample is True
    assert "baseline" in trace.nodes["k"]["infer"]


def test_enum_elbo_of_a_discrete_model_equals_the_exact_sum():
    # ELBO with q(c_i) uniform: sum_i E_q[log p(c_i) + log p(x_i | c_i) - log q(c_i)], computed by hand.
    pyro.clear_param_store()
    batch = _batch(4)
    sites, depth = inspect_sites(discrete_model(3), discrete_guide(3), batch, None)
    estimator = make_estimator("enum", "e", sites, discrete_model(3), discrete_guide(3), batch, None, max_plate_nesting=depth)
    elbo, _ = estimator.loss(batch, None)
    values = torch.arange(3.0)
    log_lik = torch.distributions.Normal(values, 1.0).log_prob(batch.x.unsqueeze(-1))  # (4, 3)
    exact = (log_lik.mean(-1)).sum()  # log p(c) - log q(c) = 0 for uniform q and prior
    assert elbo.item() == pytest.approx(exact.item(), rel=1e-6)
