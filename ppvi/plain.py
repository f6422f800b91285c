"""Plain Pyro code as it is: model and guide callables with Pyro's own signatures.

A Pyro user writes ``model(x, y=None)`` and ``guide(x, y=None)`` (or an autoguide), opens
``pyro.plate("data", len(x))`` and calls ``SVI(model, guide, ...)``. :class:`PlainPair` wraps
such a pair behind the interface of :class:`ppvi.gallery.ModelFile`, so ppvi's fit loop,
estimators and diagnostics take it without rewriting; :func:`ppvi.gallery.load_pair` builds one.

How ppvi calls the user's code
------------------------------
Data is a dict from the model's argument names to tensors with one row per data point; each
call passes the (minibatch) rows by keyword: ``model(x=x[index], y=y[index])``. Values that are
not per-point (an int ``J``, a tensor of another length) are passed unchanged on every call.

Minibatches
-----------
The loop index-selects the data rows, so a plate written ``pyro.plate("data", len(x))`` sees B
points and Pyro would weight them as if they were the whole data set. The plate that indexes
data points is found by its size on the full data (:func:`ppvi.pyro_util.data_plate`, whatever it
is called); under a minibatch, every site inside it (model and guide) is scaled by N/B, as
``subsample=`` would, and marked subsampled so autoguides keep one parameter per data point. A
plate that already subsamples (``subsample=batch.index``) is left alone. Global sites are never
scaled. What cannot be scaled safely is refused with a :class:`~ppvi.errors.UsageError`: no
vectorized plate of size N, an observed site outside it, a guide plate of the batch's size under
another name, local latents in an autoguide that packs all latents into one vector.

Fresh state per restart
-----------------------
:meth:`PlainPair.build_pair` returns a new pair every call. For a file it re-imports the file
(under the caller's RNG state: the restart's seed), so module-level networks, autoguide
instances and parameters are new. For Python callables it resets the ``nn.Module`` objects the
callables reach (bound ``self``, globals they name; ``reset_parameters()`` under the restart's
seed, else the weights they had when the pair was loaded) and builds autoguides anew (an autoguide
instance is copied from its state when the pair was loaded).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import inspect
import itertools
import sys
import types
from pathlib import Path

import torch

import pyro
import pyro.poutine as poutine
from pyro.infer import autoguide as pyro_autoguide
from pyro.infer.autoguide import AutoGuide
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .data import Batch
from .errors import UsageError, user_code
from .guides import init_to_median_or_feasible
from .pyro_util import data_plate, rng_scope, trace_pair

__all__ = ["AUTOGUIDES", "PlainPair", "autoguide_class", "from_callables", "from_file", "is_ppvi_convention"]

AUTOGUIDES = (
    "AutoNormal",
    "AutoDiagonalNormal",
    "AutoMultivariateNormal",
    "AutoLowRankMultivariateNormal",
    "AutoDelta",
    "AutoLaplaceApproximation",
    "AutoIAFNormal",
)
DEFAULT_AUTOGUIDE = "AutoNormal"
_counter = itertools.count()


def autoguide_class(name: str) -> type | None:
    """The Pyro autoguide class for a name (``"AutoNormal"``, case-insensitive); None if it is not one."""
    for known in AUTOGUIDES:
        if known.lower() == str(name).lower():
            return getattr(pyro_autoguide, known)
    return None


def is_ppvi_convention(module) -> bool:
    """Whether a loaded file follows ppvi's model-file convention (``model(batch, options)`` and ``GUIDES``)."""
    model = getattr(module, "model", None)
    if not hasattr(module, "GUIDES") or model is None:
        return False
    if isinstance(model, type):
        return True
    try:
        names = list(inspect.signature(model).parameters)
    except (TypeError, ValueError):
        return False
    return names[:2] == ["batch", "options"]


# ----------------------------------------------------------------------------- calling user code


def _parameters(fn) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return []


def _signature_text(fn, label: str) -> str:
    try:
        return f"{label}{inspect.signature(fn)}"
    except (TypeError, ValueError):
        return f"{label}(...)"


def _check_call(fn, label: str, kwargs: dict, model_fn=None) -> None:
    """A wrong signature is the user's mistake: name what ppvi passes and what the function takes."""
    try:
        inspect.signature(fn).bind(**kwargs)
    except (TypeError, ValueError) as error:
        if isinstance(error, ValueError) and "no signature" in str(error):
            return
        passed = ", ".join(f"{name}=" for name in kwargs) or "no arguments"
        expected = f"; the guide must take the model's arguments, {_signature_text(model_fn, 'model')}" if model_fn is not None else ""
        raise UsageError(
            f"{_signature_text(fn, label)} cannot be called with the data ({passed}): {error}{expected}. "
            "ppvi passes each data tensor by its argument name (model(x, y=None) gets x and y); a ppvi model "
            "file instead defines model(batch, options) and GUIDES."
        ) from None


def _source_files(*fns) -> list[str]:
    files = []
    for fn in fns:
        target = getattr(fn, "__func__", fn)
        target = target if not isinstance(target, AutoGuide) else None
        try:
            name = inspect.getsourcefile(target if callable(target) and not isinstance(target, torch.nn.Module) else type(target))
        except TypeError:
            name = None
        if name:
            files.append(name)
    return files


# ----------------------------------------------------------------------------- minibatch scaling


class _Minibatch:
    """What the current call sees: the batch, and the data plate found on the full data."""

    def __init__(self, data: dict):
        self.full = data
        self.batch: Batch | None = None
        self.plate: str | None = None
        self.dim: int | None = None
        self.found = False
        self.packed: str | None = None  # an autoguide that packs all latents into one vector (no local latents then)

    def minibatch(self) -> bool:
        return self.batch is not None and len(self.batch) < self.batch.num_data


class _ScaleDataPlate(Messenger):
    """Scale every site inside the data plate by N/B and mark its frame subsampled (as ``subsample=`` does)."""

    def __init__(self, state: _Minibatch, role: str):
        super().__init__()
        self.state, self.role = state, role

    def _process_message(self, msg):
        if msg["type"] != "sample" or site_is_subsample(msg) or not self.state.minibatch():
            return
        state, stack = self.state, msg["cond_indep_stack"]
        num_data, size = state.batch.num_data, len(state.batch)
        inside, frames = False, []
        for frame in stack:
            if frame.name == state.plate:
                inside = True
                if frame.full_size is None or frame.full_size == frame.size:  # not subsampled by the plate itself
                    if frame.size != size:
                        raise UsageError(
                            f"plate {frame.name!r} has {frame.size} elements in a minibatch of {size} points: it indexes "
                            "data points but not by the data's length; size it len(x), or fit without --batch-size."
                        )
                    frame = frame._replace(full_size=num_data)
                    msg["scale"] = msg["scale"] * (num_data / size)
            elif self.role == "guide" and frame.vectorized and frame.size == size and frame.full_size in (None, frame.size):
                raise UsageError(
                    f"the guide's plate {frame.name!r} has the minibatch's size ({size}) but the model's data plate is "
                    f"{state.plate!r}: name them the same so ppvi can scale both, or fit without --batch-size."
                )
            frames.append(frame)
        msg["cond_indep_stack"] = tuple(frames)
        if not inside and msg["is_observed"] and self.role == "model":
            raise UsageError(
                f"with --batch-size, the observed site {msg['name']!r} lies outside the data plate {state.plate!r}, "
                "so its weight cannot be scaled to the full data set: move it inside the plate, or fit without --batch-size."
            )


def _find_plate(state: _Minibatch, model_call, guide_call, options) -> None:
    """Find the data plate by size on the full data (once), without touching the RNG or creating gradients."""
    first = next(iter(state.full.values()))
    num_data = first.shape[0]
    full = Batch(state.full, torch.arange(num_data, device=first.device), num_data)
    saved, state.batch = state.batch, full
    try:
        with rng_scope(), torch.no_grad(), poutine.block():
            model_trace, _ = trace_pair(model_call, guide_call, full, options)
    finally:
        state.batch = saved
    state.plate = data_plate(model_trace, num_data)
    state.found = True
    if state.plate is None:
        observed = [name for name, site in model_trace.nodes.items() if site["type"] == "sample" and site["is_observed"]]
        raise UsageError(
            f"with --batch-size, ppvi must scale the likelihood by N/B, but no vectorized plate of the data's size "
            f"({num_data}) holds the observed site(s) {', '.join(map(repr, observed)) or '(none)'}: write "
            f'`with pyro.plate("data", len(x)):` around them (sized, vectorized: not a Python loop, a sequential plate or a plate '
            "without a size), or fit without --batch-size."
        )
    for name, site in model_trace.nodes.items():
        for frame in site.get("cond_indep_stack", ()):
            if frame.name == state.plate:
                state.dim = frame.dim
                if state.packed and site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site):
                    raise UsageError(
                        f"{state.packed} packs every latent into one vector, so it cannot fit the local latent {name!r} of the "
                        f"minibatched plate {state.plate!r}: use AutoNormal or AutoDelta, or fit without --batch-size."
                    )


# ----------------------------------------------------------------------------- fresh state


def _modules_reached(fns) -> list[torch.nn.Module]:
    """nn.Modules the user's callables reach: their bound ``self``, the globals their code names, their closures."""
    found = []
    for fn in fns:
        if isinstance(fn, torch.nn.Module):
            found.append(fn)
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, torch.nn.Module):
            found.append(owner)
        code, scope = getattr(getattr(fn, "__func__", fn), "__code__", None), getattr(getattr(fn, "__func__", fn), "__globals__", {})
        cells = [cell.cell_contents for cell in getattr(getattr(fn, "__func__", fn), "__closure__", None) or () if _filled(cell)]
        for value in [scope.get(name) for name in (code.co_names if code is not None else ())] + cells:
            if isinstance(value, torch.nn.Module) and not isinstance(value, AutoGuide):
                found.append(value)
    unique = []
    for module in found:
        if all(module is not seen for seen in unique):
            unique.append(module)
    return unique


def _filled(cell) -> bool:
    try:
        _ = cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


class _Reset:
    """Puts the callables' nn.Modules back to fresh weights: ``reset_parameters()`` where a layer has
    it (drawn from the current RNG: the restart's seed), else the weights it had when loaded."""

    def __init__(self, modules):
        self.modules = modules
        self.saved = [copy.deepcopy(module.state_dict()) for module in modules]

    def __call__(self) -> None:
        for module, saved in zip(self.modules, self.saved):
            module.load_state_dict(saved)
            for layer in module.modules():
                if hasattr(layer, "reset_parameters") and callable(layer.reset_parameters):
                    layer.reset_parameters()


# ----------------------------------------------------------------------------- the pair


class PlainPair:
    """A plain Pyro model (and its guides) with the interface of :class:`~ppvi.gallery.ModelFile`.

    Build one with :func:`ppvi.gallery.load_pair`. ``build_pair`` returns
    ``(model_fn, guide_fn)`` with ppvi's internal signature ``fn(batch, options)``.
    """

    def __init__(self, *, name, path, sha256, loader, guide, guide_label, doc=""):
        self.name, self.path, self.sha256 = name, path, sha256
        self.module = types.ModuleType(f"ppvi_plain.{name}", doc)  # a plain file defines no ppvi hooks (summarize ...)
        self.loader = loader  # () -> (user model callable, namespace dict of the file or None)
        self.model, self.namespace = loader(first=True)
        self.guide_label = guide_label
        self._guides = {guide_label: guide}
        for extra in AUTOGUIDES:
            self._guides.setdefault(extra, extra)
        self.constants: dict = {}
        self._last = None

    def __repr__(self) -> str:
        return f"PlainPair({self.name!r}, guide={self.guide_label!r})"

    convention = "plain Pyro: model and guide called with their own arguments"
    loads_in_memory = True  # load_data also maps in-memory tensors, dicts and tuples to the model's arguments

    @property
    def guides(self) -> dict:
        """Guide name -> what :meth:`build_pair` builds for it."""
        return dict(self._guides)

    @property
    def default_guide(self) -> str:
        return self.guide_label

    @property
    def options_class(self):
        return None

    @property
    def doc(self) -> str:
        return (self.module.__doc__ or "").strip()

    @property
    def title(self) -> str:
        return self.doc.splitlines()[0] if self.doc else self.name

    def make_options(self, values=None):
        """Plain Pyro models take no ppvi options: their arguments come from the data."""
        if values:
            raise UsageError(f"model {self.name!r} is plain Pyro code and takes no options (got {', '.join(values)}).")
        return None

    @property
    def fit_defaults(self) -> dict:
        return dict((self.namespace or {}).get("FIT_DEFAULTS", {}))

    @property
    def files(self) -> list[str]:
        return [str(self.path)] if self.path and str(self.path).endswith(".py") else _source_files(self.model)

    # ------------------------------------------------------------------ data

    def argument_names(self) -> list[str]:
        return [p.name for p in _parameters(self.model) if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    def load_data(self, source, options=None) -> dict:
        """The data as ``{argument name: tensor with one row per point}``; other values become constants.

        ``source``: None (module-level values named like the model's arguments), a CSV path (columns
        named like arguments, else the whole table as the first argument), a Tensor (the first
        argument), a dict (by keyword) or a tuple (positional).
        """
        if _tensor_list(source) and len(source) > len(self.argument_names()):
            source = torch.stack(source)  # SVI part I's `data = [torch.tensor(1.0), ...]`: one row per item
        values = _values_from(self, source)
        values = {name: torch.stack(value) if _tensor_list(value) else value for name, value in values.items()}
        data, self.constants = _split_data(self, values)
        return data

    # ------------------------------------------------------------------ the pair

    def call_args(self, batch) -> dict:
        return {**self.constants, **(batch.data if batch is not None else {})}

    def build_pair(self, guide_name=None, options=None, data=None):
        """``(model_fn, guide_fn)`` with fresh state, each called as ``fn(batch, options)``."""
        guide_name = guide_name or self.guide_label
        if guide_name not in self._guides:
            raise UsageError(f"{self.name}: no guide {guide_name!r}; give one of: {', '.join(self._guides)}, or a callable.")
        model, guide = self._fresh(self._guides[guide_name])
        state = _Minibatch(data if data is not None else {})
        boundary_files = self.files + _source_files(guide)

        checked = []

        def run(fn, role, batch):
            kwargs = self.call_args(batch)
            if not checked:
                _check_call(model, "model", kwargs)
                if not isinstance(guide, AutoGuide):
                    _check_call(guide, "guide", kwargs, model_fn=model)
                checked.append(True)
            state.batch = batch
            if state.minibatch() and not state.found:
                _find_plate(state, model_fn, guide_fn, None)
            with user_code(boundary_files), _ScaleDataPlate(state, role):
                return fn(**kwargs)

        def model_fn(batch, options=None):
            return run(model, "model", batch)

        def guide_fn(batch, options=None):
            return run(guide, "guide", batch)

        own_instance = isinstance(guide, _Deferred) and guide.instance is not None
        if isinstance(guide, _Deferred):
            guide = guide.build(model, state)
        # for ppvi.init.start_: the autoguide inside guide_fn, and whether it is the user's own instance (its start is theirs)
        guide_fn.autoguide, guide_fn.own_instance = (guide if isinstance(guide, AutoGuide) else None), own_instance
        self._last = (model_fn, guide_fn)
        return model_fn, guide_fn

    def _fresh(self, spec):
        """A new model callable and guide spec: the file re-imported, or the callables' state reset."""
        if self.namespace is not None:
            model, namespace = self.loader(first=False)
            return model, _guide_from_spec(spec, namespace)
        _Reset(_modules_reached([self.model] + ([spec] if callable(spec) and not isinstance(spec, type) else [])))()
        return self.model, _guide_from_spec(spec, None)


class _Deferred:
    """An autoguide to build from the model once the pair exists (it needs the wrapped model)."""

    def __init__(self, cls=None, instance=None, inner=None):
        self.cls, self.instance, self.inner = cls, instance, inner  # inner: the instance's own model

    def build(self, model, state: _Minibatch):
        def scaled(inner):
            def wrapped(*args, **kwargs):  # the autoguide traces the model: with the same minibatch scaling
                with _ScaleDataPlate(state, "model"):
                    return inner(*args, **kwargs)

            return wrapped

        def plates(*args, **kwargs):
            if state.plate is None or not state.minibatch():
                return []
            return [pyro.plate(state.plate, state.batch.num_data, subsample=state.batch.index, dim=state.dim)]

        if self.instance is not None:  # keep the user's own model (it may be poutine.block(model, expose=...))
            guide = copy.deepcopy(self.instance)
            guide._model = (scaled(self.inner),)  # a copy forgets its model (AutoGuide.__getstate__)
            if "create_plates" not in inspect.signature(type(guide).__init__).parameters:
                state.packed = type(guide).__name__
            if getattr(guide, "create_plates", False) is None and getattr(guide, "master", None) is None:
                guide.create_plates = plates
            return guide
        takes_plates = "create_plates" in inspect.signature(self.cls.__init__).parameters
        kwargs = {"create_plates": plates} if takes_plates else {}
        guide = self.cls(scaled(model), init_loc_fn=init_to_median_or_feasible, **kwargs)
        if not takes_plates:
            state.packed = type(guide).__name__
        return guide


def _respec(spec, namespace):
    # After a re-import, a guide the file names (a function, an autoguide instance) comes from the new module.
    if isinstance(spec, tuple) and spec[0] == "file":
        return namespace[spec[1]]
    if isinstance(spec, tuple) and spec[0] == "GUIDES":
        return namespace["GUIDES"][spec[1]]
    return spec


def _guide_from_spec(spec, namespace):
    spec = _respec(spec, namespace) if namespace is not None else spec
    if isinstance(spec, str):
        cls = autoguide_class(spec)
        if cls is None:
            raise UsageError(f"unknown guide {spec!r}: give a guide function, an autoguide class or one of {', '.join(AUTOGUIDES)}.")
        return _Deferred(cls=cls)
    if isinstance(spec, type) and issubclass(spec, AutoGuide):
        return _Deferred(cls=spec)
    if isinstance(spec, AutoGuide):
        pristine, inner = _pristine(spec)
        return _Deferred(instance=pristine, inner=inner)
    if callable(spec):
        return spec
    raise UsageError(f"guide {spec!r} is not callable: give a guide function, an autoguide class or instance, or a name.")


_PRISTINE: dict = {}


def _pristine(instance: AutoGuide) -> tuple:
    # An autoguide instance as it was when first seen, so each restart starts from the same untrained state.
    key = id(instance)
    if key not in _PRISTINE:
        if getattr(instance, "prototype_trace", None) is not None:
            raise UsageError(
                f"the {type(instance).__name__} instance was already run (it holds fitted parameters); pass a new "
                f"instance, its class, or the name {type(instance).__name__!r}."
            )
        model = instance.model
        pristine = copy.deepcopy(instance)  # AutoGuide.__getstate__ drops the model, of the original too
        instance._model = (model,)
        _PRISTINE[key] = (instance, pristine, model)
    return _PRISTINE[key][1], _PRISTINE[key][2]


# ----------------------------------------------------------------------------- data


def _tensor_list(value) -> bool:
    """A non-empty list of tensors of one shape (SVI part I's ``data = [torch.tensor(1.0), ...]``): one row each."""
    return (isinstance(value, list) and bool(value) and all(isinstance(item, torch.Tensor) for item in value)
            and len({item.shape for item in value}) == 1)


def _values_from(pair: PlainPair, source) -> dict:
    names = pair.argument_names()
    if source is None:
        return _module_values(pair, names)
    if isinstance(source, (str, Path)):
        return _csv_values(Path(source), names)
    if isinstance(source, dict):
        return dict(source)
    if isinstance(source, (tuple, list)):
        if len(source) > len(names):
            raise UsageError(f"{len(source)} data arguments given, but {_signature_text(pair.model, 'model')} takes {len(names)}.")
        return dict(zip(names, source))
    if not names:
        raise UsageError(f"{_signature_text(pair.model, 'model')} takes no data argument, but data was given.")
    return {names[0]: source}


def _module_values(pair: PlainPair, names: list[str]) -> dict:
    namespace = pair.namespace or {}
    if isinstance(namespace.get("DATA"), dict):
        return dict(namespace["DATA"])
    values = {name: namespace[name] for name in names if name in namespace and not callable(namespace[name])}
    required = [p.name for p in _parameters(pair.model) if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    missing = [name for name in required if name not in values]
    if missing:
        where = "pass data=..."
        if pair.namespace is not None:
            where = f"define module-level {', '.join(missing)} in {pair.path.name}, or give --data FILE.csv"
        raise UsageError(f"{_signature_text(pair.model, 'model')} needs {', '.join(missing)}: {where}.")
    return values


def _csv_values(path: Path, names: list[str]) -> dict:
    import pandas as pd

    from .data import read_csv

    table = read_csv(path, min_rows=1)
    try:
        header = [str(name).strip() for name in pd.read_csv(path, nrows=0).columns]
    except Exception:  # read_csv above has already named any problem with the file
        header = []
    matched = [name for name in header if name in names]
    if not names:
        raise UsageError(f"--data {path}: the model takes no data argument.")
    if not matched:  # no header, or columns not named like arguments: the whole table is the first argument
        return {names[0]: table[:, 0] if table.shape[1] == 1 else table}
    unmatched = [name for name in header if name not in names]
    if unmatched:
        raise UsageError(f"--data {path}: column(s) {', '.join(unmatched)} match no argument of the model ({', '.join(names)}).")
    return {name: table[:, [i for i, column in enumerate(header) if column == name]].squeeze(-1) for name in dict.fromkeys(matched)}


def _split_data(pair: PlainPair, values: dict) -> tuple[dict, dict]:
    """Per-point tensors (leading size N, the first argument's) and constants (everything else)."""
    params = _parameters(pair.model)
    if not any(p.kind == p.VAR_KEYWORD for p in params):
        known = pair.argument_names()
        unknown = [name for name in values if name not in known]
        if unknown:
            raise UsageError(f"data {', '.join(map(repr, unknown))} match no argument of {_signature_text(pair.model, 'model')}.")
    values = {
        name: torch.as_tensor(value) if hasattr(value, "__array__") and not isinstance(value, torch.Tensor) else value
        for name, value in values.items()
    }
    sized = [value for value in values.values() if isinstance(value, torch.Tensor) and value.dim() >= 1]
    num_data = sized[0].shape[0] if sized else None
    data = {
        name: value for name, value in values.items()
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == num_data
    }
    constants = {name: value for name, value in values.items() if name not in data}
    for name, value in data.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            row = int((~torch.isfinite(value.reshape(num_data, -1))).any(-1).nonzero()[0]) + 1
            raise UsageError(f"data {name!r}: holds NaN or infinite values (first at row {row}).")
    return data, constants


# ----------------------------------------------------------------------------- constructors


def _import_file(path: Path, seed: int | None):
    module_name = f"ppvi_plain_files.{path.stem}_{next(_counter)}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up here
    try:
        with user_code([str(path)]), (rng_scope(seed) if seed is not None else _nothing()):
            spec.loader.exec_module(module)
    except SyntaxError as error:
        raise UsageError(f"model file {path}: syntax error at line {error.lineno}: {error.msg}.") from None
    finally:
        sys.modules.pop(module_name, None)
    return module


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def from_file(path: Path, model_name: str = "model", guide=None, *, seed: int = 0, first_module=None) -> PlainPair:
    """A plain Pyro file: ``model`` (or ``model_name``) and its guide from the file, or ``guide`` as given.

    The file is imported once under ``seed`` (module-level data is reproducible) and again, under
    the caller's RNG state, for every :meth:`PlainPair.build_pair`.
    """
    path = Path(path).resolve()
    first_module = first_module if first_module is not None else _import_file(path, seed)

    def loader(first=False):
        namespace = vars(first_module if first else _import_file(path, None))
        if not callable(namespace.get(model_name)):
            raise UsageError(
                f"{path} defines no function {model_name!r}; a plain Pyro file defines `def {model_name}(...)` "
                f"(or name another: {path.name}:my_model), a ppvi model file `model(batch, options)` and GUIDES."
            )
        return namespace[model_name], namespace

    namespace = vars(first_module)
    spec, label = _file_guide(path, namespace, guide)
    pair = PlainPair(
        name=path.stem, path=path, sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        loader=loader, guide=spec, guide_label=label, doc=first_module.__doc__ or "",
    )
    # --guide NAME may also pick another guide the file defines: a GUIDES entry, or a function named *guide*
    others = {name: ("GUIDES", name) for name in namespace.get("GUIDES") or {}}
    others.update({name: ("file", name) for name, value in namespace.items() if "guide" in name.lower() and inspect.isfunction(value)})
    for name, other in others.items():
        pair._guides.setdefault(name, other)
    return pair


def _file_guide(path: Path, namespace: dict, guide):
    """The guide spec and its label for a file: explicit, else the file's ``guide``, else AutoNormal."""
    if guide is None:
        if callable(namespace.get("guide")):
            return ("file", "guide"), "guide"
        return DEFAULT_AUTOGUIDE, DEFAULT_AUTOGUIDE
    if isinstance(guide, str):
        file_part, _, fn_name = guide.rpartition(":")
        if file_part.endswith(".py"):
            other = _import_file(Path(file_part).resolve(), None)
            if not callable(getattr(other, fn_name, None)):
                raise UsageError(f"{file_part} defines no function {fn_name!r}.")
            return getattr(other, fn_name), fn_name
        if guide in namespace and (callable(namespace[guide])):
            return ("file", guide), guide
        if guide in (namespace.get("GUIDES") or {}):
            return ("GUIDES", guide), guide
        if autoguide_class(guide) is not None:
            return autoguide_class(guide).__name__, autoguide_class(guide).__name__
        raise UsageError(
            f"{path.name} has no guide {guide!r}: give a function the file defines, file.py:guide_fn, or one of {', '.join(AUTOGUIDES)}."
        )
    return guide, _label(guide)


def _label(guide) -> str:
    if isinstance(guide, str):
        cls = autoguide_class(guide)
        return cls.__name__ if cls is not None else guide
    if isinstance(guide, type):
        return guide.__name__
    if isinstance(guide, AutoGuide):
        return type(guide).__name__
    return getattr(guide, "__name__", type(guide).__name__)


def from_callables(model, guide=None) -> PlainPair:
    """A pair of Python callables (a notebook's ``model`` and ``guide``); ``guide=None`` is AutoNormal."""
    if not callable(model):
        raise UsageError(f"model {model!r} is not callable.")
    guide = DEFAULT_AUTOGUIDE if guide is None else guide
    if isinstance(guide, str) and autoguide_class(guide) is None:
        raise UsageError(
            f"unknown guide {guide!r}: give a guide function, an autoguide class or instance, or one of {', '.join(AUTOGUIDES)}."
        )
    files = _source_files(model)
    path = Path(files[0]) if files else Path(getattr(model, "__name__", "model"))
    try:
        source = inspect.getsource(model)
    except (OSError, TypeError):
        source = repr(model)
    return PlainPair(
        name=getattr(model, "__name__", type(model).__name__), path=path, sha256=hashlib.sha256(source.encode()).hexdigest(),
        loader=lambda first=False: (model, None), guide=guide, guide_label=_label(guide), doc=inspect.getdoc(model) or "",
    )
