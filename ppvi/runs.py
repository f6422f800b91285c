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
import sys
from pathlib import Path
from typing import Iterator

import torch

import pyro
import pyro.poutine as poutine

from . import rundir
from .batching import num_points
from .data import Batch
from .errors import UsageError
from .gallery import load_model
from .pyro_util import rng_scope
from .results import FitResult, RestartResult

__all__ = ["load_run", "resolve_model", "restart_params", "full_batch", "rng_scope"]


def load_run(run: str | Path | FitResult, *, device: str | torch.device = "cpu", model=None, trust_model: bool = False, log_fn=None) -> FitResult:
    """Rebuild a completed fit from its run directory (a :class:`FitResult` passes through).

    Parameters
    ----------
    run : path or FitResult
        A run directory written by ``ppvi fit --out DIR`` / ``ppvi.fit(..., out=DIR)``.
    device : str or torch.device
        Where to put the data and parameters (default CPU, whatever the fit used).
    model : str or path, optional
        The model file of a run fitted on a user's file: a run directory is data, never code, so the
        file config.json names is imported only once the user names it (see :func:`resolve_model`).
    trust_model : bool
        Import the model file config.json names (its path and sha256 go to ``log_fn``).
    log_fn : callable, optional
        Receives the note about a trusted model file (default: stderr).

    Returns
    -------
    FitResult
        With one :class:`RestartResult` per restart, each holding its own model and
        guide instances and the unconstrained parameters to load with :func:`restart_params`.

    Raises
    ------
    UsageError
        No such directory, no config.json or params.pt, a run file that ppvi did not write, a run that is
        not completed, in-memory data that cannot be rebuilt, a model file not named by the user, or a
        model file changed since the fit.
    """
    if isinstance(run, FitResult):
        if not run.restarts:
            raise UsageError("the fit result holds no restarts.")
        return run
    run_dir = Path(run)
    device = torch.device(device)
    config, snapshots = _completed_run(run_dir, device)
    model_file = resolve_model(config, run_dir, model=model, trust=trust_model, log_fn=log_fn)
    guide = config.get("guide")
    if guide not in model_file.guides:
        raise UsageError(f"{run_dir}: model {model_file.name!r} has no guide {guide!r} any more.")
    options = model_file.make_options(config.get("options") or None)
    data = _run_data(run_dir, config, model_file, options, device)
    trace = rundir.read_trace(run_dir)
    restarts = []
    for index, snapshot in enumerate(snapshots):
        with rng_scope(snapshot["seed"]):  # guides may initialise from the data (k-means): keep it reproducible
            model_fn, guide_fn = model_file.build_pair(guide, options, data)
        restarts.append(RestartResult(
            restart=index, seed=snapshot["seed"],
            params={name: value for name, value in snapshot["params"].items() if not name.startswith("__baseline")},
            unconstrained=dict(snapshot["unconstrained"]), elbo_trace=trace[trace["restart"] == index].reset_index(drop=True),
            model_fn=model_fn, guide_fn=guide_fn,
        ))
    return FitResult(
        params=None, elbo_trace=trace, estimator=config.get("estimator"), estimator_reason=config.get("estimator_reason", ""),
        device=device, seed=config.get("seed", 0), config=config, restarts=restarts, model_file=model_file, options=options,
        data=data, run_dir=run_dir,
    )


def _completed_run(run_dir: Path, device: torch.device) -> tuple[dict, list]:
    """config.json and the per-restart snapshots of a completed run (a UsageError for anything else)."""
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
    checkpoint = rundir.load_checkpoint(run_dir, map_location=device)
    if checkpoint is None:
        raise UsageError(f"{run_dir}: incomplete run directory: no {rundir.PARAMS}.")
    snapshots = checkpoint["restarts"]
    if len(snapshots) != config.get("restarts") or not all(snapshot["done"] for snapshot in snapshots):
        finished = sum(bool(s["done"]) for s in snapshots)
        raise UsageError(f"{run_dir}: incomplete run directory: {rundir.PARAMS} holds {finished} of {config.get('restarts')} finished restart(s).")
    return config, snapshots


def _run_data(run_dir: Path, config: dict, model_file, options, device: torch.device) -> dict:
    """The run's data, loaded again as the fit loaded it, and checked to be the same size."""
    source = config.get("data", "built-in")
    if source == "in-memory":
        raise UsageError(f"{run_dir}: the run was fitted on in-memory data, which ppvi cannot rebuild; pass the FitResult itself instead of the folder.")
    with rng_scope(config.get("seed", 0)):  # loaders may draw (synthetic data are seeded by their own spec)
        data = model_file.load_data(None if source == "built-in" else source, options)
    data = {name: value.to(device) for name, value in data.items()}
    num_data = num_points(data)
    heldout = config.get("heldout")
    expected = config.get("num_data", 0) + (heldout.get("num_data", 0) if isinstance(heldout, dict) else 0)  # early stopping held some out
    if num_data != expected:
        raise UsageError(f"{run_dir}: the data ({source}) now has {num_data} points, the fit saw {expected}; the data changed since the fit.")
    return data


def full_batch(result: FitResult) -> Batch:
    """The whole data set as one batch (index = arange(N)), as the model and guide expect it."""
    num_data = num_points(result.data)
    index = torch.arange(num_data, device=result.device)
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
        where = Path(result.run_dir) / rundir.PARAMS if result.run_dir is not None else Path(rundir.PARAMS)
        rundir.check_params_match(where, chosen.restart, chosen.unconstrained, current)
        with torch.no_grad():
            for name, value in chosen.unconstrained.items():
                if name in current:
                    current[name].copy_(value.to(current[name].device))
                elif not name.startswith("__baseline"):  # created inside a loss: unconstrained == constrained
                    store[name] = value
        yield chosen


def resolve_model(config: dict, run_dir: Path, *, model=None, trust: bool = False, log_fn=None):
    """The run's model, loaded only as the user allows: a run directory is data, never code.

    A gallery name in config.json loads by name. A model *file* named by config.json is imported only
    when the user names it (``model``, e.g. ``--model PATH``) or trusts it (``trust``, ``--trust-model``,
    which reports the path and sha256 through ``log_fn``). Before any import the file's sha256 must match
    config.json's ``model_sha256``.

    Parameters
    ----------
    config : dict
        The run's config.json, as :func:`read_config` returns it.
    run_dir : path
        The run directory (for messages).
    model : str or path, optional
        The model file (or gallery name) the user named for this run.
    trust : bool
        Load the file config.json names.
    log_fn : callable, optional
        Receives the path and sha256 of a trusted file (default: printed to stderr).

    Returns
    -------
    ppvi.gallery.ModelFile

    Raises
    ------
    UsageError
        An untrusted model file (the message names it and both ways to allow it), a file that is missing
        or changed since the fit, or a gallery name that no longer exists.
    """
    named = str(config["model"])
    where = f"{Path(run_dir) / rundir.CONFIG}"
    if model is None and not _is_file_name(named):
        try:
            return _checked(load_model(named), config, run_dir)
        except UsageError as error:
            raise UsageError(f"{run_dir}: cannot load the run's model: {error}") from None
    chosen = Path(str(model)).expanduser() if model is not None else Path(named)
    if model is not None and not _is_file_name(str(model)):
        return _checked(load_model(str(model)), config, run_dir)
    if not chosen.is_file():
        raise UsageError(f"{where} names the model file {chosen}, which does not exist; name the file with --model PATH.")
    digest = rundir.model_sha256(chosen)
    expected = config.get("model_sha256")
    if expected is not None and digest != expected:
        raise UsageError(
            f"{run_dir}: the model file {chosen} changed since the fit (sha256 {digest[:12]}..., config.json has "
            f"{str(expected)[:12]}...); the saved parameters may not fit it any more: refit."
        )
    if model is None and not trust:
        raise UsageError(
            f"{where} names the model file {chosen}; ppvi imports no Python file named by a run directory until you "
            f"name it (a run directory is data, never code). If you trust that file, name it: --model {chosen} "
            f"(to resume: ppvi fit {chosen} --resume {run_dir}), or add --trust-model to load the file config.json "
            f"names (sha256 {digest})."
        )
    if model is None:
        (log_fn or _to_stderr)(f"trusting the model file {chosen.resolve()} (sha256 {digest}), named by {where}")
    return load_model(str(chosen))


def _is_file_name(text: str) -> bool:
    return text.endswith(".py") or "/" in text or "\\" in text


def _checked(model_file, config: dict, run_dir: Path):
    expected = config.get("model_sha256")
    if expected is not None and model_file.sha256 != expected:
        raise UsageError(
            f"{run_dir}: the model file {model_file.path} changed since the fit (sha256 {model_file.sha256[:12]}..., "
            f"config.json has {str(expected)[:12]}...), or config.json was edited to name another model; "
            "the saved parameters may not fit it any more: refit."
        )
    return model_file


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)
