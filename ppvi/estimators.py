"""Gradient estimators for the ELBO, and the rules that pick one for a model/guide pair.

=========  ==============================================================
reparam    pathwise gradients (Kingma & Welling 2014): Trace_ELBO, or
           MeanFieldELBO (analytic KL where registered; TraceMeanField_ELBO's
           estimator, leaner) when the guide is mean-field
score      score function / REINFORCE (Williams 1992; Ranganath et al.
           2014) at the non-reparameterizable guide sites, Rao-Blackwellised
           by Pyro's dependency tracking (TraceGraph_ELBO), with a baseline
           (``--baseline``): none, a decaying average of the downstream cost,
           or ``neural`` (default): the average plus an input-dependent
           network b(q's parameters) fitted by least squares to the residual
           cost (Mnih & Gregor 2014, NVIL)
enum       exact sums over finite discrete sites (TraceEnum_ELBO); discrete
           guide sites too large to enumerate get score-function terms there
gumbel     Gumbel-softmax / Concrete relaxation (Jang et al. 2017; Maddison
           et al. 2017) of OneHotCategorical and Bernoulli sites, temperature
           tau_t = max(min_temperature, temperature * exp(-anneal_rate * t)),
           optionally straight-through; the trace records the *discrete* ELBO
iwae       importance-weighted bound with K = num_particles samples (Burda et
           al. 2016), per data point when every latent site is local
auto       all latent sites reparameterizable -> reparam; every discrete site
           with at most ENUM_MAX_SUPPORT values -> enum; discrete sites that
           cannot be enumerated -> score with the neural baseline (or enum +
           score terms when other discrete sites must be summed in the model)
=========  ==============================================================

Every estimator exposes one call, ``loss(batch, options, step=0)``, returning
``(elbo, surrogate_loss)``: an unbiased estimate of the ELBO (detached, left on
the device) and the scalar to differentiate (``-objective`` up to terms with
zero expected gradient, since we descend a loss). For ``gumbel`` and ``iwae``
the objective is not the ELBO: ``-surrogate_loss`` is their objective
(relaxed ELBO, IWAE bound) and ``elbo`` is still the ELBO, so traces of all
estimators compare on the same scale.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import TraceEnum_ELBO, TraceGraph_ELBO, Trace_ELBO
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .errors import UsageError
from .losses import MeanFieldELBO

__all__ = [
    "ESTIMATORS", "BASELINES", "ENUM_MAX_SUPPORT", "Site", "EstimatorSettings", "Estimator",
    "inspect_sites", "choose_estimator", "make_estimator", "feasible_estimators",
]

ESTIMATORS = ("auto", "reparam", "score", "enum", "gumbel", "iwae")
BASELINES = ("none", "average", "neural")
ENUM_MAX_SUPPORT = 256  # largest per-site support that `auto` sums out exactly
BASELINE_HIDDEN = 100  # units of the neural baseline's hidden layer (NVIL used 100 tanh units)
# The network's output is in units of BASELINE_UNIT nats per data point (as a 10x learning rate on its
# output layer): per-point costs of image models differ by tens of nats between points. Measured on
# catvae at MNIST-trained parameters (1,000 warm-up steps): encoder gradient variance 2.7x below the
# decaying average with unit 1, 3.6x with unit 10 (and 1.0x with logits instead of probabilities as input).
BASELINE_UNIT = 10.0


@dataclass(frozen=True)
class Site:
    """A latent sample site as the estimator rules see it."""

    name: str
    where: str  # "guide", or "model" for a latent site the guide does not sample
    distribution: str
    reparameterized: bool
    discrete: bool
    support_size: int | None  # number of values when the support can be enumerated
    relaxable: bool = False  # OneHotCategorical / Bernoulli: has a Gumbel-softmax relaxation

    def describe(self) -> str:
        size = f", {self.support_size} values" if self.support_size is not None else ""
        return f"'{self.name}' ({self.distribution}{size})"

    @property
    def enumerable(self) -> bool:
        return self.support_size is not None and self.support_size <= ENUM_MAX_SUPPORT


@dataclass(frozen=True)
class EstimatorSettings:
    """The estimator-specific options (``--baseline``, ``--temperature`` ...); None means the default.

    Defaults: baseline ``neural``; temperature 1.0 and min_temperature 0.5 (Jang et al. 2017:
    tau = max(0.5, exp(-r t))); anneal_rate such that tau reaches the floor halfway through the fit,
    r = ln(temperature / min_temperature) / (steps / 2). Jang et al. used r = 1e-5 to 1e-4 over
    hundreds of thousands of steps; a fixed r that small would leave a fit of a few thousand steps
    at tau ~ 1, where the decoder learns on soft inputs and the discrete ELBO falls behind (measured
    on catvae: -29.3 nats per digit after 2,250 steps at tau 0.93, against -26.2 at tau 0.5).
    No straight-through.
    """

    baseline: str | None = None
    temperature: float | None = None
    anneal_rate: float | None = None
    min_temperature: float | None = None
    straight_through: bool | None = None

    GUMBEL_FIELDS = ("temperature", "anneal_rate", "min_temperature", "straight_through")

    def check(self, requested: str) -> None:
        """Refuse settings that are invalid, or that cannot apply to the requested estimator."""
        if self.baseline is not None and self.baseline not in BASELINES:
            raise UsageError(f"unknown baseline {self.baseline!r}; choose one of: {', '.join(BASELINES)}.")
        for name in ("temperature", "min_temperature"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise UsageError(f"--{name.replace('_', '-')} must be a positive number (got {value!r}).")
        if self.anneal_rate is not None and not (math.isfinite(self.anneal_rate) and self.anneal_rate >= 0):
            raise UsageError(f"--anneal-rate must be zero or positive (got {self.anneal_rate!r}).")
        if self.min_temperature is not None and self.min_temperature > (1.0 if self.temperature is None else self.temperature):
            raise UsageError(
                f"--min-temperature {self.min_temperature:g} exceeds the starting temperature "
                f"{1.0 if self.temperature is None else self.temperature:g}; the temperature only falls."
            )
        self.check_applies(requested)

    def check_applies(self, estimator: str) -> None:
        """For ``auto``, called again with the estimator it chose."""
        if estimator == "auto":
            return
        if self.baseline is not None and estimator != "score":
            raise UsageError(f"--baseline applies to the score-function estimator only; the estimator here is {estimator!r} (use --estimator score).")
        given = [f"--{name.replace('_', '-')}" for name in self.GUMBEL_FIELDS if getattr(self, name) is not None]
        if given and estimator != "gumbel":
            raise UsageError(f"{', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to --estimator gumbel only; the estimator here is {estimator!r}.")

    def resolved(self, total_steps: int | None = None) -> dict:
        """The values in effect (defaults filled in; the default anneal rate needs the fit's length)."""
        temperature = 1.0 if self.temperature is None else float(self.temperature)
        # the default floor is 0.5, or the starting temperature when that is lower (a fixed low temperature)
        floor = min(0.5, temperature) if self.min_temperature is None else float(self.min_temperature)
        if self.anneal_rate is not None:
            rate = float(self.anneal_rate)
        elif total_steps and temperature > floor:
            rate = math.log(temperature / floor) / max(total_steps / 2, 1)
        else:
            rate = 0.0
        return {
            "baseline": self.baseline or "neural",
            "temperature": temperature,
            "anneal_rate": rate,
            "min_temperature": floor,
            "straight_through": bool(self.straight_through),
        }


def _unwrap(fn):
    while hasattr(fn, "base_dist") and type(fn).__name__ in ("Independent", "ExpandedDistribution", "MaskedDistribution"):
        fn = fn.base_dist
    return fn


def _distribution_name(fn) -> str:
    return type(_unwrap(fn)).__name__


def _site(name: str, msg: dict, where: str) -> Site:
    fn = msg["fn"]
    support_size = None
    if getattr(fn, "has_enumerate_support", False):
        support_size = int(fn.enumerate_support(expand=False).shape[0])
    return Site(
        name=name,
        where=where,
        distribution=_distribution_name(fn),
        reparameterized=bool(fn.has_rsample),
        discrete=bool(fn.support.is_discrete),
        support_size=support_size,
        relaxable=isinstance(_unwrap(fn), (torch.distributions.OneHotCategorical, torch.distributions.Bernoulli)),
    )


def inspect_sites(model_fn: Callable, guide_fn: Callable, *args) -> tuple[list[Site], int]:
    """Run the guide once, and the model against it; list the latent sites of both and the plate depth."""
    guide_trace = poutine.trace(guide_fn).get_trace(*args)
    model_trace = poutine.trace(poutine.replay(model_fn, trace=guide_trace)).get_trace(*args)
    sites = [
        _site(name, msg, "guide")
        for name, msg in guide_trace.nodes.items()
        if msg["type"] == "sample" and not msg["is_observed"] and not site_is_subsample(msg)
    ]
    sites += [
        _site(name, msg, "model")
        for name, msg in model_trace.nodes.items()
        if msg["type"] == "sample"
        and not msg["is_observed"]
        and not site_is_subsample(msg)
        and name not in guide_trace.nodes
    ]
    max_plate_nesting = max(
        (len(msg["cond_indep_stack"]) for trace in (guide_trace, model_trace) for msg in trace.nodes.values() if msg["type"] == "sample"),
        default=0,
    )
    return sites, max_plate_nesting


def _names(sites) -> str:
    return ", ".join(site.describe() for site in sites)


def _groups(sites):
    nonreparam = [s for s in sites if s.where == "guide" and not s.reparameterized]
    model_only = [s for s in sites if s.where == "model"]
    continuous = [s for s in sites if s.where == "guide" and s.reparameterized]
    return nonreparam, model_only, continuous


def feasible_estimators(sites: list[Site]) -> list[str]:
    """The estimators that can fit this pair, in the order `auto` prefers them."""
    nonreparam, model_only, _ = _groups(sites)
    works = []
    if not nonreparam and not model_only:
        works.append("reparam")
    # enum sums out what it can; a guide site it cannot enumerate gets score-function (DiCE) terms,
    # which is only worth TraceEnum_ELBO when some model-only site must be summed out anyway
    if all(s.support_size is not None for s in model_only) and (model_only or all(s.support_size is not None for s in nonreparam)):
        works.append("enum")
    if not model_only:
        works.append("score")
    if nonreparam and not model_only and all(s.relaxable for s in nonreparam):
        works.append("gumbel")
    if not nonreparam and not model_only:
        works.append("iwae")
    return works


def choose_estimator(requested: str, sites: list[Site], settings: EstimatorSettings | None = None) -> tuple[str, str]:
    """Apply the estimator rules; return ``(name, reason)`` or raise UsageError for an impossible choice."""
    settings = settings or EstimatorSettings()
    if requested not in ESTIMATORS:
        raise UsageError(f"unknown estimator {requested!r}; choose one of: {', '.join(ESTIMATORS)}.")
    settings.check(requested)
    name, reason = _choose(requested, sites, settings)
    settings.check_applies(name)
    return name, reason


def _baseline_words(settings: EstimatorSettings) -> str:
    return {
        "none": "no baseline",
        "average": "a decaying-average baseline",
        "neural": "a neural (input-dependent, NVIL-style) baseline",
    }[settings.resolved()["baseline"]]


def _choose(requested: str, sites: list[Site], settings: EstimatorSettings) -> tuple[str, str]:
    nonreparam, model_only, continuous = _groups(sites)
    works = feasible_estimators(sites)
    alternatives = ", ".join(works) if works else "none of ppvi's estimators"
    pathwise = f"; pathwise gradients for {_names(continuous)}" if continuous else ""

    if requested == "auto":
        if not nonreparam and not model_only:
            return "reparam", f"every latent site is reparameterizable: {_names(continuous) or 'none'}"
        too_big = [s for s in model_only if not s.enumerable]
        if too_big:
            raise UsageError(
                f"latent site(s) {_names(too_big)} appear in the model but not in the guide and cannot be "
                f"enumerated (more than {ENUM_MAX_SUPPORT} values, or not discrete): add them to the guide."
            )
        big = [s for s in nonreparam if not s.enumerable]
        small = [s for s in nonreparam + model_only if s.enumerable]
        if not big:
            summed = f" ({_names(model_only)} in the model, absent from the guide)" if model_only else ""
            return "enum", f"discrete site(s) {_names(small)} have small finite support and are summed out exactly{summed}{pathwise}"
        why_big = f"discrete site(s) {_names(big)} cannot be enumerated (more than {ENUM_MAX_SUPPORT} values or no finite support)"
        if model_only:  # those must be summed out, so TraceEnum_ELBO; the big guide sites get DiCE score terms
            return "enum", f"{why_big}: score-function terms there; {_names(small)} summed out exactly{pathwise}"
        small_note = f"; {_names(small)} also scored (enumerate them with --estimator enum)" if small else ""
        return "score", f"{why_big}: score-function gradients with {_baseline_words(settings)}{small_note}{pathwise}"

    if requested not in works:
        if requested in ("reparam", "iwae") and nonreparam:
            problem = f"guide site(s) {_names(nonreparam)} have no reparameterized sampler"
        elif model_only and requested in ("reparam", "score", "gumbel", "iwae"):
            problem = f"site(s) {_names(model_only)} are latent in the model but absent from the guide, so only enumeration can sum them out"
        elif requested == "gumbel" and not nonreparam:
            problem = "it has no discrete guide site to relax (every guide site is continuous)"
        elif requested == "gumbel":
            problem = (
                f"site(s) {_names([s for s in nonreparam if not s.relaxable])} have no Gumbel-softmax relaxation "
                "(only OneHotCategorical and Bernoulli sites can be relaxed: a relaxed value must stand in for the discrete one)"
            )
        else:
            unsummable = [s for s in nonreparam + model_only if s.support_size is None]
            problem = f"site(s) {_names(unsummable)} have no finite support to enumerate"
        raise UsageError(f"estimator {requested!r} cannot fit this model/guide pair: {problem}. Estimators that work: {alternatives}.")
    resolved = settings.resolved()
    reasons = {
        "reparam": "requested: pathwise gradients at every site",
        "enum": "requested: exact sums over " + (_names([s for s in nonreparam + model_only if s.enumerable]) or "no discrete site (same as reparam)"),
        "score": f"requested: score-function gradients with {_baseline_words(settings)} at "
        + (_names(nonreparam) if nonreparam else f"every latent site {_names(continuous)}"),
        "gumbel": f"requested: Gumbel-softmax relaxation of {_names(nonreparam)} "
        f"(temperature {resolved['temperature']:g}, floor {resolved['min_temperature']:g}, anneal rate "
        + (f"{settings.anneal_rate:g}" if settings.anneal_rate is not None else "reaching the floor at mid-fit")
        + (", straight-through" if resolved["straight_through"] else "")
        + ")",
        "iwae": "requested: importance-weighted bound",
    }
    return requested, reasons[requested] + (pathwise if requested in ("enum", "score", "gumbel") else "")


# ----------------------------------------------------------------------------- score function


def _baseline_features(fn) -> torch.Tensor:
    """The neural baseline's input at a site: q's own parameters there (detached), one row per batch element.

    Categorical and Bernoulli sites give their probabilities; other families their parameters.

    NVIL conditions its baseline on x; q's parameters are the encoder's summary of x (and of
    any upstream latents), available at every site without model-specific wiring. They do not
    depend on the site's sample, so the baseline leaves the estimator unbiased.
    """
    base = _unwrap(fn)
    if isinstance(base, (torch.distributions.Categorical, torch.distributions.OneHotCategorical, torch.distributions.Bernoulli)):
        params = [base.probs]  # bounded: logits of a confident encoder saturate the tanh units
    else:
        params = [value for value in (getattr(base, name, None) for name in base.arg_constraints) if isinstance(value, torch.Tensor)]
    if not params:
        raise UsageError(f"the neural baseline cannot read the parameters of a {type(base).__name__} site; use --baseline average.")
    shape = fn.batch_shape + fn.event_shape
    if isinstance(base, torch.distributions.Categorical):
        shape = shape + params[0].shape[-1:]
    columns = torch.stack([torch.broadcast_to(p.detach(), shape) for p in params], -1)
    return columns.reshape(fn.batch_shape + (-1,))


class _NeuralBaseline(nn.Module):
    """b(features) = scale * BASELINE_UNIT * MLP(features): per-point units; Pyro's costs carry the subsample scale."""

    def __init__(self, num_features: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_features, BASELINE_HIDDEN), nn.Tanh(), nn.Linear(BASELINE_HIDDEN, 1))
        nn.init.zeros_(self.net[-1].weight)  # starts as the decaying average alone
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, features: torch.Tensor, scale=1.0) -> torch.Tensor:
        return scale * BASELINE_UNIT * self.net(features).squeeze(-1)


class _ScoreFunction(Messenger):
    """Make chosen guide sites non-reparameterized and attach their baseline (Pyro's ``infer["baseline"]``)."""

    def __init__(self, names: frozenset, baseline: str = "neural", baseline_beta: float = 0.9):
        super().__init__()
        self.names, self.baseline, self.baseline_beta = names, baseline, baseline_beta
        self.networks: dict[str, _NeuralBaseline] = {}

    def _network(self, name: str, features: torch.Tensor) -> _NeuralBaseline:
        if name not in self.networks:
            network = _NeuralBaseline(features.shape[-1]).to(features.device)
            with poutine.block():  # register in the param store (so Adam and checkpoints see it), untraced
                # update_module_params: parameters already in the store (a loaded run) become the network's own
                self.networks[name] = pyro.module(f"_ppvi_baseline.{name}", network, update_module_params=True)
        return self.networks[name]

    def _pyro_sample(self, msg):
        if msg["name"] not in self.names or msg["is_observed"]:
            return
        fn = msg["fn"]
        while isinstance(inspect.getattr_static(type(fn), "has_rsample", None), property):
            fn = fn.base_dist  # Independent / Expanded / Masked wrappers delegate to their base
        fn.has_rsample_(False)
        if self.baseline == "none":
            return
        options = {"use_decaying_avg_baseline": True, "baseline_beta": self.baseline_beta}
        if self.baseline == "neural":
            features = _baseline_features(msg["fn"])
            network, scale = self._network(msg["name"], features), msg["scale"]
            options.update(nn_baseline=lambda inputs: network(inputs, scale), nn_baseline_input=features)
        msg["infer"].setdefault("baseline", options)


def _analytic_kl_applies(model_fn, guide_fn, *args) -> bool:
    """True when the guide is mean-field, has no Delta site, and some site's KL(q || p) has a closed form.

    Mean-field: no guide site's distribution depends on another latent sample, so the KL
    splits into per-site terms (TraceMeanField_ELBO's assumption). Delta sites (autoguides
    emit them after sampling an auxiliary latent) rule it out: Pyro 1.9's registered
    KL(Delta || p) = -log p(v) ignores the Delta's log_density (the Jacobian of an
    autoguide's transform), which silently changes the objective (NumPyro fixed the same
    bug in PR #1625). Such guides get Trace_ELBO, which is correct for them.
    """
    try:
        guide_trace = poutine.trace(guide_fn).get_trace(*args)
        model_trace = poutine.trace(poutine.replay(model_fn, trace=guide_trace)).get_trace(*args)
        dependencies = pyro.infer.inspect.get_dependencies(guide_fn, args)["prior_dependencies"]
    except Exception:  # provenance tracking does not cover every guide; fall back to Monte Carlo KL
        return False
    if not all(set(upstream) <= {name} for name, upstream in dependencies.items()):
        return False
    latent = [(name, msg) for name, msg in guide_trace.nodes.items() if msg["type"] == "sample" and not msg["is_observed"] and name in model_trace.nodes]
    if any(_distribution_name(msg["fn"]) == "Delta" for _, msg in latent):
        return False
    for name, msg in latent:
        try:
            torch.distributions.kl_divergence(msg["fn"], model_trace.nodes[name]["fn"])
            return True
        except NotImplementedError:
            continue
    return False


# ----------------------------------------------------------------------------- estimators


@dataclass(frozen=True)
class Estimator:
    """A chosen estimator: Pyro's ELBO object plus the (possibly wrapped) model and guide it runs."""

    name: str
    reason: str
    elbo: pyro.infer.ELBO | None = field(repr=False)
    model_fn: Callable = field(repr=False)
    guide_fn: Callable = field(repr=False)
    objective: str | None = None  # what -surrogate_loss estimates when it is not the ELBO (recorded in the trace)
    baselines: object = field(default=None, repr=False)  # score: the messenger holding the baselines (gradvar freezes them)

    def loss(self, *args, step: int = 0):
        """Return ``(elbo, surrogate_loss)`` for one minibatch: elbo detached, the loss to descend."""
        if isinstance(self.elbo, TraceGraph_ELBO):
            elbo, surrogate_loss = self.elbo._loss_and_surrogate_loss(self.model_fn, self.guide_fn, args, {})
            return elbo.detach(), surrogate_loss
        loss = self.elbo.differentiable_loss(self.model_fn, self.guide_fn, *args)
        return -loss.detach(), loss  # loss = -elbo, since we descend a loss

    def extra_columns(self, steps: list[int]) -> dict:
        """Per-step values besides the ELBO that the trace should record (none by default)."""
        return {}


def _latent_sample(site) -> bool:
    return site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)


def _log_prob_sum(site) -> torch.Tensor:
    return scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"]).sum()


# ----------------------------------------------------------------------------- Gumbel-softmax


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
    elif isinstance(fn, torch.distributions.Bernoulli):
        relaxed = dist.RelaxedBernoulliStraightThrough if straight_through else dist.RelaxedBernoulli
    else:
        raise UsageError(f"a {type(fn).__name__} site has no Gumbel-softmax relaxation (OneHotCategorical and Bernoulli have).")
    return relaxed(tau, logits=fn.logits)


def _harden(value: torch.Tensor, discrete_fn) -> torch.Tensor:
    """The discrete value under the same noise: argmax(logits + Gumbel) is an exact draw from the categorical
    (the Gumbel-max trick), and sigmoid((logits + Logistic) / tau) > 1/2 an exact Bernoulli draw."""
    if isinstance(_unwrap(discrete_fn), torch.distributions.OneHotCategorical):
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
            total = total + _log_prob_sum(site)
        else:
            total = total + _log_prob_sum(site) - _log_prob_sum(guide_trace.nodes[name])
    return total


@dataclass(frozen=True)
class _Gumbel(Estimator):
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


# ----------------------------------------------------------------------------- importance weighted


def _reduce(log_p: torch.Tensor, particle_dim: int, data_dim: int | None) -> torch.Tensor:
    """Sum a site's log density over every dim but the particle dim (and the data dim): (K|1, B|1) or (K|1,)."""
    ndim = -particle_dim
    while log_p.dim() < ndim:
        log_p = log_p.unsqueeze(0)
    keep = [ndim + particle_dim] + ([ndim + data_dim] if data_dim is not None else [])
    other = [d for d in range(log_p.dim()) if d not in keep]
    if other:
        log_p = log_p.sum(dim=other, keepdim=True)
    return log_p.reshape([log_p.shape[d] for d in keep])


def _data_dim(site, plate: str) -> int | None:
    return next((frame.dim for frame in site["cond_indep_stack"] if frame.name == plate), None)


@dataclass(frozen=True)
class _IWAE(Estimator):
    num_particles: int = 1
    max_plate_nesting: int = 0
    local_plate: str | None = None  # every sample site lies in this plate: bound per data point

    def loss(self, *args, step: int = 0):
        K, particle_dim = self.num_particles, -(self.max_plate_nesting + 1)
        particles = pyro.plate("_ppvi_particles", K, dim=particle_dim)
        guide_trace = poutine.trace(particles(self.guide_fn)).get_trace(*args)
        model_trace = poutine.trace(poutine.replay(particles(self.model_fn), trace=guide_trace)).get_trace(*args)
        log_w, scale = 0.0, 1.0
        for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
            for site in trace.nodes.values():
                if site["type"] != "sample" or site_is_subsample(site) or (sign < 0 and site["is_observed"]):
                    continue
                log_p = site["fn"].log_prob(site["value"])
                if self.local_plate is None:  # one joint weight per particle, with Pyro's scale and mask
                    log_w = log_w + sign * _reduce(scale_and_mask(log_p, site["scale"], site["mask"]), particle_dim, None)
                else:  # per point: unscaled log w_ik; the subsample scale multiplies the per-point bounds below
                    if site["is_observed"]:
                        log_p, scale = scale_and_mask(log_p, 1.0, site["mask"]), site["scale"]
                    log_w = log_w + sign * _reduce(log_p, particle_dim, _data_dim(site, self.local_plate))
        # IWAE = sum_i [logsumexp_k log w_ik - log K] (Burda et al. 2016, eq. 8); ELBO = sum_i mean_k log w_ik
        bound = scale * (torch.logsumexp(log_w, 0) - math.log(K)).sum()
        elbo = scale * log_w.mean(0).sum()
        return elbo.detach(), -bound  # -bound, since we descend a loss


def _local_plate(model_fn, guide_fn, args) -> str | None:
    """The plate every sample site of model and guide lies in (its per-point bound is exact), else None.

    Without one the bound is joint, log mean_k exp(sum of all log weights), which is a bound on
    log p(x) only on the full data: on a minibatch the subsample scale N/B multiplies the log
    likelihood inside the logsumexp, and the result can exceed log p(x). So minibatches are refused there.
    """
    with poutine.block():
        guide_trace = poutine.trace(guide_fn).get_trace(*args)
        model_trace = poutine.trace(poutine.replay(model_fn, trace=guide_trace)).get_trace(*args)
    sites = [site for trace in (guide_trace, model_trace) for site in trace.nodes.values() if site["type"] == "sample" and not site_is_subsample(site)]
    common = set.intersection(*({frame.name for frame in site["cond_indep_stack"] if frame.vectorized} for site in sites)) if sites else set()
    plate = "data" if "data" in common else (next(iter(common)) if len(common) == 1 else None)
    if plate is None and any(not (isinstance(site["scale"], (int, float)) and site["scale"] == 1.0) for site in sites):
        globals_ = [name for name, site in guide_trace.nodes.items() if _latent_sample(site) and not any(f.vectorized for f in site["cond_indep_stack"])]
        raise UsageError(
            f"iwae on minibatches needs every latent site to belong to one data point; {', '.join(repr(n) for n in globals_) or 'some site'} "
            "is global, and the joint importance-weighted bound on a subsample (log-likelihood scaled by N/B inside the "
            "logsumexp) is not a lower bound on log p(x). Fit full batch (no --batch-size), or use reparam."
        )
    return plate


# ----------------------------------------------------------------------------- construction


def _enumerate(fn, names: frozenset):
    """Enumerate exactly the named sites in parallel (the others keep their samplers)."""

    def config(msg):
        if msg["name"] in names and not msg["is_observed"] and "enumerate" not in msg["infer"]:
            return {"enumerate": "parallel"}
        return {}

    return poutine.infer_config(fn, config)


def make_estimator(
    name: str,
    reason: str,
    sites: list[Site],
    model_fn,
    guide_fn,
    *args,
    num_particles: int = 1,
    vectorize_particles: bool = False,
    max_plate_nesting: int = 0,
    settings: EstimatorSettings | None = None,
    total_steps: int | None = None,
) -> Estimator:
    """Build the estimator chosen by :func:`choose_estimator`.

    ``vectorize_particles`` draws all particles in one pass, in an extra plate left of the
    model's plates (Pyro's ``vectorize_particles``); the model must broadcast over it. ``iwae``
    always vectorizes its K = ``num_particles`` samples. ``total_steps`` sets gumbel's default anneal rate.
    """
    resolved = (settings or EstimatorSettings()).resolved(total_steps)
    common = dict(num_particles=num_particles, vectorize_particles=vectorize_particles and num_particles > 1, max_plate_nesting=max_plate_nesting)
    nonreparam = [s for s in sites if s.where == "guide" and not s.reparameterized]
    if name == "reparam":
        if _analytic_kl_applies(model_fn, guide_fn, *args):
            reason += "; analytic KL where registered (ppvi's MeanFieldELBO: TraceMeanField_ELBO's estimator, log densities at observed sites only)"
            return Estimator(name, reason, MeanFieldELBO(**common), model_fn, guide_fn)
        return Estimator(name, reason + " (Trace_ELBO)", Trace_ELBO(**common), model_fn, guide_fn)
    if name == "enum":
        summed = frozenset(s.name for s in sites if (s.where == "model" or not s.reparameterized) and s.enumerable)
        has_discrete = any(not s.reparameterized or s.where == "model" for s in sites)
        elbo = TraceEnum_ELBO(strict_enumeration_warning=has_discrete, **common)
        return Estimator(name, reason + " (TraceEnum_ELBO)", elbo, _enumerate(model_fn, summed), _enumerate(guide_fn, summed))
    if name == "score":
        guide_sites = [s for s in sites if s.where == "guide"]
        scored = nonreparam or guide_sites
        baselines = _ScoreFunction(frozenset(s.name for s in scored), baseline=resolved["baseline"])
        wrapped = baselines(guide_fn)
        with poutine.block():  # one probe: builds the neural baselines now, so the optimizer sees them from step 0
            poutine.trace(wrapped).get_trace(*args)
        return Estimator(name, reason + " (TraceGraph_ELBO)", TraceGraph_ELBO(**common), model_fn, wrapped, baselines=baselines)
    if name == "gumbel":
        names = frozenset(s.name for s in nonreparam)
        relax = _Relax(names, resolved["temperature"], resolved["straight_through"])
        with poutine.block():
            guide_trace = poutine.trace(relax(guide_fn)).get_trace(*args)
            relax_model = _Relax(names, 1.0, False)
            poutine.trace(poutine.replay(relax_model(model_fn), trace=guide_trace)).get_trace(*args)
        for site_name in names:
            q, p = relax.discrete[site_name], relax_model.discrete[site_name]
            try:
                torch.distributions.kl_divergence(q, p)
            except NotImplementedError:
                raise UsageError(f"gumbel: the KL between the guide's and the model's distributions at site '{site_name}' has no closed form ({type(q).__name__} vs {type(p).__name__}).") from None
        only = {n for n, site in guide_trace.nodes.items() if _latent_sample(site)} <= names
        return _Gumbel(name, reason + " (relaxed ELBO; the trace records the discrete ELBO)", None, model_fn, guide_fn,
                       objective="relaxed_elbo", names=names, settings=resolved, num_particles=num_particles, guide_only_relaxed=only)
    if name == "iwae":
        plate = _local_plate(model_fn, guide_fn, args)
        where = f"per data point over plate '{plate}'" if plate else "one joint bound over all sites (some latent site is global)"
        return _IWAE(name, f"{reason} with K = {num_particles}, {where}", None, model_fn, guide_fn,
                     objective="iwae_bound", num_particles=num_particles, max_plate_nesting=max_plate_nesting, local_plate=plate)
    raise UsageError(f"unknown estimator {name!r}; choose one of: {', '.join(ESTIMATORS)}.")
