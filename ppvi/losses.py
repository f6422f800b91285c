"""A lean ELBO for mean-field guides with analytic KL terms.

:class:`MeanFieldELBO` computes what Pyro 1.9's ``TraceMeanField_ELBO.differentiable_loss``
computes (``pyro/infer/trace_mean_field_elbo.py``, ``_differentiable_loss_particle``), without the
per-step machinery that the analytic-KL case does not need: ``get_importance_trace``
(``pyro/infer/enum.py``) computes, at every site, ``log_prob`` and its scaled sum
(``Trace.compute_log_prob``) and the guide's score parts (``compute_score_parts``), then the
analytic KL ignores log q(z) and log p(z) of the latent sites, whose graphs autograd still walks
back; and ``Trace_ELBO.differentiable_loss`` reads the loss back to the host twice
(``torch_item``). Here each particle runs the guide once and replays the model against it once,
recording the sample sites under one messenger (``_Sites``: what ``poutine.trace(poutine.replay(...))``
records of them, without the param sites that ``pyro.module`` emits per weight), then the ELBO
of the particle is

    sum over observed model sites x:   scale * mask * log p(x | ...)
    minus, over latent model sites z:  scale * mask * KL(q(z) || p(z))          (closed form registered)
                                  or:  scale * mask * (log q(z) - log p(z))     (else, Monte Carlo)
    minus, over auxiliary guide sites: scale * mask * log q(z)

with the scale and mask of the site as Pyro's ``scale_and_mask`` applies them (the guide site's
for KL and log q, the model site's for log p), and subsample sites skipped. Two shortcuts, equal
up to rounding: a number scale without mask multiplies the site's sum rather than each element,
and an ``Independent(Bernoulli(logits))`` observed site is one fused
``binary_cross_entropy_with_logits(..., reduction="sum")``, without Bernoulli.log_prob's broadcast
and its negation of the full-size tensor, forward and backward (benchmarks/README.md, ``vae.py``,
has the measured savings). Particles are a loop,
or one vectorized pass in an outermost ``pyro.plate`` at dim ``-max_plate_nesting`` (Pyro's
``vectorize_particles``, inherited from :class:`pyro.infer.ELBO`); the loss is the mean over them.

Like ``TraceMeanField_ELBO`` this assumes a mean-field guide whose latent sites are all
reparameterized; model latent sites absent from the guide are refused. Pyro's checks (model/guide
match, site shapes, ordering of sites, full reparameterization) run only when
``pyro.is_validation_enabled()``.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

import pyro
import pyro.poutine as poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO
from pyro.infer.trace_mean_field_elbo import _check_mean_field_requirement
from pyro.infer.util import is_validation_enabled
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from pyro.util import check_if_enumerated, check_model_guide_match, check_site_shape, warn_if_nan

__all__ = ["MeanFieldELBO"]


def _scaled_sum(tensor, scale, mask):
    """``scale_and_mask(tensor, scale, mask).sum()``; a number scale without mask multiplies the sum instead."""
    if mask is None and isinstance(scale, (int, float)):
        total = tensor.sum()
        return total if scale == 1 else total * scale
    return scale_and_mask(tensor, scale, mask).sum()


def _log_prob_sum(site):
    """The site's log density summed over all its dimensions, before scale and mask.

    ``Independent(Bernoulli(logits=...))`` (the usual image likelihood) at a value of the logits'
    shape is one fused ``binary_cross_entropy_with_logits(..., reduction="sum")``: Bernoulli.log_prob
    would broadcast, negate the full-size tensor (and its gradient) and sum it in two steps.
    """
    fn, value = site["fn"], site["value"]
    base = fn
    while isinstance(base, torch.distributions.Independent):
        base = base.base_dist
    if (
        type(base) in _BERNOULLI
        and "logits" in base.__dict__  # built from logits (else probs; the lazy logits would add ops)
        and base.logits.shape == value.shape
        and base.logits.dtype == value.dtype
        and not site["args"]
        and not site["kwargs"]
        and not is_validation_enabled()  # keep Bernoulli.log_prob's check of the support
    ):
        return -F.binary_cross_entropy_with_logits(base.logits, value, reduction="sum")
    return fn.log_prob(value, *site["args"], **site["kwargs"]).sum()


_BERNOULLI = (torch.distributions.Bernoulli, pyro.distributions.Bernoulli)


def _kl(guide_fn, model_fn):
    """``kl_divergence(q, p)``, or None where no closed form is registered for the pair."""
    try:
        return torch.distributions.kl_divergence(guide_fn, model_fn)
    except NotImplementedError:
        return None


class _Sites(Messenger):
    """Record the sample sites of one run, replaying the latent values of ``replay`` (a dict of sites).

    What ``poutine.trace(poutine.replay(fn, trace))`` records of the sample sites, with one messenger
    instead of two and no trace of the ``pyro.param`` sites (``pyro.module`` emits one per weight).
    """

    def __init__(self, replay=None):
        super().__init__()
        self.replay = replay
        self.sites = {}

    def _pyro_sample(self, msg):
        if self.replay is not None and not msg["is_observed"] and msg["name"] in self.replay:
            guide_site = self.replay[msg["name"]]  # as poutine.replay does
            msg["done"] = True
            msg["value"] = guide_site["value"]
            msg["infer"] = guide_site["infer"]

    def _pyro_post_sample(self, msg):
        if msg["name"] in self.sites:
            raise RuntimeError(f"Multiple sample sites named '{msg['name']}'")
        self.sites[msg["name"]] = msg.copy()


class MeanFieldELBO(ELBO):
    """``TraceMeanField_ELBO`` for the analytic-KL case, computing log densities only where used.

    Takes Pyro's ELBO keywords (``num_particles``, ``vectorize_particles``, ``max_plate_nesting``,
    ...). :meth:`differentiable_loss` returns the same value, with the same gradients, as
    ``pyro.infer.TraceMeanField_ELBO(...).differentiable_loss`` for the same random draws.
    """

    def _get_trace(self, model, guide, args, kwargs):
        """The sample sites of the guide and of the model replayed against it: two dicts name -> site."""
        if is_validation_enabled():  # full Pyro traces, for Pyro's checks
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
            self._validate(model_trace, guide_trace)
            return model_trace.nodes, guide_trace.nodes
        with _Sites() as guide_sites:
            guide(*args, **kwargs)
        with _Sites(replay=guide_sites.sites) as model_sites:
            model(*args, **kwargs)
        return model_sites.sites, guide_sites.sites

    def _validate(self, model_trace, guide_trace):
        """Pyro's checks of get_importance_trace and TraceMeanField_ELBO (validation mode only)."""
        check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
        check_if_enumerated(guide_trace)
        _check_mean_field_requirement(model_trace, guide_trace)
        for trace in (model_trace, guide_trace):
            for site in trace.nodes.values():
                if site["type"] == "sample" and not site_is_subsample(site):
                    site_shape = {**site, "log_prob": site["fn"].log_prob(site["value"])}
                    check_site_shape(site_shape, self.max_plate_nesting)
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site) and not site["fn"].has_rsample:
                raise NotImplementedError(f"All distributions in the guide must be fully reparameterized (site {name!r} is not).")

    @staticmethod
    def _particle_elbo(model_sites, guide_sites):
        """The ELBO estimate of one (vectorized) particle, a differentiable scalar."""
        elbo = 0.0
        for name, site in model_sites.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if site["is_observed"]:
                if site["mask"] is None and isinstance(site["scale"], (int, float)):
                    elbo = elbo + _log_prob_sum(site) * site["scale"]
                else:
                    log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
                    elbo = elbo + _scaled_sum(log_p, site["scale"], site["mask"])
                continue
            guide_site = guide_sites.get(name)
            if guide_site is None or guide_site["type"] != "sample":
                raise ValueError(
                    f"latent site {name!r} of the model is not sampled by the guide: MeanFieldELBO (like Pyro's "
                    "TraceMeanField_ELBO) needs every latent site in the guide; enumerate it (TraceEnum_ELBO) or add it to the guide."
                )
            kl = _kl(guide_site["fn"], site["fn"])
            if kl is None:  # no closed form: Monte Carlo, log p(z) - log q(z) at the guide's draw
                log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
                log_q = guide_site["fn"].log_prob(guide_site["value"], *guide_site["args"], **guide_site["kwargs"])
                elbo = elbo + _scaled_sum(log_p, site["scale"], site["mask"])
                elbo = elbo - _scaled_sum(log_q, guide_site["scale"], guide_site["mask"])
            elif torch.is_tensor(kl):
                elbo = elbo - _scaled_sum(kl, guide_site["scale"], guide_site["mask"])
            else:  # a number: the same KL at every element of the batch
                elbo = elbo - scale_and_mask(kl, guide_site["scale"], guide_site["mask"]) * guide_site["fn"].batch_shape.numel()
        for name, site in guide_sites.items():  # auxiliary guide sites: their entropy term
            if site["type"] == "sample" and name not in model_sites and not site_is_subsample(site):
                if not site["infer"].get("is_auxiliary"):
                    raise ValueError(f"guide site {name!r} is not in the model and not marked infer={{'is_auxiliary': True}}.")
                log_q = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
                elbo = elbo - _scaled_sum(log_q, site["scale"], site["mask"])
        return elbo

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """-ELBO, averaged over the particles: a differentiable scalar tensor."""
        elbo = 0.0
        for model_sites, guide_sites in self._get_traces(model, guide, args, kwargs):
            elbo = elbo + self._particle_elbo(model_sites, guide_sites)
        if self.num_particles != 1:
            elbo = elbo / self.num_particles
        loss = -elbo  # -elbo, since we descend a loss
        if is_validation_enabled():
            warn_if_nan(loss, "loss")
        return loss

    def loss(self, model, guide, *args, **kwargs):
        """-ELBO as a float (no gradients)."""
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs):
        """-ELBO as a float, after back-propagating it (for ``pyro.infer.SVI``)."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward(retain_graph=self.retain_graph)
        return float(loss.detach())
