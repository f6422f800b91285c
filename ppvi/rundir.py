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

import json
import os
import uuid
from pathlib import Path

import pandas as pd
import torch

from .errors import UsageError

__all__ = ["atomic_write", "write_json", "read_config", "write_trace", "read_trace", "save_checkpoint", "load_checkpoint"]

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
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json(path: Path, payload: dict) -> None:
    def write(temporary):
        with open(temporary, "w") as handle:
            json.dump(payload, handle, indent=2, default=str)
            handle.write("\n")

    atomic_write(path, write)


def read_config(run_dir: Path) -> dict:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise UsageError(f"{run_dir}: not a ppvi run directory (no {CONFIG}).")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UsageError(f"{path}: unreadable ({error}).") from None


def write_trace(run_dir: Path, trace: pd.DataFrame) -> None:
    atomic_write(Path(run_dir) / TRACE, lambda temporary: trace.to_csv(temporary, index=False))


def read_trace(run_dir: Path) -> pd.DataFrame:
    path = Path(run_dir) / TRACE
    if not path.is_file():
        raise UsageError(f"{run_dir}: no ELBO trace ({TRACE}); the run has not logged a step yet.")
    return pd.read_csv(path)


def save_checkpoint(run_dir: Path, state: dict) -> None:
    atomic_write(Path(run_dir) / PARAMS, lambda temporary: torch.save(state, temporary))


def load_checkpoint(run_dir: Path, map_location=None) -> dict | None:
    path = Path(run_dir) / PARAMS
    if not path.is_file():
        return None
    return torch.load(path, map_location=map_location, weights_only=True)
