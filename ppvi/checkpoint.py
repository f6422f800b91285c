"""The run directory while a fit runs: config.json, checkpoints, the trace so far, and the final files.

:class:`RunWriter` is the fit loop's one handle on its run directory. It loads the
previous checkpoint on ``--resume`` (and drops trace rows logged after it), writes
config.json, saves a checkpoint only from parameters known to be finite, records a
divergence, and writes the final trace and plot. Without a run directory (or on a
rank other than 0 of a data-parallel fit) every write is skipped.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pandas as pd
import torch

from . import rundir
from .errors import TrainingDiverged, UsageError
from .plots import save_trace_plot

__all__ = ["RunWriter", "CHECKPOINT_SECONDS", "TRACE_COLUMNS"]

CHECKPOINT_SECONDS = 10.0  # default wall time between checkpoints
TRACE_COLUMNS = ["restart", "step", "epoch", "elbo", "time_s"]


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _all_finite(tensors) -> bool:
    tensors = [tensor.detach() for tensor in tensors if tensor.is_floating_point()]
    if not tensors:
        return True
    # one reduction on the device and one read: checkpoints are sync points already
    return bool(torch.stack([torch.isfinite(tensor).all() for tensor in tensors]).all())


class RunWriter:
    """Checkpoints and files of one fit's run directory (``run_dir`` None: keep nothing)."""

    def __init__(self, run_dir, *, resume: bool, device: torch.device, writer: bool = True, checkpoint_every: int | None = None):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.resume, self.device, self.writer, self.checkpoint_every = resume, device, writer, checkpoint_every
        self.snapshots: list[dict | None] = []
        self.previous_config: dict = {}  # the interrupted run's config.json, on resume
        self.traces: list[pd.DataFrame | None] = []
        self._last_write = time.perf_counter()
        if self.run_dir is None and resume:
            raise UsageError("--resume needs the run directory to continue.")
        if self.run_dir is not None and self.run_dir.exists() and not self.run_dir.is_dir():
            raise UsageError(f"--out {self.run_dir}: a file of that name exists; choose a folder.")

    @contextlib.contextmanager
    def opened(self):
        """Hold the run directory for the block: its writer lock, then the previous checkpoint (on resume).

        A folder this fit created and left empty (the fit failed before its first write) is removed.
        """
        if self.run_dir is None or not self.writer:  # another rank of a data-parallel fit: reads only
            if self.run_dir is not None and self.resume:
                self._load_previous()
            yield self
            return
        created = not self.run_dir.exists()
        try:
            with rundir.lock(self.run_dir, takeover=self.resume):
                if self.resume:
                    self._load_previous()
                elif any(path.name != rundir.LOCK for path in self.run_dir.iterdir()):
                    raise UsageError(f"--out {self.run_dir}: the folder exists and is not empty; "
                                     f"choose a new folder or continue it with --resume {self.run_dir}.")
                yield self
        finally:
            if created and self.run_dir.is_dir() and not any(self.run_dir.iterdir()):
                self.run_dir.rmdir()

    def _load_previous(self) -> None:
        if not (self.run_dir / rundir.CONFIG).is_file():
            raise UsageError(f"--resume {self.run_dir}: nothing was saved there (no {rundir.CONFIG}); the fit stopped before its first write: start it again.")
        self.previous_config = rundir.read_config(self.run_dir)
        previous = rundir.load_checkpoint(self.run_dir, map_location=self.device)
        for leftover in self.run_dir.glob(".*.tmp"):  # a write cut short by a kill
            leftover.unlink(missing_ok=True)  # every rank of a data-parallel fit runs this
        self.snapshots = list(previous["restarts"]) if previous else []
        old = rundir.read_trace(self.run_dir) if self.snapshots and (self.run_dir / rundir.TRACE).exists() else None
        for restart, snapshot in enumerate(self.snapshots):  # drop rows logged after the last checkpoint
            self.traces.append(old[(old["restart"] == restart) & (old["step"] < snapshot["step"])] if old is not None else None)

    def start(self, config: dict, *, settings_differ) -> None:
        """Write config.json (status "running"); on resume, refuse a run whose settings changed."""
        if self.run_dir is None or not self.writer:
            return
        if (self.run_dir / rundir.CONFIG).is_file():
            old = rundir.read_config(self.run_dir)
            if old.get("model_sha256") != config["model_sha256"]:
                raise UsageError(f"--resume {self.run_dir}: the model file {config['model_path']} changed since the run started; start a new run.")
            if old.get("status") == "completed" and not self.snapshots:
                raise UsageError(f"--resume {self.run_dir}: the run is completed but its {rundir.PARAMS} is missing; nothing to continue: start a new run.")
            for key in settings_differ(old) + [key for key in ("options", "num_data") if old.get(key) != config.get(key)]:
                raise UsageError(f"--resume {self.run_dir}: {key} differs from the interrupted run.")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        rundir.write_json(self.run_dir / rundir.CONFIG, {**config, "status": "running"})

    def restore(self, restart: int, store, optimizer) -> tuple[int, float, pd.DataFrame | None]:
        """Put a resumed restart's state back; ``(start step, elapsed seconds, its trace so far)``."""
        if restart >= len(self.snapshots) or self.snapshots[restart] is None:
            self.snapshots.extend([None] * (restart + 1 - len(self.snapshots)))
            self.traces.extend([None] * (restart + 1 - len(self.traces)))
            return 0, 0.0, None
        snapshot = self.snapshots[restart]
        current = dict(store.named_parameters())
        rundir.check_params_match(self.run_dir / rundir.PARAMS, restart, snapshot["unconstrained"], current)
        with torch.no_grad():
            for name, value in snapshot["unconstrained"].items():
                if name in current:
                    current[name].copy_(value)
                else:  # created inside the loss (e.g. a baseline); unconstrained == constrained there
                    store[name] = value.to(self.device)
        optimizer.load_state_dict(snapshot["optimizer"])
        _set_rng_state(snapshot["rng"], self.device)
        return snapshot["step"], snapshot["elapsed_s"], self.traces[restart]

    def finished(self, restart: int) -> bool:
        """Whether a resumed restart had already finished (its budget, or converged before it)."""
        return restart < len(self.snapshots) and self.snapshots[restart] is not None and bool(self.snapshots[restart]["done"])

    def due(self, step: int, done: bool) -> bool:
        if done or (self.checkpoint_every and step % self.checkpoint_every == 0):
            return True
        return self.checkpoint_every is None and time.perf_counter() - self._last_write > CHECKPOINT_SECONDS

    def monitor_state(self, restart: int) -> dict | None:
        """The stopping rule's state saved with a resumed restart's checkpoint (None: none was saved)."""
        snapshot = self.snapshots[restart] if restart < len(self.snapshots) else None
        return None if snapshot is None else snapshot.get("monitor")

    def checkpoint(self, restart: int, *, store, optimizer, step: int, elapsed: float, seed: int, done: bool, trace: pd.DataFrame,
                   monitor=None) -> None:
        """Keep this restart's state, and write it with the trace; never from non-finite parameters."""
        self._last_write = time.perf_counter()
        self.traces[restart] = trace
        if not _all_finite(value for _, value in store.named_parameters()):
            raise TrainingDiverged(f"parameters became non-finite by step {step} (restart {restart})", step)
        self.snapshots[restart] = {
            "seed": seed,
            "step": step,
            "done": done,
            "elapsed_s": elapsed,
            "unconstrained": {name: value.detach().clone() for name, value in store.named_parameters()},
            "params": {name: store[name].detach().clone() for name in store.keys()},
            "optimizer": optimizer.state_dict(),
            "rng": _rng_state(self.device),
            **({"monitor": monitor.state_dict()} if monitor is not None else {}),
        }
        if self.run_dir is not None and self.writer:
            rundir.write_trace(self.run_dir, self.trace())
            rundir.save_checkpoint(self.run_dir, {"format": 1, "restarts": [s for s in self.snapshots if s is not None]})

    def trace(self) -> pd.DataFrame:
        frames = [frame for frame in self.traces if frame is not None and not frame.empty]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=TRACE_COLUMNS)

    def diverged(self, restart: int, error: TrainingDiverged, config: dict) -> None:
        """Keep the finite steps before the divergence and say which checkpoint is left."""
        if getattr(error, "trace", None) is not None:
            self.traces[restart] = error.trace
        if self.run_dir is None or not self.writer:
            return
        rundir.write_trace(self.run_dir, self.trace())
        rundir.write_json(self.run_dir / rundir.CONFIG, {**config, "status": "diverged", "error": str(error)})
        kept = self.snapshots[restart] if restart < len(self.snapshots) else None
        where = f"the last good checkpoint (step {kept['step']})" if kept is not None else "no checkpoint: none was due yet"
        error.args = (f"{error}; {self.run_dir} keeps {where}.",)

    def finish(self, config: dict, title: str) -> None:
        if self.run_dir is None or not self.writer:
            return
        rundir.write_json(self.run_dir / rundir.CONFIG, config)
        save_trace_plot(self.run_dir, self.trace(), title)
