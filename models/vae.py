"""Variational autoencoder (Kingma & Welling 2014) on handwritten digits, MLP or convolutional.

Generative story, for images i = 1..N with L latent dimensions (``--latent-dim``)::

    z[i] ~ Normal(0, I_L)
    x[i] ~ Bernoulli(sigmoid(decoder(z[i])))                      --likelihood bernoulli (default)
    x[i] ~ Normal(sigmoid(decoder(z[i])), scale^2 I)              --likelihood gaussian

The decoder is a network owned by the model (``pyro.module("decoder", ...)``); its weights,
and the Gaussian ``scale``, are point parameters fitted by maximising the ELBO.

Bernoulli likelihood: the pixels are binarized dynamically, a fresh Bernoulli draw with the
intensity as its probability for every minibatch (``ppvi.images.binarize``; Salakhutdinov &
Murray 2008), so the ELBO is a bound on the likelihood of binarized digits. The encoder sees
the intensities themselves. Gaussian likelihood: on the intensities in [0, 1], with one learned
scale shared by all pixels, constrained above 0.01 (pixels that are always 0, like the borders
of the digits, would otherwise let the density grow without bound).

``--beta`` weights the KL term (Higgins et al. 2017, beta-VAE): the latent site ``z`` is scaled
by beta in both model and guide (``ppvi.modeling.kl_weight``, a ``pyro.poutine.scale``), so the
fitted objective is E_q[log p(x | z)] - beta KL(q(z | x) || p(z)); beta = 1 is the plain VAE and its
ELBO, beta = 0 drops the KL term.

Guides
------
amortized  q(z[i] | x[i]) = Normal(mu(x[i]), diag(sigma(x[i])^2)) from an encoder network
           (``pyro.module("encoder", ...)``). The guide is mean-field over z and the KL from the
           Normal prior is registered, so ``--estimator auto`` picks reparam with the analytic KL
           (TraceMeanField_ELBO).

Architectures (``--architecture``): ``mlp`` flattens each image (one hidden layer of
``--hidden-dim`` units each way); ``conv`` (28x28 images only) encodes with two stride-2
convolutions (16 and 32 channels, 28 -> 14 -> 7) and a hidden layer, and decodes mirror-wise
with transposed convolutions.

Data: scikit-learn's 8x8 digits by default (1797 images, ``ppvi.images.load_digits``);
``--data DIR`` reads the MNIST training split from a folder of IDX files
(``ppvi.images.load_mnist(DIR, "train")``). The data dict is ``{"x": images, "labels": labels}``:
``x`` float32 in [0, 1], flattened to (N, H*W) for mlp, (N, 1, 28, 28) for conv; the labels ride
along (the fit ignores them) for colouring latent plots.

Fit defaults (100 epochs, batches of 128, lr 3e-3) are sized for the digits: about 1,400 steps,
5-15 s on one CPU core, ending near -25.4 nats per binarized image (L = 2). On MNIST give
``--epochs``: one epoch of the 60,000 training images is 469 steps, and a conv step on a batch of
128 takes about 0.1 s on one CPU core.
"""

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

import pyro
import pyro.distributions as dist
from pyro.distributions import constraints

from ppvi.errors import DataError
from ppvi.images import binarize, check_unit_interval, load_digits, load_mnist
from ppvi.modeling import kl_weight

FIT_DEFAULTS = {"epochs": 100, "batch_size": 128, "lr": 3e-3}

CONV_SIDE = 28
MIN_GAUSSIAN_SCALE = 0.01


@dataclass
class Options:
    latent_dim: int = field(default=2, metadata={"help": "L, the number of latent dimensions (2 lets you plot the codes directly)."})
    hidden_dim: int = field(default=128, metadata={"help": "Units of the hidden layer in encoder and decoder."})
    architecture: Literal["mlp", "conv"] = field(default="mlp", metadata={"help": "mlp, or conv for 28x28 images (MNIST)."})
    likelihood: Literal["bernoulli", "gaussian"] = field(
        default="bernoulli", metadata={"help": "bernoulli on dynamically binarized pixels, or gaussian with a learned scale."}
    )
    beta: float = field(default=1.0, metadata={"help": "Weight of the KL term (beta-VAE); 1 is the plain VAE."})

    def __post_init__(self):
        if self.latent_dim < 1:
            raise ValueError(f"--latent-dim must be at least 1 (got {self.latent_dim}).")
        if self.hidden_dim < 1:
            raise ValueError(f"--hidden-dim must be at least 1 (got {self.hidden_dim}).")
        if self.architecture not in ("mlp", "conv"):
            raise ValueError(f"--architecture must be mlp or conv (got {self.architecture!r}).")
        if self.likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"--likelihood must be bernoulli or gaussian (got {self.likelihood!r}).")
        if not self.beta >= 0:  # also refuses NaN
            raise ValueError(f"--beta must be non-negative (got {self.beta}).")


def _conv_error(side: str, where: str) -> str:
    return (
        f"--architecture conv needs 28x28 images (MNIST: --data DIR), but {where} has {side} images; "
        "use --architecture mlp."
    )


def load_data(source, options):
    if source is None:
        images, labels = load_digits()
        where = "the built-in digits"
    else:
        images, labels = load_mnist(source, "train")
        where = source
    if options.architecture == "conv":
        if images.shape[1:] != (CONV_SIDE, CONV_SIDE):
            raise DataError(_conv_error(f"{images.shape[1]}x{images.shape[2]}", where))
        x = images.unsqueeze(1)
    else:
        x = images.reshape(images.shape[0], -1)
    return {"x": x, "labels": labels}


def _image_shape(x, options) -> torch.Size:
    """The per-image shape of the data, checked against the architecture."""
    shape = x.shape[1:]
    if len(shape) == 0:
        raise ValueError("the VAE needs images (one row of pixels per data point), got a vector of scalars.")
    if options.architecture == "conv" and shape.numel() != CONV_SIDE * CONV_SIDE:
        raise ValueError(_conv_error("x".join(str(s) for s in shape), "the data"))
    return shape


class MLPDecoder(nn.Module):
    def __init__(self, latent_dim, hidden_dim, num_pixels):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.Softplus(), nn.Linear(hidden_dim, num_pixels))

    def forward(self, z):
        return self.net(z)  # logits, (..., num_pixels)


class MLPEncoder(nn.Module):
    def __init__(self, latent_dim, hidden_dim, num_pixels):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_pixels, hidden_dim), nn.Softplus(), nn.Linear(hidden_dim, 2 * latent_dim))

    def forward(self, x):
        return self.net(x.reshape(x.shape[0], -1))


class ConvDecoder(nn.Module):
    def __init__(self, latent_dim, hidden_dim):
        super().__init__()
        self.dense = nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 32 * 7 * 7), nn.ReLU())
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(32, 16, kernel_size=4, stride=2, padding=1),  # 7 -> 14
            nn.ReLU(),
            nn.ConvTranspose2d(16, 1, kernel_size=4, stride=2, padding=1),  # 14 -> 28
        )

    def forward(self, z):
        hidden = self.dense(z.reshape(-1, z.shape[-1])).reshape(-1, 32, 7, 7)
        return self.deconv(hidden).reshape(*z.shape[:-1], CONV_SIDE * CONV_SIDE)


class ConvEncoder(nn.Module):
    def __init__(self, latent_dim, hidden_dim):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=4, stride=2, padding=1),  # 28 -> 14
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=4, stride=2, padding=1),  # 14 -> 7
            nn.ReLU(),
        )
        self.dense = nn.Sequential(nn.Linear(32 * 7 * 7, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 2 * latent_dim))

    def forward(self, x):
        features = self.conv(x.reshape(-1, 1, CONV_SIDE, CONV_SIDE))
        return self.dense(features.reshape(features.shape[0], -1))


class Model:
    """p(z) p(x | z) with the decoder network; instantiated once per fit."""

    def __init__(self, options, data):
        x = data["x"]
        self.image_shape = _image_shape(x, options)
        if options.likelihood == "bernoulli":
            check_unit_interval(x, "data 'x' (the Bernoulli likelihood binarizes intensities in [0, 1])")
        num_pixels = self.image_shape.numel()
        if options.architecture == "conv":
            self.decoder = ConvDecoder(options.latent_dim, options.hidden_dim)
        else:
            self.decoder = MLPDecoder(options.latent_dim, options.hidden_dim, num_pixels)

    def decode(self, z):
        """Pixel means of p(x | z), in [0, 1], shaped (..., *image_shape), for a batch of codes (..., L)."""
        return torch.sigmoid(self.decoder(z)).reshape(*z.shape[:-1], *self.image_shape)

    def __call__(self, batch, options):
        pyro.module("decoder", self.decoder)
        x = batch.x
        if options.likelihood == "gaussian":
            scale = pyro.param("x_scale", lambda: x.new_tensor(0.1), constraint=constraints.greater_than(MIN_GAUSSIAN_SCALE))
        with pyro.plate("data", batch.num_data, subsample=batch.index):
            with kl_weight(options.beta):
                z = pyro.sample("z", dist.Normal(x.new_zeros(options.latent_dim), x.new_ones(options.latent_dim)).to_event(1))
            logits = self.decoder(z).reshape(*z.shape[:-1], *self.image_shape)
            event_dims = len(self.image_shape)
            if options.likelihood == "bernoulli":
                # x was checked once, in __init__
                pyro.sample("x", dist.Bernoulli(logits=logits).to_event(event_dims), obs=binarize(x, check=False))
            else:
                pyro.sample("x", dist.Normal(torch.sigmoid(logits), scale).to_event(event_dims), obs=x)


model = Model


class Amortized:
    """q(z | x) = Normal(mu(x), diag(sigma(x)^2)) from the encoder network."""

    def __init__(self, options, data):
        image_shape = _image_shape(data["x"], options)
        if options.architecture == "conv":
            self.encoder = ConvEncoder(options.latent_dim, options.hidden_dim)
        else:
            self.encoder = MLPEncoder(options.latent_dim, options.hidden_dim, image_shape.numel())

    def encode(self, x):
        """(loc, scale) of q(z | x) for a batch of images."""
        loc, raw_scale = self.encoder(x).chunk(2, dim=-1)
        return loc, F.softplus(raw_scale) + 1e-4

    def __call__(self, batch, options):
        pyro.module("encoder", self.encoder)
        loc, scale = self.encode(batch.x)
        with pyro.plate("data", batch.num_data, subsample=batch.index):
            with kl_weight(options.beta):
                pyro.sample("z", dist.Normal(loc, scale).to_event(1))


GUIDES = {"amortized": Amortized}
