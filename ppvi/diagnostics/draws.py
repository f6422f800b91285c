"""Drawing from each restart's guide, scoring the draws, and packing them into ArviZ InferenceData.

Each draw's ``log_p`` = log p(x, z) (discrete local sites summed out, see :mod:`.layout`) and
``log_q`` = log q(z) go to ``sample_stats``; the per-observation log-likelihood to
``log_likelihood``; replicated data to ``posterior_predictive``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import numpy as np
import torch

import pyro
from pyro import poutine
from pyro.infer import config_enumerate
from pyro.poutine.uncondition_messenger import UnconditionMessenger
from pyro.poutine.util import site_is_subsample

from ..batching import num_points
from ..errors import UsageError
from ..pyro_util import device_scope, finite, rng_scope
from ..runs import full_batch, load_run, restart_params
from .arviz_util import az, quiet
from .layout import Layout, build_layout, is_deterministic, is_latent

if TYPE_CHECKING:
    from ..results import FitResult, RestartResult

__all__ = ["CHUNK_VALUES", "DRAWS_PLATE", "MAX_POINTWISE_VALUES", "MAX_PREDICTIVE_VALUES", "check_count", "inference_data", "to_inference_data"]

MAX_POINTWISE_VALUES = 50_000_000  # restarts x draws x points kept for the log-likelihood group
MAX_PREDICTIVE_VALUES = 10_000_000  # restarts x draws x observed values kept for the posterior_predictive group (40 MB)
CHUNK_VALUES = 4_000_000  # draws x points evaluated in one vectorised pass
DRAWS_PLATE = "_ppvi_draws"


def check_count(name: str, value, minimum: int = 1) -> int:
    """An integer option of at least ``minimum`` (:func:`ppvi.pyro_util.finite`), None refused."""
    if value is None:
        raise UsageError(f"--{name} must be an integer (got None).")
    return finite(name, value, kind=int, low=minimum)


def _pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    tensor = torch.as_tensor(tensor)
    return tensor.reshape((1,) * (width - tensor.dim()) + tuple(tensor.shape)) if tensor.dim() < width else tensor


def _per_draw(log_prob, width: int, draws: int, vectorized: bool) -> torch.Tensor:
    """Sum a site's log-density over everything but the draws: shape (draws,)."""
    log_prob = _pad(log_prob, width)
    if log_prob.dim() > width:
        raise UsageError("a site's log-density depends on a summed-out discrete site; ppvi cannot score this model's draws.")
    if not vectorized:
        return log_prob.sum().reshape(1)
    return log_prob.expand(draws, *log_prob.shape[1:]).reshape(draws, -1).sum(-1)


def _pointwise(log_probs, width: int, data_dim: int, draws: int, num_data: int, vectorized: bool) -> torch.Tensor:
    """Per data point: sum each term over the other plates, add the terms, log-sum-exp over enumerated values.

    ``log p(x_i | theta) = log sum_z prod_sites p(site_i | z, theta)``; shape (draws, num_data).
    """
    keep = {width + data_dim} | ({0} if vectorized else set())  # positions inside the plate block
    total = 0.0
    for log_prob in log_probs:
        log_prob = _pad(log_prob, width)
        offset = log_prob.dim() - width  # enumerated dimensions sit left of the plates
        others = [offset + position for position in range(width) if position not in keep]
        total = total + (log_prob.sum(others, keepdim=True) if others else log_prob)
    enumerated = total.dim() - width
    if enumerated:
        total = total.logsumexp(list(range(enumerated)))
    shape = [1] * width
    shape[width + data_dim] = num_data
    if vectorized:
        shape[0] = draws
    return total.expand(shape).reshape(draws if vectorized else 1, num_data)


class _Replicate(UnconditionMessenger):
    """Draw the observed sites afresh (replicated data), leaving pyro.deterministic sites as they are."""

    def _pyro_sample(self, msg):
        if not msg["infer"].get("_deterministic"):
            super()._pyro_sample(msg)


def _trace_draws(restart: RestartResult, batch, options, layout: Layout, draws: int | None, predictive: bool):
    """(guide trace, model trace, replicated-data trace or None) of ``draws`` draws at once in a plate (or one)."""
    width = layout.max_plate_nesting + (draws is not None)
    hidden = set(layout.marginalized)
    in_plate = pyro.plate(DRAWS_PLATE, draws, dim=-(layout.max_plate_nesting + 1)) if draws is not None else contextlib.nullcontext()
    with in_plate:
        guide_trace = poutine.trace(poutine.block(restart.guide_fn, hide_fn=lambda msg: msg["name"] in hidden)).get_trace(batch, options)
        model_fn = poutine.replay(restart.model_fn, trace=guide_trace)
        if hidden:
            model_fn = poutine.enum(config_enumerate(model_fn, default="parallel"), first_available_dim=-(width + 1))
        model_trace = poutine.trace(model_fn).get_trace(batch, options)
        replicate = None
        if predictive:
            replicate = poutine.trace(_Replicate()(poutine.replay(restart.model_fn, trace=guide_trace))).get_trace(batch, options)
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    return guide_trace, model_trace, replicate


def _log_terms(guide_trace, model_trace, layout: Layout, batch, count: int, vectorized: bool) -> dict:
    """log q and log p per draw, and the log-likelihood per observed site (per point where it has one)."""
    width = layout.max_plate_nesting + vectorized
    hidden = set(layout.marginalized)
    pointwise_sites = layout.pointwise_sites
    device, num_data = batch.index.device, batch.num_data
    latent = [msg for msg in guide_trace.nodes.values() if is_latent(msg)]
    log_q = sum((_per_draw(msg["log_prob"], width, count, vectorized) for msg in latent), torch.zeros(count, device=device))
    log_p, log_lik = torch.zeros(count, device=device), {}
    if hidden:  # one observed site per point (checked in the layout): sum out the discrete sites jointly with it
        name = pointwise_sites[0]
        terms = [model_trace.nodes[site]["log_prob"] for site in (*layout.marginalized, name)]
        log_lik[name] = _pointwise(terms, width, layout.data_dim, count, num_data, vectorized)
        log_p = log_p + log_lik[name].sum(-1)
    for name, msg in model_trace.nodes.items():
        if msg["type"] != "sample" or site_is_subsample(msg) or is_deterministic(msg) or name in hidden or (hidden and name in pointwise_sites):
            continue
        log_p = log_p + _per_draw(msg["log_prob"], width, count, vectorized)
        if name in pointwise_sites:
            log_lik[name] = _pointwise([msg["log_prob"]], width, layout.data_dim, count, num_data, vectorized)
        elif name in layout.observed:
            log_lik[name] = _per_draw(msg["log_prob"], width, count, vectorized)
    return {"log_p": log_p, "log_q": log_q, "log_likelihood": log_lik}


def _evaluate(restart: RestartResult, batch, options, layout: Layout, draws: int | None, predictive: bool, pointwise: bool) -> dict:
    """Draw from the guide (``draws`` at once in a plate, or one), score each draw, return tensors (draws, ...)."""
    guide_trace, model_trace, replicate = _trace_draws(restart, batch, options, layout, draws, predictive)
    count = draws if draws is not None else 1
    terms = _log_terms(guide_trace, model_trace, layout, batch, count, draws is not None)
    out = {
        "posterior": {name: model_trace.nodes[name]["value"].reshape(count, *site.shape) for name, site in layout.kept.items()},
        "log_likelihood": terms["log_likelihood"] if pointwise else {},  # too many values to keep: log_p still holds their sum
        "posterior_predictive": {},
        "sample_stats": {"log_p": terms["log_p"], "log_q": terms["log_q"]},
    }
    if replicate is not None:
        out["posterior_predictive"] = {name: replicate.nodes[name]["value"].reshape(count, *site.shape) for name, site in layout.observed.items()}
    return out


def _concatenate(parts: list[dict]) -> dict:
    return {group: {name: torch.cat([part[group][name] for part in parts]).cpu().numpy() for name in parts[0][group]} for group in parts[0]}


def _chain_seed(seed: int, restart: int) -> int:
    return int(np.random.SeedSequence([seed, restart]).generate_state(1)[0])


def _draw_chain(result: FitResult, restart: RestartResult, layout: Layout, num_samples: int, vectorize: bool, pointwise: bool, predictive: bool) -> dict:
    """All draws of one restart: in vectorised chunks where the model broadcasts over a draws plate, else one by one."""
    batch = full_batch(result)
    if vectorize:
        chunk = max(1, min(num_samples, CHUNK_VALUES // max(1, batch.num_data)))
        sizes = [min(chunk, num_samples - start) for start in range(0, num_samples, chunk)]
    else:
        sizes = [None] * num_samples
    return _concatenate([_evaluate(restart, batch, result.options, layout, size, predictive, pointwise) for size in sizes])


def to_inference_data(run, num_samples: int = 1000, seed: int = 0, *, predictive: bool = True, layout: Layout | None = None) -> az.InferenceData:
    """Draw from each restart's guide and score the draws; return ArviZ InferenceData.

    Parameters
    ----------
    run : path or FitResult
        A run directory (see :func:`ppvi.runs.load_run`) or the result of :func:`ppvi.fit`.
    num_samples : int
        Draws per restart (per chain).
    seed : int
        Restart ``r`` draws with a seed derived from ``(seed, r)``; the global RNG is restored afterwards.
    predictive : bool
        Also draw replicated data (the posterior_predictive group), where restarts x draws x
        observed values stay within ``MAX_PREDICTIVE_VALUES`` (a VAE's images would not).
    layout : Layout, optional
        The fit's layout, where the caller has built it already.

    Returns
    -------
    arviz.InferenceData
        ``posterior`` (every latent site not summed out or left out, see :mod:`.layout`; dims
        ``chain`` = restart, ``draw``, then plate names), ``log_likelihood`` (per observation, full
        data), ``observed_data``, ``constant_data`` (other data tensors), ``posterior_predictive``
        and ``sample_stats`` with ``log_p`` = log p(x, z) and ``log_q`` = log q(z) of every draw.
    """
    result = load_run(run)
    num_samples = check_count("num-samples", num_samples)
    seed = check_count("seed", seed, minimum=0)
    layout = layout or build_layout(result)
    vectorize = bool(result.config.get("vectorize_particles"))
    num_data = num_points(result.data)
    pointwise = len(result.restarts) * num_samples * num_data <= MAX_POINTWISE_VALUES
    observed_values = sum(int(np.prod(site.shape)) for site in layout.observed.values())
    predictive = predictive and pointwise and len(result.restarts) * num_samples * observed_values <= MAX_PREDICTIVE_VALUES
    chains = []
    for restart in result.restarts:
        with restart_params(result, restart), rng_scope(_chain_seed(seed, restart.restart)), torch.no_grad(), device_scope(result.device):
            chains.append(_draw_chain(result, restart, layout, num_samples, vectorize, pointwise, predictive))
    return inference_data(result, layout, chains, num_samples, seed)


def _attrs(result: FitResult, layout: Layout, stacked: dict, num_samples: int, seed: int, restarts: int) -> dict:
    point_sites = sorted(name for name, values in stacked["posterior"].items() if num_samples > 1 and np.all(values.max(axis=1) == values.min(axis=1)))
    return {
        "ppvi_model": result.model_file.name,
        "ppvi_guide": result.config.get("guide", ""),
        "ppvi_restarts": restarts,
        "ppvi_seed": seed,
        "ppvi_marginalized": ", ".join(layout.marginalized),
        "ppvi_left_out": ", ".join(layout.left_out),
        "ppvi_point_estimate_sites": ", ".join(point_sites),
    }


def inference_data(result: FitResult, layout: Layout, chains: list[dict], num_samples: int, seed: int) -> az.InferenceData:
    """Stack the restarts' draws as chains and label them with the layout's dimension names."""
    stacked = {group: {name: np.stack([chain[group][name] for chain in chains]) for name in chains[0][group]} for group in chains[0]}
    attrs = _attrs(result, layout, stacked, num_samples, seed, len(chains))
    coords = {name: np.arange(size) for name, size in layout.plate_sizes.items()}
    latent_dims = {name: site.dims for name, site in layout.kept.items()}
    observed_dims = {name: site.dims for name, site in layout.observed.items()}
    loglik_dims = {name: [layout.data_plate] if site.per_point else [] for name, site in layout.observed.items()}

    def dataset(values: dict, dims: dict, **kwargs):
        used = {dim for name in values for dim in dims.get(name, [])}
        with quiet():  # it warns when there are more chains than draws
            return az.dict_to_dataset(values, coords={k: v for k, v in coords.items() if k in used}, dims=dims, attrs=attrs, library=pyro, **kwargs)

    groups = {
        "posterior": dataset(stacked["posterior"], latent_dims),
        "sample_stats": dataset(stacked["sample_stats"], {}),
        "observed_data": dataset(layout.observed_values, observed_dims, default_dims=[]),
    }
    if stacked["log_likelihood"]:
        groups["log_likelihood"] = dataset(stacked["log_likelihood"], loglik_dims)
    if stacked["posterior_predictive"]:
        groups["posterior_predictive"] = dataset(stacked["posterior_predictive"], observed_dims)
    constants = {name: value.detach().cpu().numpy() for name, value in result.data.items() if name not in layout.observed}
    if constants:
        groups["constant_data"] = dataset(constants, {name: [layout.data_plate] if layout.data_plate else [] for name in constants}, default_dims=[])
    return az.InferenceData(**groups)
