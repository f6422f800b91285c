"""Finding and loading model files: gallery names and users' own paths alike.

A model file is a plain Python module. ppvi reads these names from it:

``model(batch, options)``
    The Pyro model (a function, or a class that ppvi instantiates once per fit
    as ``Model(options, data)`` and then calls).
``GUIDES``
    A dict from guide name to guide; the first entry is the default. A guide is
    a function ``guide(batch, options)`` or a class instantiated once per fit
    as ``Guide(options, data)`` (use a class when the guide owns neural
    networks or initialises from the data).
``Options`` (optional)
    A dataclass; each field becomes a ``--kebab-case`` command-line option
    (help text from ``field(metadata={"help": ...})``). ``__post_init__`` may
    raise ``ValueError`` for invalid values.
``load_data(source, options)`` (optional)
    Returns a dict of per-point tensors (leading dimension = data points).
    ``source`` is None for the built-in default, else the ``--data`` string.
    Without it, ``--data FILE.csv`` is required and read into ``{"x": ...}``.
``summarize(result)`` (optional)
    Returns a dict of numbers worth printing after a fit (e.g. cluster accuracy).
``FIT_DEFAULTS`` (optional)
    Default fit settings for this model, e.g. ``{"steps": 1000, "lr": 0.05}``.

The gallery lives in ``models/`` of the source tree and ships inside the wheel
as ``ppvi/gallery/``; both are found, so an installed ppvi needs no checkout.
A user's file is loaded by path with no registration step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

__all__ = ["ModelFile", "gallery_dir", "gallery_names", "load_model"]


def gallery_dir() -> Path:
    """The folder holding the gallery's model files (installed wheel, else the source checkout)."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "gallery", package.parent / "models"):
        if candidate.is_dir():
            return candidate
    raise RuntimeError("ppvi's model gallery is missing from this installation.")


def gallery_names() -> list[str]:
    return sorted(path.stem for path in gallery_dir().glob("*.py") if not path.stem.startswith("_"))


@dataclass(frozen=True)
class ModelFile:
    """A loaded model file: its module plus what ppvi reads from it."""

    name: str
    path: Path
    module: types.ModuleType
    sha256: str

    @property
    def doc(self) -> str:
        return (self.module.__doc__ or "").strip()

    @property
    def title(self) -> str:
        return self.doc.splitlines()[0] if self.doc else self.name

    @property
    def guides(self) -> dict:
        return dict(self.module.GUIDES)

    @property
    def default_guide(self) -> str:
        return next(iter(self.module.GUIDES))

    @property
    def options_class(self):
        return getattr(self.module, "Options", None)

    @property
    def fit_defaults(self) -> dict:
        return dict(getattr(self.module, "FIT_DEFAULTS", {}))

    def make_options(self, values=None):
        """Build the model's Options from a dict (or pass an Options instance through)."""
        cls = self.options_class
        if cls is None:
            if values:
                raise UsageError(f"model {self.name!r} takes no options (got {', '.join(values)}).")
            return None
        if isinstance(values, cls):
            return values
        values = dict(values or {})
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"model {self.name!r} has no option {unknown[0]!r}; its options are: {', '.join(sorted(known))}.")
        from .pyro_util import finite

        hints = typing.get_type_hints(cls)
        for name, value in values.items():  # nan passes `scale > 0` checks in __post_init__: refuse non-finite numbers first
            if hints.get(name) is float and isinstance(value, float):
                finite(name.replace("_", "-"), value)
        try:
            return cls(**values)
        except (ValueError, TypeError) as error:
            raise UsageError(f"model {self.name!r}: {error}") from None

    def build_pair(self, guide: str, options, data: dict) -> tuple:
        """A fresh ``(model_fn, guide_fn)``: a class in the file is instantiated as ``cls(options, data)``
        (it may own networks or initialise from the data), a function is used as it is."""
        return _instantiate(self.module.model, options, data), _instantiate(self.guides[guide], options, data)

    def load_data(self, source, options) -> dict:
        from .data import check_points, read_csv

        loader = getattr(self.module, "load_data", None)
        if loader is not None:
            data = loader(source, options)
        elif source is None:
            raise UsageError(f"model {self.name!r} has no built-in data: give --data FILE.csv.")
        else:
            data = {"x": read_csv(source)}
        if not isinstance(data, dict):
            data = {"x": data}
        sizes = {name: value.shape[0] for name, value in data.items()}
        if len(set(sizes.values())) != 1:
            raise UsageError(f"model {self.name!r}: data tensors disagree on the number of points: {sizes}.")
        for name, value in data.items():
            if value.is_floating_point():
                check_points(value.reshape(value.shape[0], -1), name=f"data {name!r}", min_rows=1)
        return data


def _instantiate(component, options, data):
    if not isinstance(component, type):
        return component
    try:
        return component(options, data)
    except ValueError as error:
        raise UsageError(f"{component.__name__}: {error}") from None


def _load_module(name: str, path: Path) -> types.ModuleType:
    module_name = f"ppvi_models.{name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up here
    try:
        spec.loader.exec_module(module)
    except Exception:
        sys.modules.pop(module_name, None)
        raise
    return module


def load_model(name_or_path: str | Path) -> ModelFile:
    """Load a gallery model by name (``"gmm"``) or a user's model file by path (``"./my_model.py"``)."""
    text = str(name_or_path)
    if text.endswith(".py") or "/" in text or "\\" in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise UsageError(f"model file {text!r} does not exist.")
        name = path.stem
    else:
        path = gallery_dir() / f"{text}.py"
        if not path.is_file() or text.startswith("_"):
            raise UsageError(f"unknown model {text!r}; the gallery has: {', '.join(gallery_names())} (or give a path to a .py file).")
        name = text
    path = path.resolve()
    try:
        module = _load_module(name, path)
    except SyntaxError as error:
        raise UsageError(f"model file {path}: syntax error at line {error.lineno}: {error.msg}.") from None
    for required in ("model", "GUIDES"):
        if not hasattr(module, required):
            raise UsageError(
                f"model file {path} defines no {required!r}; a model file needs `model(batch, options)` "
                "and `GUIDES = {'name': guide, ...}` (see ppvi.gallery)."
            )
    if not module.GUIDES:
        raise UsageError(f"model file {path}: GUIDES is empty.")
    return ModelFile(name=name, path=path, module=module, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
