"""Fitted runs rebuilt from their run directories, and one restart's parameters put back into Pyro.

:func:`load_run` reads what a fit left behind (config.json, params.pt,
elbo.csv) and rebuilds what :func:`ppvi.fit` returned: the model file, its
options and data exactly as the fit made them, and per restart a fresh
model/guide pair with its fitted parameters. :func:`restart_params` loads one
restart's parameters into Pyro's param store for the length of a ``with``
block and restores the store (and the RNG) afterwards, so diagnostics leave
no global state behind.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import pyro
import pyro.poutine as poutine
import torch

from . import rundir
from .data import Batch
from .errors import UsageError
from .pyro_util import rng_scope
from .results import FitResult, RestartResult
from .gallery import load_model

__all__ = ["load_run", "restart_params", "full_batch", "rng_scope"]


def load_run(run: str | Path | FitResult, *, device: str | torch.device = "cpu") -> FitResult:
    """Rebuild a completed fit from its run directory (a :class:`FitResult` passes through).

    Parameters
    ----------
    run : path or FitResult
        A run directory written by ``ppvi fit --out DIR`` / ``ppvi.fit(..., out=DIR)``.
    device : str or torch.device
        Where to put the data and parameters (default CPU, whatever the fit used).

    Returns
    -------
    FitResult
        With one :class:`RestartResult` per restart, each holding its own model and
        guide instances and the unconstrained parameters to load with :func:`restart_params`.

    Raises
    ------
    UsageError
        No such directory, no config.json or params.pt, a run that is not completed,
        in-memory data that cannot be rebuilt, or a model file changed since the fit.
    """
    if isinstance(run, FitResult):
        if not run.restarts:
            raise UsageError("the fit result holds no restarts.")
        return run
    run_dir = Path(run)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: no such run directory.")
    config = rundir.read_config(run_dir)
    status = config.get("status")
    if status != "completed":
        why = {
            "running": f"it was interrupted (or is still running); finish it with `ppvi fit --resume {run_dir}`",
            "diverged": f"the fit diverged ({config.get('error', 'non-finite ELBO')})",
        }.get(status, f"its status is {status!r}")
        raise UsageError(f"{run_dir}: the run is not completed: {why}.")
    device = torch.device(device)
    try:
        checkpoint = rundir.load_checkpoint(run_dir, map_location=device)
    except Exception as error:  # truncated or foreign file: torch raises several types
        raise UsageError(f"{run_dir / rundir.PARAMS}: unreadable ({type(error).__name__}: {str(error).splitlines()[0]}).") from None
    if checkpoint is None:
        raise UsageError(f"{run_dir}: incomplete run directory: no {rundir.PARAMS}.")
    snapshots = checkpoint.get("restarts", [])
    if len(snapshots) != config.get("restarts") or not all(snapshot.get("done") for snapshot in snapshots):
        raise UsageError(f"{run_dir}: incomplete run directory: {rundir.PARAMS} holds {sum(bool(s.get('done')) for s in snapshots)} of {config.get('restarts')} finished restart(s).")

    try:
        model_file = load_model(config["model"])
    except UsageError as error:
        raise UsageError(f"{run_dir}: cannot load the run's model: {error}") from None
    if model_file.sha256 != config.get("model_sha256"):
        raise UsageError(
            f"{run_dir}: the model file {model_file.path} changed since the fit (sha256 {model_file.sha256[:12]}..., "
            f"config.json has {str(config.get('model_sha256'))[:12]}...); the saved parameters may not fit it any more: refit."
        )
    guide = config.get("guide")
    if guide not in model_file.guides:
        raise UsageError(f"{run_dir}: model {model_file.name!r} has no guide {guide!r} any more.")
    options = model_file.make_options(config.get("options") or None)
    source = config.get("data", "built-in")
    if source == "in-memory":
        raise UsageError(f"{run_dir}: the run was fitted on in-memory data, which ppvi cannot rebuild; pass the FitResult itself instead of the folder.")
    with rng_scope(config.get("seed", 0)):  # loaders may draw (synthetic data are seeded by their own spec)
        data = model_file.load_data(None if source == "built-in" else source, options)
    data = {name: value.to(device) for name, value in data.items()}
    num_data = next(iter(data.values())).shape[0]
    if num_data != config.get("num_data"):
        raise UsageError(f"{run_dir}: the data ({source}) now has {num_data} points, the fit saw {config.get('num_data')}; the data changed since the fit.")

    trace = rundir.read_trace(run_dir)
    restarts = []
    for index, snapshot in enumerate(snapshots):
        with rng_scope(snapshot["seed"]):  # guides may initialise from the data (k-means): keep it reproducible
            model_fn, guide_fn = model_file.build_pair(guide, options, data)
        restarts.append(
            RestartResult(
                restart=index,
                seed=snapshot["seed"],
                params={name: value for name, value in snapshot["params"].items() if not name.startswith("__baseline")},
                unconstrained=dict(snapshot["unconstrained"]),
                elbo_trace=trace[trace["restart"] == index].reset_index(drop=True),
                model_fn=model_fn,
                guide_fn=guide_fn,
            )
        )
    return FitResult(
        params=None,
        elbo_trace=trace,
        estimator=config.get("estimator"),
        estimator_reason=config.get("estimator_reason", ""),
        device=device,
        seed=config.get("seed", 0),
        config=config,
        restarts=restarts,
        model_file=model_file,
        options=options,
        data=data,
        run_dir=run_dir,
    )


def full_batch(result: FitResult) -> Batch:
    """The whole data set as one batch (index = arange(N)), as the model and guide expect it."""
    num_data = next(iter(result.data.values())).shape[0]
    index = torch.arange(num_data, device=next(iter(result.data.values())).device)
    return Batch(result.data, index, num_data)


@contextlib.contextmanager
def restart_params(result: FitResult, restart: int | RestartResult) -> Iterator[RestartResult]:
    """Load one restart's fitted parameters into Pyro's param store for the block.

    The guide is run once (and the model against it) so that every parameter is
    registered with its constraint; then the saved unconstrained values are
    copied in. The previous param store and RNG state come back on exit.
    """
    chosen = result.restarts[restart] if isinstance(restart, int) else restart
    store = pyro.get_param_store()
    batch = full_batch(result)
    with store.scope(), rng_scope(chosen.seed):
        with torch.no_grad(), poutine.block():
            guide_trace = poutine.trace(chosen.guide_fn).get_trace(batch, result.options)
            poutine.replay(chosen.model_fn, trace=guide_trace)(batch, result.options)
        current = dict(store.named_parameters())
        missing = sorted(set(current) - set(chosen.unconstrained))
        if missing:
            raise UsageError(f"restart {chosen.restart}: the saved parameters lack {', '.join(missing)}; the model or guide changed since the fit.")
        with torch.no_grad():
            for name, value in chosen.unconstrained.items():
                if name in current:
                    if current[name].shape != value.shape:
                        raise UsageError(
                            f"restart {chosen.restart}: parameter {name!r} has shape {tuple(value.shape)} in the run but "
                            f"{tuple(current[name].shape)} in the guide now; the options or data changed since the fit."
                        )
                    current[name].copy_(value.to(current[name].device))
                elif not name.startswith("__baseline"):  # created inside a loss: unconstrained == constrained
                    store[name] = value
        yield chosen
