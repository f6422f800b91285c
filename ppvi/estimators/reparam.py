"""reparam: pathwise gradients (Kingma & Welling 2014).

Trace_ELBO, or ppvi's MeanFieldELBO (analytic KL where registered: TraceMeanField_ELBO's
estimator, leaner) when the guide is mean-field. Fits a pair whose guide samples every latent
site with a reparameterized sampler; ``auto``'s first choice.
"""

from __future__ import annotations

from pyro.infer import Trace_ELBO

from ..losses import MeanFieldELBO
from .base import Estimator, EstimatorSpec, PairInfo, names

__all__ = ["ESTIMATOR", "model_only_problem", "no_sampler_problem"]


def no_sampler_problem(info: PairInfo) -> str | None:
    """The problem of any pathwise estimator: guide sites without a reparameterized sampler."""
    if info.nonreparam:
        return f"guide site(s) {names(info.nonreparam)} have no reparameterized sampler"
    return model_only_problem(info)


def model_only_problem(info: PairInfo) -> str | None:
    """The problem of every estimator that samples only from the guide: latent sites the guide omits."""
    if info.model_only:
        return f"site(s) {names(info.model_only)} are latent in the model but absent from the guide, so only enumeration can sum them out"
    return None


def reason(info: PairInfo, settings, auto: bool) -> str:
    if auto:
        return f"every latent site is reparameterizable: {names(info.continuous) or 'none'}"
    return "requested: pathwise gradients at every site"


def build(info: PairInfo, model_fn, guide_fn, *, reason: str, options: dict, num_particles: int, vectorize_particles: bool) -> Estimator:
    common = {"num_particles": num_particles, "vectorize_particles": vectorize_particles, "max_plate_nesting": info.plate_depth}
    if info.analytic_kl:
        reason += (
            "; analytic KL where registered (ppvi's MeanFieldELBO: TraceMeanField_ELBO's estimator, log densities at observed sites only)"
        )
        return Estimator("reparam", reason, MeanFieldELBO(**common), model_fn, guide_fn)
    return Estimator("reparam", reason + " (Trace_ELBO)", Trace_ELBO(**common), model_fn, guide_fn)


ESTIMATOR = EstimatorSpec(
    name="reparam", why_not=no_sampler_problem, reason=reason, build=build,
    auto_why_not=no_sampler_problem, order=10, priority=10,
)
