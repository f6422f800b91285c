"""enum: exact sums over finite discrete sites (TraceEnum_ELBO).

Discrete sites with at most ENUM_MAX_SUPPORT values are summed out in parallel, in the guide and
in the model (a model site the guide leaves out is summed out there); guide sites that cannot be
enumerated (too many values, or continuous without rsample) get score-function (DiCE) terms. A
guide's own ``infer={"enumerate": ...}`` at a site is kept as written.
"""

from __future__ import annotations

from pyro import poutine
from pyro.infer import TraceEnum_ELBO

from .base import ENUM_MAX_SUPPORT, Estimator, EstimatorSpec, PairInfo, names

__all__ = ["ESTIMATOR", "cannot_enumerate"]


def why_not(info: PairInfo) -> str | None:
    """A model-only site must be summable; without one, every non-reparameterized guide site must be."""
    model_only, nonreparam = info.model_only, info.nonreparam
    if all(s.support_size is not None for s in model_only) and (model_only or all(s.support_size is not None for s in nonreparam)):
        return None
    unsummable = [s for s in nonreparam + model_only if s.support_size is None]
    return f"site(s) {names(unsummable)} have no finite support to enumerate"


def auto_why_not(info: PairInfo) -> str | None:
    """auto sums out sites of at most ENUM_MAX_SUPPORT values; larger guide sites go to score unless a model site must be summed."""
    too_big = [s for s in info.model_only if not s.enumerable]
    if too_big:
        return (
            f"latent site(s) {names(too_big)} appear in the model but not in the guide and cannot be "
            f"enumerated (more than {ENUM_MAX_SUPPORT} values, or not discrete): add them to the guide"
        )
    if not info.nonreparam and not info.model_only:
        return "no discrete site to sum out"
    big = [s for s in info.nonreparam if not s.enumerable]
    if big and not info.model_only:
        return f"guide site(s) {names(big)} cannot be enumerated, and no model site needs summing out"
    return None


def cannot_enumerate(sites) -> str:
    """Why these guide sites are scored, by kind: discrete too large, or continuous without rsample."""
    discrete = [s for s in sites if s.discrete]
    continuous = [s for s in sites if not s.discrete]
    parts = []
    if discrete:
        parts.append(f"discrete site(s) {names(discrete)} cannot be enumerated (more than {ENUM_MAX_SUPPORT} values or no finite support)")
    if continuous:
        parts.append(f"continuous site(s) {names(continuous)} have no rsample, so no pathwise gradient")
    return "; ".join(parts)


def reason(info: PairInfo, settings, auto: bool) -> str:
    nonreparam, model_only, continuous = info.nonreparam, info.model_only, info.continuous
    pathwise = f"; pathwise gradients for {names(continuous)}" if continuous else ""
    small = [s for s in nonreparam + model_only if s.enumerable]
    if not auto:
        return "requested: exact sums over " + (names(small) or "no discrete site (same as reparam)") + pathwise
    big = [s for s in nonreparam if not s.enumerable]
    if not big:
        summed = f" ({names(model_only)} in the model, absent from the guide)" if model_only else ""
        return f"discrete site(s) {names(small)} have small finite support and are summed out exactly{summed}{pathwise}"
    return f"{cannot_enumerate(big)}: score-function terms there; {names(small)} summed out exactly{pathwise}"


def _enumerate(fn, summed: frozenset):
    """Enumerate exactly the named sites in parallel (the others keep their samplers; a site's own setting stays)."""

    def config(msg):
        if msg["name"] in summed and not msg["is_observed"] and "enumerate" not in msg["infer"]:
            return {"enumerate": "parallel"}
        return {}

    return poutine.infer_config(fn, config)


def build(info: PairInfo, model_fn, guide_fn, *, reason: str, options: dict, num_particles: int, vectorize_particles: bool) -> Estimator:
    summed = frozenset(s.name for s in info.model_only + info.nonreparam if s.enumerable)
    has_discrete = bool(info.model_only or info.nonreparam)
    elbo = TraceEnum_ELBO(strict_enumeration_warning=has_discrete, num_particles=num_particles,
                          vectorize_particles=vectorize_particles, max_plate_nesting=info.plate_depth)
    return Estimator("enum", reason + " (TraceEnum_ELBO)", elbo, _enumerate(model_fn, summed), _enumerate(guide_fn, summed))


ESTIMATOR = EstimatorSpec(
    name="enum", why_not=why_not, reason=reason, build=build, auto_why_not=auto_why_not, order=30, priority=20,
    can_infer_discrete=True, uses_infer=lambda info, site, key: key == "enumerate" and site.discrete,
)
