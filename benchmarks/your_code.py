"""Your own Pyro code under ppvi's defaults: does the stopping rule stop, and where (issue 11)?

Six models written as Pyro users write them (their own signatures, plates and autoguides; synthetic
data), each fitted by ``ppvi.fit(model, guide, data=...)`` with no budget (the rule, at most 3,000 steps)
and compared with a long fit of the same guide (8,000 steps, 8 particles, lr decayed 100x: "q*") and
with NUTS (4,000 draws after 1,000 warm-up). The distance is the largest |mean error| / reference sd
and the largest |log sd ratio| over the latent elements, from 8,000 draws of each guide.

    python benchmarks/your_code.py [name[:guide] ...]      (names: rugged, logreg, schools, poisson, gampois, ar1)

The references take minutes each (NUTS and the long fits on one core).
"""

from __future__ import annotations

import sys
import time

import stopping  # benchmarks/stopping.py: q's moments and their distance, one home
import torch

import pyro
import pyro.distributions as dist
from pyro.infer import MCMC, NUTS

import ppvi

DRAWS = 8000

g = torch.Generator().manual_seed(1)

# 1. Bayesian regression tutorial (rugged terrain), synthetic data
n = 170
africa = (torch.rand(n, generator=g) < 0.3).float()
torch.manual_seed(1)  # torch.distributions samples from the global generator
rugged = torch.distributions.Gamma(1.5, 1.0).sample((n,))
log_gdp = 9.2 - 1.9 * africa - 0.2 * rugged + 0.35 * africa * rugged + 0.95 * torch.randn(n, generator=g)

def rugged_model(is_cont_africa, ruggedness, log_gdp=None):
    a = pyro.sample("a", dist.Normal(0., 10.))
    b_a = pyro.sample("bA", dist.Normal(0., 1.))
    b_r = pyro.sample("bR", dist.Normal(0., 1.))
    b_ar = pyro.sample("bAR", dist.Normal(0., 1.))
    sigma = pyro.sample("sigma", dist.Uniform(0., 10.))
    mean = a + b_a * is_cont_africa + b_r * ruggedness + b_ar * is_cont_africa * ruggedness
    with pyro.plate("data", len(ruggedness)):
        return pyro.sample("obs", dist.Normal(mean, sigma), obs=log_gdp)

rugged_data = (africa, rugged, log_gdp)

# 2. logistic regression
xl = torch.randn(500, 4, generator=g)
yl = torch.bernoulli(torch.sigmoid(xl @ torch.tensor([1.0, -2.0, 0.5, 0.0]) - 0.5), generator=g)

def logreg_model(x, y=None):
    w = pyro.sample("w", dist.Normal(0., 2.).expand([x.shape[1]]).to_event(1))
    b = pyro.sample("b", dist.Normal(0., 2.))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=b + x @ w), obs=y)

logreg_data = (xl, yl)

# 3. eight schools, non-centred
J = 8
y8 = torch.tensor([28., 8., -3., 7., -1., 1., 18., 12.])
s8 = torch.tensor([15., 10., 16., 11., 9., 11., 10., 18.])

def schools_model(sigma, y=None):
    mu = pyro.sample("mu", dist.Normal(0., 5.))
    tau = pyro.sample("tau", dist.HalfCauchy(5.))
    with pyro.plate("J", len(sigma)):
        theta_raw = pyro.sample("theta_raw", dist.Normal(0., 1.))
        pyro.sample("obs", dist.Normal(mu + tau * theta_raw, sigma), obs=y)

schools_data = (s8, y8)

# 4. Poisson regression
xp = torch.randn(200, 3, generator=g)
cp = torch.poisson(torch.exp(0.5 + xp @ torch.tensor([0.3, -0.5, 0.2])), generator=g)

def poisson_model(x, counts=None):
    beta = pyro.sample("beta", dist.Normal(0., 1.).expand([3]).to_event(1))
    b0 = pyro.sample("b0", dist.Normal(0., 5.))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("counts", dist.Poisson(torch.exp(b0 + x @ beta)), obs=counts)

poisson_data = (xp, cp)

# 5. Gamma-Poisson (closed form Gamma(2 + sum, 1 + n))
cg = torch.poisson(torch.full((20,), 3.0), generator=g)

def gampois_model(counts):
    rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
    with pyro.plate("obs_plate", len(counts)):
        pyro.sample("counts", dist.Poisson(rate), obs=counts)

gampois_data = (cg,)

# 6. AR(1)
T = 200
ys = torch.zeros(T)
for t in range(1, T):
    ys[t] = 0.7 * ys[t - 1] + 0.5 * torch.randn(1, generator=g)

def ar1_model(y):
    phi = pyro.sample("phi", dist.Uniform(-1., 1.))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.))
    with pyro.plate("time", len(y) - 1):
        pyro.sample("y", dist.Normal(phi * y[:-1], sigma), obs=y[1:])

ar1_data = (ys,)

MODELS = {name: (globals()[f"{name}_model"], globals()[f"{name}_data"]) for name in
          ["rugged", "logreg", "schools", "poisson", "gampois", "ar1"]}


def nuts_moments(model, data) -> dict:
    pyro.set_rng_seed(0)
    mcmc = MCMC(NUTS(model, target_accept_prob=0.9), num_samples=4000, warmup_steps=1000, disable_progbar=True)
    mcmc.run(*data)
    return {name: (v.reshape(len(v), -1).double().numpy().mean(0), v.reshape(len(v), -1).double().numpy().std(0))
            for name, v in mcmc.get_samples().items()}


def distance(fit: dict, reference: dict) -> str:
    return "%.3f, %.3f" % stopping.distance(fit, reference)


def main(specs: list[str]) -> None:
    torch.set_num_threads(1)
    print("model:guide | steps | time s | from q* | from NUTS | q* from NUTS | status")
    for spec in specs:
        name, _, guide = spec.partition(":")
        model, data = MODELS[name]
        nuts = nuts_moments(model, data)
        best = stopping.moments(ppvi.fit(model, guide or None, data=data, steps=8000, lr=0.01, lr_decay=0.01, num_particles=8, device="cpu"),
                                draws=DRAWS, seed=0)
        start = time.perf_counter()
        result = ppvi.fit(model, guide or None, data=data, device="cpu")
        seconds = time.perf_counter() - start
        fitted = stopping.moments(result, draws=DRAWS, seed=0)
        status = result.config["convergence"]["0"]["status"]
        print(f"{spec} | {len(result.elbo_trace)} | {seconds:.1f} | {distance(fitted, best)} | {distance(fitted, nuts)} | "
              f"{distance(best, nuts)} | {status[:80]}", flush=True)


DEFAULT = ["gampois", "ar1", "poisson", "poisson:AutoMultivariateNormal", "logreg", "rugged", "rugged:AutoMultivariateNormal", "schools"]

if __name__ == "__main__":
    main(sys.argv[1:] or DEFAULT)
