"""VaDE: a VAE with a mixture-of-Gaussians prior (Jiang et al. 2017; the GMVAE family), for clustering.

Generative story, for images i = 1..N with K clusters (``--num-clusters``, default 10) and L latent
dimensions (``--latent-dim``, default 10)::

    c[i] ~ Categorical(pi)
    z[i] ~ Normal(mu[c[i]], diag(sigma[c[i]]^2))
    x[i] ~ Bernoulli(sigmoid(decoder(z[i])))

pi (K weights, ``pyro.param`` on the simplex), mu (K x L) and sigma (K x L, positive) are point
parameters fitted by maximising the ELBO, as in VaDE; so are the decoder's weights (an MLP with one
hidden layer of ``--hidden-dim`` units, ``pyro.module("decoder", ...)``). mu starts as K draws from
Normal(0, 1) in L dimensions and sigma at 1, so the clusters start apart. Pixels are binarized
dynamically (``ppvi.images.binarize``); the encoder sees the intensities.

The assignment c is left to the model: the guide does not sample it, so ``--estimator auto`` picks
enum and TraceEnum_ELBO sums it out exactly for every point, i.e. the prior on z is the mixture
density sum_c pi_c N(z; mu_c, sigma_c^2). This is the marginal ELBO, a (tighter) bound than VaDE's
ELBO with its mean-field q(c | x) factor: that factor's optimum is the posterior p(c | z) that
enumeration computes anyway, so nothing is lost by not learning it.

Guides
------
amortized  q(z[i] | x[i]) = Normal(m(x[i]), diag(s(x[i])^2)) from an MLP encoder
           (``pyro.module("encoder", ...)``); reparameterized.

Clustering: ``cluster_accuracy(result)`` assigns each point to argmax_c p(c | z) at z = the mean of
q(z | x) and scores the assignment against the labels with the best one-to-one map of clusters to
labels (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``); ``summarize(result)`` adds the
cluster sizes.

Data: scikit-learn's 8x8 digits by default (1797 images with labels); ``--data DIR`` reads the
MNIST training split from a folder of IDX files. The data dict is ``{"x": (N, H*W), "labels": (N,)}``.

Fit defaults (60 epochs of batches of 128 on the digits, 900 steps, lr 3e-3): about 17 s for
``ppvi fit vade`` on 2 CPU cores, ending near -24.1 nats per binarized image, with cluster accuracy
0.60, 0.55, 0.60 for seeds 0, 1, 2 (chance under the best map is 0.13). Some clusters end empty:
there is no autoencoder pretraining or GMM initialisation of mu as in the VaDE paper, so this is
below k-means on the raw pixels (0.79, scikit-learn, 10 inits), not a reproduction of the paper's numbers.
"""

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import pyro
import pyro.distributions as dist
from pyro.distributions import constraints

from ppvi.images import binarize, check_unit_interval, flat_image_data, num_pixels

FIT_DEFAULTS = {"epochs": 60, "batch_size": 128, "lr": 3e-3}


@dataclass
class Options:
    num_clusters: int = field(default=10, metadata={"help": "K, the number of mixture components of the prior on z."})
    latent_dim: int = field(default=10, metadata={"help": "L, the number of latent dimensions."})
    hidden_dim: int = field(default=256, metadata={"help": "Units of the hidden layer in encoder and decoder."})

    def __post_init__(self):
        if self.num_clusters < 1:
            raise ValueError(f"--num-clusters must be at least 1 (got {self.num_clusters}).")
        if self.latent_dim < 1:
            raise ValueError(f"--latent-dim must be at least 1 (got {self.latent_dim}).")
        if self.hidden_dim < 1:
            raise ValueError(f"--hidden-dim must be at least 1 (got {self.hidden_dim}).")


def load_data(source, options):
    return flat_image_data(source)


def _num_pixels(x) -> int:
    return num_pixels(x, "VaDE")


def _mlp(inputs, hidden, outputs):
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, outputs))


class Model:
    """p(c) p(z | c) p(x | z): mixture prior parameters and the decoder; instantiated once per fit."""

    def __init__(self, options, data):
        x = data["x"]
        check_unit_interval(x, "data 'x' (the Bernoulli likelihood binarizes intensities in [0, 1])")
        self.decoder = _mlp(options.latent_dim, options.hidden_dim, _num_pixels(x))

    def prior(self, options, like):
        """(pi, mu, sigma) of the mixture prior, as Pyro parameters."""
        K, L = options.num_clusters, options.latent_dim
        pi = pyro.param("pi", lambda: like.new_full((K,), 1.0 / K), constraint=constraints.simplex)
        mu = pyro.param("mu", lambda: torch.randn(K, L, dtype=like.dtype, device=like.device))
        sigma = pyro.param("sigma", lambda: like.new_ones(K, L), constraint=constraints.greater_than(1e-3))
        return pi, mu, sigma

    def __call__(self, batch, options):
        pyro.module("decoder", self.decoder)
        x = batch.x.reshape(batch.x.shape[0], -1)
        pi, mu, sigma = self.prior(options, x)
        with pyro.plate("data", batch.num_data, subsample=batch.index):
            c = pyro.sample("c", dist.Categorical(pi))
            z = pyro.sample("z", dist.Normal(mu[c], sigma[c]).to_event(1))
            # x was checked once, in __init__
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=binarize(x, check=False))


model = Model


class Amortized:
    """q(z | x) = Normal(m(x), diag(s(x)^2)) from the encoder; c is summed out in the model."""

    def __init__(self, options, data):
        self.encoder = _mlp(_num_pixels(data["x"]), options.hidden_dim, 2 * options.latent_dim)

    def encode(self, x):
        """(loc, scale) of q(z | x) for a batch of images."""
        loc, raw_scale = self.encoder(x.reshape(x.shape[0], -1)).chunk(2, dim=-1)
        return loc, F.softplus(raw_scale) + 1e-4

    def __call__(self, batch, options):
        pyro.module("encoder", self.encoder)
        loc, scale = self.encode(batch.x)
        with pyro.plate("data", batch.num_data, subsample=batch.index):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


GUIDES = {"amortized": Amortized}


def cluster_posterior(z, pi, mu, sigma):
    """log p(c | z) for each row of z, shape (N, K)."""
    log_joint = pi.log() + dist.Normal(mu, sigma).log_prob(z.unsqueeze(-2)).sum(-1)
    return log_joint - log_joint.logsumexp(-1, keepdim=True)


def assign_clusters(result, data=None):
    """argmax_c p(c | z = mean of q(z | x)) for every point, with the best restart's parameters."""
    from ppvi.runs import restart_params

    x = (data if data is not None else result.data)["x"]
    with restart_params(result, result.best) as chosen, torch.no_grad():
        loc, _ = chosen.guide_fn.encode(x)
        pi, mu, sigma = chosen.model_fn.prior(result.options, x)
        return cluster_posterior(loc, pi, mu, sigma).argmax(-1)


def best_mapping_accuracy(clusters, labels) -> float:
    """Accuracy of cluster ids against labels under the best one-to-one map (Hungarian algorithm)."""
    from scipy.optimize import linear_sum_assignment

    clusters = np.asarray(clusters, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    size = int(max(clusters.max(), labels.max())) + 1
    counts = np.zeros((size, size), dtype=np.int64)
    np.add.at(counts, (clusters, labels), 1)
    rows, cols = linear_sum_assignment(-counts)
    return float(counts[rows, cols].sum() / len(labels))


def cluster_accuracy(result, data=None) -> float:
    """Clustering accuracy against the data's labels (best one-to-one map of clusters to labels)."""
    data = data if data is not None else result.data
    if "labels" not in data:
        raise ValueError("the data has no labels to score the clusters against.")
    clusters = assign_clusters(result, data)
    return best_mapping_accuracy(clusters.cpu().numpy(), data["labels"].cpu().numpy())


def summarize(result, data=None) -> dict:
    """Cluster accuracy (when the data has labels) and cluster sizes."""
    data = data if data is not None else result.data
    clusters = assign_clusters(result, data).cpu().numpy()
    summary = {"cluster_sizes": np.bincount(clusters, minlength=result.options.num_clusters).tolist()}
    if "labels" in data:
        summary["accuracy"] = best_mapping_accuracy(clusters, data["labels"].cpu().numpy())
    return summary
