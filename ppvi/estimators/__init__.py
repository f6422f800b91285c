"""Gradient estimators for the ELBO, as a registry, and the rules that pick one for a model/guide pair.

=========  ==============================================================
reparam    pathwise gradients (Kingma & Welling 2014): Trace_ELBO, or
           MeanFieldELBO (analytic KL where registered) for a mean-field guide
score      score function / REINFORCE (Williams 1992; Ranganath et al. 2014)
           at the non-reparameterizable guide sites, TraceGraph_ELBO, with a
           baseline: none, decaying average, or neural (default; NVIL)
enum       exact sums over finite discrete sites (TraceEnum_ELBO); guide
           sites it cannot enumerate get score-function terms there
gumbel     Gumbel-softmax / Concrete relaxation of OneHotCategorical and
           Bernoulli sites (Jang et al. 2017; Maddison et al. 2017)
iwae       importance-weighted bound with K = num_particles (Burda et al. 2016)
auto       the registered estimators in priority order (reparam, enum, score):
           the first whose ``auto_why_not`` finds no problem
=========  ==============================================================

How it fits together: :func:`probe` traces a model/guide pair once into a :class:`PairInfo`
(its sites, each classified as discrete, continuous reparameterizable, or continuous not
reparameterizable; plate depth; data plate; mean-field structure). :func:`build` chooses
(``auto`` or a name) and builds an :class:`Estimator` from it: ``.name``, ``.reason``,
``.options`` (the options in effect, for config.json), ``.objective``, ``.loss(*args, step=)``
returning ``(elbo, surrogate_loss)`` and ``.extra_columns(steps)``.

Each estimator is one module of this package defining ``ESTIMATOR = EstimatorSpec(...)``
(see :class:`EstimatorSpec`); the package registers every such module when imported.

The guide's own ``infer`` settings are honoured, and reported: ``infer={"baseline": ...}`` at a
site the score estimator scores is used as written (ppvi's baseline is not attached there), and
``infer={"enumerate": ...}`` is kept by enum; an estimator that does not use a setting says so.
The reason names each, and ``Estimator.options["guide_infer"]`` records ``{site: {key: {value, used}}}``.
"""

from __future__ import annotations

from .base import (
    BASELINES,
    DISCRETE,
    ENUM_MAX_SUPPORT,
    NOT_REPARAMETERIZABLE,
    REPARAMETERIZABLE,
    Estimator,
    EstimatorSettings,
    EstimatorSpec,
    PairInfo,
    Site,
)
from .probe import inspect_sites, probe
from .registry import (
    ESTIMATORS,
    build,
    choose_estimator,
    discover,
    feasible_estimators,
    make_estimator,
    register,
    registered,
    spec,
    specs,
    unregister,
)

__all__ = [
    "BASELINES", "DISCRETE", "ENUM_MAX_SUPPORT", "ESTIMATORS", "NOT_REPARAMETERIZABLE", "REPARAMETERIZABLE",
    "Estimator", "EstimatorSettings", "EstimatorSpec", "PairInfo", "Site",
    "build", "choose_estimator", "discover", "feasible_estimators", "inspect_sites", "make_estimator",
    "probe", "register", "registered", "spec", "specs", "unregister",
]

discover(__name__, __path__)
