"""Posterior diagnostics for a fitted guide, with ArviZ.

Draws from the guide go into ArviZ ``InferenceData`` with ``chain`` (= restart)
and ``draw`` dimensions; then:

PSIS k-hat
    Pareto k-hat of the importance ratios ``log p(x, z) - log q(z)`` (Yao,
    Vehtari, Simpson & Gelman 2018), per restart and pooled, via
    ``az.psislw``: below 0.5 the guide is good, 0.5-0.7 usable with care, above
    0.7 unreliable. The overall verdict is the worst restart's. The pooled
    smoothed weights give PSIS-corrected posterior means beside the raw ones.
R-hat across restarts
    ``az.rhat`` / ``az.ess`` with restarts as chains: draws within a restart are
    independent, so R-hat > 1.01 means the restarts' guides disagree (different
    modes, or an unfinished fit).
PSIS-LOO
    ``az.loo`` on the per-observation log-likelihood (the guide's draws standing
    in for posterior draws), and beside it the estimate corrected for q
    (Magnusson et al. 2019), which stays sound where q's tails are too heavy.
NUTS reference
    Pyro's NUTS on the same model and full data, for models small enough, and a
    table and forest plot of VI against it.

Discrete latent sites. A discrete site inside the data plate with at most
``ENUM_MAX_SUPPORT`` values (a mixture's assignment ``z``) is summed out
exactly in the model, whether the guide samples it (gmm ``meanfield``) or
leaves it to the model (gmm ``map``): ``log p(x, theta)`` and the
per-observation log-likelihood ``log p(x_i | theta)`` are log-sum-exps over its
values, ``log q(theta)`` leaves it out, and it is not in the posterior group.
So k-hat judges the guide's marginal ``q(theta)`` against ``p(theta | x)``.
Other discrete guide sites stay in the joint ratio and in the posterior; a
discrete site that is neither sampled by the guide nor summable is refused.

Point-estimate guides (Delta sites, e.g. gmm ``map``) have no density against
which to weigh the posterior: k-hat, PSIS means and R-hat are reported as not
applicable for them, with the reason.

References
----------
Yao, Vehtari, Simpson & Gelman (2018). Yes, but did it work?: Evaluating
variational inference. ICML.
Vehtari, Gelman & Gabry (2017). Practical Bayesian model evaluation using
leave-one-out cross-validation and WAIC. Statistics and Computing.
Magnusson, Andersen, Jonasson & Vehtari (2019). Bayesian leave-one-out
cross-validation for large data. ICML.
Vehtari, Gelman, Simpson, Carpenter & Buerkner (2021). Rank-normalization,
folding, and localization: an improved R-hat. Bayesian Analysis.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import config_enumerate
from pyro.poutine.uncondition_messenger import UnconditionMessenger
from pyro.poutine.util import site_is_subsample

from . import rundir
from .errors import UsageError
from .estimators import ENUM_MAX_SUPPORT
from .results import FitResult, RestartResult
from .runs import full_batch, load_run, restart_params, rng_scope

with warnings.catch_warnings():  # ArviZ announces its refactor once a day on import
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

__all__ = [
    "KHAT_GOOD",
    "KHAT_USABLE",
    "RHAT_MAX",
    "Layout",
    "PsisReport",
    "RestartAgreement",
    "LooReport",
    "NutsComparison",
    "Diagnosis",
    "to_inference_data",
    "psis_diagnostics",
    "khat_verdict",
    "restart_agreement",
    "loo_report",
    "summarize",
    "nuts_reference",
    "compare_to_reference",
    "plot_comparison",
    "diagnose",
    "format_diagnosis",
]

KHAT_GOOD, KHAT_USABLE = 0.5, 0.7  # Yao et al. (2018), section 3
RHAT_MAX = 1.01  # Vehtari et al. (2021)
MIN_PSIS_DRAWS = 100  # per restart: below this the Pareto fit of the tail (3 sqrt(S) draws) is mostly noise
MAX_NUTS_LATENT_DIM = 1000  # continuous latent dimensions NUTS is asked to explore
MAX_NUTS_DATA = 10_000  # data points per gradient evaluation
MAX_POINTWISE_VALUES = 50_000_000  # restarts x draws x points kept for the log-likelihood group
CHUNK_VALUES = 4_000_000  # draws x points evaluated in one vectorised pass
MAX_PRINTED_ROWS = 60  # of the summary tables ppvi diagnose prints (the CSV files hold them all)
DRAWS_PLATE = "_ppvi_draws"
POSTERIOR_FILE, SUMMARY_FILE, REPORT_FILE = "posterior.nc", "summary.csv", "diagnostics.json"
COMPARISON_FILE, FOREST_FILE = "nuts_comparison.csv", "nuts_forest.png"


# --- where each site's draws go ------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """How a model's sites map onto ArviZ groups, found from one run of the guide and model on the full data.

    ``latent`` and ``observed`` map a site name to its per-draw shape and dimension
    names (a plate's name for a plated dimension, ``SITE_dim_I`` otherwise).
    """

    latent: dict  # name -> (shape, dims, discrete) for the posterior group
    observed: dict  # name -> (shape, dims, per_point)
    observed_values: dict = field(repr=False)  # name -> numpy array of the data
    marginalized: tuple  # discrete sites summed out in the model
    data_plate: str | None
    data_dim: int | None  # the data plate's (negative) dimension
    max_plate_nesting: int
    plate_sizes: dict


def _is_latent(msg) -> bool:
    return msg["type"] == "sample" and not msg["is_observed"] and not site_is_subsample(msg)


def _is_deterministic(msg) -> bool:
    # pyro.deterministic: an observed Delta site with its log-density masked out
    return msg["type"] == "sample" and bool(msg["infer"].get("_deterministic"))


def _is_observed(msg) -> bool:
    return msg["type"] == "sample" and msg["is_observed"] and not _is_deterministic(msg)


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


def _support_size(fn) -> int | None:
    if not getattr(fn, "has_enumerate_support", False):
        return None
    return int(fn.enumerate_support(expand=False).shape[0])


def _describe(name: str, fn) -> str:
    while hasattr(fn, "base_dist") and type(fn).__name__ in ("Independent", "ExpandedDistribution", "MaskedDistribution"):
        fn = fn.base_dist
    return f"'{name}' ({type(fn).__name__})"


def _layout(result: FitResult) -> Layout:
    restart = result.restarts[0]
    batch = full_batch(result)
    with restart_params(result, restart), poutine.block():
        guide_trace = poutine.trace(restart.guide_fn).get_trace(batch, result.options)
        model_trace = poutine.trace(poutine.replay(restart.model_fn, trace=guide_trace)).get_trace(batch, result.options)
    sites = [msg for trace in (guide_trace, model_trace) for msg in trace.nodes.values() if msg["type"] == "sample"]
    frames = [frame for msg in sites for frame in _frames(msg)]
    plate_sizes = {frame.name: frame.size for frame in frames}
    max_plate_nesting = max((-frame.dim for frame in frames), default=0)
    observed = {name: msg for name, msg in model_trace.nodes.items() if _is_observed(msg)}
    observed_frames = [frame for msg in observed.values() for frame in _frames(msg)]
    data_frame = next((f for f in observed_frames if f.name == "data"), None) or next(
        (f for f in observed_frames if (f.full_size or f.size) == batch.num_data), None
    )

    marginalized, latent = [], {}
    for name, msg in model_trace.nodes.items():
        if not (_is_latent(msg) or _is_deterministic(msg)):
            continue
        fn = msg["fn"]
        discrete = bool(fn.support.is_discrete)
        if discrete:
            size = _support_size(fn)
            local = data_frame is not None and [f.name for f in _frames(msg)] == [data_frame.name]
            if size is not None and size <= ENUM_MAX_SUPPORT and local:
                marginalized.append(name)
                continue
            if name not in guide_trace.nodes:
                raise UsageError(
                    f"latent site {_describe(name, fn)} is discrete, absent from the guide, and not a per-data-point site with at most "
                    f"{ENUM_MAX_SUPPORT} values that could be summed out; ppvi cannot evaluate log p(x, z) for this model."
                )
        value = msg["value"]
        latent[name] = (tuple(value.shape), _dim_names(name, value.shape, fn.event_dim, _frames(msg)), discrete)

    per_point = {}
    for name, msg in observed.items():
        value = msg["value"]
        in_data = data_frame is not None and data_frame.name in [f.name for f in _frames(msg)]
        dims = _dim_names(name, value.shape, msg["fn"].event_dim, _frames(msg))
        per_point[name] = (tuple(value.shape), dims, in_data)
    if marginalized and sum(in_data for *_, in_data in per_point.values()) != 1:
        raise UsageError(
            f"ppvi sums out the discrete site(s) {', '.join(map(repr, marginalized))} per data point, which needs exactly one "
            f"observed site in plate {data_frame.name!r} (this model has {', '.join(map(repr, per_point)) or 'none'})."
        )
    return Layout(
        latent=latent,
        observed=per_point,
        observed_values={name: msg["value"].detach().cpu().numpy() for name, msg in observed.items()},
        marginalized=tuple(marginalized),
        data_plate=data_frame.name if data_frame is not None else None,
        data_dim=data_frame.dim if data_frame is not None else None,
        max_plate_nesting=max_plate_nesting,
        plate_sizes=plate_sizes,
    )


# --- drawing from the guide and scoring the draws ------------------------------------------------


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


def _evaluate(restart: RestartResult, batch, options, layout: Layout, draws: int | None, predictive: bool, pointwise: bool) -> dict:
    """Draw from the guide (``draws`` at once in a plate, or one), score each draw, return tensors (draws, ...)."""
    vectorized = draws is not None
    nesting = layout.max_plate_nesting
    width = nesting + vectorized
    hidden = set(layout.marginalized)
    draws_plate = pyro.plate(DRAWS_PLATE, draws, dim=-(nesting + 1)) if vectorized else contextlib.nullcontext()
    with draws_plate:
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
    count = draws if vectorized else 1
    out = {"posterior": {}, "log_likelihood": {}, "posterior_predictive": {}}
    log_q = sum(
        (_per_draw(msg["log_prob"], width, count, vectorized) for msg in guide_trace.nodes.values() if _is_latent(msg)),
        torch.zeros(count, device=batch.index.device),
    )
    pointwise_sites = [name for name, (*_, per_point) in layout.observed.items() if per_point]
    log_p = torch.zeros(count, device=batch.index.device)
    if hidden:  # one observed site per point (checked in _layout): sum out the discrete sites jointly with it
        name = pointwise_sites[0]
        terms = [model_trace.nodes[site]["log_prob"] for site in (*layout.marginalized, name)]
        out["log_likelihood"][name] = _pointwise(terms, width, layout.data_dim, count, batch.num_data, vectorized)
        log_p = log_p + out["log_likelihood"][name].sum(-1)
    for name, msg in model_trace.nodes.items():
        if msg["type"] != "sample" or site_is_subsample(msg) or _is_deterministic(msg) or name in hidden or (hidden and name in pointwise_sites):
            continue
        log_p = log_p + _per_draw(msg["log_prob"], width, count, vectorized)
        if name in layout.observed:
            if name in pointwise_sites:
                out["log_likelihood"][name] = _pointwise([msg["log_prob"]], width, layout.data_dim, count, batch.num_data, vectorized)
            else:
                out["log_likelihood"][name] = _per_draw(msg["log_prob"], width, count, vectorized)
    for name, (shape, *_) in layout.latent.items():
        out["posterior"][name] = model_trace.nodes[name]["value"].reshape(count, *shape)
    if replicate is not None:
        for name, (shape, *_) in layout.observed.items():
            out["posterior_predictive"][name] = replicate.nodes[name]["value"].reshape(count, *shape)
    out["sample_stats"] = {"log_p": log_p, "log_q": log_q}
    if not pointwise:  # too many values to keep: log_p still holds their sum
        out["log_likelihood"] = {}
    return out


def _concatenate(parts: list[dict]) -> dict:
    return {
        group: {name: torch.cat([part[group][name] for part in parts]).cpu().numpy() for name in parts[0][group]}
        for group in parts[0]
    }


def _chain_seed(seed: int, restart: int) -> int:
    return int(np.random.SeedSequence([seed, restart]).generate_state(1)[0])


def _device_scope(device: torch.device):
    # As in the fit: on CUDA, tensor factories in model code land on the GPU.
    return torch.device(device) if torch.device(device).type != "cpu" else contextlib.nullcontext()


def _check_count(name: str, value, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UsageError(f"--{name} must be an integer of at least {minimum} (got {value!r}).")
    return value


def _draw_chain(result: FitResult, restart: RestartResult, layout: Layout, num_samples: int, vectorize: bool, pointwise: bool, predictive: bool) -> dict:
    """All draws of one restart: in vectorised chunks where the model broadcasts over a draws plate, else one by one."""
    batch = full_batch(result)
    if vectorize:
        chunk = max(1, min(num_samples, CHUNK_VALUES // max(1, batch.num_data)))
        parts = [
            _evaluate(restart, batch, result.options, layout, min(chunk, num_samples - start), predictive, pointwise)
            for start in range(0, num_samples, chunk)
        ]
    else:
        parts = [_evaluate(restart, batch, result.options, layout, None, predictive, pointwise) for _ in range(num_samples)]
    return _concatenate(parts)


def to_inference_data(run, num_samples: int = 1000, seed: int = 0, *, predictive: bool = True) -> az.InferenceData:
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
        Also draw replicated data (the posterior_predictive group).

    Returns
    -------
    arviz.InferenceData
        ``posterior`` (every latent site not summed out; dims ``chain`` = restart, ``draw``, then
        plate names), ``log_likelihood`` (per observation, full data), ``observed_data``,
        ``constant_data`` (other data tensors), ``posterior_predictive`` and ``sample_stats``
        with ``log_p`` = log p(x, z) and ``log_q`` = log q(z) of every draw.
    """
    result = load_run(run)
    num_samples = _check_count("num-samples", num_samples)
    seed = _check_count("seed", seed, minimum=0)
    layout = _layout(result)
    vectorize = bool(result.config.get("vectorize_particles"))
    num_data = next(iter(result.data.values())).shape[0]
    pointwise = len(result.restarts) * num_samples * num_data <= MAX_POINTWISE_VALUES
    chains = []
    for restart in result.restarts:
        with restart_params(result, restart), rng_scope(_chain_seed(seed, restart.restart)), torch.no_grad(), _device_scope(result.device):
            chains.append(_draw_chain(result, restart, layout, num_samples, vectorize, pointwise, predictive and pointwise))
    return _inference_data(result, layout, chains, num_samples, seed)


def _inference_data(result: FitResult, layout: Layout, chains: list[dict], num_samples: int, seed: int) -> az.InferenceData:
    stacked = {group: {name: np.stack([chain[group][name] for chain in chains]) for name in chains[0][group]} for group in chains[0]}
    point_sites = sorted(
        name for name, values in stacked["posterior"].items() if num_samples > 1 and np.all(values.max(axis=1) == values.min(axis=1))
    )
    attrs = {
        "ppvi_model": result.model_file.name,
        "ppvi_guide": result.config.get("guide", ""),
        "ppvi_restarts": len(chains),
        "ppvi_seed": seed,
        "ppvi_marginalized": ", ".join(layout.marginalized),
        "ppvi_point_estimate_sites": ", ".join(point_sites),
    }
    coords = {name: np.arange(size) for name, size in layout.plate_sizes.items()}
    latent_dims = {name: dims for name, (shape, dims, _) in layout.latent.items()}
    observed_dims = {name: dims for name, (shape, dims, _) in layout.observed.items()}
    loglik_dims = {name: [layout.data_plate] if per_point else [] for name, (_, _, per_point) in layout.observed.items()}

    def dataset(values: dict, dims: dict, **kwargs):
        used = {dim for name in values for dim in dims.get(name, [])}
        with _arviz_quiet():  # it warns when there are more chains than draws
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
        constant_dims = {name: [layout.data_plate] if layout.data_plate else [] for name in constants}
        groups["constant_data"] = dataset(constants, constant_dims, default_dims=[])
    return az.InferenceData(**groups)


# --- PSIS k-hat ----------------------------------------------------------------------------------


class PsisReport(NamedTuple):
    """Pareto k-hat of the importance ratios p(x, z) / q(z), per restart and pooled."""

    khat: tuple  # one per restart
    khat_pooled: float
    verdict: str  # good | usable with care | unreliable | not applicable | not computed
    note: str
    log_weights: np.ndarray | None  # pooled smoothed normalised log weights, (chain, draw)

    @property
    def khat_mean(self) -> float:
        return float(np.mean(self.khat)) if self.khat else math.nan

    @property
    def khat_max(self) -> float:
        return float(np.max(self.khat)) if self.khat else math.nan


def khat_verdict(khat: float) -> str:
    """Yao et al. (2018): below 0.5 good, 0.5 to 0.7 usable with care, above 0.7 (or undefined) unreliable."""
    if not np.isfinite(khat) or khat > KHAT_USABLE:
        return "unreliable"
    return "good" if khat < KHAT_GOOD else "usable with care"


VERDICT_TEXT = {
    "good": "good (k-hat < 0.5): importance sampling from the guide is reliable, so the PSIS-corrected estimates can be trusted "
    "(k-hat cannot see a guide that is too wide: compare psis_mean with mean)",
    "usable with care": "usable with care (0.5 <= k-hat <= 0.7): PSIS-corrected estimates are usable, but converge slowly",
    "unreliable": "unreliable (k-hat > 0.7): the guide misses posterior mass; neither its estimates nor their PSIS correction can be trusted",
}


@contextlib.contextmanager
def _arviz_quiet():
    # ArviZ warns (UserWarning, RuntimeWarning) where our reports say the same in words.
    # ArviZ also logs through its own (unregistered) logger, e.g. "Shape validation failed" for one chain.
    logger = getattr(az, "_log", None) or logging.getLogger("arviz")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def psis_diagnostics(idata: az.InferenceData) -> PsisReport:
    """PSIS on the log importance ratios ``log_p - log_q`` in ``sample_stats`` (reff = 1: the draws are independent)."""
    log_ratios = (idata.sample_stats["log_p"] - idata.sample_stats["log_q"]).transpose("chain", "draw").values.astype(np.float64)
    chains, draws = log_ratios.shape
    point_sites = idata.posterior.attrs.get("ppvi_point_estimate_sites", "")
    if point_sites:
        note = f"not applicable: the guide is a point estimate at {point_sites} (no density q to weigh p against)"
        return PsisReport((), math.nan, "not applicable", note, None)
    if draws < MIN_PSIS_DRAWS:
        note = f"not computed: k-hat needs at least {MIN_PSIS_DRAWS} draws per restart (--num-samples; got {draws})"
        return PsisReport((), math.nan, "not computed", note, None)
    if not np.all(np.isfinite(log_ratios)):
        return PsisReport((math.inf,) * chains, math.inf, "unreliable", "some draws have a non-finite log p(x, z) - log q(z)", None)
    with _arviz_quiet():
        per_chain = tuple(float(az.psislw(log_ratios[chain].copy(), reff=1.0)[1]) for chain in range(chains))
        smoothed, pooled = az.psislw(log_ratios.reshape(-1).copy(), reff=1.0)
    worst = khat_verdict(max(per_chain))
    return PsisReport(per_chain, float(pooled), worst, VERDICT_TEXT[worst], np.asarray(smoothed).reshape(chains, draws))


# --- R-hat and ESS across restarts ---------------------------------------------------------------


class RestartAgreement(NamedTuple):
    """R-hat and bulk ESS per parameter element, with restarts as chains."""

    rhat: pd.Series
    ess_bulk: pd.Series
    flagged: tuple  # labels whose restarts disagree
    note: str


def _flatten(dataset) -> pd.Series:
    """One value per scalar element, labelled as ArviZ's summary labels rows (``locs[0, 1]``)."""
    values = {}
    for name, array in dataset.data_vars.items():
        if array.ndim == 0:
            values[name] = float(array.values)
            continue
        for index in np.ndindex(array.shape):
            coords = ", ".join(str(array.coords[dim].values[i]) if dim in array.coords else str(i) for dim, i in zip(array.dims, index))
            values[f"{name}[{coords}]"] = float(array.values[index])
    return pd.Series(values, dtype=float)


def restart_agreement(idata: az.InferenceData) -> RestartAgreement:
    """R-hat > 1.01 across restarts flags parameters where the restarts disagree (different modes?)."""
    chains = idata.posterior.sizes["chain"]
    if chains < 2:
        empty = pd.Series(dtype=float)
        return RestartAgreement(empty, empty, (), "one restart: R-hat across restarts needs 2 or more (--restarts)")
    with _arviz_quiet():
        rhat = _flatten(az.rhat(idata))
        ess = _flatten(az.ess(idata))
    spread = _flatten(idata.posterior.mean("draw").max("chain") - idata.posterior.mean("draw").min("chain"))
    undefined = rhat.isna() & (spread > 1e-6 * (1.0 + _flatten(abs(idata.posterior.mean(("chain", "draw"))))))
    flagged = tuple(rhat.index[(rhat > RHAT_MAX) | undefined])
    if flagged:
        note = f"restarts disagree (different modes?) at {len(flagged)} of {len(rhat)} parameter(s): R-hat > {RHAT_MAX}"
    else:
        note = f"restarts agree: every R-hat <= {RHAT_MAX}"
    if rhat.isna().any():
        note += "; R-hat is undefined where draws do not vary (point estimates): those are compared by their values"
    return RestartAgreement(rhat, ess, flagged, note)


# --- PSIS-LOO ------------------------------------------------------------------------------------


class LooReport(NamedTuple):
    """PSIS-LOO of the guide's draws: ``az.loo`` as if they were posterior draws, and corrected for q.

    The corrected estimate weighs draw s for observation i by
    ``p(theta_s | x) / (q(theta_s) p(x_i | theta_s))`` (Magnusson, Andersen, Jonasson & Vehtari
    2019, section 3), smoothed by ``az.psislw``; it stays sound where q's tails are heavier than the
    posterior's, which sends ``az.loo``'s ratios ``1 / p(x_i | theta_s)`` out of control.
    """

    var_name: str
    elpd_loo: float  # az.loo
    se: float
    p_loo: float
    num_points: int
    num_high_k: int  # observations with Pareto k > 0.7 in az.loo
    max_k: float
    elpd_loo_corrected: float  # with the p / q correction
    se_corrected: float
    max_k_corrected: float
    note: str


def _corrected_loo(idata: az.InferenceData, name: str) -> tuple[float, float, float]:
    from scipy.special import logsumexp

    log_lik = idata.log_likelihood[name].stack(__sample__=("chain", "draw")).astype(np.float64)
    stats = idata.sample_stats.stack(__sample__=("chain", "draw")).astype(np.float64)
    log_ratio = stats["log_p"] - stats["log_q"] - log_lik  # log p(theta | x) / (q(theta) p(x_i | theta)) + const
    with _arviz_quiet():
        log_weights, pareto_k = az.psislw(log_ratio.transpose(..., "__sample__"), reff=1.0)
    log_lik = log_lik.transpose(..., "__sample__").values
    elpd_i = logsumexp(log_weights.values + log_lik, axis=-1)  # weights are normalised over the draws
    return float(elpd_i.sum()), float(np.sqrt(elpd_i.size * np.var(elpd_i))), float(np.max(pareto_k.values))


def loo_report(idata: az.InferenceData) -> LooReport:
    """PSIS-LOO of the one observed site with a per-observation log-likelihood (NaNs and a note where there is none)."""
    names = []
    if "log_likelihood" in idata.groups():
        names = [name for name, array in idata.log_likelihood.data_vars.items() if set(array.dims) - {"chain", "draw"}]
    point_sites = idata.posterior.attrs.get("ppvi_point_estimate_sites", "")
    reason = None
    if point_sites:
        reason = f"not applicable: the guide is a point estimate at {point_sites}, so there are no posterior draws to leave one out of"
    elif idata.posterior.sizes["draw"] < MIN_PSIS_DRAWS:
        reason = f"not computed: PSIS needs at least {MIN_PSIS_DRAWS} draws per restart (--num-samples)"
    elif len(names) != 1:
        reason = "not computed: " + ("no observed site has a per-observation log-likelihood" if not names else f"several observed sites ({', '.join(names)})")
    if reason is not None:
        nan = math.nan
        return LooReport(names[0] if len(names) == 1 else "", nan, nan, nan, 0, 0, nan, nan, nan, nan, reason)
    with _arviz_quiet():
        elpd = az.loo(idata, pointwise=True, var_name=names[0], reff=1.0)
    pareto_k = np.asarray(elpd.pareto_k)
    high = int((pareto_k > KHAT_USABLE).sum())
    corrected = _corrected_loo(idata, names[0])
    note = "every observation's Pareto k <= 0.7" if not high else f"{high} observation(s) with Pareto k > 0.7 in az.loo: its estimate is unreliable"
    if corrected[2] > KHAT_USABLE:
        note += "; the q-corrected estimate has observation(s) with Pareto k > 0.7 (max {:.2f})".format(corrected[2])
    return LooReport(names[0], float(elpd.elpd_loo), float(elpd.se), float(elpd.p_loo), int(pareto_k.size), high, float(pareto_k.max()), *corrected, note)


# --- summary -------------------------------------------------------------------------------------


def summarize(idata: az.InferenceData, psis: PsisReport | None = None) -> pd.DataFrame:
    """``az.summary`` of the posterior, with a ``psis_mean`` column (PSIS-corrected mean) beside ``mean``."""
    stat_funcs = None
    if psis is not None and psis.log_weights is not None:
        weights = np.exp(psis.log_weights).reshape(-1)  # chain-major, as ArviZ ravels (chain, draw)
        stat_funcs = {"psis_mean": lambda values: float(np.dot(weights, values))}
    with _arviz_quiet():
        frame = az.summary(idata, round_to="none", stat_funcs=stat_funcs, extend=True)
    if "psis_mean" in frame.columns:
        columns = [c for c in frame.columns if c != "psis_mean"]
        columns.insert(columns.index("mean") + 1, "psis_mean")
        frame = frame[columns]
    return frame


# --- NUTS reference ------------------------------------------------------------------------------


class NutsComparison(NamedTuple):
    """VI against NUTS, element by element."""

    table: pd.DataFrame  # vi_mean, vi_sd, nuts_mean, nuts_sd, nuts_mcse_mean, mean_diff, mean_diff_sd, sd_ratio
    reference: az.InferenceData
    num_divergences: int


def _check_nuts(result: FitResult, layout: Layout) -> None:
    num_data = next(iter(result.data.values())).shape[0]
    latent_dim = sum(int(np.prod(shape)) for shape, _, discrete in layout.latent.values() if not discrete)
    discrete = [name for name, (*_, is_discrete) in layout.latent.items() if is_discrete]
    if discrete:
        raise UsageError(
            f"--reference nuts: the model has discrete latent site(s) {', '.join(map(repr, discrete))} that are not per-data-point "
            "sites NUTS could sum out by enumeration; NUTS needs continuous latents."
        )
    if latent_dim > MAX_NUTS_LATENT_DIM:
        raise UsageError(f"--reference nuts: the model has {latent_dim} continuous latent dimensions; ppvi runs NUTS up to {MAX_NUTS_LATENT_DIM}.")
    if num_data > MAX_NUTS_DATA:
        raise UsageError(f"--reference nuts: the data have {num_data} points; ppvi runs NUTS (full-data gradients) up to {MAX_NUTS_DATA}.")


def nuts_reference(run, num_samples: int = 1000, *, warmup_steps: int | None = None, seed: int = 0, progress: bool = False) -> az.InferenceData:
    """Run Pyro's NUTS on the same model and full data; return its posterior as InferenceData (one chain).

    Discrete per-data-point sites are summed out by enumeration, as in the VI diagnostics.
    Model parameters (``pyro.param`` in the model, if any) are held at the best restart's values.

    Raises
    ------
    UsageError
        Models too large for NUTS (more than ``MAX_NUTS_LATENT_DIM`` continuous latent dimensions
        or ``MAX_NUTS_DATA`` data points), or with discrete latent sites it cannot sum out.
    """
    from pyro.infer import MCMC, NUTS

    result = load_run(run)
    num_samples = _check_count("nuts-samples", num_samples)
    seed = _check_count("seed", seed, minimum=0)
    layout = _layout(result)
    _check_nuts(result, layout)
    warmup_steps = warmup_steps if warmup_steps is not None else max(200, num_samples // 2)
    best = result.best
    model_fn = config_enumerate(best.model_fn, default="parallel") if layout.marginalized else best.model_fn
    with restart_params(result, best), rng_scope(seed), _device_scope(result.device):
        kernel = NUTS(model_fn, max_plate_nesting=layout.max_plate_nesting, jit_compile=False)
        mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps, num_chains=1, disable_progbar=not progress)
        mcmc.run(full_batch(result), result.options)
        samples = mcmc.get_samples(group_by_chain=True)
        divergences = mcmc.diagnostics().get("divergences", {}).get("chain 0", [])
    # pyro.deterministic sites are not among NUTS's samples: they are left out of the comparison
    posterior = {
        name: samples[name].reshape(1, num_samples, *shape).detach().cpu().numpy()
        for name, (shape, _, _) in layout.latent.items()
        if name in samples
    }
    diverging = np.zeros((1, num_samples), dtype=bool)
    diverging[0, list(divergences)] = True
    coords = {name: np.arange(size) for name, size in layout.plate_sizes.items()}
    dims = {name: dims for name, (_, dims, _) in layout.latent.items() if name in posterior}
    used = {dim for names in dims.values() for dim in names}
    attrs = {"ppvi_model": result.model_file.name, "ppvi_reference": "nuts", "ppvi_warmup_steps": warmup_steps, "ppvi_seed": seed}
    return az.InferenceData(
        posterior=az.dict_to_dataset(posterior, coords={k: v for k, v in coords.items() if k in used}, dims=dims, attrs=attrs, library=pyro),
        sample_stats=az.dict_to_dataset({"diverging": diverging}, attrs=attrs, library=pyro),
    )


def compare_to_reference(vi: az.InferenceData, reference: az.InferenceData) -> NutsComparison:
    """Per element: VI and NUTS means and sds side by side, their differences in NUTS sds, and sd ratios.

    Elements are matched by name and index, so a mixture's components are compared as labelled:
    where VI and NUTS settle in different label modes, the differences show the relabelling.
    """
    with _arviz_quiet():
        ours = az.summary(vi, kind="stats", round_to="none")
        theirs = az.summary(reference, round_to="none")
    common = [label for label in ours.index if label in theirs.index]
    table = pd.DataFrame(
        {
            "vi_mean": ours.loc[common, "mean"],
            "vi_sd": ours.loc[common, "sd"],
            "nuts_mean": theirs.loc[common, "mean"],
            "nuts_sd": theirs.loc[common, "sd"],
            "nuts_mcse_mean": theirs.loc[common, "mcse_mean"],
        }
    )
    table["mean_diff"] = table["vi_mean"] - table["nuts_mean"]
    table["mean_diff_sd"] = table["mean_diff"] / table["nuts_sd"]  # in posterior sds, as NUTS estimates them
    table["sd_ratio"] = table["vi_sd"] / table["nuts_sd"]
    divergences = int(reference.sample_stats["diverging"].sum()) if "sample_stats" in reference.groups() else 0
    return NutsComparison(table, reference, divergences)


def plot_comparison(vi: az.InferenceData, reference: az.InferenceData, path: Path, names=("VI", "NUTS")) -> Path:
    """ArviZ forest plot of VI against the reference (94% HDIs, chains combined), saved as PNG."""
    import matplotlib.pyplot as plt  # ArviZ draws through pyplot; headless machines fall back to Agg by themselves

    var_names = [name for name in vi.posterior.data_vars if name in reference.posterior.data_vars]
    with _arviz_quiet():
        axes = az.plot_forest([vi, reference], model_names=list(names), var_names=var_names, combined=True)
    figure = np.ravel(axes)[0].figure
    rundir.atomic_write(Path(path), lambda temporary: figure.savefig(temporary, format="png", dpi=110))
    plt.close(figure)
    return Path(path)


# --- everything at once --------------------------------------------------------------------------


@dataclass
class Diagnosis:
    """What ``ppvi diagnose`` reports; plain data."""

    model: str
    guide: str
    num_samples: int
    seed: int
    idata: az.InferenceData = field(repr=False)
    summary: pd.DataFrame = field(repr=False)
    psis: PsisReport = field(repr=False)
    restarts: RestartAgreement = field(repr=False)
    loo: LooReport = field(repr=False)
    nuts: NutsComparison | None = field(default=None, repr=False)
    run_dir: Path | None = None
    files: list = field(default_factory=list)

    def to_json(self) -> dict:
        def number(value):
            return None if value is None or not np.isfinite(value) else float(value)

        report = {
            "model": self.model,
            "guide": self.guide,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "restarts": int(self.idata.posterior.sizes["chain"]),
            "marginalized_sites": [s for s in self.idata.posterior.attrs.get("ppvi_marginalized", "").split(", ") if s],
            "psis": {
                "khat": [number(k) for k in self.psis.khat],
                "khat_pooled": number(self.psis.khat_pooled),
                "khat_mean": number(self.psis.khat_mean),
                "khat_max": number(self.psis.khat_max),
                "verdict": self.psis.verdict,
                "note": self.psis.note,
            },
            "rhat": {
                "max": number(self.restarts.rhat.max()) if len(self.restarts.rhat) else None,
                "flagged": {label: number(self.restarts.rhat[label]) for label in self.restarts.flagged},
                "note": self.restarts.note,
            },
            "loo": {key: (number(value) if isinstance(value, float) else value) for key, value in self.loo._asdict().items()},
        }
        if self.nuts is not None:
            table = self.nuts.table
            report["nuts"] = {
                "num_samples": int(self.nuts.reference.posterior.sizes["draw"]),
                "num_divergences": self.nuts.num_divergences,
                "max_abs_mean_diff_sd": number(table["mean_diff_sd"].abs().max()),
                "sd_ratio_range": [number(table["sd_ratio"].min()), number(table["sd_ratio"].max())],
            }
        return report


def diagnose(
    run,
    *,
    num_samples: int = 1000,
    seed: int = 0,
    reference: str | None = None,
    nuts_samples: int = 1000,
    write: bool = True,
    progress: bool = False,
    log_fn: Callable[[str], None] | None = None,
) -> Diagnosis:
    """Draw from the guide, compute every diagnostic, and write them into the run directory.

    Parameters
    ----------
    run : path or FitResult
        Run directory or in-memory fit (an in-memory fit without ``run_dir`` writes nothing).
    num_samples : int
        Guide draws per restart.
    seed : int
        Seed of the draws (and of NUTS).
    reference : {None, "nuts"}
        Also run NUTS and compare (small models only).
    nuts_samples : int
        NUTS draws after as many warm-up steps as half of them (at least 200).
    write : bool
        Write posterior.nc, summary.csv, diagnostics.json (and nuts_comparison.csv,
        nuts_forest.png) atomically into the run directory.

    Returns
    -------
    Diagnosis
    """
    log_fn = log_fn or (lambda message: None)
    num_samples = _check_count("num-samples", num_samples)
    seed = _check_count("seed", seed, minimum=0)
    if reference not in (None, "nuts"):
        raise UsageError(f"unknown --reference {reference!r}; the reference available is: nuts.")
    if reference is not None:
        nuts_samples = _check_count("nuts-samples", nuts_samples)
    result = load_run(run)
    if reference == "nuts":
        _check_nuts(result, _layout(result))  # refuse before spending time on the draws
    idata = to_inference_data(result, num_samples, seed)
    psis = psis_diagnostics(idata)
    diagnosis = Diagnosis(
        model=result.model_file.name,
        guide=result.config.get("guide", ""),
        num_samples=num_samples,
        seed=seed,
        idata=idata,
        summary=summarize(idata, psis),
        psis=psis,
        restarts=restart_agreement(idata),
        loo=loo_report(idata),
        run_dir=result.run_dir,
    )
    if reference == "nuts":
        log_fn(f"running NUTS: {nuts_samples} draws after {max(200, nuts_samples // 2)} warm-up steps ...")
        diagnosis.nuts = compare_to_reference(idata, nuts_reference(result, nuts_samples, seed=seed, progress=progress))
    if write and result.run_dir is not None:
        diagnosis.files = _write(diagnosis, Path(result.run_dir))
    return diagnosis


def _write(diagnosis: Diagnosis, run_dir: Path) -> list[Path]:
    paths = [run_dir / POSTERIOR_FILE, run_dir / SUMMARY_FILE, run_dir / REPORT_FILE]
    rundir.atomic_write(paths[0], lambda temporary: diagnosis.idata.to_netcdf(temporary))
    rundir.atomic_write(paths[1], lambda temporary: diagnosis.summary.to_csv(temporary, index_label="parameter"))
    rundir.write_json(paths[2], diagnosis.to_json())
    if diagnosis.nuts is not None:
        paths.append(run_dir / COMPARISON_FILE)
        rundir.atomic_write(paths[-1], lambda temporary: diagnosis.nuts.table.to_csv(temporary, index_label="parameter"))
        paths.append(plot_comparison(diagnosis.idata, diagnosis.nuts.reference, run_dir / FOREST_FILE))
    return paths


def _number(value: float) -> str:
    return "nan" if value is None or not np.isfinite(value) else f"{value:.3g}"


def format_diagnosis(diagnosis: Diagnosis) -> str:
    """The report ``ppvi diagnose`` prints."""
    restarts = int(diagnosis.idata.posterior.sizes["chain"])
    lines = [
        f"{diagnosis.model} / {diagnosis.guide}: {diagnosis.num_samples} guide draws x {restarts} restart(s) (chains)",
    ]
    marginalized = diagnosis.idata.posterior.attrs.get("ppvi_marginalized", "")
    if marginalized:
        lines.append(f"summed out exactly (not in the posterior table): {marginalized}")
    shown = diagnosis.summary.head(MAX_PRINTED_ROWS)
    lines += ["", "ArviZ summary (psis_mean: PSIS-corrected mean):", shown.to_string(float_format=lambda v: f"{v:.4g}")]
    if len(diagnosis.summary) > len(shown):
        lines.append(f"... {len(diagnosis.summary) - len(shown)} more rows in {SUMMARY_FILE}")
    lines.append("")
    psis = diagnosis.psis
    lines.append("PSIS k-hat of p(x, z) / q(z) (Yao et al. 2018; < 0.5 good, 0.5-0.7 usable with care, > 0.7 unreliable):")
    if psis.khat:
        per_restart = "  ".join(f"restart {i}: {_number(k)}" for i, k in enumerate(psis.khat))
        lines.append(f"  {per_restart}  pooled: {_number(psis.khat_pooled)}")
    lines.append(f"  verdict: {psis.note}")
    lines.append(f"R-hat across restarts: {diagnosis.restarts.note}")
    for label in diagnosis.restarts.flagged:
        rhat = diagnosis.restarts.rhat[label]
        lines.append(f"  {label}: R-hat {rhat:.4g}: restarts disagree (different modes?)")
    loo = diagnosis.loo
    if np.isfinite(loo.elpd_loo):
        lines.append(
            f"PSIS-LOO ({loo.var_name}, {loo.num_points} observations): elpd_loo {loo.elpd_loo:.2f} (se {loo.se:.2f}), p_loo {loo.p_loo:.2f}; "
            f"corrected for q: elpd_loo {loo.elpd_loo_corrected:.2f} (se {loo.se_corrected:.2f}); {loo.note}"
        )
    else:
        lines.append(f"PSIS-LOO: {loo.note}")
    if diagnosis.nuts is not None:
        table = diagnosis.nuts.table
        lines += [
            "",
            f"VI against NUTS ({int(diagnosis.nuts.reference.posterior.sizes['draw'])} draws, {diagnosis.nuts.num_divergences} divergences); "
            "mean_diff_sd = (VI mean - NUTS mean) / NUTS sd:",
            table.head(MAX_PRINTED_ROWS).to_string(float_format=lambda v: f"{v:.4g}"),
        ]
        if len(table) > MAX_PRINTED_ROWS:
            lines.append(f"... {len(table) - MAX_PRINTED_ROWS} more rows in {COMPARISON_FILE}")
    if diagnosis.files:
        lines += ["", "wrote " + ", ".join(str(path) for path in diagnosis.files)]
    return "\n".join(lines)
