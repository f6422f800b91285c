"""ppvi: variational inference for Pyro model/guide pairs.

The public API, re-exported explicitly::

    result = ppvi.fit("gmm", guide="meanfield", steps=500)
    frame = ppvi.compare_runs(["runs/a", "runs/b"])
"""

from . import guides
from .compare import compare_runs, plot_traces
from .config import FitConfig
from .data import Batch
from .errors import DataError, TrainingDiverged, UsageError
from .estimators import ESTIMATORS, EstimatorSettings, choose_estimator, inspect_sites
from .evaluate import elbo_per_point, evaluate, iwae_bound, log_weights, score
from .fitting import FitResult, RestartResult, fit, resolve_device, resume
from .gallery import gallery_names, load_model
from .gradvar import gradient_variance, plot_gradient_variance
from .guides import auto, standard_guides
from .runs import load_run
from .version import __version__  # noqa: F401 - ppvi.__version__
from .worked_example import worked_example

# ppvi.diagnostics imports ArviZ (seconds): its names load on first use.
_DIAGNOSTICS = ("diagnose", "to_inference_data")


def __getattr__(name):
    if name in _DIAGNOSTICS:
        from . import diagnostics

        return getattr(diagnostics, name)
    raise AttributeError(f"module 'ppvi' has no attribute {name!r}")


__all__ = [
    "Batch",
    "auto",
    "guides",
    "standard_guides",
    "DataError",
    "ESTIMATORS",
    "EstimatorSettings",
    "FitConfig",
    "FitResult",
    "RestartResult",
    "TrainingDiverged",
    "UsageError",
    "choose_estimator",
    "compare_runs",
    "diagnose",
    "elbo_per_point",
    "evaluate",
    "fit",
    "gallery_names",
    "gradient_variance",
    "inspect_sites",
    "iwae_bound",
    "load_model",
    "load_run",
    "log_weights",
    "plot_gradient_variance",
    "plot_traces",
    "resolve_device",
    "resume",
    "score",
    "to_inference_data",
    "worked_example",
]
