"""score: score-function / REINFORCE gradients (Williams 1992; Ranganath et al. 2014).

At the guide's non-reparameterizable sites (discrete, or continuous without rsample; at every
guide site when all are reparameterizable and score is requested), Rao-Blackwellised by Pyro's
dependency tracking (TraceGraph_ELBO), with a baseline (``--baseline``): none, a decaying average
of the downstream cost, or ``neural`` (default): the average plus an input-dependent network
b(q's parameters) fitted by least squares to the residual cost (Mnih & Gregor 2014, NVIL).

A guide's own ``infer={"baseline": {...}}`` at a scored site is honoured as written: ppvi attaches
no baseline there (and builds no network for it); the reason and config.json say so.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

import pyro
from pyro import poutine
from pyro.infer import TraceGraph_ELBO
from pyro.poutine.messenger import Messenger

from .base import Estimator, EstimatorSpec, PairInfo, baseline_features, baseline_words, names
from .enum import cannot_enumerate
from .reparam import model_only_problem

__all__ = ["BASELINE_HIDDEN", "BASELINE_UNIT", "ESTIMATOR", "ScoreFunction"]

BASELINE_HIDDEN = 100  # units of the neural baseline's hidden layer (NVIL used 100 tanh units)
# The network's output is in units of BASELINE_UNIT nats per data point (as a 10x learning rate on its
# output layer): per-point costs of image models differ by tens of nats between points. Measured on
# catvae at MNIST-trained parameters (1,000 warm-up steps): encoder gradient variance 2.7x below the
# decaying average with unit 1, 3.6x with unit 10 (and 1.0x with logits instead of probabilities as input).
BASELINE_UNIT = 10.0


def scored(info: PairInfo) -> list:
    """The guide sites that get score-function terms: the non-reparameterizable ones, else every guide site."""
    return info.nonreparam or [s for s in info.sites if s.where == "guide"]


def reason(info: PairInfo, settings, auto: bool) -> str:
    words = baseline_words(settings.resolved()["baseline"])
    nonreparam, continuous = info.nonreparam, info.continuous
    pathwise = f"; pathwise gradients for {names(continuous)}" if continuous and nonreparam else ""
    if not auto:
        where = names(nonreparam) if nonreparam else f"every latent site {names(continuous)}"
        return f"requested: score-function gradients with {words} at {where}{pathwise}"
    big = [s for s in nonreparam if not s.enumerable]
    small = [s for s in nonreparam if s.enumerable]
    small_note = f"; {names(small)} also scored (enumerate them with --estimator enum)" if small else ""
    return f"{cannot_enumerate(big)}: score-function gradients with {words}{small_note}{pathwise}"


def options(settings, total_steps) -> dict:
    return {"baseline": settings.resolved(total_steps)["baseline"]}


class _NeuralBaseline(nn.Module):
    """b(features) = scale * BASELINE_UNIT * MLP(features): per-point units; Pyro's costs carry the subsample scale."""

    def __init__(self, num_features: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_features, BASELINE_HIDDEN), nn.Tanh(), nn.Linear(BASELINE_HIDDEN, 1))
        nn.init.zeros_(self.net[-1].weight)  # starts as the decaying average alone
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, features: torch.Tensor, scale=1.0) -> torch.Tensor:
        return scale * BASELINE_UNIT * self.net(features).squeeze(-1)


class ScoreFunction(Messenger):
    """Make chosen guide sites non-reparameterized and attach their baseline (Pyro's ``infer["baseline"]``).

    ``networks`` maps a site to its neural baseline (built beforehand, so the optimizer sees it
    from step 0); a scored site without one gets the decaying average alone. A baseline the
    guide wrote itself is left as it is.
    """

    def __init__(self, names: frozenset, baseline: str = "neural", networks: dict | None = None, baseline_beta: float = 0.9):
        super().__init__()
        self.names, self.baseline, self.baseline_beta = names, baseline, baseline_beta
        self.networks = dict(networks or {})

    def _pyro_sample(self, msg):
        if msg["name"] not in self.names or msg["is_observed"]:
            return
        fn = msg["fn"]
        while isinstance(inspect.getattr_static(type(fn), "has_rsample", None), property):
            fn = fn.base_dist  # Independent / Expanded / Masked wrappers delegate to their base
        fn.has_rsample_(False)
        if self.baseline == "none" or "baseline" in msg["infer"]:
            return
        options = {"use_decaying_avg_baseline": True, "baseline_beta": self.baseline_beta}
        network = self.networks.get(msg["name"])
        if network is not None:
            scale = msg["scale"]
            options.update(nn_baseline=lambda inputs: network(inputs, scale), nn_baseline_input=baseline_features(msg["fn"]))
        msg["infer"]["baseline"] = options


def _networks(info: PairInfo, sites: list) -> dict:
    """One neural baseline per scored site, registered in the param store (Adam and checkpoints see it)."""
    networks = {}
    for site in sites:
        network = _NeuralBaseline(info.features[site.name]).to(torch.device(info.device))
        with poutine.block():  # update_module_params: parameters already in the store (a loaded run) become the network's own
            networks[site.name] = pyro.module(f"_ppvi_baseline.{site.name}", network, update_module_params=True)
    return networks


def build(info: PairInfo, model_fn, guide_fn, *, reason: str, options: dict, num_particles: int, vectorize_particles: bool) -> Estimator:
    sites = scored(info)
    baseline = options["baseline"]
    own = [s for s in sites if "baseline" in s.guide_infer]
    neural = [s for s in sites if baseline == "neural" and s not in own]
    unreadable = [s for s in neural if s.name not in info.features]
    if unreadable:
        reason += f"; the neural baseline cannot read the parameters of {names(unreadable)}: decaying average there"
    networks = _networks(info, [s for s in neural if s not in unreadable])
    messenger = ScoreFunction(frozenset(s.name for s in sites), baseline=baseline, networks=networks)
    elbo = TraceGraph_ELBO(num_particles=num_particles, vectorize_particles=vectorize_particles, max_plate_nesting=info.plate_depth)
    return Estimator("score", reason + " (TraceGraph_ELBO)", elbo, model_fn, messenger(guide_fn), baselines=messenger)


ESTIMATOR = EstimatorSpec(
    name="score", why_not=model_only_problem, reason=reason, build=build, options=options,
    auto_why_not=model_only_problem, order=20, priority=30, can_infer_discrete=True,
    uses_infer=lambda info, site, key: key == "baseline" and site in scored(info),
)
