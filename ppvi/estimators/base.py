"""The shared vocabulary of the estimator registry: sites, the probed pair, settings, the contract.

``probe`` (in :mod:`ppvi.estimators.probe`) describes a model/guide pair once as a :class:`PairInfo`;
every estimator module declares an :class:`EstimatorSpec` reading only that description to say
whether it can fit the pair and why, and building its :class:`Estimator` from it without tracing
the model again. The contract is a tuple of plain functions, as Optax's ``GradientTransformation``
is an (init, update) pair; ``can_infer_discrete`` plays the part of NumPyro's flag of that name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

import pyro
from pyro.distributions.util import scale_and_mask
from pyro.infer import TraceGraph_ELBO
from pyro.poutine.util import site_is_subsample

from ..errors import UsageError
from ..pyro_util import unwrap

__all__ = [
    "BASELINES",
    "DISCRETE",
    "ENUM_MAX_SUPPORT",
    "NOT_REPARAMETERIZABLE",
    "REPARAMETERIZABLE",
    "Estimator",
    "EstimatorSettings",
    "EstimatorSpec",
    "PairInfo",
    "Site",
    "baseline_features",
    "baseline_words",
    "latent_sample",
    "log_prob_sum",
    "names",
    "never",
]

BASELINES = ("none", "average", "neural")
ENUM_MAX_SUPPORT = 256  # largest per-site support that `auto` sums out exactly

# A site's kind, as the guide (or, for a model-only site, the model) writes it.
DISCRETE = "discrete"
REPARAMETERIZABLE = "continuous, reparameterizable"
NOT_REPARAMETERIZABLE = "continuous, not reparameterizable"


@dataclass(frozen=True)
class Site:
    """A latent sample site as the estimator rules see it (written to config.json as it is)."""

    name: str
    where: str  # "guide", or "model" for a latent site the guide does not sample
    distribution: str
    reparameterized: bool
    discrete: bool
    support_size: int | None  # number of values when the support can be enumerated
    relaxable: bool = False  # OneHotCategorical / Bernoulli: has a Gumbel-softmax relaxation
    kind: str = ""  # DISCRETE, REPARAMETERIZABLE or NOT_REPARAMETERIZABLE
    plates: tuple = ()  # names of the vectorized plates the site lies in
    kl_closed_form: bool | None = None  # guide site: KL(q || p) against the model's site is registered (None: unknown)
    guide_infer: dict = field(default_factory=dict)  # the guide's own infer settings: "baseline" / "enumerate"

    def describe(self) -> str:
        size = f", {self.support_size} values" if self.support_size is not None else ""
        kind = f": {NOT_REPARAMETERIZABLE}" if self.kind == NOT_REPARAMETERIZABLE else ""
        return f"'{self.name}' ({self.distribution}{size}{kind})"

    @property
    def enumerable(self) -> bool:
        return self.support_size is not None and self.support_size <= ENUM_MAX_SUPPORT


@dataclass(frozen=True)
class PairInfo:
    """Everything the estimator rules need to know about a model/guide pair, found by one probe.

    Built by :func:`ppvi.estimators.probe`; ``PairInfo(sites=...)`` alone describes a pair
    whose plates are unknown (the rules that need them then assume a full-batch fit).
    """

    sites: list
    plate_depth: int = 0  # the deepest plate nesting of any sample site (TraceEnum's max_plate_nesting)
    num_data: int | None = None
    data_plate: str | None = None  # the plate indexing data points, found by its size
    local_plate: str | None = None  # a plate every sample site of model and guide lies in
    subsampled: bool = False  # some site carries a subsample scale (a minibatch)
    mean_field: bool | None = None  # no guide site depends on another latent sample (None: not checked, as it could not matter)
    analytic_kl: bool = False  # mean-field, no Delta site, and some KL(q || p) has a closed form
    features: dict = field(default_factory=dict)  # guide site -> width of q's parameters (score's neural baseline)
    device: str = "cpu"

    @property
    def nonreparam(self) -> list:
        """Guide sites without a reparameterized sampler (discrete, or continuous without rsample)."""
        return [s for s in self.sites if s.where == "guide" and not s.reparameterized]

    @property
    def model_only(self) -> list:
        return [s for s in self.sites if s.where == "model"]

    @property
    def continuous(self) -> list:
        """Guide sites with pathwise gradients."""
        return [s for s in self.sites if s.where == "guide" and s.reparameterized]

    @property
    def global_guide_sites(self) -> list:
        return [s for s in self.sites if s.where == "guide" and not s.plates]


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
        """Refuse an unknown estimator, settings that are invalid, or that cannot apply to the requested estimator."""
        from .registry import spec  # the registry reads this module: imported when first needed

        if requested != "auto":
            spec(requested)
        if self.baseline is not None and self.baseline not in BASELINES:
            raise UsageError(f"unknown baseline {self.baseline!r}; choose one of: {', '.join(BASELINES)}.")
        for name in ("temperature", "min_temperature"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise UsageError(f"--{name.replace('_', '-')} must be a positive number (got {value!r}).")
        if self.anneal_rate is not None and not (math.isfinite(self.anneal_rate) and self.anneal_rate >= 0):
            raise UsageError(f"--anneal-rate must be zero or positive (got {self.anneal_rate!r}).")
        start = 1.0 if self.temperature is None else self.temperature
        if self.min_temperature is not None and self.min_temperature > start:
            raise UsageError(
                f"--min-temperature {self.min_temperature:g} exceeds the starting temperature "
                f"{start:g}; the temperature only falls."
            )
        self.check_applies(requested)

    def check_applies(self, estimator: str) -> None:
        """For ``auto``, called again with the estimator it chose."""
        if estimator == "auto":
            return
        if self.baseline is not None and estimator != "score":
            raise UsageError(
                f"--baseline applies to the score-function estimator only; the estimator here is {estimator!r} (use --estimator score)."
            )
        given = [f"--{name.replace('_', '-')}" for name in self.GUMBEL_FIELDS if getattr(self, name) is not None]
        if given and estimator != "gumbel":
            verb = "apply" if len(given) > 1 else "applies"
            raise UsageError(f"{', '.join(given)} {verb} to --estimator gumbel only; the estimator here is {estimator!r}.")

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


@dataclass(frozen=True)
class Estimator:
    """A built estimator: Pyro's ELBO object plus the (possibly wrapped) model and guide it runs.

    ``options`` holds the estimator options in effect (for config.json), including what the
    guide's own ``infer`` settings did; ``objective`` names what ``-surrogate_loss`` estimates
    when it is not the ELBO (recorded in the trace beside the ELBO).
    """

    name: str
    reason: str
    elbo: pyro.infer.ELBO | None = field(repr=False)
    model_fn: Callable = field(repr=False)
    guide_fn: Callable = field(repr=False)
    objective: str | None = None
    baselines: object = field(default=None, repr=False)  # score: the messenger holding the baselines (gradvar freezes them)
    options: dict = field(default_factory=dict)

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


def never(info: PairInfo, site: Site, key: str) -> bool:
    """The default ``uses_infer``: the estimator uses none of the guide's own infer settings."""
    return False


def no_options(settings: EstimatorSettings, total_steps: int | None) -> dict:
    """The default ``options``: the estimator takes no option."""
    return {}


class EstimatorSpec(NamedTuple):
    """What one estimator module declares (its module-level ``ESTIMATOR``): plain functions of a PairInfo.

    name : the ``--estimator`` value.
    why_not(info) -> str | None : None when it can fit the pair, else the problem in one clause.
    reason(info, settings, auto) -> str : why it fits (``auto``: why auto picked it) and how.
    build(info, model_fn, guide_fn, *, reason, options, num_particles, vectorize_particles) -> Estimator :
        wraps the pair; must not trace the model again nor raise a usage error.
    options(settings, total_steps) -> dict : the estimator options in effect (config.json).
    auto_why_not(info) -> str | None : None when ``auto`` should pick it; the spec itself as None: never.
    order : where it is listed (``--help``, messages). priority : auto's preference (lower first).
    can_infer_discrete : it can fit pairs with discrete latent sites (NumPyro's flag).
    uses_infer(info, site, key) -> bool : whether it honours the guide's own ``infer[key]`` at a site.
    """

    name: str
    why_not: Callable
    reason: Callable
    build: Callable
    options: Callable = no_options
    auto_why_not: Callable | None = None
    order: int = 100
    priority: int = 100
    can_infer_discrete: bool = False
    uses_infer: Callable = never


def names(sites) -> str:
    return ", ".join(site.describe() for site in sites)


def baseline_words(baseline: str) -> str:
    return {
        "none": "no baseline",
        "average": "a decaying-average baseline",
        "neural": "a neural (input-dependent, NVIL-style) baseline",
    }[baseline]


def baseline_features(fn) -> torch.Tensor:
    """The neural baseline's input at a site: q's own parameters there (detached), one row per batch element.

    Categorical and Bernoulli sites give their probabilities; other families their parameters.

    NVIL conditions its baseline on x; q's parameters are the encoder's summary of x (and of
    any upstream latents), available at every site without model-specific wiring. They do not
    depend on the site's sample, so the baseline leaves the estimator unbiased. Raises
    ValueError for a family without tensor parameters.
    """
    base = unwrap(fn)
    if isinstance(base, (torch.distributions.Categorical, torch.distributions.OneHotCategorical, torch.distributions.Bernoulli)):
        params = [base.probs]  # bounded: logits of a confident encoder saturate the tanh units
    else:
        params = [value for value in (getattr(base, name, None) for name in base.arg_constraints) if isinstance(value, torch.Tensor)]
    if not params:
        raise ValueError(f"a {type(base).__name__} site has no tensor parameters")
    shape = fn.batch_shape + fn.event_shape
    if isinstance(base, torch.distributions.Categorical):
        shape = shape + params[0].shape[-1:]
    columns = torch.stack([torch.broadcast_to(p.detach(), shape) for p in params], -1)
    return columns.reshape(fn.batch_shape + (-1,))


def latent_sample(site) -> bool:
    return site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)


def log_prob_sum(site) -> torch.Tensor:
    return scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"]).sum()
