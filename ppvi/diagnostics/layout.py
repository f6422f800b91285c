"""Where each site's draws go: the model's sites mapped onto ArviZ groups, from one run of the guide and model.

The data plate is found by its size (the number of data points, :func:`ppvi.pyro_util.data_plate`),
whatever the model calls it. Latent sites inside it are *local* (one value per data point, as a
VAE's codes); where they hold more than ``MAX_LOCAL_VALUES`` values per draw they are left out of
the posterior group (their densities still enter log p and log q), so that ArviZ's summary, R-hat
and ESS stay about the global parameters and take seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from pyro import poutine
from pyro.poutine.util import site_is_subsample

from ..errors import UsageError
from ..estimators import ENUM_MAX_SUPPORT
from ..pyro_util import data_plate, support_size, trace_pair, unwrap
from ..runs import full_batch, restart_params

if TYPE_CHECKING:
    from ..results import FitResult

__all__ = ["MAX_LOCAL_VALUES", "LatentSite", "Layout", "ObservedSite", "build_layout", "is_deterministic", "is_latent", "is_observed"]

MAX_LOCAL_VALUES = 1000  # local latent values per draw kept in the posterior group (eight schools' theta: 8)


@dataclass(frozen=True)
class LatentSite:
    """A latent site of the posterior group: per-draw shape, ArviZ dimension names, kind."""

    shape: tuple
    dims: list
    discrete: bool
    local: bool  # inside the data plate: one value per data point


@dataclass(frozen=True)
class ObservedSite:
    """An observed site: per-draw shape, dimension names, whether it has a term per data point, its data."""

    shape: tuple
    dims: list
    per_point: bool  # inside the data plate: a log-likelihood per observation
    value: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class Layout:
    """How a model's sites map onto ArviZ groups (see the module docstring).

    ``latent`` holds every latent site not summed out, ``observed`` every observed site;
    ``left_out`` names the local latent sites too large to keep in the posterior group.
    """

    latent: dict  # name -> LatentSite
    observed: dict  # name -> ObservedSite
    marginalized: tuple  # discrete local sites summed out in the model
    left_out: tuple  # local latent sites not kept in the posterior group
    data_plate: str | None
    data_dim: int | None  # the data plate's (negative) dimension
    max_plate_nesting: int
    plate_sizes: dict

    @property
    def kept(self) -> dict:
        """The latent sites of the posterior group."""
        return {name: site for name, site in self.latent.items() if name not in self.left_out}

    @property
    def observed_values(self) -> dict:
        return {name: site.value for name, site in self.observed.items()}

    @property
    def pointwise_sites(self) -> list:
        return [name for name, site in self.observed.items() if site.per_point]


def is_latent(msg) -> bool:
    return msg["type"] == "sample" and not msg["is_observed"] and not site_is_subsample(msg)


def is_deterministic(msg) -> bool:
    """pyro.deterministic: an observed Delta site with its log-density masked out."""
    return msg["type"] == "sample" and bool(msg["infer"].get("_deterministic"))


def is_observed(msg) -> bool:
    return msg["type"] == "sample" and msg["is_observed"] and not is_deterministic(msg)


def _frames(msg) -> list:
    return [frame for frame in msg["cond_indep_stack"] if frame.vectorized]


def _dim_names(name: str, shape, event_dim: int, frames) -> list[str]:
    by_dim = {frame.dim: frame for frame in frames}
    batch_ndim = len(shape) - event_dim
    names = []
    for position, size in enumerate(shape):
        frame = by_dim.get(position - batch_ndim) if position < batch_ndim else None
        names.append(frame.name if frame is not None and frame.size == size else f"{name}_dim_{position}")
    return names


def _in_plate(msg, plate: str | None) -> bool:
    return plate is not None and plate in [frame.name for frame in _frames(msg)]


def _latent_sites(model_trace, guide_trace, plate: str | None) -> tuple[dict, list]:
    """Latent sites kept (name -> LatentSite) and discrete local sites to sum out."""
    marginalized, latent = [], {}
    for name, msg in model_trace.nodes.items():
        if not (is_latent(msg) or is_deterministic(msg)):
            continue
        fn = msg["fn"]
        discrete = bool(fn.support.is_discrete)
        local = _in_plate(msg, plate)
        if discrete:
            size = support_size(fn)
            if size is not None and size <= ENUM_MAX_SUPPORT and local and len(_frames(msg)) == 1:
                marginalized.append(name)
                continue
            if name not in guide_trace.nodes:
                raise UsageError(
                    f"latent site '{name}' ({type(unwrap(fn)).__name__}) is discrete, absent from the guide, and not a per-data-point "
                    f"site with at most {ENUM_MAX_SUPPORT} values that could be summed out; ppvi cannot evaluate log p(x, z) for this model."
                )
        shape = tuple(msg["value"].shape)
        latent[name] = LatentSite(shape, _dim_names(name, shape, fn.event_dim, _frames(msg)), discrete, local)
    return latent, marginalized


def _observed_sites(model_trace, plate: str | None) -> dict:
    observed = {}
    for name, msg in model_trace.nodes.items():
        if is_observed(msg):
            value = msg["value"]
            dims = _dim_names(name, value.shape, msg["fn"].event_dim, _frames(msg))
            observed[name] = ObservedSite(tuple(value.shape), dims, _in_plate(msg, plate), value.detach().cpu().numpy())
    return observed


def _too_large(latent: dict) -> tuple:
    local = {name: int(np.prod(site.shape)) for name, site in latent.items() if site.local}
    return tuple(local) if sum(local.values()) > MAX_LOCAL_VALUES else ()


def build_layout(result: FitResult) -> Layout:
    """The layout of a fit's sites, from its first restart's guide and model on the full data."""
    restart = result.restarts[0]
    batch = full_batch(result)
    with restart_params(result, restart), poutine.block():
        model_trace, guide_trace = trace_pair(restart.model_fn, restart.guide_fn, batch, result.options)
    frames = [frame for trace in (guide_trace, model_trace) for msg in trace.nodes.values() if msg["type"] == "sample" for frame in _frames(msg)]
    plate = data_plate(model_trace, batch.num_data)
    latent, marginalized = _latent_sites(model_trace, guide_trace, plate)
    observed = _observed_sites(model_trace, plate)
    if marginalized and sum(site.per_point for site in observed.values()) != 1:
        raise UsageError(
            f"ppvi sums out the discrete site(s) {', '.join(map(repr, marginalized))} per data point, which needs exactly one "
            f"observed site in plate {plate!r} (this model has {', '.join(map(repr, observed)) or 'none'})."
        )
    data_dim = next((frame.dim for frame in frames if frame.name == plate), None)
    return Layout(
        latent=latent,
        observed=observed,
        marginalized=tuple(marginalized),
        left_out=_too_large(latent),
        data_plate=plate,
        data_dim=data_dim,
        max_plate_nesting=max((-frame.dim for frame in frames), default=0),
        plate_sizes={frame.name: frame.size for frame in frames},
    )
