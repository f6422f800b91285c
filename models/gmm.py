"""Gaussian mixture model with diagonal covariances.

Generative story, for K components in D dimensions and points i = 1..N::

    weights    ~ Dirichlet(alpha, ..., alpha)            alpha = --concentration (1.0)
    loc[k, d]  ~ Normal(0, 3)                             (data are standardised by default)
    scale[k, d]~ LogNormal(0, 1)
    z[i]       ~ Categorical(weights)
    x[i, d]    ~ Normal(loc[z[i], d], scale[z[i], d])

Guides
------
meanfield  q(weights) q(loc) q(scale) prod_i q(z[i]): Dirichlet, Normal, LogNormal and one
           Categorical per data point (free parameters, indexed by the minibatch).
map        point estimates (Delta) of weights, loc and scale; z is summed out in the model.
amortized  like meanfield for the globals, with q(z[i] | x[i]) from a small neural encoder.

The globals start from k-means++ seeding and a few Lloyd iterations on the data.

Data: Old Faithful by default (272 eruptions: duration and waiting time, minutes),
``--data FILE.csv`` (numeric, one point per row, header optional), or
``--data synthetic:n=500,k=3,d=2,seed=0`` (a well-separated mixture with known truth).
"""

from dataclasses import dataclass, field

import torch
from torch import nn

import pyro
import pyro.distributions as dist
from pyro.distributions import constraints

from ppvi.errors import DataError
from ppvi.data import old_faithful, parse_synthetic, read_csv, standardize, synthetic_gmm
from ppvi.init import kmeans

FIT_DEFAULTS = {"steps": 600, "lr": 0.05}


@dataclass
class Options:
    num_components: int = field(default=2, metadata={"help": "K, the number of mixture components."})
    concentration: float = field(default=1.0, metadata={"help": "alpha of the symmetric Dirichlet prior on the weights."})
    standardize: bool = field(default=True, metadata={"help": "Centre and scale each column of the data to unit variance."})

    def __post_init__(self):
        if self.num_components < 1:
            raise ValueError(f"--num-components must be at least 1 (got {self.num_components}).")
        if self.concentration <= 0:
            raise ValueError(f"--concentration must be positive (got {self.concentration}).")


def load_data(source, options):
    if source is None:
        x = old_faithful()
    elif source.startswith("synthetic"):
        x, _ = synthetic_gmm(**parse_synthetic(source, n=500, k=3, d=2, seed=0))
    else:
        x = read_csv(source)
    if options.num_components > x.shape[0]:
        raise DataError(f"--num-components {options.num_components} is larger than the number of data points ({x.shape[0]}).")
    return {"x": standardize(x) if options.standardize else x}


def model(batch, options):
    num_components, dim = options.num_components, batch.x.shape[-1]
    weights = pyro.sample("weights", dist.Dirichlet(torch.full((num_components,), options.concentration)))
    with pyro.plate("components", num_components):
        locs = pyro.sample("locs", dist.Normal(0.0, 3.0).expand([dim]).to_event(1))
        scales = pyro.sample("scales", dist.LogNormal(0.0, 1.0).expand([dim]).to_event(1))
    with pyro.plate("data", batch.num_data, subsample=batch.index):
        z = pyro.sample("z", dist.Categorical(weights))
        pyro.sample("x", dist.Normal(locs[z], scales[z]).to_event(1), obs=batch.x)


def _initial_clusters(x, num_components):
    """k-means centres, per-cluster standard deviations and soft responsibilities."""
    centers, labels = kmeans(x, num_components)
    spread = torch.stack([x[labels == k].std(dim=0) if (labels == k).sum() > 1 else x.std(dim=0) for k in range(num_components)])
    spread = spread.clamp(min=0.05 * x.std(dim=0).clamp(min=1e-3))
    log_density = dist.Normal(centers, spread).log_prob(x.unsqueeze(-2)).sum(-1)
    return centers, spread, log_density.softmax(dim=-1)


class MeanField:
    """q(weights) q(locs) q(scales) prod_i q(z_i), all factors independent."""

    def __init__(self, options, data):
        self.init_locs, self.init_scales, self.init_probs = _initial_clusters(data["x"], options.num_components)

    def globals(self, options):
        num_data = self.init_probs.shape[0]
        concentration = pyro.param(
            "weights_concentration", lambda: 1.0 + num_data * self.init_probs.mean(0), constraint=constraints.positive
        )
        pyro.sample("weights", dist.Dirichlet(concentration))
        locs_loc = pyro.param("locs_loc", lambda: self.init_locs.clone())
        locs_scale = pyro.param("locs_scale", lambda: torch.full_like(self.init_locs, 0.1), constraint=constraints.positive)
        scales_loc = pyro.param("scales_loc", lambda: self.init_scales.log())
        scales_scale = pyro.param("scales_scale", lambda: torch.full_like(self.init_scales, 0.1), constraint=constraints.positive)
        with pyro.plate("components", options.num_components):
            pyro.sample("locs", dist.Normal(locs_loc, locs_scale).to_event(1))
            pyro.sample("scales", dist.LogNormal(scales_loc, scales_scale).to_event(1))

    def __call__(self, batch, options):
        self.globals(options)
        z_probs = pyro.param("z_probs", lambda: self.init_probs.clone(), constraint=constraints.simplex)
        with pyro.plate("data", batch.num_data, subsample=batch.index):
            pyro.sample("z", dist.Categorical(z_probs[batch.index]))


class MAP:
    """Point estimates of the globals; the assignments z are summed out in the model."""

    def __init__(self, options, data):
        self.init_locs, self.init_scales, self.init_probs = _initial_clusters(data["x"], options.num_components)

    def __call__(self, batch, options):
        weights = pyro.param("weights_map", lambda: self.init_probs.mean(0), constraint=constraints.simplex)
        locs = pyro.param("locs_map", lambda: self.init_locs.clone())
        scales = pyro.param("scales_map", lambda: self.init_scales.clone(), constraint=constraints.positive)
        pyro.sample("weights", dist.Delta(weights, event_dim=1))
        with pyro.plate("components", options.num_components):
            pyro.sample("locs", dist.Delta(locs, event_dim=1))
            pyro.sample("scales", dist.Delta(scales, event_dim=1))


class Amortized(MeanField):
    """Mean-field globals; q(z_i | x_i) = Categorical(softmax(encoder(x_i)))."""

    def __init__(self, options, data, hidden_dim=32):
        super().__init__(options, data)
        self.encoder = nn.Sequential(
            nn.Linear(data["x"].shape[-1], hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, options.num_components)
        )

    def __call__(self, batch, options):
        self.globals(options)
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", batch.num_data, subsample=batch.index):
            pyro.sample("z", dist.Categorical(logits=self.encoder(batch.x)))


GUIDES = {"meanfield": MeanField, "map": MAP, "amortized": Amortized}
