"""Gradient estimators against outside truths: exact enumeration, closed-form evidence, measured variance, the CLI.

1. On a discrete toy whose ELBO can be summed exactly (3 points with a OneHotCategorical site of 3
   classes, 27 configurations, or a Bernoulli site, 8; factorised, so the sum is per point), autograd of the exact
   ELBO is the true gradient: score (every baseline) and enum must agree with it; gumbel's relaxed gradient must be biased, less so
   as the temperature falls; gumbel's reported ELBO must be unbiased for the discrete ELBO.
2. On Gaussian models with log p(x) in closed form, the IWAE bound (per-point and joint paths)
   lies between the ELBO and log p(x) and rises with K (on minibatches the joint path is refused).
3. On catvae the neural baseline cuts the encoder's gradient variance (measured by ppvi.gradvar).
4. Bad estimator options through the real CLI: exit code 2, one error line, no run directory.
5. End to end runs of fit / gradvar with the new estimators and their trace columns.

Statistical tolerances: a mean of D independent draws is compared with its truth within 4
standard errors, SE estimated from the draws' spread (D >= 50, so the CLT and the t-quantiles are
close to normal). A two-sided 4 SE excursion has probability 6.3e-5 per comparison under the
normal approximation; every test is seeded, so the numbers are fixed, and the familywise
false-alarm rate of each test is stated next to it.
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

import pyro
import pyro.distributions as dist

import ppvi
from ppvi.data import Batch
from ppvi.estimators import EstimatorSettings, choose_estimator, inspect_sites, make_estimator
from ppvi.gradvar import _warmup, gradient_variance

Z = 4.0  # standard errors allowed between a Monte Carlo mean and its exact value


# ----------------------------------------------------------------------------- 1. discrete toy, exact ELBO

MU = torch.tensor([-2.0, 0.5, 3.0])  # component means
PRIOR = torch.tensor([0.2, 0.3, 0.5])  # p(z_i = k)
X = torch.tensor([-1.0, 0.8, 2.5])
LOGITS = torch.tensor([[0.5, -0.3, 0.1], [-1.0, 0.7, 0.2], [0.3, 0.3, -0.8]])  # q's logits, far from the posterior
B_PRIOR, B_MU, B_LOGITS = 0.3, torch.tensor([-1.0, 1.5]), torch.tensor([0.4, -0.6, 1.1])  # the Bernoulli variant


def onehot_model(batch, options):
    with pyro.plate("data", batch.num_data, subsample=batch.index):
        z = pyro.sample("z", dist.OneHotCategorical(probs=PRIOR))
        pyro.sample("x", dist.Normal((z * MU).sum(-1), 1.0), obs=batch.x)


def onehot_guide(batch, options):
    logits = pyro.param("logits", LOGITS.clone())
    with pyro.plate("data", batch.num_data, subsample=batch.index):
        pyro.sample("z", dist.OneHotCategorical(logits=logits[batch.index]))


def bernoulli_model(batch, options):
    with pyro.plate("data", batch.num_data, subsample=batch.index):
        z = pyro.sample("z", dist.Bernoulli(B_PRIOR))
        pyro.sample("x", dist.Normal(B_MU[0] + (B_MU[1] - B_MU[0]) * z, 1.0), obs=batch.x)


def bernoulli_guide(batch, options):
    logits = pyro.param("logits", B_LOGITS.clone())
    with pyro.plate("data", batch.num_data, subsample=batch.index):
        pyro.sample("z", dist.Bernoulli(logits=logits[batch.index]))


def _replicated(fn, copies):
    """fn run in a plate of `copies` independent replicas: one call draws `copies` particles (gumbel loops its own)."""

    def replicated(batch, options):
        with pyro.plate("replicas", copies, dim=-2):
            return fn(batch, options)

    return replicated


TOY_BATCH = Batch({"x": X}, torch.arange(3), 3)
TOYS = {"onehot": (onehot_model, onehot_guide), "bernoulli": (bernoulli_model, bernoulli_guide)}


def exact_elbo(logits: torch.Tensor, site: str = "onehot") -> torch.Tensor:
    """sum over all configurations (3^3 or 2^3) of q(z)(log p(x, z) - log q(z)); q and p factorise over points, so per point."""
    if site == "onehot":
        log_q = torch.log_softmax(logits, -1)
        log_prior, means = PRIOR.double().log(), MU.double()
    else:  # columns z = 0, 1
        log_q = torch.stack([torch.nn.functional.logsigmoid(-logits), torch.nn.functional.logsigmoid(logits)], -1)
        log_prior, means = torch.tensor([1 - B_PRIOR, B_PRIOR], dtype=torch.float64).log(), B_MU.double()
    log_joint = log_prior + torch.distributions.Normal(means, 1.0).log_prob(X.double().unsqueeze(-1))
    return (log_q.exp() * (log_joint - log_q)).sum()


def exact_gradient(site: str = "onehot"):
    """(ELBO, d(-ELBO)/d logits): the truth every estimator's surrogate-loss gradient is compared with."""
    logits = (LOGITS if site == "onehot" else B_LOGITS).double().requires_grad_(True)
    elbo = exact_elbo(logits, site)
    (grad,) = torch.autograd.grad(-elbo, logits)
    return elbo.item(), grad


def _toy_estimator(name, settings, site="onehot", replicas=None, **kwargs):
    model, guide = TOYS[site]
    if replicas is not None:
        model, guide = _replicated(model, replicas), _replicated(guide, replicas)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    sites, depth = inspect_sites(model, guide, TOY_BATCH, None)
    chosen, reason = choose_estimator(name, sites, settings)
    return make_estimator(chosen, reason, sites, model, guide, TOY_BATCH, None, max_plate_nesting=depth, settings=settings, **kwargs)


def _draw(estimator, num_batches, per_batch=1):
    """num_batches gradient draws w.r.t. the logits (each a mean over per_batch particles) and the ELBOs."""
    logits = pyro.param("logits")
    grads, elbos = [], []
    for _ in range(num_batches):
        elbo, loss = estimator.loss(TOY_BATCH, None, step=0)
        (grad,) = torch.autograd.grad(loss / per_batch, logits)
        grads.append(grad.double())
        elbos.append(elbo.double() / per_batch)
    grads, elbos = torch.stack(grads), torch.stack(elbos)
    return grads.mean(0), grads.std(0) / math.sqrt(num_batches), elbos.mean().item(), elbos.std().item() / math.sqrt(num_batches)


@pytest.mark.parametrize("site", ["onehot", "bernoulli"])
def test_enum_gradient_and_elbo_are_exact(site):
    estimator = _toy_estimator("enum", EstimatorSettings(), site)
    mean, _, elbo, _ = _draw(estimator, 2)
    truth_elbo, truth = exact_gradient(site)
    assert elbo == pytest.approx(truth_elbo, rel=1e-6)  # float32 sums of a dozen terms of size ~10
    assert torch.allclose(mean, truth, atol=1e-5)


SCORE_BATCHES, SCORE_PARTICLES = 50, 400  # 20,000 single-sample draws per baseline


@pytest.mark.parametrize("baseline", ["none", "average", "neural"])
def test_score_gradient_is_unbiased_against_exact_enumeration(baseline):
    # Each loss call averages SCORE_PARTICLES vectorized particles; the SE of the grand mean comes from
    # the spread of the SCORE_BATCHES batch means. The baseline (a decaying average, plus a network of q's
    # logits that we do not step during the draws) depends only on earlier draws, so each draw is
    # conditionally unbiased: the draws are martingale differences around the truth, and the
    # batch-means SE stays valid although the average keeps updating.
    # Familywise false alarm: 9 coordinates x 6.3e-5 = 5.7e-4 per baseline (t_49 tails: 2e-3).
    estimator = _toy_estimator("score", EstimatorSettings(baseline=baseline), num_particles=SCORE_PARTICLES, vectorize_particles=True)
    if baseline != "none":
        _warmup(estimator, lambda step: TOY_BATCH, None, steps=50, lr=1e-2)  # fits only the baseline; the logits stay put
        assert torch.equal(pyro.param("logits").detach(), LOGITS)
    mean, se, elbo, elbo_se = _draw(estimator, SCORE_BATCHES)
    truth_elbo, truth = exact_gradient()
    assert (se > 0).all()
    assert ((mean - truth).abs() <= Z * se).all(), f"z-scores {((mean - truth) / se).tolist()}"
    assert abs(elbo - truth_elbo) <= Z * elbo_se


GUMBEL_BATCHES, GUMBEL_REPLICAS = 50, 200  # 10,000 relaxed draws per temperature


def _gumbel_draws(temperature, site="onehot", straight_through=False):
    settings = EstimatorSettings(temperature=temperature, anneal_rate=0.0, min_temperature=temperature, straight_through=straight_through)
    estimator = _toy_estimator("gumbel", settings, site, replicas=GUMBEL_REPLICAS)
    assert estimator.temperature_at(0) == estimator.temperature_at(10_000) == temperature
    return _draw(estimator, GUMBEL_BATCHES, GUMBEL_REPLICAS)


@pytest.mark.parametrize("site", ["onehot", "bernoulli"])
def test_gumbel_gradient_bias_shrinks_as_the_temperature_falls(site):
    # The relaxed objective's gradient is not the discrete ELBO's; its bias vector b(tau) = E[g] - truth
    # should shrink as tau -> 0. We estimate ||b|| by ||mean - truth||, which is off by at most
    # ||mean - E mean||, whose root mean square is ||se|| (the norm of the per-coordinate SEs): so
    # differences of the norms are compared with 4 x sqrt(||se_a||^2 + ||se_b||^2).
    # Measured (seed 0) at tau = 2, 1, 0.3: onehot ||b|| = 2.27, 1.52, 0.46 (||se|| = 0.007, 0.018, 0.053);
    # bernoulli ||b|| = 0.68, 0.38, 0.13 (||se|| = 0.002, 0.006, 0.019).
    # Familywise false alarm: 3 one-sided comparisons, each at most 3.2e-5 under the normal approximation.
    _, truth = exact_gradient(site)
    bias, se = {}, {}
    for tau in (2.0, 1.0, 0.3):
        mean, coordinate_se, _, _ = _gumbel_draws(tau, site)
        bias[tau], se[tau] = (mean - truth).norm().item(), coordinate_se.norm().item()
    print(f"gumbel ({site}) gradient bias ||E g - exact||:", {tau: f"{bias[tau]:.3f} (se {se[tau]:.3f})" for tau in bias})
    assert bias[2.0] > Z * se[2.0]  # the relaxation's bias is real, not noise
    assert bias[2.0] - bias[1.0] > Z * math.hypot(se[2.0], se[1.0])
    assert bias[1.0] - bias[0.3] > Z * math.hypot(se[1.0], se[0.3])


@pytest.mark.parametrize("site", ["onehot", "bernoulli"])
@pytest.mark.parametrize("straight_through", [False, True])
def test_gumbel_reports_an_unbiased_discrete_elbo(site, straight_through):
    # The trace's `elbo` is log p(x | hard z) - KL(q || p) at z = the Gumbel-max (or logistic) draw, an
    # exact sample from q: its mean is the exact discrete ELBO. 10,000 draws, SE from 50 batch means;
    # false alarm 6.3e-5 per case.
    truth_elbo, _ = exact_gradient(site)
    _, _, elbo, elbo_se = _gumbel_draws(1.0, site, straight_through)
    assert abs(elbo - truth_elbo) <= Z * elbo_se, (elbo, elbo_se, truth_elbo)
    if straight_through:  # the forward pass is discrete: the objective is the discrete ELBO itself
        estimator = _toy_estimator("gumbel", EstimatorSettings(straight_through=True), site)
        elbo, loss = estimator.loss(TOY_BATCH, None)
        assert elbo.item() == pytest.approx(-loss.item(), rel=1e-6)


def test_a_temperature_below_the_default_floor_is_honoured_or_refused():
    settings = EstimatorSettings(temperature=0.3, anneal_rate=0.0)
    pyro.clear_param_store()
    sites, _ = inspect_sites(onehot_model, onehot_guide, TOY_BATCH, None)
    try:
        choose_estimator("gumbel", sites, settings)
    except ppvi.UsageError as error:  # refusing it is also a fix
        assert "temperature" in str(error)
        return
    estimator = _toy_estimator("gumbel", settings)
    assert estimator.temperature_at(0) == 0.3


def test_gradvar_measures_gumbel_at_the_requested_temperature():
    small = {"num_variables": 2, "num_classes": 3, "hidden_dim": 8}  # a tiny catvae: the draws take milliseconds
    tables = [
        gradient_variance("catvae", estimators=["gumbel"], temperature=tau, num_draws=3, batch_size=16, options=small, seed=0, device="cpu")
        for tau in (0.1, 0.5)
    ]
    # same seed, same noise: only the temperature differs, so equal variances mean the same temperature was used
    assert tables[0]["variance"].tolist() != tables[1]["variance"].tolist()


# ----------------------------------------------------------------------------- 2. IWAE vs exact evidence

N_POINTS = 6
XS = torch.tensor([-1.5, 0.3, 2.0, 0.9, -0.4, 1.2])
IWAE_BATCH = Batch({"x": XS}, torch.arange(N_POINTS), N_POINTS)
Q_LOC, Q_SCALE = 0.0, 1.2  # the local guide; the posterior is N(x_i / 2, 1/2)
G_LOC, G_SCALE = -0.5, 0.8  # the global guide; the posterior is N(sum x / 7, 1/7)


def local_model(batch, options):
    with pyro.plate("data", batch.num_data, subsample=batch.index):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=batch.x)


def local_guide(batch, options):
    loc = pyro.param("loc", torch.full((batch.num_data,), Q_LOC))
    scale = pyro.param("scale", torch.full((batch.num_data,), Q_SCALE), constraint=dist.constraints.positive)
    with pyro.plate("data", batch.num_data, subsample=batch.index):
        pyro.sample("z", dist.Normal(loc[batch.index], scale[batch.index]))


def global_model(batch, options):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", batch.num_data, subsample=batch.index):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=batch.x)


def global_guide(batch, options):
    loc = pyro.param("loc", torch.tensor(G_LOC))
    scale = pyro.param("scale", torch.tensor(G_SCALE), constraint=dist.constraints.positive)
    pyro.sample("mu", dist.Normal(loc, scale))


def _gaussian_elbo_term(x, m, s):
    """E_{N(m, s^2)}[log N(z; 0, 1) + sum log N(x; z, 1)] + H[N(m, s^2)], in closed form."""
    x = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
    log2pi = math.log(2 * math.pi)
    prior = -0.5 * log2pi - 0.5 * (m**2 + s**2)
    likelihood = (-0.5 * log2pi - 0.5 * ((x - m) ** 2 + s**2)).sum()
    entropy = 0.5 * math.log(2 * math.pi * math.e * s**2)
    return float(prior + likelihood + entropy)


def truths(path):
    """(log p(x), ELBO of the initial guide), both in closed form."""
    x = XS.double()
    if path == "local":  # x_i ~ N(0, 2) independently
        log_px = torch.distributions.Normal(0.0, math.sqrt(2.0)).log_prob(x).sum().item()
        elbo = sum(_gaussian_elbo_term(xi, Q_LOC, Q_SCALE) for xi in x)
    else:  # x ~ N(0, I + 1 1^T): mu is shared
        cov = torch.eye(N_POINTS, dtype=torch.float64) + torch.ones(N_POINTS, N_POINTS, dtype=torch.float64)
        log_px = torch.distributions.MultivariateNormal(torch.zeros(N_POINTS, dtype=torch.float64), cov).log_prob(x).item()
        elbo = _gaussian_elbo_term(x, G_LOC, G_SCALE)
    return log_px, elbo


IWAE_DRAWS = 300


@pytest.mark.parametrize("path", ["local", "global"])
def test_iwae_bound_lies_between_the_elbo_and_the_exact_evidence(path):
    # IWAE_DRAWS independent draws of (elbo, bound) per K; SEs from their spread.
    # Familywise false alarm: 3 ELBO checks (two-sided) + 3 upper bounds + 2 increases (one-sided),
    # at most 8 x 6.3e-5 = 5e-4 per path. Measured (seed 0): local K=1, 5, 50: -14.25, -10.21, -9.797
    # vs log p(x) = -9.781; global: -13.94, -10.78, -10.425 vs -10.415.
    model, guide = (local_model, local_guide) if path == "local" else (global_model, global_guide)
    log_px, exact = truths(path)
    means, ses = {}, {}
    for K in (1, 5, 50):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        sites, depth = inspect_sites(model, guide, IWAE_BATCH, None)
        name, reason = choose_estimator("iwae", sites, EstimatorSettings())
        estimator = make_estimator(name, reason, sites, model, guide, IWAE_BATCH, None, num_particles=K, max_plate_nesting=depth)
        assert ("per data point" in estimator.reason) == (path == "local")
        with torch.no_grad():
            pairs = (estimator.loss(IWAE_BATCH, None) for _ in range(IWAE_DRAWS))
            draws = torch.stack([torch.stack([elbo, -loss]) for elbo, loss in pairs]).double()
        elbos, bounds = draws[:, 0], draws[:, 1]
        # Jensen, draw by draw: log mean_k w_k >= mean_k log w_k (equal at K = 1); float32 slack
        assert (bounds >= elbos - 1e-5 * elbos.abs()).all()
        if K == 1:
            assert torch.allclose(bounds, elbos, rtol=1e-6)
        elbo_se = elbos.std().item() / math.sqrt(IWAE_DRAWS)
        assert abs(elbos.mean().item() - exact) <= Z * elbo_se, (K, elbos.mean().item(), exact)
        means[K], ses[K] = bounds.mean().item(), bounds.std().item() / math.sqrt(IWAE_DRAWS)
        assert means[K] <= log_px + Z * ses[K], (K, means[K], ses[K], log_px)
    print(f"iwae {path}: log p(x) = {log_px:.4f}, ELBO = {exact:.4f},", {K: f"{means[K]:.4f} (se {ses[K]:.4f})" for K in means})
    assert means[5] - means[1] > Z * math.hypot(ses[5], ses[1])
    assert means[50] - means[5] > Z * math.hypot(ses[50], ses[5])


def test_joint_iwae_is_refused_on_minibatches():
    # With a global latent the joint bound on a minibatch weights log w = log p(mu) + (N/B) sum_b log p(x_b | mu)
    # - log q(mu), and its logsumexp is not a lower bound: averaged exactly over all C(6, 3) = 20 halves of the
    # data at K = 500 it measured -9.762 +- 0.006 against log p(x) = -10.415 (K -> infinity limit by quadrature:
    # -9.754). So ppvi refuses iwae on a subsample when some latent is global, naming the site.
    pyro.clear_param_store()
    half = torch.arange(N_POINTS // 2)
    batch = Batch({"x": XS[half]}, half, N_POINTS)
    sites, depth = inspect_sites(global_model, global_guide, batch, None)
    with pytest.raises(ppvi.UsageError, match=r"iwae on minibatches.*'mu'.*not a lower bound"):
        make_estimator("iwae", "r", sites, global_model, global_guide, batch, None, num_particles=5, max_plate_nesting=depth)


# ----------------------------------------------------------------------------- 3. variance reduction on catvae


def test_neural_baseline_reduces_catvae_encoder_gradient_variance():
    # 20 draws per estimator: a total-variance estimate from D draws has relative SD about
    # sqrt(2 / (D - 1)) = 0.32 if Gaussian, so a measured factor in the hundreds (about 800 at init,
    # seed 0) leaves the factor-2 threshold more than 10 SDs away in log scale, heavy tails or not.
    table = gradient_variance("catvae", estimators=["score:none", "score:neural"], num_draws=20, warmup=30, seed=0, device="cpu")
    encoder = table[table["group"] == "encoder"].set_index("estimator")["variance"]
    factor = encoder["score:none"] / encoder["score:neural"]
    print(f"catvae encoder gradient variance: none {encoder['score:none']:.4g}, neural {encoder['score:neural']:.4g}, factor {factor:.1f}")
    assert factor >= 2


# ----------------------------------------------------------------------------- 4. bad input through the CLI

BAD_INPUT = [
    (("fit", "vae", "--estimator", "gumbel"), "no discrete guide site"),
    (("fit", "catvae", "--estimator", "gumbel", "--temperature", "0"), "--temperature must be a positive number"),
    (("fit", "catvae", "--estimator", "gumbel", "--temperature", "-1"), "--temperature must be a positive number"),
    (("fit", "catvae", "--estimator", "gumbel", "--temperature", "0.3", "--min-temperature", "0.5"), "exceeds the starting temperature"),
    (("fit", "vae", "--estimator", "iwae", "--num-particles", "0"), "--num-particles"),
    (("fit", "vae", "--baseline", "neural"), "--baseline applies to the score-function estimator only"),
    (("fit", "catvae", "--estimator", "gumbel", "--baseline", "average"), "--baseline applies to the score-function estimator only"),
    (("fit", "catvae", "--estimator", "score", "--baseline", "bogus"), "unknown baseline 'bogus'"),
    (("fit", "gmm", "--estimator", "gumbel"), "no Gumbel-softmax relaxation"),
    (("fit", "catvae", "--estimator", "gumbel", "--anneal-rate", "-1"), "--anneal-rate must be zero or positive"),
    (("gradvar", "vae", "--estimator", "gumbel"), "no discrete guide site"),
    (("gradvar", "catvae", "--estimator", "score:bogus"), "unknown baseline 'bogus'"),
    (("gradvar", "catvae", "--num-draws", "1"), "--num-draws must be an integer of at least 2"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT, ids=[" ".join(args) for args, _ in BAD_INPUT])
def test_bad_estimator_input_is_a_one_line_usage_error(cli, tmp_path, args, message):
    out = tmp_path / "run"
    extra = ("--steps", 2) if args[0] == "fit" else ("--warmup", 2)
    result = cli(*args, *extra, "--device", "cpu", "--out", out)
    assert result.code == 2, result.text
    assert "Traceback" not in result.text and "internal error" not in result.text
    errors = [line for line in result.text.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], result.text
    assert result.text.rstrip().splitlines()[-1] == errors[0]
    assert not out.exists()


# ----------------------------------------------------------------------------- 5. end to end


@pytest.mark.parametrize(
    "schedule", [("--temperature", 2.0, "--anneal-rate", 0.05, "--min-temperature", 0.6), ()], ids=["explicit", "default"]
)
def test_fit_catvae_gumbel_records_both_elbos_and_the_temperature_schedule(cli, tmp_path, schedule):
    out = tmp_path / "run"
    result = cli("fit", "catvae", "--estimator", "gumbel", "--steps", 30, *schedule, "--seed", 0, "--device", "cpu", "--out", out)
    assert result.code == 0, result.text
    trace = pd.read_csv(out / "elbo.csv")
    assert {"elbo", "relaxed_elbo", "temperature"} <= set(trace.columns)
    assert len(trace) == 30 and trace[["elbo", "relaxed_elbo"]].notna().all().all()
    config = json.loads((out / "config.json").read_text())
    assert config["estimator"] == "gumbel"
    options = config["estimator_options"]  # the schedule in effect, defaults resolved
    if schedule:
        assert (options["temperature"], options["anneal_rate"], options["min_temperature"]) == (2.0, 0.05, 0.6)
    tau0, rate, floor = options["temperature"], options["anneal_rate"], options["min_temperature"]
    expected = [max(floor, tau0 * math.exp(-rate * step)) for step in trace["step"]]
    assert trace["temperature"].tolist() == pytest.approx(expected, rel=1e-9)  # tau_t = max(floor, tau0 exp(-rate t))
    if schedule:  # both branches of the max: annealing, then the floor
        assert trace["temperature"].iloc[0] == 2.0 and trace["temperature"].iloc[-1] == 0.6
    assert trace["relaxed_elbo"].ne(trace["elbo"]).any()  # non-straight-through: the relaxed objective differs


def test_fit_catvae_score_average_records_the_baseline(cli, tmp_path):
    out = tmp_path / "run"
    result = cli(
        "fit", "catvae", "--estimator", "score", "--baseline", "average", "--steps", 20, "--seed", 0, "--device", "cpu", "--out", out
    )
    assert result.code == 0, result.text
    config = json.loads((out / "config.json").read_text())
    assert config["estimator"] == "score" and config["estimator_options"]["baseline"] == "average"


def test_fit_vae_iwae_bound_is_above_the_elbo(cli, tmp_path):
    out = tmp_path / "run"
    result = cli("fit", "vae", "--estimator", "iwae", "--num-particles", 3, "--steps", 20, "--seed", 0, "--device", "cpu", "--out", out)
    assert result.code == 0, result.text
    trace = pd.read_csv(out / "elbo.csv")
    assert len(trace) == 20
    # same draws each step: log mean_k w_k >= mean_k log w_k (Jensen) step by step, up to float32 rounding
    assert (trace["iwae_bound"] >= trace["elbo"] - 1e-5 * trace["elbo"].abs()).all()
    assert trace["iwae_bound"].mean() > trace["elbo"].mean()


def test_gradvar_worked_example_prints_the_table(cli):
    result = cli("gradvar", "--worked-example")
    assert result.code == 0, result.text
    rows = [line.split() for line in result.out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [int(row[0]) for row in rows] == [10, 100, 1000, 10000, 100000]
    assert "score" in result.out and "pathwise" in result.out


def test_gradvar_catvae_writes_csv_and_plot(cli, tmp_path):
    out = tmp_path / "gradvar"
    result = cli("gradvar", "catvae", "--num-draws", 5, "--warmup", 2, "--seed", 0, "--device", "cpu", "--out", out)
    assert result.code == 0, result.text
    table = pd.read_csv(out / "gradvar.csv")
    assert {"estimator", "group", "variance", "snr"} <= set(table.columns)
    assert {"score:none", "score:neural", "gumbel"} <= set(table["estimator"])
    assert (table["num_draws"] == 5).all()
    assert (out / "gradvar.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("size", [0, -3])
def test_gradvar_refuses_a_batch_size_that_is_not_positive(cli, size):
    result = cli("gradvar", "normal_normal", "--estimator", "reparam", "--num-draws", 3, "--batch-size", size)
    assert result.code == 2, result.text
    assert "--batch-size must be a positive integer" in result.err
    assert "Traceback" not in result.text
