"""Gradient estimators for the ELBO, and the rules that pick one for a model/guide pair.

=========  ==============================================================
reparam    pathwise gradients (Kingma & Welling 2014): Trace_ELBO, or
           TraceMeanField_ELBO (analytic KL where registered) when the
           guide is mean-field
score      score function / REINFORCE (Williams 1992; Ranganath et al.
           2014) with Rao-Blackwellisation by Pyro's dependency tracking
           and a decaying-average baseline at every scored site
           (TraceGraph_ELBO)
enum       exact sums over finite discrete sites (TraceEnum_ELBO)
auto       all latent sites reparameterizable -> reparam; discrete sites
           with at most ENUM_MAX_SUPPORT values -> enum; else score
=========  ==============================================================

Every estimator exposes one call, ``loss(batch, options)``, returning
``(elbo, surrogate_loss)``: the ELBO estimate (detached, left on the device)
and the scalar to differentiate (``-elbo`` up to terms with zero expected
gradient, since we descend a loss).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
import pyro
import pyro.poutine as poutine
from pyro.infer import TraceEnum_ELBO, TraceGraph_ELBO, Trace_ELBO, TraceMeanField_ELBO, config_enumerate
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .errors import UsageError

__all__ = ["ESTIMATORS", "ENUM_MAX_SUPPORT", "Site", "Estimator", "inspect_sites", "choose_estimator", "make_estimator"]

ESTIMATORS = ("auto", "reparam", "score", "enum")
ENUM_MAX_SUPPORT = 256  # largest per-site support that `auto` sums out exactly


@dataclass(frozen=True)
class Site:
    """A latent sample site as the estimator rules see it."""

    name: str
    where: str  # "guide", or "model" for a latent site the guide does not sample
    distribution: str
    reparameterized: bool
    discrete: bool
    support_size: int | None  # number of values when the support can be enumerated

    def describe(self) -> str:
        size = f", {self.support_size} values" if self.support_size is not None else ""
        return f"'{self.name}' ({self.distribution}{size})"

    @property
    def enumerable(self) -> bool:
        return self.support_size is not None and self.support_size <= ENUM_MAX_SUPPORT


def _distribution_name(fn) -> str:
    while hasattr(fn, "base_dist") and type(fn).__name__ in ("Independent", "ExpandedDistribution", "MaskedDistribution"):
        fn = fn.base_dist
    return type(fn).__name__


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


def feasible_estimators(sites: list[Site]) -> list[str]:
    """The estimators that can fit this pair, in the order `auto` prefers them."""
    nonreparam = [s for s in sites if s.where == "guide" and not s.reparameterized]
    model_only = [s for s in sites if s.where == "model"]
    works = []
    if not nonreparam and not model_only:
        works.append("reparam")
    if all(s.support_size is not None for s in nonreparam + model_only):
        works.append("enum")
    if not model_only:
        works.append("score")
    return works


def choose_estimator(requested: str, sites: list[Site]) -> tuple[str, str]:
    """Apply the estimator rules; return ``(name, reason)`` or raise UsageError for an impossible choice."""
    if requested not in ESTIMATORS:
        raise UsageError(f"unknown estimator {requested!r}; choose one of: {', '.join(ESTIMATORS)}.")
    nonreparam = [s for s in sites if s.where == "guide" and not s.reparameterized]
    model_only = [s for s in sites if s.where == "model"]
    continuous = [s for s in sites if s.where == "guide" and s.reparameterized]
    works = feasible_estimators(sites)
    alternatives = ", ".join(works) if works else "none of ppvi's estimators"

    if requested == "auto":
        if not nonreparam and not model_only:
            return "reparam", f"every latent site is reparameterizable: {_names(continuous) or 'none'}"
        discrete = nonreparam + model_only
        if all(s.enumerable for s in discrete):
            summed = [s for s in model_only]
            return "enum", (
                f"discrete site(s) {_names(discrete)} have small finite support and are summed out exactly"
                + (f" ({_names(summed)} in the model, absent from the guide)" if summed else "")
                + (f"; pathwise gradients for {_names(continuous)}" if continuous else "")
            )
        too_big = [s for s in model_only if not s.enumerable]
        if too_big:
            raise UsageError(
                f"latent site(s) {_names(too_big)} appear in the model but not in the guide and cannot be "
                f"enumerated (more than {ENUM_MAX_SUPPORT} values, or not discrete): add them to the guide."
            )
        big = [s for s in nonreparam if not s.enumerable]
        return "score", (
            f"discrete site(s) {_names(big)} cannot be enumerated (more than {ENUM_MAX_SUPPORT} values or "
            f"no finite support): score-function gradients with a decaying-average baseline there"
            + (f", pathwise for {_names(continuous)}" if continuous else "")
        )

    if requested not in works:
        if requested == "reparam" and nonreparam:
            problem = f"guide site(s) {_names(nonreparam)} have no reparameterized sampler"
        elif model_only and requested in ("reparam", "score"):
            problem = f"site(s) {_names(model_only)} are latent in the model but absent from the guide, so only enumeration can sum them out"
        else:
            unsummable = [s for s in nonreparam + model_only if s.support_size is None]
            problem = f"site(s) {_names(unsummable)} have no finite support to enumerate"
        raise UsageError(f"estimator {requested!r} cannot fit this model/guide pair: {problem}. Estimators that work: {alternatives}.")
    reasons = {
        "reparam": "requested: pathwise gradients at every site",
        "enum": "requested: exact sums over " + (_names(nonreparam + model_only) or "no discrete site (same as reparam)"),
        "score": "requested: score-function gradients with a decaying-average baseline at "
        + (_names(nonreparam) if nonreparam else f"every latent site {_names(continuous)}"),
    }
    return requested, reasons[requested]


class _ScoreFunction(Messenger):
    """Make chosen guide sites non-reparameterized and give them a decaying-average baseline."""

    def __init__(self, names: frozenset, baseline_beta: float = 0.9):
        super().__init__()
        self.names = names
        self.baseline_beta = baseline_beta

    def _pyro_sample(self, msg):
        if msg["name"] not in self.names or msg["is_observed"]:
            return
        fn = msg["fn"]
        while isinstance(inspect.getattr_static(type(fn), "has_rsample", None), property):
            fn = fn.base_dist  # Independent / Expanded / Masked wrappers delegate to their base
        fn.has_rsample_(False)
        msg["infer"].setdefault("baseline", {"use_decaying_avg_baseline": True, "baseline_beta": self.baseline_beta})


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
    for name, msg in guide_trace.nodes.items():
        if msg["type"] != "sample" or msg["is_observed"] or name not in model_trace.nodes:
            continue
        if _distribution_name(msg["fn"]) == "Delta":
            return False
    for name, msg in guide_trace.nodes.items():
        if msg["type"] != "sample" or msg["is_observed"] or name not in model_trace.nodes:
            continue
        try:
            torch.distributions.kl_divergence(msg["fn"], model_trace.nodes[name]["fn"])
            return True
        except NotImplementedError:
            continue
    return False


@dataclass(frozen=True)
class Estimator:
    """A chosen estimator: Pyro's ELBO object plus the (possibly wrapped) model and guide it runs."""

    name: str
    reason: str
    elbo: pyro.infer.ELBO = field(repr=False)
    model_fn: Callable = field(repr=False)
    guide_fn: Callable = field(repr=False)

    def loss(self, *args):
        """Return ``(elbo, surrogate_loss)`` for one minibatch: elbo detached, the loss to descend."""
        if isinstance(self.elbo, TraceGraph_ELBO):
            elbo, surrogate_loss = self.elbo._loss_and_surrogate_loss(self.model_fn, self.guide_fn, args, {})
            return elbo.detach(), surrogate_loss
        loss = self.elbo.differentiable_loss(self.model_fn, self.guide_fn, *args)
        return -loss.detach(), loss  # loss = -elbo, since we descend a loss


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
) -> Estimator:
    """Build the Pyro ELBO for a chosen estimator (see :func:`choose_estimator`).

    ``vectorize_particles`` draws all particles in one pass, in an extra plate left of the
    model's plates (Pyro's ``vectorize_particles``); the model must broadcast over it.
    """
    common = dict(num_particles=num_particles, vectorize_particles=vectorize_particles and num_particles > 1, max_plate_nesting=max_plate_nesting)
    if name == "reparam":
        if _analytic_kl_applies(model_fn, guide_fn, *args):
            return Estimator(name, reason + "; analytic KL where registered (TraceMeanField_ELBO)", TraceMeanField_ELBO(**common), model_fn, guide_fn)
        return Estimator(name, reason + " (Trace_ELBO)", Trace_ELBO(**common), model_fn, guide_fn)
    if name == "enum":
        has_discrete = any(not s.reparameterized or s.where == "model" for s in sites)
        elbo = TraceEnum_ELBO(strict_enumeration_warning=has_discrete, **common)
        return Estimator(
            name,
            reason + " (TraceEnum_ELBO)",
            elbo,
            config_enumerate(model_fn, default="parallel"),
            config_enumerate(guide_fn, default="parallel"),
        )
    if name == "score":
        guide_sites = [s for s in sites if s.where == "guide"]
        scored = [s for s in guide_sites if not s.reparameterized] or guide_sites
        wrapped = _ScoreFunction(frozenset(s.name for s in scored))(guide_fn)
        return Estimator(name, reason + " (TraceGraph_ELBO)", TraceGraph_ELBO(**common), model_fn, wrapped)
    raise UsageError(f"unknown estimator {name!r}; choose one of: {', '.join(ESTIMATORS)}.")
