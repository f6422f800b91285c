"""iwae: the importance-weighted bound with K = num_particles samples (Burda et al. 2016).

Per data point when every sample site of model and guide lies in one plate (the bound is then
exact per point, and minibatches scale it); otherwise one joint bound, refused on minibatches.
Never chosen by ``auto``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import pyro
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample

from .base import Estimator, EstimatorSpec, PairInfo
from .reparam import no_sampler_problem

__all__ = ["ESTIMATOR", "IWAE"]


def why_not(info: PairInfo) -> str | None:
    """Pathwise sites only; on a minibatch, every latent site must belong to one data point.

    Without such a plate the bound is joint, log mean_k exp(sum of all log weights), which is a
    bound on log p(x) only on the full data: on a minibatch the subsample scale N/B multiplies the
    log likelihood inside the logsumexp, and the result can exceed log p(x).
    """
    problem = no_sampler_problem(info)
    if problem is None and info.local_plate is None and info.subsampled:
        globals_ = ", ".join(f"'{s.name}'" for s in info.global_guide_sites) or "some site"
        problem = (
            f"iwae on minibatches needs every latent site to belong to one data point; {globals_} "
            "is global, and the joint importance-weighted bound on a subsample (log-likelihood scaled by N/B inside the "
            "logsumexp) is not a lower bound on log p(x). Fit full batch (no --batch-size), or use reparam"
        )
    return problem


def reason(info: PairInfo, settings, auto: bool) -> str:
    return "requested: importance-weighted bound"


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
class IWAE(Estimator):
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


def build(info: PairInfo, model_fn, guide_fn, *, reason: str, options: dict, num_particles: int, vectorize_particles: bool) -> Estimator:
    plate = info.local_plate
    where = f"per data point over plate '{plate}'" if plate else "one joint bound over all sites (some latent site is global)"
    return IWAE("iwae", f"{reason} with K = {num_particles}, {where}", None, model_fn, guide_fn,
                objective="iwae_bound", num_particles=num_particles, max_plate_nesting=info.plate_depth, local_plate=plate)


ESTIMATOR = EstimatorSpec(name="iwae", why_not=why_not, reason=reason, build=build, order=50, priority=50)
