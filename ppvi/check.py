"""``ppvi check FILE``: load a model/guide pair without fitting it and say what ppvi sees.

Its sites (name, distribution, support, shape, plates, and whether each is discrete,
continuous reparameterizable or continuous non-reparameterizable), the plate that indexes data
points and how it is scaled under minibatches, which estimators apply and which ``auto`` picks
and why, and every problem found, as an error (exit code 2) or a warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import pyro
from pyro.poutine.util import site_is_subsample

from .batching import num_points
from .data import Batch
from .errors import UsageError
from .estimators import choose_estimator, feasible_estimators, inspect_sites
from .gallery import load_pair
from .pyro_util import data_plate, fit_scope, rng_scope, trace_pair, unwrap

__all__ = ["CheckReport", "check", "site_kind"]


@dataclass
class CheckReport:
    """What :func:`check` found; ``text()`` is what the command prints."""

    title: str = ""
    lines: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    def text(self) -> str:
        out = [self.title, *self.lines]
        out += [f"warning: {message}" for message in self.warnings]
        out += [f"error: {message}" for message in self.errors]
        if not self.errors:
            out.append("no errors." if not self.warnings else f"no errors, {len(self.warnings)} warning(s).")
        return "\n".join(line for line in out if line)


def site_kind(fn) -> str:
    """``discrete``, ``continuous, reparameterizable`` or ``continuous, not reparameterizable``."""
    if fn.support.is_discrete:
        return "discrete"
    return "continuous, reparameterizable" if fn.has_rsample else "continuous, not reparameterizable (score function)"


def _plates(site) -> str:
    frames = [
        f"{frame.name}[{frame.size}" + (f" of {frame.full_size}]" if frame.full_size not in (None, frame.size) else "]")
        for frame in reversed(site["cond_indep_stack"])
    ]
    return ", ".join(frames) or "-"


def _site_lines(model_trace, guide_trace) -> list[str]:
    lines = ["sites (where, name, distribution, support, shape, plates, kind):"]
    for where, trace in (("guide", guide_trace), ("model", model_trace)):
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site) or site["infer"].get("is_auxiliary"):
                continue
            if where == "model" and not site["is_observed"] and name in guide_trace.nodes:
                continue  # a latent site is listed where it is sampled (the guide)
            fn = site["fn"]
            kind = "observed" if site["is_observed"] else site_kind(fn)
            lines.append(
                f"  {where:5} {name}: {type(unwrap(fn)).__name__}, support {fn.support}, shape {tuple(site['value'].shape)}, "
                f"plates {_plates(site)}, {kind}"
            )
    return lines


def _infer_warnings(guide_trace) -> list[str]:
    found = []
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample" and {"baseline", "enumerate"} & set(site["infer"]):
            settings = {key: site["infer"][key] for key in ("baseline", "enumerate") if key in site["infer"]}
            found.append(f"guide site {name!r} sets infer={settings}: Pyro's own handling of it applies at this site.")
    return found


def _shape_warnings(model_trace, guide_trace) -> list[str]:
    found = []
    for name, site in guide_trace.nodes.items():
        other = model_trace.nodes.get(name)
        if site["type"] != "sample" or other is None or other["is_observed"] or site_is_subsample(site):
            continue
        prior_shape = tuple(other["fn"].batch_shape + other["fn"].event_shape)
        value_shape = tuple(site["value"].shape)
        if value_shape != prior_shape:
            found.append(
                f"the guide samples {name!r} with shape {value_shape} but the model's prior there has shape {prior_shape}: "
                f"log p({name}) broadcasts to {tuple(other['fn'].log_prob(site['value']).shape)} and is summed as if each "
                "element were a separate latent; make the guide's shape match the model's."
            )
    return found


def _plate_lines(report: CheckReport, model_trace, num_data: int, batch_size: int | None, ppvi_file: bool) -> None:
    plate = data_plate(model_trace, num_data)
    if plate is None:
        report.lines.append(f"data plate: none of size {num_data} holds an observed site; fits run full-batch only.")
        if batch_size:
            report.errors.append(
                f"--batch-size {batch_size}: no vectorized plate of the data's size ({num_data}) holds the observed sites, so "
                'the likelihood cannot be scaled; wrap them in `with pyro.plate("data", len(x)):` (sized, vectorized), or fit full-batch.'
            )
        return
    inside = [
        name for name, site in model_trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site) and any(f.name == plate for f in site["cond_indep_stack"])
    ]
    how = "by Pyro (ppvi's convention: subsample=batch.index)" if ppvi_file else "by ppvi (whether or not the plate has subsample=)"
    report.lines.append(
        f"data plate: {plate!r} ({num_data} points); under --batch-size B its sites {', '.join(inside)} are scaled by N/B {how}; "
        "global sites are not scaled."
    )


def _estimator_lines(report: CheckReport, model_fn, guide_fn, batch, options) -> None:
    sites, _ = inspect_sites(model_fn, guide_fn, batch, options)
    works = feasible_estimators(sites)
    report.lines.append(f"estimators that apply: {', '.join(works) or 'none'}")
    try:
        name, reason = choose_estimator("auto", sites)
        report.lines.append(f"auto picks: {name} ({reason})")
    except UsageError as error:
        report.errors.append(str(error))


def check(model, guide=None, *, data=None, batch_size: int | None = None, options=None) -> CheckReport:
    """Load the pair, run guide and model once on the full data (seed 0, nothing leaks), report.

    A minibatch of ``batch_size`` points is also run when given, to catch what only minibatches refuse.
    """
    report = CheckReport()
    try:
        pair = load_pair(model, guide)
        report.title = f"{pair.name} ({pair.path}): {pair.convention}; guide {guide or pair.default_guide}"
        options = pair.make_options(options)
        tensors = pair.load_data(data, options) if not isinstance(data, dict) or getattr(pair, "loads_in_memory", False) else data
        num_data = num_points(tensors)
        report.lines.append(f"data: {', '.join(f'{k} {tuple(v.shape)}' for k, v in tensors.items()) or 'none'} ({num_data} points)")
        with fit_scope(), rng_scope(0), pyro.validation_enabled(True):
            name = guide if isinstance(guide, str) and guide in pair.guides else pair.default_guide
            model_fn, guide_fn = pair.build_pair(name, options, tensors)
            full = Batch(tensors, torch.arange(num_data), num_data)
            model_trace, guide_trace = trace_pair(model_fn, guide_fn, full, options)
            report.lines += _site_lines(model_trace, guide_trace)
            report.warnings += _infer_warnings(guide_trace) + _shape_warnings(model_trace, guide_trace)
            _plate_lines(report, model_trace, num_data, batch_size, ppvi_file=not getattr(pair, "loads_in_memory", False))
            _estimator_lines(report, model_fn, guide_fn, full, options)
            if batch_size and batch_size < num_data and not report.errors:
                index = torch.arange(batch_size)
                batch = Batch({k: v.index_select(0, index) for k, v in tensors.items()}, index, num_data)
                trace_pair(model_fn, guide_fn, batch, options)
    except UsageError as error:
        report.errors.append(str(error))
    return report
