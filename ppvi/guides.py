"""Pyro's automatic guides as entries of a model file's ``GUIDES`` dict.

A class in ``GUIDES`` is instantiated once per fit as ``Guide(options, data)``
and then called as ``guide(batch, options)``. A Pyro autoguide is built from
the model instead (``AutoNormal(model)``) and called with the model's
arguments; :func:`auto` bridges the two: it returns a subclass of the
autoguide whose ``__init__(options, data)`` builds it from the model file's
``model``. The autoguide runs the model once on the first call to learn its
latent sites, and registers its parameters in Pyro's param store, where the
fit loop's optimizer finds them.

Usage in a model file::

    from ppvi.guides import standard_guides

    def model(batch, options):
        ...

    GUIDES = standard_guides(model)   # {"meanfield": ..., "fullrank": ..., "lowrank": ...}

The three families, all Gaussian in the unconstrained space of the latents
(Kucukelbir et al. 2017):

=========  ==============================  ======================================
meanfield  AutoNormal                      q(z) = prod_i Normal(z_i | m_i, s_i)
fullrank   AutoMultivariateNormal          q(z) = Normal(z | m, L L^T), L lower-triangular
lowrank    AutoLowRankMultivariateNormal   q(z) = Normal(z | m, W W^T + D), W of rank ~ sqrt(dim)
=========  ==============================  ======================================

Latent sites inside the ``"data"`` plate (local latents) are supported by
``meanfield`` also under minibatches: its plate is built from ``batch.index``, so
the guide and the model look at the same points. ``fullrank`` and ``lowrank``
pack all latents into one vector and need the full batch for local latents.

References
----------
Kucukelbir, A., Tran, D., Ranganath, R., Gelman, A., Blei, D. M. (2017).
Automatic differentiation variational inference. JMLR 18(14).
"""

from __future__ import annotations

import inspect

import torch

import pyro
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide import AutoGuide, AutoLowRankMultivariateNormal, AutoMultivariateNormal, AutoNormal
from pyro.infer.autoguide.initialization import init_to_feasible as _pyro_init_to_feasible
from pyro.infer.autoguide.initialization import init_to_median

from .errors import UsageError

__all__ = [
    "auto", "standard_guides", "meanfield", "fullrank", "lowrank", "INIT_SCALE",
    "init_to_feasible", "init_to_median_or_feasible", "instantiate", "is_autoguide_class",
]

INIT_SCALE = 0.1  # initial sd of every unconstrained latent: small, so early steps follow the mean's gradient


def _feasible_from_support(fn) -> torch.Tensor:
    # The point whose unconstrained value is zero, built from the support and shape alone: an
    # improper prior (ImproperUniform) cannot be sampled, so Pyro's init_to_feasible fails on it.
    shape = fn.batch_shape + fn.event_shape
    transform = biject_to(fn.support)
    return transform(torch.zeros(transform.inverse_shape(shape))).detach()


def init_to_feasible(site=None):
    """Pyro's ``init_to_feasible`` (unconstrained value zero), also for priors that cannot be sampled.

    Works for improper priors such as ``ImproperUniform``: the point comes from the site's support
    and shape, without drawing from the distribution.
    """
    if site is None:
        return init_to_feasible
    try:
        return _pyro_init_to_feasible(site)
    except NotImplementedError:
        value = _feasible_from_support(site["fn"])
        value._pyro_custom_init = False
        return value


def init_to_median_or_feasible(site=None):
    """Pyro's default autoguide start (the prior's median, from 15 draws); the feasible point where
    the prior cannot be sampled (an improper prior)."""
    if site is None:
        return init_to_median_or_feasible
    try:
        return init_to_median(site, fallback=None)
    except (NotImplementedError, ValueError):
        return init_to_feasible(site)


def is_autoguide_class(component) -> bool:
    """A Pyro autoguide class as the user wrote it (``AutoNormal``), not one built by :func:`auto`."""
    return isinstance(component, type) and issubclass(component, AutoGuide) and component.__module__ != __name__


def instantiate(component, model_fn, options, data):
    """A ``GUIDES`` (or model) entry ready to call as ``fn(batch, options)``, with fresh state.

    A Pyro autoguide class (``{"autonormal": AutoNormal}``) is built from the model file's
    ``model`` through :func:`auto`, starting from the prior's median (the feasible point where the
    prior is improper); another class is instantiated as ``Component(options, data)``; a function
    is used as it is.
    """
    if is_autoguide_class(component):
        component = auto(component, model_fn, init_loc_fn=init_to_median_or_feasible)
    if not isinstance(component, type):
        return component
    try:
        return component(options, data)
    except ValueError as error:
        raise UsageError(f"{component.__name__}: {error}") from None


def _data_plate(batch, options):
    # The plate the model opens over its data points, with the same subsample (see ppvi.data.Batch).
    return pyro.plate("data", batch.num_data, subsample=batch.index)


def _refuse_subsampled_latents(prototype_trace, guide_name: str) -> None:
    for name, site in prototype_trace.iter_stochastic_nodes():
        for frame in site["cond_indep_stack"]:
            if frame.full_size is not None and frame.full_size != frame.size:
                raise UsageError(
                    f"guide {guide_name} cannot fit the latent site {name!r} inside the subsampled plate "
                    f"{frame.name!r} ({frame.size} of {frame.full_size} points per batch): it packs all latents "
                    "into one vector of fixed size. Fit on the full batch, or use a mean-field guide."
                )


def auto(autoguide_class: type, model_fn, /, **kwargs) -> type:
    """A guide class for ``GUIDES`` that builds ``autoguide_class(model_fn, **kwargs)``.

    Parameters
    ----------
    autoguide_class : type
        A subclass of :class:`pyro.infer.autoguide.AutoGuide` (``AutoNormal``,
        ``AutoMultivariateNormal``, ``AutoDelta``, ...).
    model_fn : callable
        The model file's ``model(batch, options)`` (a function, not a class).
    **kwargs
        Passed to the autoguide's ``__init__`` (``init_loc_fn``, ``init_scale``, ``rank``...).
        Autoguides that take ``create_plates`` get the model's ``"data"`` plate by default,
        subsampled at ``batch.index``, so that under minibatches the guide's local latents
        and the model's likelihood refer to the same points.

    Returns
    -------
    type
        A subclass of ``autoguide_class`` with ``__init__(self, options, data)``. It keeps
        the autoguide's name, so parameters are named as in Pyro (``AutoNormal.locs.mu``).
    """
    # AutoNormal and AutoDelta take the model's plates; the AutoContinuous family (full and low
    # rank) packs every latent into one vector, whose size a subsampled local latent would change.
    takes_plates = "create_plates" in inspect.signature(autoguide_class.__init__).parameters
    if takes_plates:
        kwargs.setdefault("create_plates", _data_plate)

    def __init__(self, options, data):
        autoguide_class.__init__(self, model_fn, **kwargs)

    def _setup_prototype(self, *args, **kwargs_):
        autoguide_class._setup_prototype(self, *args, **kwargs_)
        if not takes_plates:
            _refuse_subsampled_latents(self.prototype_trace, autoguide_class.__name__)

    return type(
        autoguide_class.__name__,
        (autoguide_class,),
        {
            "__init__": __init__,
            "_setup_prototype": _setup_prototype,
            "__module__": __name__,
            "__doc__": f"{autoguide_class.__name__} of the model file's model, built per fit as Guide(options, data).",
        },
    )


def meanfield(model_fn, /, *, init_loc_fn=init_to_feasible, init_scale: float = INIT_SCALE) -> type:
    """Mean-field Gaussian guide (``AutoNormal``): one independent Normal per unconstrained latent."""
    return auto(AutoNormal, model_fn, init_loc_fn=init_loc_fn, init_scale=init_scale)


def fullrank(model_fn, /, *, init_loc_fn=init_to_feasible, init_scale: float = INIT_SCALE) -> type:
    """Full-rank Gaussian guide (``AutoMultivariateNormal``) over all unconstrained latents jointly."""
    return auto(AutoMultivariateNormal, model_fn, init_loc_fn=init_loc_fn, init_scale=init_scale)


def lowrank(model_fn, /, *, init_loc_fn=init_to_feasible, init_scale: float = INIT_SCALE, rank: int | None = None) -> type:
    """Low-rank-plus-diagonal Gaussian guide (``AutoLowRankMultivariateNormal``); rank ~ sqrt(dim) by default."""
    return auto(AutoLowRankMultivariateNormal, model_fn, init_loc_fn=init_loc_fn, init_scale=init_scale, rank=rank)


def standard_guides(model_fn, /, *, init_loc_fn=init_to_feasible, init_scale: float = INIT_SCALE) -> dict:
    """``{"meanfield": ..., "fullrank": ..., "lowrank": ...}`` for a model file's ``GUIDES``.

    Every guide starts at ``init_loc_fn`` (default: the point whose unconstrained value is
    zero, e.g. 0 for a real, 1 for a positive scale) with sd ``init_scale`` per coordinate.
    """
    common = dict(init_loc_fn=init_loc_fn, init_scale=init_scale)
    return {"meanfield": meanfield(model_fn, **common), "fullrank": fullrank(model_fn, **common), "lowrank": lowrank(model_fn, **common)}
