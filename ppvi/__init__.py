"""ppvi: variational inference for Pyro model/guide pairs.

The public API, re-exported explicitly::

    result = ppvi.fit("gmm", guide="meanfield", steps=500)
    frame = ppvi.compare_runs(["runs/a", "runs/b"])
"""

__version__ = "0.1.0"

from .compare import compare_runs, plot_traces
from .data import Batch
from .errors import DataError, TrainingDiverged, UsageError
from .estimators import ESTIMATORS, choose_estimator, inspect_sites
from .fit import FitResult, RestartResult, fit, resolve_device, resume
from .gallery import gallery_names, load_model

__all__ = [
    "Batch",
    "DataError",
    "ESTIMATORS",
    "FitResult",
    "RestartResult",
    "TrainingDiverged",
    "UsageError",
    "choose_estimator",
    "compare_runs",
    "fit",
    "gallery_names",
    "inspect_sites",
    "load_model",
    "plot_traces",
    "resolve_device",
    "resume",
]
