"""Stopping rules against outside truths: AR(1) theory for the MCSE, closed-form posteriors for stopped fits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pyro
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from ppvi.convergence import EarlyStopping, Stationarity, heldout_split, load_unconstrained_, mcse_of_mean, q_scales, split_rhat
from ppvi.data import Batch
from ppvi.gallery import load_model
from ppvi.pyro_util import trainable_params

SYNC_EVERY = 50


def ar1(num_steps, phi, seed, dim=1):
    """x_t = phi x_{t-1} + e_t, e_t ~ N(0, 1): stationary sd 1 / sqrt(1 - phi^2), ESS of the mean T (1 - phi) / (1 + phi)."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(num_steps, dim))
    x = np.zeros((num_steps, dim))
    x[0] = noise[0] / math.sqrt(1 - phi**2)
    for t in range(1, num_steps):
        x[t] = phi * x[t - 1] + noise[t]
    return x


def test_split_rhat_is_one_for_white_noise_and_large_for_a_trend():
    noise = np.random.default_rng(0).normal(size=(400, 3))
    assert np.all(split_rhat(noise) < 1.05)  # 4 windows of 100: R-hat - 1 is O(1/100)
    trend = noise + np.linspace(0, 5, 400)[:, None]
    assert np.all(split_rhat(trend) > 1.5)


def test_mcse_matches_ar1_theory():
    """For AR(1) with phi = 0.5, ESS/T = (1 - phi) / (1 + phi) = 1/3; over 200 series the estimate's mean is
    within 10% (the estimator's own sd at T = 2000 is about 5%)."""
    iterates = ar1(2000, 0.5, seed=1, dim=200)
    ess, mcse = mcse_of_mean(iterates)
    assert np.mean(ess) / 2000 == pytest.approx(1 / 3, rel=0.1)
    stationary_sd = 1 / math.sqrt(1 - 0.25)
    assert np.mean(mcse) == pytest.approx(stationary_sd / math.sqrt(2000 / 3), rel=0.1)


def feed(monitor, iterates):
    """Drive a monitor with prepared iterates as the loop would: observe each step, check at each sync."""
    for step, row in enumerate(iterates):
        monitor.observe(step, {"theta": torch.as_tensor(row, dtype=torch.float32)})
        if (step + 1) % SYNC_EVERY == 0 and monitor.check(step, None):
            return step
    return None


def test_stationarity_waits_for_the_drift_to_end_then_averages_to_the_fixed_point():
    """A drift over 600 steps, then AR(1) jitter (sd 1.15) around 3: stationarity is declared after the
    drift, and the average is within 4 MCSE of 3."""
    drift = np.linspace(-20, 3, 600)[:, None] * np.ones((1, 2))
    jitter = 3 + ar1(5000, 0.5, seed=2, dim=2)
    monitor = Stationarity({"theta": torch.zeros(2)}, mcse_threshold=0.05, unscaled=1.0)
    stop = feed(monitor, np.concatenate([drift, jitter]))
    assert stop is not None and monitor.converged
    assert monitor.stationary_step > 500
    assert "converged at step" in monitor.status
    averaged, mcse = monitor.averaged()
    assert np.all(np.abs(averaged["theta"].numpy() - 3) < 4 * mcse["theta"])


def test_a_drift_that_never_ends_is_reported_as_not_converged():
    monitor = Stationarity({"theta": torch.zeros(1)})
    assert feed(monitor, np.linspace(0, 10, 2000)[:, None]) is None
    assert not monitor.converged
    assert monitor.status.startswith("not converged within the budget: raise --max-steps")
    assert "still drift one way, a larger --lr" in monitor.status  # not "lower --lr", as it once said
    assert monitor.averaged() == ({}, {})


def test_early_stopping_restores_the_best_heldout_checkpoint():
    curve = [-10, -8, -7, -6.5, -6.6, -6.7, -6.55, -6.8, -7.0, -7.2]  # best at check 3, then no gain
    stopper = EarlyStopping(patience=4)
    for check, elbo in enumerate(curve):
        decision = stopper.update(check, elbo, {"w": torch.tensor([float(check)])})
        if decision:
            break
    assert decision.step == 7 and stopper.best_step == 3
    assert stopper.best_params["w"].item() == 3.0
    train, heldout = heldout_split(100, fraction=0.1, seed=0)
    assert len(heldout) == 10 and len(set(train.tolist()) | set(heldout.tolist())) == 100


def fit_gallery(name, lr, max_steps, seed=0):
    """Plain SVI with the monitor in the loop, as ppvi.fit wires it; returns (monitor, steps run)."""
    model_file = load_model(name)
    options = model_file.module.Options()
    data = model_file.module.load_data(None, options)
    batch = Batch(data, torch.arange(len(data["x"])), len(data["x"]))
    guide = model_file.module.GUIDES["meanfield"]
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    svi = SVI(model_file.module.model, guide, Adam({"lr": lr}), Trace_ELBO())
    svi.step(batch, options)
    monitor = Stationarity(trainable_params(), scale_fn=q_scales)
    for step in range(1, max_steps):
        svi.step(batch, options)
        monitor.observe(step, trainable_params())
        if (step + 1) % SYNC_EVERY == 0 and monitor.check(step, None):
            break
    averaged, _ = monitor.averaged()
    load_unconstrained_(pyro.get_param_store(), averaged)
    return monitor, step + 1, data["x"], options


@pytest.mark.slow
def test_normal_normal_stops_early_at_the_closed_form():
    """Stopped when MCSE/sd < 0.1: the mean is within 0.3 posterior sd (3 MCSE) and the sd within 15%
    (MCSE 0.1 on log sd, plus the small bias of a fixed-step Adam cloud); gallery default is 3,000 steps."""
    monitor, steps, x, options = fit_gallery("normal_normal", lr=0.2, max_steps=3000)
    precision = 1 / options.prior_scale**2 + len(x) / options.noise_scale**2
    mean, sd = float(x.sum() / options.noise_scale**2 / precision), precision**-0.5
    assert monitor.converged and steps <= 1500, monitor.status  # at most half the fixed budget
    assert abs(pyro.param("mu_loc").item() - mean) < 0.3 * sd
    assert pyro.param("mu_scale").item() == pytest.approx(sd, rel=0.15)


@pytest.mark.slow
def test_beta_bernoulli_stops_early_at_the_closed_form():
    monitor, steps, x, options = fit_gallery("beta_bernoulli", lr=0.2, max_steps=3000)
    posterior = torch.distributions.Beta(options.prior_a + x.sum(), options.prior_b + (1 - x).sum())
    q = torch.distributions.Beta(pyro.param("p_a").detach(), pyro.param("p_b").detach())
    sd = posterior.variance.sqrt().item()
    assert monitor.converged and steps < 3000, monitor.status
    assert abs(q.mean.item() - posterior.mean.item()) < 0.3 * sd
    assert q.variance.sqrt().item() == pytest.approx(sd, rel=0.15)


def test_too_few_steps_is_reported_as_not_converged():
    """Through ppvi.fit: no --steps, so the fit stops by itself, but --max-steps 100 ends it first."""
    import ppvi

    messages = []
    result = ppvi.fit("normal_normal", max_steps=100, seed=0, log_fn=messages.append)
    convergence = result.config["convergence"]["0"]
    assert len(result.elbo_trace) == 100 and not convergence["converged"]
    assert convergence["status"].startswith("not converged within the budget: raise --max-steps")
    assert convergence["reported"] == "last iterate" and any("not converged" in message for message in messages)


@pytest.mark.slow
def test_a_fit_that_converges_reports_its_step_and_the_average():
    """Through ppvi.fit with the gallery's lr and no --steps: stops well before the old fixed 3,000 steps,
    reports the step, and the reported parameters are the iterate average, at the closed form."""
    import ppvi

    result = ppvi.fit("normal_normal", seed=0, auto_stop=True)
    convergence = result.config["convergence"]["0"]
    assert convergence["converged"] and convergence["stop_step"] == len(result.elbo_trace) < 3000
    assert convergence["status"].startswith(f"converged at step {convergence['stop_step']}")
    assert convergence["reported"] == "iterate average"
    x = result.data["x"]
    precision = 1 / 10.0**2 + len(x)
    assert abs(result.params["mu_loc"].item() - float(x.sum()) / precision) < 0.3 * precision**-0.5
    assert result.params["mu_scale"].item() == pytest.approx(precision**-0.5, rel=0.15)


def test_fixed_steps_keep_the_old_behaviour_and_say_whether_the_elbo_still_rose():
    import ppvi

    result = ppvi.fit("normal_normal", steps=60, seed=0)
    summary = result.config["convergence"]["0"]
    assert len(result.elbo_trace) == 60 and summary["converged"] is None and summary["rule"] == "fixed budget"
    assert summary["status"].startswith("fixed budget of 60 steps: the ELBO is")


def test_fixed_budget_summary_tells_a_rising_elbo_from_a_flat_autocorrelated_one():
    """AR(1) noise (phi 0.9, as Adam's iterates make the ELBO) around a constant is flat; the same noise on
    a rise of 40 nats over 400 steps (10 over the last 100: 6 se of the batch-means trend) is rising."""
    from ppvi.convergence import fixed_budget_summary

    rng = np.random.default_rng(0)
    noise = np.zeros(400)
    for t in range(1, 400):
        noise[t] = 0.9 * noise[t - 1] + rng.normal()
    flat = fixed_budget_summary(-100 + noise)
    rising = fixed_budget_summary(-100 + noise + np.linspace(0, 40, 400))
    assert flat["elbo_rising"] is False and "flat over the last 100 steps" in flat["status"]
    assert rising["elbo_rising"] is True and "still rising" in rising["status"] and "raise --steps" in rising["status"]
    assert flat["converged"] is None and rising["converged"] is None  # no rule ran: never "converged"
    assert fixed_budget_summary(np.zeros(10))["elbo_rising"] is None


def test_a_converged_run_saves_its_iterate_average_and_resume_leaves_it_as_it_was(tmp_path):
    # Before: params.pt held the last iterate while the result reported the average, and --resume of a
    # run that stopped early trained on to the full budget (and reported a fresh, unconverged monitor).
    import ppvi
    from ppvi import rundir

    run = tmp_path / "run"
    fitted = ppvi.fit("normal_normal", max_steps=3000, device="cpu", out=run, progress=False)
    assert fitted.config["convergence"]["0"]["converged"]
    saved = rundir.load_checkpoint(run)["restarts"][0]
    assert torch.equal(saved["params"]["mu_loc"], fitted.params["mu_loc"])
    resumed = ppvi.resume(run)
    assert len(resumed.elbo_trace) == len(fitted.elbo_trace) < 3000
    assert resumed.config["convergence"] == fitted.config["convergence"]
    assert torch.equal(resumed.params["mu_loc"], fitted.params["mu_loc"])


def test_the_rule_cuts_the_learning_rate_until_the_average_is_precise():
    """Adam on a noisy quadratic (gradient theta - 3 + N(0, 1) noise, optimum 3, scale 1): at lr 0.5 the cloud is too
    wide for a precise average in two windows, so the rule cuts the lr, restarts from the average, and stops
    with the average within 3 MCSE-thresholds of 3; the learning rate it ran at is recorded per trace row."""
    import pandas as pd

    torch.manual_seed(0)
    theta = torch.zeros(2, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=0.5)
    monitor = Stationarity({"theta": theta}, optimizer=optimizer, unscaled=1.0)
    lrs = []
    for step in range(20000):
        theta.grad = theta.detach() - 3 + torch.randn(2)
        optimizer.step()
        monitor.observe(step)
        if (step + 1) % SYNC_EVERY == 0:
            rows = pd.DataFrame({"elbo": -0.5 * (theta.detach() - 3).square().sum().item() * np.ones(SYNC_EVERY)})
            decision = monitor.check(step, rows)
            lrs.append(rows["lr"].iloc[0])
            if decision:
                break
    assert monitor.converged and monitor.phase >= 1 and optimizer.param_groups[0]["lr"] < 0.5, monitor.status
    assert lrs[0] == 0.5 and lrs[-1] == pytest.approx(0.5 * monitor.shrink**monitor.phase)
    averaged, mcse = monitor.averaged()
    assert np.all(np.abs(averaged["theta"].numpy() - 3) < 0.3) and np.all(mcse["theta"] < 0.1)
    assert monitor.summary()["lr_halvings"] == monitor.phase and "converged at step" in monitor.status


def test_linear_regression_fullrank_stops_at_the_closed_form_before_the_fixed_budget():
    """--max-steps 9000 on the full-rank guide: the rule stops before the gallery's fixed 3,000 steps (measured: 1,550)
    at the closed-form posterior (known noise; Bishop 2006 eq. 3.53-3.54): means within 0.3 sd and log sds within
    0.3, 3 x the rule's MCSE threshold (0.1 of q's sd for a location, 0.1 for a log-scale)."""
    import ppvi

    result = ppvi.fit("linear_regression", "fullrank", seed=0, max_steps=9000)
    convergence = result.config["convergence"]["0"]
    assert convergence["converged"] and convergence["stop_step"] < 3000, convergence["status"]
    x, y = result.data["x"].double(), result.data["y"].double()
    design = torch.cat([torch.ones(len(x), 1, dtype=x.dtype), x], -1)
    cov = torch.linalg.inv(design.T @ design + torch.eye(design.shape[1]) / 100.0)
    mean, sd = cov @ design.T @ y, cov.diagonal().sqrt()
    from ppvi.diagnostics import to_inference_data

    posterior = to_inference_data(result, num_samples=4000, seed=1, predictive=False).posterior["w"].values.reshape(-1, design.shape[1])
    assert np.all(np.abs(posterior.mean(0) - mean.numpy()) < 0.3 * sd.numpy())
    assert np.all(np.abs(np.log(posterior.std(0) / sd.numpy())) < 0.3)


def test_a_minibatch_fit_stops_early_on_held_out_points_and_restores_the_best():
    """No --steps with --batch-size: a seeded tenth of the points is held out, its ELBO evaluated once an epoch
    (recorded in the trace), and the reported parameters are those of the best evaluation."""
    import ppvi

    result = ppvi.fit("normal_normal", batch_size=10, seed=0, auto_stop=True)  # (its file counts steps: asked for)
    heldout, convergence = result.config["heldout"], result.config["convergence"]["0"]
    assert heldout["num_data"] == 5 and result.config["num_data"] == 45  # the gallery data: 50 points
    evaluated = result.elbo_trace.dropna(subset=["heldout_elbo"])
    assert len(evaluated) >= 5 and convergence["reported"] == "best held-out checkpoint"
    best = evaluated["heldout_elbo"].max()
    assert convergence["best_heldout_elbo"] == pytest.approx(best)
    assert int(evaluated.loc[evaluated["heldout_elbo"].idxmax(), "step"]) + 1 == convergence["best_step"]
    if convergence["converged"]:
        assert convergence["stop_step"] == len(result.elbo_trace) < 3000


def test_diagnose_shows_how_the_fit_ended_beside_khat():
    import ppvi
    from ppvi.diagnostics import diagnose, format_diagnosis

    stopped = diagnose(ppvi.fit("normal_normal", seed=0, max_steps=9000), num_samples=500, write=False)
    assert "optimisation:\n  restart 0: converged at step" in format_diagnosis(stopped)
    assert stopped.to_json()["convergence"]["0"]["converged"]
    short = diagnose(ppvi.fit("normal_normal", max_steps=100, seed=0), num_samples=500, write=False)
    assert "a restart did not converge" in format_diagnosis(short)
    fixed = diagnose(ppvi.fit("normal_normal", steps=100, seed=0), num_samples=500, write=False)
    assert "optimisation:\n  restart 0: fixed budget of 100 steps: the ELBO is" in format_diagnosis(fixed)


def test_the_default_budget_follows_the_model_file():
    """No --steps: plain Pyro code (no tuned schedule) stops by itself; a gallery model keeps its declared steps;
    a minibatch fit stops early on held-out points; --max-steps turns the rule on anywhere."""
    from ppvi.config import FitConfig

    assert FitConfig().resolve({}).auto_stop and FitConfig().resolve({}).steps == 3000
    gallery = FitConfig().resolve({"steps": 600, "lr": 0.05})
    assert not gallery.auto_stop and gallery.steps == 600
    assert FitConfig(max_steps=500).resolve({"steps": 600}).auto_stop
    minibatch = FitConfig().resolve({"epochs": 100, "batch_size": 128})
    assert minibatch.auto_stop and minibatch.epochs == 100 and minibatch.steps is None
    assert not FitConfig(steps=10).resolve({}).auto_stop
    assert not FitConfig(batch_size=10).resolve({}).auto_stop  # a global latent's best held-out checkpoint fits the held-out points


def test_gallery_defaults_are_per_guide_where_the_file_says_so():
    """linear_regression stops by the rule with 8 particles, but its lowrank guide keeps the fixed schedule
    (FIT_DEFAULTS["by_guide"]): the rule never saw a cov_factor, known only up to a rotation, settle."""
    import ppvi

    meanfield = ppvi.fit("linear_regression", guide="meanfield", max_steps=5, device="cpu").config["settings"]
    lowrank = ppvi.fit("linear_regression", guide="lowrank", steps=5, device="cpu").config["settings"]
    assert (meanfield["num_particles"], meanfield["auto_stop"]) == (8, True)
    assert lowrank["num_particles"] == 1
    assert ppvi.load_model("linear_regression").fit_defaults["by_guide"]  # the model file's own dict is left whole


def test_lr_decay_is_a_schedule_the_rule_does_not_run_under():
    from ppvi.config import FitConfig
    from ppvi.errors import UsageError

    decayed = FitConfig(lr_decay=0.1).resolve({})
    assert not decayed.auto_stop and decayed.steps == 1000
    with pytest.raises(UsageError, match="--lr-decay sets a schedule"):
        FitConfig(lr_decay=0.1, max_steps=100).resolve({})


def test_a_run_that_stopped_early_on_held_out_points_opens_again(tmp_path):
    """diagnose rebuilds the data from the run directory: the held-out points count toward the size it checks."""
    import ppvi
    from ppvi.diagnostics import diagnose, format_diagnosis

    ppvi.fit("normal_normal", batch_size=10, seed=0, auto_stop=True, out=tmp_path / "run")
    report = format_diagnosis(diagnose(tmp_path / "run", num_samples=200, write=False))
    assert "optimisation:\n  restart 0:" in report


def plain_normal_mean(obs):
    """A normal mean written the plain Pyro way: model(obs), its own plate name, known noise sd 1."""
    mu = pyro.sample("mu", pyro.distributions.Normal(0.0, 10.0))
    with pyro.plate("obs_plate", obs.shape[0]):
        pyro.sample("y", pyro.distributions.Normal(mu, 1.0), obs=obs)


def normal_mean_data():
    y = torch.randn(100, generator=torch.Generator().manual_seed(0))
    return y - y.mean() + 0.6  # sample mean 0.6: posterior N(0.6 * 100 / 100.01, 100.01^-1/2)


@pytest.mark.parametrize("guide", ["own", None], ids=["own-autonormal-from-0", "default-autonormal-laplace"])
def test_your_own_code_stops_at_the_closed_form(guide):
    """Through the plain-callables path, from the user's AutoNormal (location 0: the ELBO rises steadily for
    ~1,000 steps at lr 0.01; a flat-ELBO test fooled by that rise once stopped it 0.11 sd off) and from ppvi's
    default AutoNormal (Laplace start). Closed form: mean 0.59994, sd 0.099995; the rule asks MCSE < 0.1 sd."""
    from pyro.infer.autoguide import AutoNormal

    import ppvi

    own = AutoNormal(plain_normal_mean) if guide == "own" else None
    result = ppvi.fit(plain_normal_mean, own, data={"obs": normal_mean_data()}, seed=0, device="cpu")
    status = result.config["convergence"]["0"]
    assert status["converged"] and status["stop_step"] <= 3000, status["status"]
    expected_start = "default start (your own autoguide" if guide == "own" else "Laplace start"
    assert result.config["start"]["0"].startswith(expected_start)
    precision = 1 / 10.0**2 + 100
    mean, sd = 0.6 * 100 / precision, precision**-0.5
    assert abs(result.params["AutoNormal.locs.mu"].item() - mean) < 0.3 * sd
    assert result.params["AutoNormal.scales.mu"].item() == pytest.approx(sd, rel=0.15)


def test_your_own_autoguide_instance_gets_the_laplace_start_only_when_asked():
    from pyro.infer.autoguide import AutoNormal

    import ppvi

    data = {"obs": normal_mean_data()}
    asked = ppvi.fit(plain_normal_mean, AutoNormal(plain_normal_mean), data=data, init="laplace", steps=5, device="cpu")
    assert asked.config["start"]["0"].startswith("Laplace start")
    by_name = ppvi.fit(plain_normal_mean, "AutoNormal", data=data, steps=5, device="cpu")
    assert by_name.config["start"]["0"].startswith("Laplace start")
