"""The estimator registry: one module per estimator, found on import; what probe() sees in a pair."""

import importlib.util
import sys
import textwrap

import pytest
import torch

import pyro
import pyro.distributions as dist

import ppvi
from ppvi.data import Batch
from ppvi.estimators import (
    DISCRETE,
    ESTIMATORS,
    NOT_REPARAMETERIZABLE,
    REPARAMETERIZABLE,
    build,
    choose_estimator,
    discover,
    probe,
    registered,
    spec,
    specs,
    unregister,
)

TOY = '''
"""A toy estimator: plain Trace_ELBO, for pairs whose guide samples every site pathwise."""
from pyro.infer import Trace_ELBO

from ppvi.estimators import Estimator, EstimatorSpec


def why_not(info):
    return None if not info.nonreparam and not info.model_only else "the toy needs pathwise sites only"


def reason(info, settings, auto):
    return "toy: plain Trace_ELBO" + (" (auto)" if auto else "")


def build(info, model_fn, guide_fn, *, reason, options, num_particles, vectorize_particles):
    return Estimator("toy", reason, Trace_ELBO(num_particles=num_particles), model_fn, guide_fn)


ESTIMATOR = EstimatorSpec(
    name="toy", why_not=why_not, reason=reason, build=build, options=lambda settings, total_steps: {"flavour": "plain"},
    auto_why_not=why_not, order=5, priority=5,
)
'''


def _module(path, name):
    spec_ = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    return module


def _batch(n=5):
    return Batch({"x": torch.randn(n)}, torch.arange(n), n)


def continuous_model(batch, options):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("observe_data", batch.num_data, subsample=batch.index):  # not called "data"
        pyro.sample("x", dist.Normal(mu, 1.0), obs=batch.x)


def continuous_guide(batch, options):
    pyro.sample("mu", dist.Normal(pyro.param("loc", torch.tensor(0.0)), 1.0))


def test_a_toy_estimator_module_is_picked_up_by_choose_build_and_fit(tmp_path):
    (tmp_path / "toy_estimator.py").write_text(TOY)
    toy = _module(tmp_path / "toy_estimator.py", "toy_estimator")
    with registered(toy.ESTIMATOR):
        assert "toy" in ESTIMATORS and list(ESTIMATORS)[:2] == ["auto", "toy"]
        pyro.clear_param_store()
        info = probe(continuous_model, continuous_guide, _batch(), None)
        assert choose_estimator("auto", info) == ("toy", "toy: plain Trace_ELBO (auto)")  # priority 5: before reparam
        estimator = build("toy", info, continuous_model, continuous_guide, _batch(), None)
        assert estimator.name == "toy" and estimator.options == {"flavour": "plain"}
        result = ppvi.fit("normal_normal", estimator="toy", steps=5, seed=0, progress=False)
        assert result.estimator == "toy" and result.estimator_reason == "toy: plain Trace_ELBO"
    assert "toy" not in ESTIMATORS
    with pytest.raises(ppvi.UsageError, match="unknown estimator 'toy'"):
        spec("toy")


def test_discover_registers_every_module_defining_an_estimator(tmp_path, monkeypatch):
    package = tmp_path / "more_estimators"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "toy.py").write_text(TOY)
    (package / "helpers.py").write_text(textwrap.dedent("VALUE = 1\n"))  # no ESTIMATOR: not registered
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        discover("more_estimators", [str(package)])
        assert [s.name for s in specs()][:1] == ["toy"]
        assert [s.name for s in specs("priority")][:3] == ["toy", "reparam", "enum"]
    finally:
        unregister("toy")
        sys.modules.pop("more_estimators.toy", None)
    assert [s.name for s in specs()] == ["reparam", "score", "enum", "gumbel", "iwae"]


def test_every_builtin_estimator_declares_the_contract():
    for entry in specs():
        assert callable(entry.why_not) and callable(entry.reason) and callable(entry.build) and callable(entry.options)
    assert {s.name for s in specs() if s.auto_why_not is not None} == {"reparam", "enum", "score"}
    assert {s.name for s in specs() if s.can_infer_discrete} == {"score", "enum", "gumbel"}


def test_probe_finds_the_data_plate_by_size_and_the_site_kinds():
    def model(batch, options):
        rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
        p = pyro.sample("p", dist.Beta(2.0, 2.0))
        with pyro.plate("observe_data", batch.num_data, subsample=batch.index):
            k = pyro.sample("k", dist.Bernoulli(p))
            pyro.sample("x", dist.Normal(k + rate, 1.0), obs=batch.x)

    def guide(batch, options):
        pyro.sample("rate", dist.Gamma(pyro.param("a", torch.tensor(2.0)), 1.0))
        pyro.sample("p", dist.Beta(2.0, 2.0).has_rsample_(False))
        with pyro.plate("observe_data", batch.num_data, subsample=batch.index):
            pyro.sample("k", dist.Bernoulli(0.5))

    pyro.clear_param_store()
    info = probe(model, guide, _batch(6), None)
    kinds = {s.name: s.kind for s in info.sites}
    assert kinds == {"rate": REPARAMETERIZABLE, "p": NOT_REPARAMETERIZABLE, "k": DISCRETE}
    assert info.data_plate == "observe_data" and info.num_data == 6 and info.plate_depth == 1
    assert info.local_plate is None  # 'rate' and 'p' are global
    assert {s.name: s.plates for s in info.sites}["k"] == ("observe_data",)


def test_probe_records_mean_field_analytic_kl_and_the_local_plate():
    pyro.clear_param_store()
    info = probe(continuous_model, continuous_guide, _batch(), None)
    assert info.analytic_kl and info.mean_field and info.data_plate == "observe_data"
    assert [s.kl_closed_form for s in info.sites] == [True]
