"""Plain Pyro code as users write it: files, callables, their own plates; every failure of issue 10 refused or fixed."""

from __future__ import annotations

import textwrap

import pytest
import torch
from conftest import run_cli

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoNormal

from ppvi import fitting
from ppvi.data import Batch
from ppvi.errors import UsageError
from ppvi.gallery import ModelFile, load_model, load_pair
from ppvi.pyro_util import fit_scope, rng_scope

COIN = '''
import torch
import pyro
import pyro.distributions as dist
import torch.distributions.constraints as constraints

data = torch.cat([torch.ones(6), torch.zeros(4)])

def model(data):
    f = pyro.sample("latent_fairness", dist.Beta(torch.tensor(10.0), torch.tensor(10.0)))
    with pyro.plate("observe_data", len(data)):
        pyro.sample("obs", dist.Bernoulli(f), obs=data)

def guide(data):
    alpha_q = pyro.param("alpha_q", torch.tensor(15.0), constraint=constraints.positive)
    beta_q = pyro.param("beta_q", torch.tensor(15.0), constraint=constraints.positive)
    pyro.sample("latent_fairness", dist.Beta(alpha_q, beta_q))
'''


def write(tmp_path, text, name="user_model.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def first_batch_trace(pair, data, batch_size=None, seed=0):
    """Build a pair as the fit loop does and trace guide and model on the first (mini)batch."""
    num_data = next(iter(data.values())).shape[0]
    index = torch.arange(batch_size or num_data)
    batch = Batch({k: v.index_select(0, index) for k, v in data.items()}, index, num_data)
    with fit_scope(), rng_scope(seed):
        model_fn, guide_fn = pair.build_pair(pair.default_guide, None, data)
        guide_trace = poutine.trace(guide_fn).get_trace(batch, None)
        model_trace = poutine.trace(poutine.replay(model_fn, trace=guide_trace)).get_trace(batch, None)
    return model_trace, guide_trace


# ----------------------------------------------------------------------------- loading


def test_plain_file_runs_with_module_level_data(tmp_path):
    # issue 10, 2: "defines no 'GUIDES'", then "no built-in data", then an internal TypeError
    pair = load_model(write(tmp_path, COIN))
    assert pair.default_guide == "guide" and "plain Pyro" in pair.convention
    data = pair.load_data(None, None)
    assert torch.equal(data["data"], torch.cat([torch.ones(6), torch.zeros(4)]))
    result = fitting.fit(pair, steps=30, lr=0.01)
    assert set(result.params) == {"alpha_q", "beta_q"}


def test_file_colon_names_model_and_guide(tmp_path):
    path = write(tmp_path, COIN.replace("def model(", "def coin(").replace("def guide(", "def coin_guide("))
    pair = load_pair(f"{path}:coin", "coin_guide")
    assert pair.default_guide == "coin_guide"
    model_trace, guide_trace = first_batch_trace(pair, pair.load_data(None, None))
    assert "latent_fairness" in guide_trace.nodes and "obs" in model_trace.nodes
    other = load_pair(f"{path}:coin", f"{path}:coin_guide")
    assert other.default_guide == "coin_guide"


def test_ppvi_convention_still_detected():
    model_file = load_pair("beta_bernoulli")
    assert type(model_file) is ModelFile and "ppvi model file" in model_file.convention


def test_csv_columns_map_to_arguments_by_name(tmp_path):
    path = write(tmp_path, "def model(x, y=None):\n    pass\n")
    (tmp_path / "d.csv").write_text("x,y\n1,2\n3,4\n5,6\n")
    (tmp_path / "plain.csv").write_text("1,2\n3,4\n5,6\n")
    pair = load_pair(path, "AutoNormal")
    data = pair.load_data(str(tmp_path / "d.csv"), None)
    assert torch.equal(data["x"], torch.tensor([1.0, 3.0, 5.0])) and torch.equal(data["y"], torch.tensor([2.0, 4.0, 6.0]))
    whole = pair.load_data(str(tmp_path / "plain.csv"), None)  # no header: the table is the first argument
    assert list(whole) == ["x"] and whole["x"].shape == (3, 2)


def test_in_memory_sources_map_to_arguments():
    def model(x, y=None, scale=1.0):
        pass

    pair = load_pair(model)
    x, y = torch.randn(5, 2), torch.randn(5)
    assert set(pair.load_data((x, y), None)) == {"x", "y"}
    assert set(pair.load_data(x, None)) == {"x"}
    data = pair.load_data({"x": x, "y": y, "scale": 2.0}, None)
    assert set(data) == {"x", "y"} and pair.constants == {"scale": 2.0}


# ----------------------------------------------------------------------------- user errors


def test_wrong_signature_names_the_expected_ones(tmp_path):
    path = write(tmp_path, COIN.replace("def guide(data):", "def guide(data, extra):"))
    pair = load_pair(path)
    with pytest.raises(UsageError, match=r"guide\(data, extra\).*model\(data\)"):
        first_batch_trace(pair, pair.load_data(None, None))


def test_exception_in_user_code_names_file_and_line(tmp_path):
    path = write(tmp_path, COIN.replace("    f = pyro.sample", "    assert len(data) > 100, 'too few flips'\n    f = pyro.sample"))
    pair = load_pair(path)
    with pytest.raises(UsageError, match=rf"{path.name}:\d+: AssertionError in your code: too few flips"):
        first_batch_trace(pair, pair.load_data(None, None))


def test_exception_at_import_names_file_and_line(tmp_path):
    path = write(tmp_path, "import torch\nassert False, 'broken at import'\n")
    result = run_cli("check", str(path))
    assert result.code == 2 and f"{path.name}:2" in result.text and "broken at import" in result.text


def test_missing_module_level_data_says_what_to_give(tmp_path):
    pair = load_pair(write(tmp_path, "def model(x, y=None):\n    pass\n"))
    with pytest.raises(UsageError, match=r"needs x: define module-level x .* or give --data"):
        pair.load_data(None, None)


# ----------------------------------------------------------------------------- minibatches


def regression(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with pyro.plate("points", x.shape[0]):  # no subsample=: the way Pyro's tutorials write it
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(x @ w + z, 1.0), obs=y)


def test_minibatch_scales_sites_in_the_data_plate_and_no_others():
    data = {"x": torch.randn(100, 2), "y": torch.randn(100)}
    model_trace, guide_trace = first_batch_trace(load_pair(regression, "AutoNormal"), data, batch_size=20)
    assert model_trace.nodes["obs"]["scale"] == 5.0 and model_trace.nodes["z"]["scale"] == 5.0
    assert guide_trace.nodes["z"]["scale"] == 5.0  # the guide's local latent: same points, same weight
    assert model_trace.nodes["w"]["scale"] == 1.0 and guide_trace.nodes["w"]["scale"] == 1.0
    full_model, _ = first_batch_trace(load_pair(regression, "AutoNormal"), data)
    assert full_model.nodes["obs"]["scale"] == 1.0


def test_minibatch_elbo_is_unbiased_for_the_full_batch():
    # With every latent fixed, the scaled log-density of the batches of one epoch averages exactly to the full one.
    data = {"x": torch.randn(60, 2), "y": torch.randn(60)}
    pair = load_pair(regression, "AutoDelta")
    with fit_scope(), rng_scope(0):
        model_fn, guide_fn = pair.build_pair(pair.default_guide, None, data)
        full = Batch(data, torch.arange(60), 60)
        guide_full = poutine.trace(guide_fn).get_trace(full, None)
        values = {"w": guide_full.nodes["w"]["value"], "z": guide_full.nodes["z"]["value"]}
        total = poutine.trace(poutine.condition(model_fn, values)).get_trace(full, None).log_prob_sum()
        parts = []
        for start in range(0, 60, 15):
            index = torch.arange(start, start + 15)
            batch = Batch({k: v[index] for k, v in data.items()}, index, 60)
            part = poutine.trace(poutine.condition(model_fn, {"w": values["w"], "z": values["z"][index]})).get_trace(batch, None)
            parts.append(part.log_prob_sum())
    # w's prior counts once per batch; the data-plate sites are scaled by 4
    assert torch.allclose(torch.stack(parts).mean(), total, rtol=1e-5)


def test_minibatch_refused_without_a_data_plate(tmp_path):
    def unplated(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        pyro.sample("obs", dist.Normal(x @ w, 1.0).to_event(1), obs=y)

    data = {"x": torch.randn(50, 2), "y": torch.randn(50)}
    with pytest.raises(UsageError, match=r'no vectorized plate of the data\'s size \(50\).*pyro.plate\("data", len\(x\)\)'):
        first_batch_trace(load_pair(unplated, "AutoNormal"), data, batch_size=10)
    first_batch_trace(load_pair(unplated, "AutoNormal"), data)  # full batch is fine


def test_minibatch_refused_for_packed_autoguide_with_local_latents():
    data = {"x": torch.randn(50, 2), "y": torch.randn(50)}
    with pytest.raises(UsageError, match="AutoMultivariateNormal packs every latent"):
        first_batch_trace(load_pair(regression, "AutoMultivariateNormal"), data, batch_size=10)


def test_gallery_models_with_subsample_are_not_double_scaled():
    model_file = load_pair("beta_bernoulli")
    data = model_file.load_data(None, model_file.make_options(None))
    num_data = data["x"].shape[0]
    index = torch.arange(10)
    batch = Batch({"x": data["x"][index]}, index, num_data)
    with fit_scope():
        model_fn, guide_fn = model_file.build_pair(None, model_file.make_options(None), data)
        options = model_file.make_options(None)
        guide_trace = poutine.trace(guide_fn).get_trace(batch, options)
        trace = poutine.trace(poutine.replay(model_fn, trace=guide_trace)).get_trace(batch, options)
    assert trace.nodes["x"]["scale"] == num_data / 10


# ----------------------------------------------------------------------------- fresh state per restart

STATEFUL = '''
import torch
import pyro
import pyro.distributions as dist
from pyro.infer.autoguide import AutoNormal

encoder = torch.nn.Linear(1, 2)  # created at import: before any seed ppvi sets

def model(x):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(z, 1.0), obs=x)

def guide(x):
    pyro.module("encoder", encoder)
    out = encoder(x.unsqueeze(-1))
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(out[:, 0], out[:, 1].exp()))
'''


def test_restarts_start_fresh_and_same_seed_is_identical(tmp_path):
    path = write(tmp_path, STATEFUL)
    x = torch.linspace(-1, 1, 8)
    first = fitting.fit(load_pair(path), data=x, steps=20, lr=0.1, restarts=2, seed=3)
    again = fitting.fit(load_pair(path), data=x, steps=20, lr=0.1, restarts=2, seed=3)
    for one, two in zip(first.restarts, again.restarts):
        assert one.elbo_trace["elbo"].tolist() == two.elbo_trace["elbo"].tolist()
    # restart 1 did not start where restart 0 ended: its first ELBO is not restart 0's last
    r0, r1 = first.restarts
    weight = next(name for name in r0.params if name.startswith("encoder") and name.endswith("weight"))
    assert not torch.equal(r0.params[weight], r1.params[weight])
    assert r1.elbo_trace["elbo"].iloc[0] != pytest.approx(r0.elbo_trace["elbo"].iloc[-1], rel=1e-3)


def test_callables_with_module_state_and_autoguide_instance_restart_fresh():
    net = torch.nn.Linear(1, 1)

    def model(x):
        scale = torch.nn.functional.softplus(net(torch.ones(1))).squeeze()
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(mu, scale), obs=x)

    guide = AutoNormal(model)  # an instance, as in Pyro's tutorials
    pair = load_pair(model, guide)
    data = pair.load_data(torch.randn(6), None)
    with fit_scope():
        builds = []
        for seed in (0, 0, 1):
            with pyro.get_param_store().scope(), rng_scope(seed):
                model_fn, guide_fn = pair.build_pair(None, None, data)
                trace = poutine.trace(guide_fn).get_trace(Batch(data, torch.arange(6), 6), None)
                builds.append((net.weight.detach().clone(), trace.nodes["mu"]["value"].detach().clone()))
    (w0, m0), (w0b, m0b), (w1, m1) = builds
    assert torch.equal(w0, w0b) and torch.equal(m0, m0b)  # same seed: identical
    assert not torch.equal(w0, w1)  # another seed: fresh weights


# ----------------------------------------------------------------------------- guides


def test_improper_prior_starts_from_a_feasible_point():
    def model(x):
        scale = pyro.sample("scale", dist.ImproperUniform(constraints.positive, (), ()))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(0.0, scale), obs=x)

    result = fitting.fit(load_pair(model, "AutoNormal"), data=torch.randn(20), steps=20, lr=0.05)
    assert torch.isfinite(result.params["AutoNormal.locs.scale"])


def test_autoguide_class_in_guides_of_a_ppvi_file(tmp_path):
    path = write(tmp_path, '''
        import pyro, torch
        import pyro.distributions as dist
        from pyro.infer.autoguide import AutoNormal

        def load_data(source, options):
            return {"x": torch.randn(20)}

        def model(batch, options):
            mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
            with pyro.plate("data", batch.num_data, subsample=batch.index):
                pyro.sample("obs", dist.Normal(mu, 1.0), obs=batch.x)

        GUIDES = {"autonormal": AutoNormal}
    ''')
    result = fitting.fit(str(path), steps=10)
    assert "AutoNormal.locs.mu" in result.params


# ----------------------------------------------------------------------------- ppvi check


def test_check_prints_sites_plate_and_estimator(tmp_path):
    path = write(tmp_path, COIN)
    result = run_cli("check", str(path), "--batch-size", "5")
    assert result.code == 0, result.text
    assert "latent_fairness: Beta" in result.text and "continuous, reparameterizable" in result.text
    assert "data plate: 'observe_data'" in result.text and "scaled by N/B by ppvi" in result.text
    assert "auto picks: reparam" in result.text


def test_check_reports_nonreparameterized_site_and_exits_2_on_refusal(tmp_path):
    path = write(tmp_path, COIN.replace("dist.Beta(alpha_q, beta_q)", "NonreparameterizedBeta(alpha_q, beta_q)").replace(
        "import pyro\n", "import pyro\nfrom pyro.distributions.testing.fakes import NonreparameterizedBeta\n", 1)
        .replace("    with pyro.plate(\"observe_data\", len(data)):\n        pyro.sample(\"obs\", dist.Bernoulli(f), obs=data)",
                 "    pyro.sample(\"obs\", dist.Bernoulli(f).expand([len(data)]).to_event(1), obs=data)"))
    result = run_cli("check", str(path), "--batch-size", "5")
    assert "continuous, not reparameterizable" in result.text
    assert "auto picks: score" in result.text
    assert result.code == 2 and "no vectorized plate" in result.text


def test_fit_help_names_the_convention(tmp_path):
    path = write(tmp_path, COIN)
    assert "plain Pyro" in run_cli("fit", str(path), "--help").text
    assert "ppvi model file" in run_cli("fit", "beta_bernoulli", "--help").text


def test_cli_fits_a_plain_file_with_autoguide_and_csv(tmp_path):
    path = write(tmp_path, COIN)
    (tmp_path / "flips.csv").write_text("data\n1\n1\n1\n1\n1\n1\n0\n0\n0\n0\n")
    result = run_cli("fit", str(path), "--guide", "AutoNormal", "--data", str(tmp_path / "flips.csv"), "--steps", "20",
                     "--out", str(tmp_path / "run"))
    assert result.code == 0, result.text
    assert (tmp_path / "run" / "config.json").exists()


def test_ppvi_fit_takes_a_callable_and_an_autoguide_name():
    import ppvi

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)

    assert "AutoNormal.locs.mu" in ppvi.fit(model, data=torch.randn(5), steps=5).params  # guide=None: AutoNormal
    assert "AutoDelta.mu" in ppvi.fit(model, "AutoDelta", data=torch.randn(5), steps=5).params


def test_standard_guides_start_feasible_under_an_improper_prior(tmp_path):
    path = write(tmp_path, '''
        import pyro, torch
        import pyro.distributions as dist
        from pyro.distributions import constraints
        from ppvi.guides import standard_guides

        def load_data(source, options):
            return {"x": torch.randn(20)}

        def model(batch, options):
            scale = pyro.sample("scale", dist.ImproperUniform(constraints.positive, (), ()))
            with pyro.plate("data", batch.num_data, subsample=batch.index):
                pyro.sample("obs", dist.Normal(0.0, scale), obs=batch.x)

        GUIDES = standard_guides(model)
    ''')
    for guide in ("meanfield", "fullrank"):
        result = fitting.fit(str(path), guide=guide, steps=5)
        assert all(torch.isfinite(value).all() for value in result.params.values())


def test_describe_fit_prints_elbo_values_and_posterior_moments():
    from ppvi.report import describe_fit

    def model(data):
        f = pyro.sample("f", dist.Beta(10.0, 10.0))
        with pyro.plate("flips", len(data)):
            pyro.sample("obs", dist.Bernoulli(f), obs=data)

    result = fitting.fit(load_pair(model, "AutoNormal"), data=torch.cat([torch.ones(6), torch.zeros(4)]), steps=10, restarts=2)
    text = describe_fit(result)
    assert "restart 0 (seed 0): final ELBO" in text and "restart 1 (seed 1)" in text
    assert "AutoNormal.locs.f = " in text and "f: 0." in text and "+-" in text
