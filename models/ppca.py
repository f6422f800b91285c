"""Probabilistic PCA (Tipping & Bishop 1999) with an amortized linear-Gaussian encoder.

Generative story, for points i = 1..N in d dimensions with q latent dimensions (``--latent-dim``)::

    z[i] ~ Normal(0, I_q)
    x[i] ~ Normal(W z[i] + b, sigma^2 I_d)

W (d x q), b (d) and sigma (> 0) are point parameters of the model (``pyro.param``): the fit
maximises the ELBO over them, so at its optimum it is maximum-likelihood PPCA.

Guides
------
amortized  q(z[i] | x[i]) = Normal(A x[i] + c, diag(s^2)): a linear encoder (A: q x d, c: q,
           s: q, shared by all points).

Exact posterior and why the ELBO can reach the likelihood: p(z | x) = Normal(M^-1 W^T (x - b),
sigma^2 M^-1) with M = W^T W + sigma^2 I_q. Its mean is linear in x and its covariance is the
same for every point, so the encoder's family contains it whenever M is diagonal, i.e. whenever
the columns of W are orthogonal. The maximum-likelihood W is W_ML = U_q (L_q - sigma^2 I)^(1/2) R
for any rotation R; R = I gives orthogonal columns. So the ELBO's maximum over (W, b, sigma,
A, c, s) equals the maximum log-likelihood, and a diagonal q pins the rotation to the principal
axes (Lucas et al. 2019, "Don't blame the ELBO"). That pull is weak (it vanishes at 0 and at 45
degrees), so a fit typically ends with the posterior correlation |rho| < 0.15 and the ELBO a
few thousandths of a nat per point below the maximum log-likelihood: -1/2 log(1 - rho^2) from
the rotation, the rest from the optimizer (tests/test_ppca.py has the measurements).

Maximum log-likelihood in closed form (Tipping & Bishop 1999, eq. 7 and 15-17): with S the
sample covariance (divided by N), eigenvalues l_1 >= ... >= l_d, b_ML the sample mean and
sigma_ML^2 = (l_{q+1} + ... + l_d) / (d - q)::

    log L = -N/2 [d log(2 pi) + sum_{j<=q} log l_j + (d - q) log sigma_ML^2 + d]

(:func:`max_log_likelihood` computes it.)

Data: by default 1000 seeded draws from a PPCA model with d = 10, q = 2, sigma = 0.5;
``--data FILE.csv`` takes numeric rows (one point per row, header optional, d > q columns).
"""

import math
from dataclasses import dataclass, field

import torch

import pyro
import pyro.distributions as dist
from pyro.distributions import constraints

from ppvi.data import read_csv
from ppvi.errors import DataError

FIT_DEFAULTS = {"steps": 4000, "lr": 0.2, "lr_decay": 0.001}


@dataclass
class Options:
    latent_dim: int = field(default=2, metadata={"help": "q, the number of latent dimensions (1 <= q < d)."})

    def __post_init__(self):
        if self.latent_dim < 1:
            raise ValueError(f"--latent-dim must be at least 1 (got {self.latent_dim}).")


def synthetic_ppca(n=1000, d=10, q=2, sigma=0.5, seed=0):
    """Seeded draws from a PPCA model; returns (x, W, b)."""
    generator = torch.Generator().manual_seed(seed)
    weight = 2.0 * torch.randn(d, q, generator=generator)
    bias = torch.randn(d, generator=generator)
    z = torch.randn(n, q, generator=generator)
    x = z @ weight.T + bias + sigma * torch.randn(n, d, generator=generator)
    return x, weight, bias


def max_log_likelihood(x, latent_dim):
    """The maximum over (W, b, sigma) of the PPCA log-likelihood of the rows of x, in closed form."""
    x = x.double()
    n, d = x.shape
    centred = x - x.mean(0)
    eigenvalues = torch.linalg.eigvalsh(centred.T @ centred / n).flip(0)  # descending
    sigma2 = eigenvalues[latent_dim:].mean()
    return float(-0.5 * n * (d * math.log(2 * math.pi) + eigenvalues[:latent_dim].log().sum() + (d - latent_dim) * sigma2.log() + d))


def load_data(source, options):
    x = synthetic_ppca()[0] if source is None else read_csv(source)
    if x.ndim != 2 or options.latent_dim >= x.shape[1]:
        raise DataError(
            f"--latent-dim {options.latent_dim} must be smaller than the data's dimension ({x.shape[-1]} columns)"
            f"{'' if source is None else ' in ' + source}."
        )
    return {"x": x}


class Model:
    """The PPCA likelihood; W starts small and random, b at the data mean, sigma at the data's sd."""

    def __init__(self, options, data):
        x = data["x"]
        if x.ndim != 2 or options.latent_dim >= x.shape[1]:
            raise ValueError(f"--latent-dim {options.latent_dim} must be smaller than the data's dimension ({x.shape[-1]}).")
        spread = x.std(0).mean()
        # columns of decreasing size: a diagonal q favours orthogonal columns, and unequal starts keep
        # the fit away from the 45-degree rotation where that preference has no gradient
        decay = 0.5 ** torch.arange(options.latent_dim, device=x.device, dtype=x.dtype)
        self.init_weight = spread * decay * torch.randn(x.shape[1], options.latent_dim, device=x.device)
        self.init_bias = x.mean(0)
        self.init_sigma = spread.clone()

    def __call__(self, batch, options):
        weight = pyro.param("W", lambda: self.init_weight.clone())
        bias = pyro.param("b", lambda: self.init_bias.clone())
        sigma = pyro.param("sigma", lambda: self.init_sigma.clone(), constraint=constraints.positive)
        with pyro.plate("data", batch.num_data, subsample=batch.index):
            z = pyro.sample("z", dist.Normal(batch.x.new_zeros(options.latent_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ weight.T + bias, sigma).to_event(1), obs=batch.x)


model = Model


class Amortized:
    """q(z | x) = Normal(A x + c, diag(s^2))."""

    def __init__(self, options, data):
        x = data["x"]
        self.init_encoder = torch.zeros(options.latent_dim, x.shape[1], device=x.device)
        self.init_offset = torch.zeros(options.latent_dim, device=x.device)
        self.init_scale = torch.ones(options.latent_dim, device=x.device)

    def __call__(self, batch, options):
        encoder = pyro.param("A", lambda: self.init_encoder.clone())
        offset = pyro.param("c", lambda: self.init_offset.clone())
        scale = pyro.param("s", lambda: self.init_scale.clone(), constraint=constraints.positive)
        with pyro.plate("data", batch.num_data, subsample=batch.index):
            pyro.sample("z", dist.Normal(batch.x @ encoder.T + offset, scale).to_event(1))


GUIDES = {"amortized": Amortized}
