"""Categorical VAE: a VAE whose latent code is discrete (Jang, Gu & Poole 2017's 784-(20x10)-200 setup).

Generative story, for images i = 1..N with V categorical variables (``--num-variables``, default 20)
of C classes each (``--num-classes``, default 10)::

    z[i, v] ~ OneHotCategorical(uniform over C classes)       v = 1..V, independent
    x[i]    ~ Bernoulli(sigmoid(decoder(z[i])))                decoder: MLP on the V*C one-hot vector

The decoder (one hidden layer of ``--hidden-dim`` units) is a network owned by the model
(``pyro.module("decoder", ...)``); its weights are point parameters fitted by maximising the ELBO.
The pixels are binarized dynamically (a fresh Bernoulli draw per minibatch, ``ppvi.images.binarize``),
so the ELBO bounds the likelihood of binarized digits; the encoder sees the intensities.

The latent is written as ONE sample site ``z`` with value of shape (batch, V, C):
``OneHotCategorical(logits).to_event(1)`` inside the data plate. Enumerating it is infeasible:
the joint support of the V variables has C^V values (10^20 in the default setup), and Pyro's
``Independent`` over the V variables has no enumerate support at all. So ``--estimator auto``
picks ``score`` (REINFORCE at ``z``, Rao-Blackwellised by TraceGraph_ELBO, with the neural baseline;
pathwise gradients for the decoder), and ``--estimator enum`` and ``reparam`` are refused, naming the
site. ``--estimator gumbel`` relaxes ``z`` (Gumbel-softmax, Jang et al. 2017; Concrete, Maddison et
al. 2017) and records the discrete ELBO.

This model is the test bed of the estimators (``notebooks/02_gradient_estimators.ipynb``,
``benchmarks/catvae.py``). On the 8x8 digits, with the fit defaults (40 epochs of batches of 128,
600 steps, lr 3e-3; about 15 s on 2 CPU cores), every score-function variant collapses: the ELBO
ends near -27.2 nats per binarized image, no better than the best model with independent pixels
(-27.1), with KL(q(z | x) || uniform) of about 0.02 nats per image (out of at most 20 log 10 = 46).
There is little to gain from the code on 64 pixels (Gumbel-softmax reaches -26.2 in the same budget,
-25.8 in 150 epochs), and the score-function noise swamps it. On MNIST the code is worth tens of
nats and every estimator uses it; see ``benchmarks/README.md`` for the numbers.

Guides
------
amortized  q(z[i, v] | x[i]) = OneHotCategorical(softmax(encoder(x[i])[v])), independent over v,
           from an MLP encoder (``pyro.module("encoder", ...)``).

Data: scikit-learn's 8x8 digits by default (1797 images, ``ppvi.images.load_digits``);
``--data DIR`` reads the MNIST training split from a folder of IDX files. The data dict is
``{"x": images flattened to (N, H*W), "labels": labels}`` (labels ride along, unused by the fit).
"""

from dataclasses import dataclass, field

from torch import nn

import pyro
import pyro.distributions as dist

from ppvi.images import binarize, check_unit_interval, flat_image_data, num_pixels

FIT_DEFAULTS = {"epochs": 40, "batch_size": 128, "lr": 3e-3}


@dataclass
class Options:
    num_variables: int = field(default=20, metadata={"help": "V, the number of categorical latent variables."})
    num_classes: int = field(default=10, metadata={"help": "C, the number of classes of each latent variable."})
    hidden_dim: int = field(default=200, metadata={"help": "Units of the hidden layer in encoder and decoder."})

    def __post_init__(self):
        if self.num_variables < 1:
            raise ValueError(f"--num-variables must be at least 1 (got {self.num_variables}).")
        if self.num_classes < 2:
            raise ValueError(f"--num-classes must be at least 2 (got {self.num_classes}).")
        if self.hidden_dim < 1:
            raise ValueError(f"--hidden-dim must be at least 1 (got {self.hidden_dim}).")


def load_data(source, options):
    return flat_image_data(source)


def _num_pixels(x) -> int:
    return num_pixels(x, "the categorical VAE")


class Model:
    """p(z) p(x | z) with the decoder network; instantiated once per fit."""

    def __init__(self, options, data):
        x = data["x"]
        num_pixels = _num_pixels(x)
        check_unit_interval(x, "data 'x' (the Bernoulli likelihood binarizes intensities in [0, 1])")
        latent = options.num_variables * options.num_classes
        self.decoder = nn.Sequential(nn.Linear(latent, options.hidden_dim), nn.ReLU(), nn.Linear(options.hidden_dim, num_pixels))

    def __call__(self, batch, options):
        pyro.module("decoder", self.decoder)
        x = batch.x.reshape(batch.x.shape[0], -1)
        logits = x.new_zeros(options.num_variables, options.num_classes)  # uniform prior
        with pyro.plate("data", batch.num_data, subsample=batch.index):
            z = pyro.sample("z", dist.OneHotCategorical(logits=logits).to_event(1))
            pixel_logits = self.decoder(z.reshape(*z.shape[:-2], -1))
            # x was checked once, in __init__
            pyro.sample("x", dist.Bernoulli(logits=pixel_logits).to_event(1), obs=binarize(x, check=False))


model = Model


class Amortized:
    """q(z | x): independent categoricals over the V variables, logits from an MLP encoder."""

    def __init__(self, options, data):
        num_pixels = _num_pixels(data["x"])
        self.shape = (options.num_variables, options.num_classes)
        latent = options.num_variables * options.num_classes
        self.encoder = nn.Sequential(nn.Linear(num_pixels, options.hidden_dim), nn.ReLU(), nn.Linear(options.hidden_dim, latent))

    def logits(self, x):
        """Logits of q(z | x), shape (batch, V, C)."""
        return self.encoder(x.reshape(x.shape[0], -1)).reshape(x.shape[0], *self.shape)

    def __call__(self, batch, options):
        pyro.module("encoder", self.encoder)
        logits = self.logits(batch.x)
        with pyro.plate("data", batch.num_data, subsample=batch.index):
            pyro.sample("z", dist.OneHotCategorical(logits=logits).to_event(1))


GUIDES = {"amortized": Amortized}
