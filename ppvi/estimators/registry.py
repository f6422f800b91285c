"""The registry of estimators: which exist, which can fit a pair, which ``auto`` picks, and building it.

Every module of this package that defines ``ESTIMATOR = EstimatorSpec(...)`` is registered when
the package is imported, so adding an estimator is adding one module (see ``ppvi/estimators/iwae.py``
for a short one). :func:`register` adds a spec from elsewhere (a plug-in, a test).
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

from ..errors import UsageError
from .base import Estimator, EstimatorSettings, EstimatorSpec, PairInfo, Site
from .probe import probe

__all__ = [
    "ESTIMATORS", "build", "choose_estimator", "discover", "feasible_estimators", "make_estimator",
    "register", "registered", "spec", "specs", "unregister",
]

_REGISTRY: dict[str, EstimatorSpec] = {}


class _Names(Sequence):
    """``("auto", <registered names in listing order>)``, read live: a tuple that sees new registrations."""

    def _names(self) -> tuple:
        return ("auto",) + tuple(s.name for s in specs())

    def __getitem__(self, index):
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __eq__(self, other) -> bool:
        return tuple(self) == tuple(other) if isinstance(other, Sequence) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._names())

    def __repr__(self) -> str:
        return repr(self._names())


ESTIMATORS = _Names()


def register(estimator: EstimatorSpec) -> EstimatorSpec:
    """Add (or replace) an estimator in the registry; returns it."""
    if not isinstance(estimator, EstimatorSpec):
        raise TypeError(f"register() takes an EstimatorSpec, got {type(estimator).__name__}")
    if estimator.name == "auto":
        raise ValueError("'auto' is the registry's own choice, not an estimator name")
    _REGISTRY[estimator.name] = estimator
    return estimator


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


@contextlib.contextmanager
def registered(estimator: EstimatorSpec) -> Iterator[EstimatorSpec]:
    """Register an estimator for the duration of a block (what was there before comes back)."""
    before = _REGISTRY.get(estimator.name)
    register(estimator)
    try:
        yield estimator
    finally:
        unregister(estimator.name)
        if before is not None:
            register(before)


def discover(package: str, path) -> None:
    """Import every module of ``package`` (at ``path``) and register each module-level ``ESTIMATOR``."""
    for module_info in pkgutil.iter_modules(path):
        module = importlib.import_module(f"{package}.{module_info.name}")
        found = getattr(module, "ESTIMATOR", None)
        if isinstance(found, EstimatorSpec):
            register(found)


def specs(by: str = "order") -> list[EstimatorSpec]:
    """The registered estimators, in listing ``order`` or in auto's ``priority``."""
    return sorted(_REGISTRY.values(), key=lambda s: (getattr(s, by), s.name))


def spec(name: str) -> EstimatorSpec:
    """The registered estimator of that name; the one place an unknown name is refused."""
    if name not in _REGISTRY:
        raise UsageError(f"unknown estimator {name!r}; choose one of: {', '.join(ESTIMATORS)}.")
    return _REGISTRY[name]


def _info(sites_or_info) -> PairInfo:
    return sites_or_info if isinstance(sites_or_info, PairInfo) else PairInfo(sites=list(sites_or_info))


def feasible_estimators(sites_or_info) -> list[str]:
    """The estimators that can fit this pair, in the order `auto` prefers them."""
    info = _info(sites_or_info)
    return [s.name for s in specs("priority") if s.why_not(info) is None]


def _infer_notes(estimator: EstimatorSpec, info: PairInfo) -> tuple[str, dict]:
    """What became of the guide's own ``infer`` settings: honoured or ignored, in words and for config.json."""
    words, record = [], {}
    for site in info.sites:
        for key, value in site.guide_infer.items():
            used = bool(estimator.uses_infer(info, site, key))
            record.setdefault(site.name, {})[key] = {"value": value, "used": used}
            if used:
                words.append(f"the guide's own infer {key}={value} at '{site.name}' is used as written")
            else:
                words.append(f"the guide's own infer {key}={value} at '{site.name}' is not used by {estimator.name}")
    return ("; " + "; ".join(words) if words else ""), ({"guide_infer": record} if record else {})


def _auto(info: PairInfo) -> EstimatorSpec:
    refusals = []
    for candidate in specs("priority"):
        if candidate.auto_why_not is None:
            continue
        problem = candidate.auto_why_not(info)
        if problem is None:
            return candidate
        refusals.append(f"{candidate.name}: {problem}")
    raise UsageError("auto found no estimator for this model/guide pair (" + "; ".join(refusals) + ").")


def choose_estimator(requested: str, sites_or_info, settings: EstimatorSettings | None = None) -> tuple[str, str]:
    """Apply the estimator rules; return ``(name, reason)`` or raise UsageError for an impossible choice.

    ``sites_or_info`` is a PairInfo from :func:`probe` (or, as before, its list of sites).
    """
    settings = settings or EstimatorSettings()
    info = _info(sites_or_info)
    settings.check(requested)  # refuses an unknown name first
    if requested == "auto":
        chosen = _auto(info)
    else:
        chosen = spec(requested)
        problem = chosen.why_not(info)
        if problem is not None:
            works = ", ".join(feasible_estimators(info)) or "none of ppvi's estimators"
            raise UsageError(f"estimator {requested!r} cannot fit this model/guide pair: {problem}. Estimators that work: {works}.")
    settings.check_applies(chosen.name)
    notes, _ = _infer_notes(chosen, info)
    return chosen.name, chosen.reason(info, settings, requested == "auto") + notes


def _build(name: str, reason: str, info: PairInfo, model_fn, guide_fn, settings, num_particles, vectorize_particles, total_steps):
    chosen = spec(name)
    options = chosen.options(settings, total_steps)
    estimator = chosen.build(
        info, model_fn, guide_fn, reason=reason, options=options,
        num_particles=num_particles, vectorize_particles=vectorize_particles and num_particles > 1,
    )
    return replace(estimator, options={**options, **estimator.options, **_infer_notes(chosen, info)[1]})


def build(
    requested: str,
    info: PairInfo,
    model_fn: Callable,
    guide_fn: Callable,
    *args,
    settings: EstimatorSettings | None = None,
    num_particles: int = 1,
    vectorize_particles: bool = False,
    total_steps: int | None = None,
) -> Estimator:
    """Choose (``requested`` may be ``auto``) and build the estimator for a probed pair.

    Every usage error is raised while choosing, before anything is built; the pair is not traced
    again. ``vectorize_particles`` draws all particles in one pass, in an extra plate left of the
    model's plates (Pyro's ``vectorize_particles``); the model must broadcast over it. ``iwae``
    always vectorizes its K = ``num_particles`` samples. ``total_steps`` sets gumbel's default
    anneal rate. ``args`` (the batch and options the pair was probed with) are not needed today.
    """
    settings = settings or EstimatorSettings()
    name, reason = choose_estimator(requested, info, settings)
    return _build(name, reason, info, model_fn, guide_fn, settings, num_particles, vectorize_particles, total_steps)


def make_estimator(
    name: str,
    reason: str,
    sites: list[Site],
    model_fn,
    guide_fn,
    *args,
    num_particles: int = 1,
    vectorize_particles: bool = False,
    max_plate_nesting: int = 0,
    settings: EstimatorSettings | None = None,
    total_steps: int | None = None,
) -> Estimator:
    """Build an estimator chosen by :func:`choose_estimator` (the older face of :func:`build`).

    The pair is probed again here (``sites`` and ``max_plate_nesting`` are what that probe finds);
    an estimator that cannot fit the pair is refused with a UsageError.
    """
    info = probe(model_fn, guide_fn, *args)
    problem = spec(name).why_not(info)
    if problem is not None:
        raise UsageError(f"estimator {name!r} cannot fit this model/guide pair: {problem}.")
    settings = settings or EstimatorSettings()
    return _build(name, reason, info, model_fn, guide_fn, settings, num_particles, vectorize_particles, total_steps)

