"""The run directory: what a fit leaves behind, written atomically.

    config.json   everything needed to rerun (model, guide, estimator + reason, seed, device, versions)
    elbo.csv      the trace: restart, step, epoch, elbo, time_s (one row per step)
    params.pt     per-restart parameter state, optimizer state and RNG state (loads with weights_only=True)
    elbo.png      the trace plotted

Each file is written to a temporary name in the same folder and renamed into
place, so a run killed at any moment leaves the previous complete version of
every file, and ``--resume`` continues from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import pickle
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Iterator

import pandas as pd
import torch

from .errors import UsageError

__all__ = [
    "atomic_write", "write_json", "read_config", "write_trace", "read_trace", "save_checkpoint", "load_checkpoint",
    "check_checkpoint", "check_params_match", "params_finite", "lock", "model_sha256", "not_a_run_file",
]

CONFIG, TRACE, PARAMS, PLOT = "config.json", "elbo.csv", "params.pt", "elbo.png"


def atomic_write(path: Path, write_fn) -> None:
    """Call ``write_fn(temporary_path)``, then rename the result onto ``path``."""
    path = Path(path)
    # A fresh name that write_fn creates itself, so the file gets the usual umask permissions
    # (mkstemp would leave every run file readable by its owner only).
    temporary = str(path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write_fn(temporary)
        os.replace(temporary, path)
    except OSError as error:  # name the file being written, not its temporary name
        Path(temporary).unlink(missing_ok=True)
        raise type(error)(error.errno, error.strerror or str(error), str(path)) from error
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json(path: Path, payload: dict) -> None:
    def write(temporary):
        with open(temporary, "w") as handle:
            json.dump(payload, handle, indent=2, default=str)
            handle.write("\n")

    atomic_write(path, write)


def not_a_run_file(path: Path, why: str) -> UsageError:
    """The one message for a run-directory file that ppvi did not write (or that was damaged)."""
    return UsageError(f"{path}: not a ppvi run file ({why}).")


# config.json: the keys every reader needs, those --resume needs, and the types a fit writes
_NUMBER, _INT, _TEXT, _DICT = (int, float), (int,), (str,), (dict,)
CONFIG_REQUIRED = ("model", "guide")
RESUME_KEYS = ("data", "options", "steps", "batch_size", "lr", "num_particles", "device", "seed", "restarts", "estimator_requested")
CONFIG_TYPES = {
    "model": _TEXT, "guide": _TEXT, "model_sha256": _TEXT, "model_path": _TEXT, "status": _TEXT, "estimator": _TEXT,
    "estimator_requested": _TEXT, "data": _TEXT, "device": _TEXT, "options": _DICT, "estimator_settings": _DICT,
    "seed": _INT, "restarts": _INT, "num_data": _INT, "steps": _INT, "epochs": _INT, "batch_size": _INT,
    "num_particles": _INT, "checkpoint_every": _INT, "lr": _NUMBER, "lr_decay": _NUMBER,
}
STATUSES = ("running", "completed", "diverged")
# [low, high): the seed seeds numpy too (below 2**32); counts are positive; rates positive (tiny is allowed)
CONFIG_RANGES = {
    "seed": (0, 2**32), "restarts": (1, math.inf), "num_data": (1, math.inf), "steps": (1, math.inf), "epochs": (1, math.inf),
    "batch_size": (1, math.inf), "num_particles": (1, math.inf), "checkpoint_every": (1, math.inf),
    "lr": (math.ulp(0.0), math.inf), "lr_decay": (math.ulp(0.0), math.inf),
}


def read_config(run_dir: Path, *, require: tuple = ()) -> dict:
    """config.json of a run directory, checked against its schema.

    Raises
    ------
    UsageError
        No folder or no config.json (nothing was saved: start the fit again), or a file that is not
        a JSON object with the keys and types a fit writes ("RUN_DIR/config.json: not a ppvi run file (...)");
        ``require`` names further keys that must be present (:data:`RESUME_KEYS` for ``--resume``).
    """
    run_dir = Path(run_dir)
    path = run_dir / CONFIG
    if not run_dir.exists():
        raise UsageError(f"{run_dir}: no such run directory; nothing was saved there (a fit stopped before its first checkpoint "
                         "leaves nothing to resume): start the fit again.")
    if not path.is_file():
        raise UsageError(f"{run_dir}: not a ppvi run directory (no {CONFIG}); if a fit was stopped before writing it, nothing was saved: start the fit again.")
    try:
        payload = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise not_a_run_file(path, "not UTF-8 text") from None
    except (json.JSONDecodeError, RecursionError) as error:
        raise not_a_run_file(path, f"not JSON: {str(error)[:80]}") from None
    if not isinstance(payload, dict):
        raise not_a_run_file(path, f"a JSON {type(payload).__name__}, where a fit writes an object")
    for key in (*CONFIG_REQUIRED, *require):
        if key not in payload:
            raise not_a_run_file(path, f"no {key!r} key")
    for key, kinds in CONFIG_TYPES.items():
        value = payload.get(key)
        if value is None and key not in CONFIG_REQUIRED:
            continue  # optional, or null where a fit writes null (epochs, batch_size)
        if isinstance(value, bool) or not isinstance(value, kinds) or (kinds is _TEXT and key in CONFIG_REQUIRED and not value):
            kind = {_NUMBER: "number", _INT: "integer", _TEXT: "non-empty string", _DICT: "object"}[kinds]
            raise not_a_run_file(path, f"{key!r} is {json.dumps(value)[:40]}, where a fit writes a {kind}")
        if key == "status" and value not in STATUSES:
            raise not_a_run_file(path, f"status {json.dumps(value)[:40]}; a fit writes one of {', '.join(STATUSES)}")
        low, high = CONFIG_RANGES.get(key, (-math.inf, math.inf))
        if kinds in (_NUMBER, _INT) and not ((isinstance(value, int) or math.isfinite(value)) and low <= value < high):
            raise not_a_run_file(path, f"{key!r} is {value}, where a fit writes a finite number in [{low:g}, {high:g})")
    return payload


def write_trace(run_dir: Path, trace: pd.DataFrame) -> None:
    atomic_write(Path(run_dir) / TRACE, lambda temporary: trace.to_csv(temporary, index=False))


TRACE_COLUMNS = ("restart", "step", "elbo")


def read_trace(run_dir: Path) -> pd.DataFrame:
    """elbo.csv of a run directory, checked: readable CSV, restart/step/elbo columns, numbers, at least one row."""
    path = Path(run_dir) / TRACE
    if not path.is_file():
        raise UsageError(f"{run_dir}: no ELBO trace ({TRACE}); the run has not logged a step yet.")
    try:
        trace = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise not_a_run_file(path, "the file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as error:
        raise not_a_run_file(path, f"not a readable CSV: {str(error).strip().splitlines()[0][:80]}") from None
    missing = [column for column in TRACE_COLUMNS if column not in trace.columns]
    if missing:
        raise not_a_run_file(path, f"no {', '.join(missing)} column; it has {', '.join(map(str, trace.columns[:6]))}")
    if trace.empty:
        raise not_a_run_file(path, "no rows")
    for column in (*TRACE_COLUMNS, "epoch", "time_s"):
        if column in trace.columns and not pd.api.types.is_numeric_dtype(trace[column]):
            bad = trace[column][pd.to_numeric(trace[column], errors="coerce").isna()].iloc[0]
            raise not_a_run_file(path, f"column {column!r} holds the text {str(bad)[:30]!r}, where a fit writes numbers")
    for column in ("restart", "step"):
        if not pd.api.types.is_integer_dtype(trace[column]):
            raise not_a_run_file(path, f"column {column!r} holds non-integers")
    return trace


def save_checkpoint(run_dir: Path, state: dict) -> None:
    """Write params.pt atomically; a failed write (full disk) is an OSError naming the file, and the previous file stays."""

    def write(temporary):
        try:
            torch.save(state, temporary)
        except RuntimeError as error:  # torch reports a failed write (ENOSPC) as RuntimeError("... file write failed")
            if "write" not in str(error):
                raise
            full = shutil.disk_usage(Path(temporary).parent).free < 16 * 2**20
            raise OSError(errno.ENOSPC if full else errno.EIO, "No space left on device" if full else _first_line(error), temporary) from error

    atomic_write(Path(run_dir) / PARAMS, write)


def load_checkpoint(run_dir: Path, map_location=None) -> dict | None:
    """params.pt of a run directory (None when there is none), loaded with ``weights_only=True`` and checked.

    Raises
    ------
    UsageError
        A file that is truncated, not a PyTorch file, a bare tensor or another structure than a fit
        writes ("RUN_DIR/params.pt: not a ppvi run file (...)"), or one holding pickled objects other
        than tensors, which is never unpickled.
    """
    path = Path(run_dir) / PARAMS
    if not path.is_file():
        return None
    try:
        with warnings.catch_warnings():  # a foreign pickle protocol draws a warning before the refusal
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "global" in str(error).lower():  # weights_only refused a class or function: code in the pickle
            raise UsageError(f"{path}: params.pt holds objects other than tensors; ppvi does not load it (a fit writes only tensors and numbers).") from None
        raise not_a_run_file(path, f"unreadable: {_first_line(error)}") from None
    except Exception as error:  # truncated or foreign file: torch raises RuntimeError, EOFError, zipfile and pickle errors
        raise not_a_run_file(path, f"unreadable: {type(error).__name__}: {_first_line(error)}") from None
    check_checkpoint(path, state)
    return state


SNAPSHOT_TYPES = {
    "seed": int, "step": int, "done": bool, "elapsed_s": (int, float), "unconstrained": dict, "params": dict, "optimizer": dict, "rng": dict,
}


def check_checkpoint(path: Path, state) -> None:
    """Raise "not a ppvi run file" unless ``state`` has the structure a fit saves in params.pt."""
    if isinstance(state, torch.Tensor):
        raise not_a_run_file(path, "it holds a bare tensor, where a fit saves a dict of restarts")
    if not isinstance(state, dict) or not isinstance(state.get("restarts"), list):
        raise not_a_run_file(path, f"it holds a {type(state).__name__} without a 'restarts' list")
    if state.get("format", 1) != 1:
        raise not_a_run_file(path, f"format {state.get('format')!r}; this ppvi reads format 1")
    for index, snapshot in enumerate(state["restarts"]):
        if not isinstance(snapshot, dict):
            raise not_a_run_file(path, f"restart {index} is a {type(snapshot).__name__}, not a dict")
        for key, kind in SNAPSHOT_TYPES.items():
            value = snapshot.get(key)
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                raise not_a_run_file(path, f"restart {index} has no {key!r} of the type a fit writes")
        for key in ("unconstrained", "params"):
            for name, value in snapshot[key].items():
                if not isinstance(name, str) or not isinstance(value, torch.Tensor):
                    raise not_a_run_file(path, f"restart {index}: {key}[{str(name)[:30]!r}] is not a tensor")


def check_params_match(path: Path, restart: int, saved: dict, current: dict) -> None:
    """Raise a UsageError unless the saved unconstrained parameters fit the model and guide built now.

    ``current`` is the param store's ``named_parameters()`` after one run of the guide (and model): every
    one of them must be saved, with the same shape (saved names beyond them are created inside a loss).
    """
    missing = sorted(set(current) - set(saved))
    if missing:
        raise UsageError(
            f"{path}: restart {restart}: the saved parameters lack {', '.join(missing[:5])}; the file was saved by "
            "another model or guide, or the model or guide changed since the fit."
        )
    for name, value in current.items():
        if tuple(saved[name].shape) != tuple(value.shape):
            raise UsageError(
                f"{path}: restart {restart}: parameter {name!r} has shape {tuple(saved[name].shape)} in the file but "
                f"{tuple(value.shape)} in the guide now; the file was saved by another model, or the options or data changed since the fit."
            )


def params_finite(state) -> bool:
    """Whether every floating-point tensor in ``state`` (nested dicts, lists, tuples) is finite.

    One host-device sync for the whole state: call it where a checkpoint is written (already a sync
    point), and write the checkpoint only when it returns True.
    """
    per_device: dict = {}
    for tensor in _tensors(state):
        if tensor.is_floating_point() or tensor.is_complex():
            per_device.setdefault(tensor.device, []).append(torch.isfinite(tensor).all())
    return all(bool(torch.stack(flags).all()) for flags in per_device.values())


def _tensors(state):
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from _tensors(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _tensors(value)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:120] if text else type(error).__name__


LOCK = ".ppvi.lock"


@contextlib.contextmanager
def lock(run_dir: Path, *, takeover: bool = False) -> Iterator[Path]:
    """Hold the run directory's writer lock for the block: one writer per run directory.

    The lock is ``fcntl.flock`` on ``RUN_DIR/.ppvi.lock``, which holds the writer's PID; the kernel
    releases it when the writer dies, however it dies, and the file is removed on a normal exit.

    Parameters
    ----------
    run_dir : path
        The run directory (created if missing).
    takeover : bool
        True for ``--resume``: continue after a writer that died (its lock file is still there).
        Without it a leftover lock file means a killed fit, which only ``--resume`` continues.

    Raises
    ------
    UsageError
        Another live process writes this run directory (its PID named), or, without ``takeover``,
        a previous writer was killed here.
    """
    import fcntl

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    while True:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(handle, 64).decode(errors="replace").strip() or "unknown"
            os.close(handle)
            raise UsageError(
                f"{run_dir}: another ppvi process (PID {holder}) is writing this run directory; one writer per run "
                f"directory: wait for it to finish, or choose another --out."
            ) from None
        try:
            same_file = os.path.samestat(os.fstat(handle), os.stat(path))
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(handle)  # the holder removed the file between our open and our lock: take the new one
    try:
        previous = os.read(handle, 64).decode(errors="replace").strip()
        if previous and not takeover:
            raise UsageError(
                f"{run_dir}: a previous ppvi fit (PID {previous}) was stopped while writing here; "
                f"continue it with `ppvi fit --resume {run_dir}`, or choose another --out."
            )
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        path.unlink(missing_ok=True)  # still holding the lock: nobody else sees a half-removed state
        os.close(handle)


def model_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read without importing it."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
