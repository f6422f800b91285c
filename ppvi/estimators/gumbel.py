"""gumbel: the Gumbel-softmax / Concrete relaxation (Jang et al. 2017; Maddison et al. 2017).

Relaxes the guide's OneHotCategorical and Bernoulli sites, temperature
tau_t = max(min_temperature, temperature * exp(-anneal_rate * t)), optionally straight-through;
the trace records the *discrete* ELBO beside the relaxed one it ascends. Never chosen by ``auto``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

import pyro.distributions as dist
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from ..pyro_util import unwrap
from .base import Estimator, EstimatorSettings, EstimatorSpec, PairInfo, log_prob_sum, names
from .reparam import model_only_problem

__all__ = ["ESTIMATOR", "Gumbel"]


def why_not(info: PairInfo) -> str | None:
    problem = model_only_problem(info)
    if problem is not None:
        return problem
    nonreparam = info.nonreparam
    if not nonreparam:
        return "it has no discrete guide site to relax (every guide site is continuous)"
    if not all(s.relaxable for s in nonreparam):
        return (
            f"site(s) {names([s for s in nonreparam if not s.relaxable])} have no Gumbel-softmax relaxation "
            "(only OneHotCategorical and Bernoulli sites can be relaxed: a relaxed value must stand in for the discrete one)"
        )
    no_kl = [s for s in nonreparam if s.kl_closed_form is False]  # None: not probed (a bare list of sites)
    if no_kl:
        return f"the KL between the guide's and the model's distributions at site(s) {names(no_kl)} has no closed form"
    return None


def reason(info: PairInfo, settings: EstimatorSettings, auto: bool) -> str:
    resolved = settings.resolved()
    pathwise = f"; pathwise gradients for {names(info.continuous)}" if info.continuous else ""
    rate = f"{settings.anneal_rate:g}" if settings.anneal_rate is not None else "reaching the floor at mid-fit"
    straight = ", straight-through" if resolved["straight_through"] else ""
    return (
        f"requested: Gumbel-softmax relaxation of {names(info.nonreparam)} (temperature {resolved['temperature']:g}, "
        f"floor {resolved['min_temperature']:g}, anneal rate {rate}{straight}){pathwise}"
    )


def options(settings: EstimatorSettings, total_steps) -> dict:
    values = settings.resolved(total_steps)
    return {name: values[name] for name in EstimatorSettings.GUMBEL_FIELDS}


def _relaxed(fn, temperature: float, straight_through: bool):
    """The Gumbel-softmax / Concrete relaxation of a OneHotCategorical or Bernoulli site, wrappers kept."""
    if isinstance(fn, dist.MaskedDistribution):
        return _relaxed(fn.base_dist, temperature, straight_through).mask(fn._mask)
    if isinstance(fn, torch.distributions.Independent):
        return _relaxed(fn.base_dist, temperature, straight_through).to_event(fn.reinterpreted_batch_ndims)
    if isinstance(fn, dist.ExpandedDistribution):
        return _relaxed(fn.base_dist, temperature, straight_through).expand(fn.batch_shape)
    tau = torch.full((), temperature, dtype=fn.logits.dtype, device=fn.logits.device)  # no host-to-device copy
    if isinstance(fn, torch.distributions.OneHotCategorical):
        relaxed = dist.RelaxedOneHotCategoricalStraightThrough if straight_through else dist.RelaxedOneHotCategorical
    else:  # Bernoulli: why_not admits no other family
        relaxed = dist.RelaxedBernoulliStraightThrough if straight_through else dist.RelaxedBernoulli
    return relaxed(tau, logits=fn.logits)


def _harden(value: torch.Tensor, discrete_fn) -> torch.Tensor:
    """The discrete value under the same noise: argmax(logits + Gumbel) is an exact draw from the categorical
    (the Gumbel-max trick), and sigmoid((logits + Logistic) / tau) > 1/2 an exact Bernoulli draw."""
    if isinstance(unwrap(discrete_fn), torch.distributions.OneHotCategorical):
        return torch.zeros_like(value).scatter_(-1, value.argmax(-1, keepdim=True), 1.0)  # one_hot would sync to check
    return (value > 0.5).to(value.dtype)


class _Relax(Messenger):
    """Swap the named sites' distributions for their relaxations; remember the discrete ones."""

    def __init__(self, names: frozenset, temperature: float, straight_through: bool):
        super().__init__()
        self.names, self.temperature, self.straight_through = names, temperature, straight_through
        self.discrete: dict = {}

    def _pyro_sample(self, msg):
        if msg["name"] in self.names and not msg["is_observed"]:
            self.discrete[msg["name"]] = msg["fn"]
            msg["fn"] = _relaxed(msg["fn"], self.temperature, self.straight_through)


class _Force(Messenger):
    """Set the named latent sites to given values (they stay latent, with their own distributions)."""

    def __init__(self, values: dict):
        super().__init__()
        self.values = values

    def _pyro_sample(self, msg):
        if msg["name"] in self.values and not msg["is_observed"]:
            msg["value"], msg["done"] = self.values[msg["name"]], True


def _relaxed_terms(model_trace, guide_trace, q_discrete: dict, p_discrete: dict) -> torch.Tensor:
    """log p(x | z) - sum KL(q_disc || p_disc) over the relaxed sites + (log p - log q) at the other latent sites.

    The KL of a relaxed site is the exact one between the *discrete* q and p (as in Jang et al. 2017's
    code): the relaxation enters through the value the model's downstream computation sees.
    """
    total = 0.0
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if name in q_discrete:
            kl = torch.distributions.kl_divergence(q_discrete[name], p_discrete[name])
            total = total - scale_and_mask(kl, site["scale"], site["mask"]).sum()
        elif site["is_observed"]:
            total = total + log_prob_sum(site)
        else:
            total = total + log_prob_sum(site) - log_prob_sum(guide_trace.nodes[name])
    return total


@dataclass(frozen=True)
class Gumbel(Estimator):
    names: frozenset = frozenset()
    settings: dict = field(default_factory=dict)
    num_particles: int = 1
    guide_only_relaxed: bool = True  # the guide samples nothing but the relaxed sites

    def temperature_at(self, step: int) -> float:
        """tau_t = max(min_temperature, temperature * exp(-anneal_rate * t)) (Jang et al. 2017, section 3.1)."""
        s = self.settings
        return max(s["min_temperature"], s["temperature"] * math.exp(-s["anneal_rate"] * step))

    def extra_columns(self, steps: list[int]) -> dict:
        return {"temperature": [self.temperature_at(step) for step in steps]}

    def _particle(self, args, temperature: float):
        straight_through = self.settings["straight_through"]
        relax_guide = _Relax(self.names, temperature, straight_through)
        relax_model = _Relax(self.names, temperature, straight_through)
        guide_trace = poutine.trace(relax_guide(self.guide_fn)).get_trace(*args)
        model_trace = poutine.trace(poutine.replay(relax_model(self.model_fn), trace=guide_trace)).get_trace(*args)
        objective = _relaxed_terms(model_trace, guide_trace, relax_guide.discrete, relax_model.discrete)
        if straight_through:  # the forward pass already ran on discrete values: the objective *is* the discrete ELBO
            return objective.detach(), objective
        with torch.no_grad():  # the discrete ELBO at the hard values the same noise gives
            hard = {name: _harden(guide_trace.nodes[name]["value"], fn) for name, fn in relax_guide.discrete.items()}
            if self.guide_only_relaxed:
                hard_guide = guide_trace.copy()
                for name, value in hard.items():
                    hard_guide.nodes[name] = {**guide_trace.nodes[name], "value": value, "fn": relax_guide.discrete[name]}
            else:  # guide sites downstream of a relaxed one must be drawn given the hard value
                hard_guide = poutine.trace(_Force(hard)(self.guide_fn)).get_trace(*args)
            hard_model = poutine.trace(poutine.replay(self.model_fn, trace=hard_guide)).get_trace(*args)
            q = {name: hard_guide.nodes[name]["fn"] for name in hard}
            p = {name: hard_model.nodes[name]["fn"] for name in hard}
            elbo = _relaxed_terms(hard_model, hard_guide, q, p)
        return elbo, objective

    def loss(self, *args, step: int = 0):
        temperature = self.temperature_at(step)
        elbo, objective = 0.0, 0.0
        for _ in range(self.num_particles):
            particle_elbo, particle_objective = self._particle(args, temperature)
            elbo, objective = elbo + particle_elbo, objective + particle_objective
        return elbo / self.num_particles, -objective / self.num_particles  # -objective, since we descend a loss


def build(info: PairInfo, model_fn, guide_fn, *, reason: str, options: dict, num_particles: int, vectorize_particles: bool) -> Estimator:
    relaxed = frozenset(s.name for s in info.nonreparam)
    only = {s.name for s in info.sites if s.where == "guide"} <= relaxed
    return Gumbel("gumbel", reason + " (relaxed ELBO; the trace records the discrete ELBO)", None, model_fn, guide_fn,
                  objective="relaxed_elbo", names=relaxed, settings=options, num_particles=num_particles, guide_only_relaxed=only)


ESTIMATOR = EstimatorSpec(
    name="gumbel", why_not=why_not, reason=reason, build=build, options=options, order=40, priority=40, can_infer_discrete=True,
)
