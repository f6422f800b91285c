"""Probe a model/guide pair once: the guide traced, the model replayed against it, summarised as a PairInfo."""

from __future__ import annotations

from collections.abc import Callable

import torch

import pyro
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from ..pyro_util import data_plate, support_size, trace_pair, unwrap
from .base import DISCRETE, NOT_REPARAMETERIZABLE, REPARAMETERIZABLE, PairInfo, Site, baseline_features, latent_sample

__all__ = ["inspect_sites", "probe"]

_INFER_KEYS = ("baseline", "enumerate")


def _describe_setting(value) -> str:
    """The guide's infer value in words (a baseline dict may hold a network: named by its type)."""
    if isinstance(value, dict):
        plain = (bool, int, float, str, type(None))
        parts = [f"{k}={v!r}" if isinstance(v, plain) else f"{k}=<{type(v).__name__}>" for k, v in value.items()]
        return "{" + ", ".join(parts) + "}"
    return repr(value)


def _kind(fn) -> str:
    if fn.support.is_discrete:
        return DISCRETE
    return REPARAMETERIZABLE if fn.has_rsample else NOT_REPARAMETERIZABLE


def _closed_form(q, p) -> bool:
    try:
        torch.distributions.kl_divergence(q, p)
    except NotImplementedError:
        return False
    return True


def _site(name: str, msg: dict, where: str, model_msg: dict | None) -> Site:
    fn = msg["fn"]
    return Site(
        name=name,
        where=where,
        distribution=type(unwrap(fn)).__name__,
        reparameterized=bool(fn.has_rsample),
        discrete=bool(fn.support.is_discrete),
        support_size=support_size(fn),
        relaxable=isinstance(unwrap(fn), (torch.distributions.OneHotCategorical, torch.distributions.Bernoulli)),
        kind=_kind(fn),
        plates=tuple(frame.name for frame in msg["cond_indep_stack"] if frame.vectorized),
        kl_closed_form=None if where == "model" else model_msg is not None and _closed_form(fn, model_msg["fn"]),
        guide_infer={key: _describe_setting(msg["infer"][key]) for key in _INFER_KEYS if where == "guide" and key in msg["infer"]},
    )


def _local_plate(model_trace, guide_trace, data_plate_name: str | None) -> tuple[str | None, bool]:
    """(a plate every sample site of model and guide lies in, or None; whether any site is subsampled)."""
    sites = [s for trace in (guide_trace, model_trace) for s in trace.nodes.values() if s["type"] == "sample" and not site_is_subsample(s)]
    common = set.intersection(*({f.name for f in s["cond_indep_stack"] if f.vectorized} for s in sites)) if sites else set()
    preferred = [name for name in (data_plate_name, "data") if name in common]
    plate = preferred[0] if preferred else (next(iter(common)) if len(common) == 1 else None)
    subsampled = any(not (isinstance(s["scale"], (int, float)) and s["scale"] == 1.0) for s in sites)
    return plate, subsampled


def _mean_field(guide_fn, args) -> bool:
    try:  # provenance tracking does not cover every guide: then assume it is not mean-field
        dependencies = pyro.infer.inspect.get_dependencies(guide_fn, args)["prior_dependencies"]
    except Exception:  # noqa: BLE001 - any failure of provenance tracking means "not known to be mean-field"
        return False
    return all(set(upstream) <= {name} for name, upstream in dependencies.items())


def _features(guide_trace) -> tuple[dict, str]:
    features, device = {}, "cpu"
    for name, msg in guide_trace.nodes.items():
        if latent_sample(msg):
            device = str(msg["value"].device) if isinstance(msg["value"], torch.Tensor) else device
            try:
                features[name] = int(baseline_features(msg["fn"]).shape[-1])
            except (ValueError, RuntimeError):
                continue
    return features, device


def probe(model_fn: Callable, guide_fn: Callable, *args) -> PairInfo:
    """Trace the guide once and the model against it; describe the pair for the estimator rules.

    Also creates the pair's parameters (they come into being on first use). The analytic-KL
    check traces the guide once more, with provenance tracking, only when it can matter.
    A Delta site rules analytic KL out: Pyro 1.9's registered KL(Delta || p) = -log p(v) ignores
    the Delta's log_density (the Jacobian of an autoguide's transform), which silently changes
    the objective (NumPyro fixed the same bug in PR #1625).
    """
    with poutine.block():
        model_trace, guide_trace = trace_pair(model_fn, guide_fn, *args)
    guide_latent = [(n, m) for n, m in guide_trace.nodes.items() if latent_sample(m)]
    sites = [_site(n, m, "guide", model_trace.nodes.get(n)) for n, m in guide_latent]
    sites += [_site(n, m, "model", None) for n, m in model_trace.nodes.items() if latent_sample(m) and n not in guide_trace.nodes]
    samples = [m for t in (guide_trace, model_trace) for m in t.nodes.values() if m["type"] == "sample"]
    depth = max((len(m["cond_indep_stack"]) for m in samples), default=0)
    num_data = getattr(args[0], "num_data", None) if args else None
    plate = data_plate(model_trace, num_data) if isinstance(num_data, int) else None
    local, subsampled = _local_plate(model_trace, guide_trace, plate)
    shared = [s for s in sites if s.where == "guide" and s.name in model_trace.nodes]
    no_delta = all(s.distribution != "Delta" for s in shared)
    closed = no_delta and any(s.kl_closed_form for s in shared)
    mean_field = _mean_field(guide_fn, args) if closed else None  # checked only where analytic KL could apply
    features, device = _features(guide_trace)
    return PairInfo(
        sites=sites, plate_depth=depth, num_data=num_data, data_plate=plate, local_plate=local, subsampled=subsampled,
        mean_field=mean_field, analytic_kl=bool(closed and mean_field), features=features, device=device,
    )


def inspect_sites(model_fn: Callable, guide_fn: Callable, *args) -> tuple[list[Site], int]:
    """``(sites, plate depth)`` of a pair (the older, narrower face of :func:`probe`)."""
    info = probe(model_fn, guide_fn, *args)
    return info.sites, info.plate_depth
