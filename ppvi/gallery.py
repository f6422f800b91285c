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
    Default fit settings for this model, e.g. ``{"steps": 1000, "lr": 0.05}``; ``"by_guide"``
    maps a guide name to its own settings over those (``{"lowrank": {"auto_stop": False}}``).

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

from .errors import UsageError, user_code

__all__ = ["ModelFile", "gallery_dir", "gallery_names", "load_model", "load_pair"]


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

    convention = "ppvi model file: model(batch, options) and GUIDES"

    def build_pair(self, guide_name=None, options=None, data=None):
        """``(model_fn, guide_fn)``, both called as ``fn(batch, options)``, with fresh state.

        A class (the model, or a ``GUIDES`` entry) is instantiated anew as ``Cls(options, data)``;
        a Pyro autoguide class (``{"autonormal": AutoNormal}``) is built from the file's model; a
        function is used as it is. Call it inside the restart's RNG scope and param store.
        """
        from .guides import instantiate

        guide_name = guide_name or self.default_guide
        if guide_name not in self.guides:
            raise UsageError(f"model {self.name!r} has no guide {guide_name!r}; its guides are: {', '.join(self.guides)}.")
        with user_code([self.path]):
            model_fn = instantiate(self.module.model, None, options, data)
            base = self.module.model if not isinstance(self.module.model, type) else model_fn
            guide_fn = instantiate(self.guides[guide_name], base, options, data)
        return model_fn, guide_fn

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
    """Load a gallery model by name (``"gmm"``) or a user's model file by path (``"./my_model.py"``).

    A path to a plain Pyro file (``model(x)`` without ``GUIDES``), or ``"file.py:model_fn"``, gives
    a :class:`ppvi.plain.PlainPair` (see :func:`load_pair`).
    """
    if callable(name_or_path) and not isinstance(name_or_path, (str, Path)):
        return load_pair(name_or_path)  # a plain Pyro callable, with AutoNormal by default
    if hasattr(name_or_path, "build_pair"):
        return name_or_path  # a ModelFile-like pair already (ppvi.plain.PlainPair)
    text = str(name_or_path)
    file_part, colon, _ = text.rpartition(":")
    if colon and file_part.endswith(".py"):
        return load_pair(text)
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
        with user_code([path]):
            module = _load_module(name, path)
    except SyntaxError as error:
        raise UsageError(f"model file {path}: syntax error at line {error.lineno}: {error.msg}.") from None
    from . import plain

    if not plain.is_ppvi_convention(module) and path.suffix == ".py" and name == path.stem and not str(path).startswith(str(gallery_dir())):
        return plain.from_file(path, "model", None, first_module=module)
    for required in ("model", "GUIDES"):
        if not hasattr(module, required):
            raise UsageError(
                f"model file {path} defines no {required!r}; a model file needs `model(batch, options)` "
                "and `GUIDES = {'name': guide, ...}` (see ppvi.gallery)."
            )
    if not module.GUIDES:
        raise UsageError(f"model file {path}: GUIDES is empty.")
    return ModelFile(name=name, path=path, module=module, sha256=hashlib.sha256(path.read_bytes()).hexdigest())


def load_pair(model, guide=None, *, seed: int = 0):
    """The model/guide pair behind every way of naming one, with :class:`ModelFile`'s interface.

    Parameters
    ----------
    model : ModelFile, str, Path or callable
        A ModelFile (returned as it is); a gallery name (``"gmm"``); a path ``"file.py"`` or
        ``"file.py:model_fn"``; or a Python callable with Pyro's own signature (``model(x, y=None)``).
        A file that defines ``model(batch, options)`` and ``GUIDES`` follows ppvi's convention
        (:class:`ModelFile`); any other file or callable is plain Pyro (:class:`ppvi.plain.PlainPair`).
    guide : optional
        A name in the file's ``GUIDES`` or a function the file defines; an autoguide name
        (``"AutoNormal"``, ``"AutoDiagonalNormal"``, ``"AutoMultivariateNormal"``,
        ``"AutoLowRankMultivariateNormal"``, ``"AutoDelta"``, ``"AutoLaplaceApproximation"``,
        ``"AutoIAFNormal"``); an autoguide class or instance; a callable; or ``"file.py:guide_fn"``.
        None: ppvi files take their first ``GUIDES`` entry; plain files their ``guide`` function if
        they define one, else ``AutoNormal``; callables ``AutoNormal`` (Pyro's usual first choice).
    seed : int
        Seed in force while a plain file is first imported (module-level data and weights).

    Returns
    -------
    ModelFile or PlainPair
        ``.default_guide`` is the guide chosen here; ``.build_pair(guide_name, options, data)``.
    """
    from . import plain

    if isinstance(model, ModelFile) or hasattr(model, "build_pair"):
        return model
    if callable(model) and not isinstance(model, (str, Path)):
        return plain.from_callables(model, guide)
    text = str(model)
    file_part, colon, fn_name = text.rpartition(":")
    if colon and file_part.endswith(".py"):
        path = Path(file_part).expanduser()
        if not path.is_file():
            raise UsageError(f"model file {file_part!r} does not exist.")
        return plain.from_file(path, fn_name, guide, seed=seed)
    if text.endswith(".py") or "/" in text or "\\" in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise UsageError(f"model file {text!r} does not exist.")
        path = path.resolve()
        from .pyro_util import rng_scope

        with user_code([path]), rng_scope(seed):
            module = _load_module(path.stem, path)
        if plain.is_ppvi_convention(module):
            model_file = ModelFile(name=path.stem, path=path, module=module, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
            return _with_guide(model_file, guide)
        return plain.from_file(path, "model", guide, seed=seed, first_module=module)
    return _with_guide(load_model(text), guide)


def _with_guide(model_file: ModelFile, guide):
    if guide is not None and guide not in model_file.guides:
        raise UsageError(f"model {model_file.name!r} has no guide {guide!r}; its guides are: {', '.join(model_file.guides)}.")
    return model_file
