"""The fit loop: data in, estimator chosen (with the reason), SVI steps, ELBO trace and checkpoints out.

One function, :func:`fit`, serves the command line, notebooks and tests. The
loop never forces a host-device sync per step: each step's ELBO is written
into a device buffer that is read back every ``SYNC_EVERY`` steps (and at
checkpoints), which is also when NaN/inf is detected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import pyro
import pyro.poutine as poutine
import torch

from . import distributed, rundir
from .data import Batch
from .errors import TrainingDiverged, UsageError
from .estimators import ESTIMATORS, Estimator, EstimatorSettings, choose_estimator, inspect_sites, make_estimator
from .gallery import ModelFile, load_model

__all__ = ["fit", "resume", "FitResult", "RestartResult", "resolve_device"]

SYNC_EVERY = 50  # steps between reads of the ELBO buffer (one host-device sync each)
CHECKPOINT_SECONDS = 10.0  # default wall time between checkpoints
DEFAULT_STEPS, DEFAULT_LR = 1000, 0.01
IWAE_DEFAULT_PARTICLES = 5  # K for --estimator iwae without --num-particles (Burda et al. 2016 report k = 5 and 50)


@dataclass
class RestartResult:
    """One independent fit (one chain, in ArviZ's terms)."""

    restart: int
    seed: int
    params: dict  # site name -> constrained value
    unconstrained: dict  # what the optimizer moved; loads back into Pyro's param store
    elbo_trace: pd.DataFrame
    model_fn: Callable = field(repr=False)
    guide_fn: Callable = field(repr=False)

    @property
    def final_elbo(self) -> float:
        """Median ELBO over the last tenth of the steps (one step is noisy, and heavy-tailed
        importance weights can throw single steps far off: a median is not moved by them)."""
        tail = max(1, len(self.elbo_trace) // 10)
        return float(self.elbo_trace["elbo"].iloc[-tail:].median())


@dataclass
class FitResult:
    """What :func:`fit` returns: plain data, nothing hidden in global state."""

    params: dict | None  # of the best restart (highest final ELBO); None: filled in from the restarts
    elbo_trace: pd.DataFrame  # restart, step, epoch, elbo, time_s
    estimator: str
    estimator_reason: str
    device: torch.device
    seed: int
    config: dict
    restarts: list[RestartResult]
    model_file: ModelFile = field(repr=False)
    options: Any = None
    data: dict = field(default=None, repr=False)
    run_dir: Path | None = None

    @property
    def best(self) -> RestartResult:
        return max(self.restarts, key=lambda restart: restart.final_elbo)

    def __post_init__(self):
        if self.params is None and self.restarts:
            self.params = self.best.params


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` is CUDA when PyTorch sees a GPU, else CPU; ``cuda`` without a GPU is a usage error."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use auto, cpu or cuda.") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: PyTorch sees no CUDA GPU on this machine (torch.cuda.is_available() is False); use --device cpu or auto.")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0.")
    if resolved.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {name!r}; use auto, cpu or cuda.")
    return resolved


def _device_scope(device: torch.device):
    # On CUDA, make factory calls in model code (torch.zeros, dist.Normal(0., 1.)) land on the GPU.
    # On CPU there is nothing to redirect, and the torch-function mode would only add overhead.
    return torch.device(device) if device.type != "cpu" else contextlib.nullcontext()


def load_data_tensors(model_file: ModelFile, data, options, device: torch.device) -> tuple[str | None, dict]:
    """``(source, tensors on device)``: a source string (or None, built-in) goes through the model's loader;
    tensors are used as given (``source`` "in-memory")."""
    if data is None or isinstance(data, (str, Path)):
        source = None if data is None else str(data)
        tensors = model_file.load_data(source, options)
    else:
        source = "in-memory"
        tensors = data if isinstance(data, dict) else {"x": data}
    return source, {name: value.to(device) for name, value in tensors.items()}


def _positive(name: str, value, kind=int):
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0 or (kind is int and int(value) != value):
        raise UsageError(f"--{name} must be a positive {'integer' if kind is int else 'number'} (got {value!r}).")
    return kind(value)


def _tensors_of(fn) -> list:
    found = []
    while fn is not None:
        found += [value for value in vars(fn).values() if isinstance(value, torch.Tensor)]
        fn = getattr(fn, "base_dist", None)
    return found


def _loop_needs_device_scope(model_fn, guide_fn, batch, options, device: torch.device) -> bool:
    """On CUDA, whether the training loop must keep the ``torch.device`` mode of :func:`_device_scope`.

    The mode sends factory calls in model code (``torch.zeros(3)``, ``dist.Normal(0., 1.)``) to the
    GPU, at the price of Python dispatch on every torch call: 0.8 ms of a 4.2 ms VAE step on an
    H200. One probe run of guide and model without it says whether every sample site's value and
    distribution tensors land on the GPU anyway; if one lands on the CPU, or the run fails, the loop
    keeps the mode. (Set-up, where networks and parameters are created, always runs inside it.)
    """
    if device.type == "cpu":
        return False
    try:
        with torch.no_grad(), poutine.block():
            guide_trace = poutine.trace(guide_fn).get_trace(batch, options)
            model_trace = poutine.trace(poutine.replay(model_fn, trace=guide_trace)).get_trace(batch, options)
    except Exception:  # a device mismatch, typically: the model needs the mode
        return True
    tensors = [
        tensor
        for trace in (guide_trace, model_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for tensor in [site["value"], *_tensors_of(site["fn"])]
        if isinstance(tensor, torch.Tensor)
    ]
    return any(tensor.device.type != device.type for tensor in tensors)


class _Batches:
    """Minibatch indices for a step: a stream of per-epoch permutations cut into equal batches.

    Batch ``s`` covers positions ``[s*B, (s+1)*B)`` of the stream, so every batch has B points,
    each epoch visits every point once, and the batch of any step can be rebuilt from
    ``(seed, step)`` alone, which is what makes ``--resume`` exact.
    """

    def __init__(self, num_data: int, batch_size: int | None, seed: int, device: torch.device):
        self.num_data, self.seed, self.device = num_data, seed, device
        self.batch_size = batch_size if batch_size and batch_size < num_data else None
        self.full = torch.arange(num_data, device=device)
        self._cache: dict[int, torch.Tensor] = {}

    def steps_per_epoch(self) -> int:
        return 1 if self.batch_size is None else math.ceil(self.num_data / self.batch_size)

    def epoch_of(self, step: int) -> int:
        return step if self.batch_size is None else (step * self.batch_size) // self.num_data

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            generator = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = {key: value for key, value in self._cache.items() if key >= epoch - 1}
            self._cache[epoch] = torch.randperm(self.num_data, generator=generator, device=self.device)
        return self._cache[epoch]

    def index(self, step: int) -> torch.Tensor:
        if self.batch_size is None:
            return self.full
        start, stop = step * self.batch_size, (step + 1) * self.batch_size
        pieces = [
            self._permutation(epoch)[max(start - epoch * self.num_data, 0) : stop - epoch * self.num_data]
            for epoch in range(start // self.num_data, (stop - 1) // self.num_data + 1)
        ]  # a batch straddles at most a few epochs; slicing first keeps a step O(batch size)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _batch(data: dict, index: torch.Tensor, num_data: int, full: bool) -> Batch:
    if full:
        return Batch(data, index, num_data)
    return Batch({name: value.index_select(0, index) for name, value in data.items()}, index, num_data)


def _instantiate(component, options, data):
    # A class in a model file is instantiated once per fit (it may own networks or initialise from data).
    if not isinstance(component, type):
        return component
    try:
        return component(options, data)
    except ValueError as error:
        raise UsageError(f"{component.__name__}: {error}") from None


def _trainable(store) -> dict:
    # Pyro keeps decaying-average baselines in the param store; they are state, not parameters.
    return {name: value for name, value in store.named_parameters() if not name.startswith("__baseline")}


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _snapshot(store, optimizer, step: int, elapsed: float, seed: int, device, done: bool) -> dict:
    return {
        "seed": seed,
        "step": step,
        "done": done,
        "elapsed_s": elapsed,
        "unconstrained": {name: value.detach().clone() for name, value in store.named_parameters()},
        "params": {name: store[name].detach().clone() for name in store.keys()},
        "optimizer": optimizer.state_dict(),
        "rng": _rng_state(device),
    }


def _restore(store, optimizer, snapshot: dict, device) -> None:
    current = dict(store.named_parameters())
    with torch.no_grad():
        for name, value in snapshot["unconstrained"].items():
            if name in current:
                current[name].copy_(value)
            else:  # created inside the loss (e.g. a baseline); unconstrained == constrained there
                store[name] = value.to(device)
    optimizer.load_state_dict(snapshot["optimizer"])
    _set_rng_state(snapshot["rng"], device)


def _versions() -> dict:
    from . import __version__

    return {"ppvi": __version__, "pyro": pyro.__version__, "torch": torch.__version__, "python": platform.python_version()}


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ELBO {task.fields[elbo]}"),
        disable=not enabled,
        transient=False,
    )


def fit(
    model: str | Path | ModelFile,
    *,
    guide: str | None = None,
    estimator: str = "auto",
    data=None,
    baseline: str | None = None,
    temperature: float | None = None,
    anneal_rate: float | None = None,
    min_temperature: float | None = None,
    straight_through: bool | None = None,
    options=None,
    steps: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    lr_decay: float | None = None,
    num_particles: int | None = None,
    vectorize_particles: bool | None = None,
    device: str = "auto",
    seed: int = 0,
    restarts: int = 1,
    out: str | Path | None = None,
    resume: bool = False,
    checkpoint_every: int | None = None,
    progress: bool = False,
    log_fn: Callable[[str], None] | None = None,
) -> FitResult:
    """Fit a model/guide pair by stochastic variational inference.

    Parameters
    ----------
    model : str or Path or ModelFile
        A gallery name (``"gmm"``) or the path of a model file.
    guide : str, optional
        A name from the file's ``GUIDES``; default its first entry.
    estimator : {"auto", "reparam", "score", "enum", "gumbel", "iwae"}
        Gradient estimator; ``auto`` applies the rules in :mod:`ppvi.estimators`.
    baseline : {"none", "average", "neural"}, optional
        Score-function baseline (default neural); only with the score estimator.
    temperature, anneal_rate, min_temperature : float, optional
        Gumbel-softmax schedule tau_t = max(min_temperature, temperature * exp(-anneal_rate * t))
        (defaults 1.0, the rate reaching the floor halfway through the fit, 0.5); only with gumbel.
    straight_through : bool, optional
        Gumbel-softmax straight-through: discrete values forward, relaxed gradients back.
    data : None, str, Tensor or dict of Tensor
        None for the model's built-in data, a ``--data`` string (file, folder,
        ``synthetic:...``) or tensors with one data point per row.
    options : dict or the model's Options, optional
        Model options (``{"num_components": 3}``).
    steps, epochs : int, optional
        Length of the fit: optimizer steps, or passes over the data (not both).
    batch_size : int, optional
        Minibatch size; default full batch.
    lr : float, optional
        Adam learning rate (default from the model file, else 0.01).
    lr_decay : float, optional
        Factor by which the learning rate decays, exponentially, over the whole fit
        (``lr * lr_decay ** (step / steps)``, as Pyro's ClippedAdam ``lrd``); default 1 (constant).
    num_particles : int, optional
        Samples per ELBO estimate (default from the model file, else 1); K of the ``iwae`` bound
        (default 5 there).
    vectorize_particles : bool, optional
        Draw the particles in one vectorized pass (the model must broadcast over a
        leading particle dimension); default from the model file, else False.
    device : {"auto", "cpu", "cuda"}
    seed : int
        Restart ``r`` uses seed ``seed + r``.
    restarts : int
        Independent fits from different seeds, kept as separate traces.
    out : path, optional
        Run directory to write (config.json, elbo.csv, params.pt, elbo.png).
    resume : bool
        Continue the run in ``out`` from its last checkpoint.
    checkpoint_every : int, optional
        Steps between checkpoints (default: every ~10 s of wall time, and at the end).
    progress : bool
        Show a progress bar with the running ELBO.
    log_fn : callable, optional
        Receives one-line messages (the estimator choice and its reason).

    Returns
    -------
    FitResult
    """
    log_fn = log_fn or (lambda message: None)
    model_file = model if isinstance(model, ModelFile) else load_model(model)
    defaults = model_file.fit_defaults
    guide = guide or model_file.default_guide
    if guide not in model_file.guides:
        raise UsageError(f"model {model_file.name!r} has no guide {guide!r}; its guides are: {', '.join(model_file.guides)}.")
    if steps is not None and epochs is not None:
        raise UsageError("give --steps or --epochs, not both.")
    steps, epochs = _positive("steps", steps), _positive("epochs", epochs)
    batch_size = _positive("batch-size", batch_size if batch_size is not None else defaults.get("batch_size"))
    lr = _positive("lr", lr if lr is not None else defaults.get("lr", DEFAULT_LR), kind=float)
    lr_decay = _positive("lr-decay", lr_decay if lr_decay is not None else defaults.get("lr_decay", 1.0), kind=float)
    if num_particles is None and estimator == "iwae":
        num_particles = max(IWAE_DEFAULT_PARTICLES, defaults.get("num_particles", 1))
    num_particles = _positive("num-particles", num_particles if num_particles is not None else defaults.get("num_particles", 1))
    settings = EstimatorSettings(baseline, temperature, anneal_rate, min_temperature, straight_through)
    if estimator not in ESTIMATORS:
        raise UsageError(f"unknown estimator {estimator!r}; choose one of: {', '.join(ESTIMATORS)}.")
    settings.check(estimator)  # bad values, and options that cannot apply, before any data is read
    if vectorize_particles is None:
        vectorize_particles = bool(defaults.get("vectorize_particles", False))
    restarts = _positive("restarts", restarts)
    checkpoint_every = _positive("checkpoint-every", checkpoint_every)
    if steps is None and epochs is None:
        steps, epochs = defaults.get("steps"), defaults.get("epochs")
        if steps is None and epochs is None:
            steps = DEFAULT_STEPS
    if not isinstance(seed, int) or seed < 0:
        raise UsageError(f"--seed must be a non-negative integer (got {seed!r}).")
    torch_device = distributed.local_device(resolve_device(device))  # [dist] cuda:LOCAL_RANK under torchrun
    options = model_file.make_options(options)

    source, data_tensors = load_data_tensors(model_file, data, options, torch_device)
    num_data = next(iter(data_tensors.values())).shape[0]
    if batch_size is not None and batch_size > num_data:
        batch_size = None  # a batch as large as the data set is full-batch
    batches = _Batches(num_data, batch_size, seed, torch_device)
    total_steps = steps if steps is not None else epochs * batches.steps_per_epoch()

    run_dir = Path(out) if out is not None else None
    previous = None
    if run_dir is not None:
        if resume:
            previous = rundir.load_checkpoint(run_dir, map_location=torch_device)
            for leftover in run_dir.glob(".*.tmp"):  # a write cut short by a kill
                leftover.unlink(missing_ok=True)  # [dist] every rank runs this
        elif run_dir.exists() and any(run_dir.iterdir()):
            raise UsageError(f"--out {run_dir}: the folder exists and is not empty; choose a new folder or continue it with --resume {run_dir}.")
    elif resume:
        raise UsageError("--resume needs the run directory to continue.")
    # [dist] refuse what cannot run at this world size, on every rank, then join the process group
    distributed.check_world_size(batch_size, num_data, rundir.read_config(run_dir).get("world_size", 1) if previous else None)
    comm = distributed.connect(torch_device)
    writes = run_dir is not None and comm.is_writer

    config = {
        "model": model_file.name if Path(str(model)).suffix != ".py" else str(model_file.path),
        "model_path": str(model_file.path),
        "model_sha256": model_file.sha256,
        "guide": guide,
        "estimator_requested": estimator,
        "estimator_settings": dataclasses.asdict(settings),
        "options": dataclasses.asdict(options) if options is not None else {},
        "data": source if source is not None else "built-in",
        "num_data": num_data,
        "steps": total_steps,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "lr_decay": lr_decay,
        "num_particles": num_particles,
        "vectorize_particles": vectorize_particles,
        "device": str(torch_device),
        "seed": seed,
        "restarts": restarts,
        "checkpoint_every": checkpoint_every,
        "world_size": comm.world_size,
        "versions": _versions(),
    }

    restart_results: list[RestartResult] = []
    snapshots: list[dict] = list(previous["restarts"]) if previous else []
    traces: list[pd.DataFrame] = []
    if previous and run_dir is not None and (run_dir / rundir.TRACE).exists():
        old = rundir.read_trace(run_dir)
        for restart, snapshot in enumerate(snapshots):  # drop rows logged after the last checkpoint
            traces.append(old[(old["restart"] == restart) & (old["step"] < snapshot["step"])])
    chosen: Estimator | None = None

    with _progress(progress) as bar:
        for restart in range(restarts):
            restart_seed = seed + restart
            with _device_scope(torch_device):  # model code may create tensors: on the GPU
                pyro.clear_param_store()
                pyro.set_rng_seed(restart_seed)
                model_fn = _instantiate(model_file.module.model, options, data_tensors)
                guide_fn = _instantiate(model_file.guides[guide], options, data_tensors)
                first = _batch(data_tensors, batches.index(0), num_data, batches.batch_size is None)
                with pyro.validation_enabled(True):
                    sites, plate_depth = inspect_sites(model_fn, guide_fn, first, options)  # also creates the parameters
                    name, reason = choose_estimator(estimator, sites, settings)
                    chosen = make_estimator(
                        name, reason, sites, model_fn, guide_fn, first, options, num_particles=num_particles,
                        vectorize_particles=vectorize_particles, max_plate_nesting=plate_depth, settings=settings,
                        total_steps=total_steps,
                    )
                if restart == 0:
                    log_fn(f"estimator: {chosen.name} ({chosen.reason})")
                    config.update(
                        estimator=chosen.name,
                        estimator_reason=chosen.reason,
                        estimator_options=_relevant(chosen.name, settings, total_steps),
                        sites=[dataclasses.asdict(site) for site in sites],
                        status="running",
                    )
                    if writes:
                        if previous is not None:
                            _check_resumable(run_dir, config)
                        run_dir.mkdir(parents=True, exist_ok=True)
                        rundir.write_json(run_dir / rundir.CONFIG, config)

                pyro.set_rng_seed(restart_seed)
                store = pyro.get_param_store()
                comm.broadcast_([value for _, value in store.named_parameters()])  # [dist] rank 0's initial values
                # fused Adam keeps its step counters on the GPU: the default implementation syncs per parameter per step
                optimizer = torch.optim.Adam(list(_trainable(store).values()), lr=lr, fused=torch_device.type == "cuda")
                start, elapsed = 0, 0.0
                if restart < len(snapshots):
                    _restore(store, optimizer, snapshots[restart], torch_device)
                    start, elapsed = snapshots[restart]["step"], snapshots[restart]["elapsed_s"]
                else:
                    snapshots.append(None)
                    traces.append(pd.DataFrame(columns=["restart", "step", "epoch", "elbo", "time_s"]))

                def checkpoint(step: int, elapsed_now: float, done: bool) -> None:
                    snapshots[restart] = _snapshot(store, optimizer, step, elapsed_now, restart_seed, torch_device, done)
                    if writes:
                        rundir.write_trace(run_dir, pd.concat(traces, ignore_index=True))
                        rundir.save_checkpoint(run_dir, {"format": 1, "restarts": [s for s in snapshots if s is not None]})

            scoped = _loop_needs_device_scope(model_fn, guide_fn, first, options, torch_device)
            task = bar.add_task(f"{model_file.name}/{guide} restart {restart}" if restarts > 1 else f"{model_file.name}/{guide}", total=total_steps, completed=start, elbo="...")
            try:
                with _device_scope(torch_device) if scoped else contextlib.nullcontext():
                    elapsed = _train(
                        chosen, options, data_tensors, batches, store, optimizer, traces, restart, comm,
                        start, total_steps, elapsed, checkpoint, checkpoint_every, (lr, lr_decay),
                        lambda step, elbo: bar.update(task, completed=step, elbo=f"{elbo:.4g}"),
                    )
            except TrainingDiverged as error:
                if writes:
                    rundir.write_trace(run_dir, pd.concat(traces, ignore_index=True))  # the finite steps before it
                    rundir.write_json(run_dir / rundir.CONFIG, {**config, "status": "diverged", "error": str(error)})
                    kept = snapshots[restart]
                    where = f"the last good checkpoint (step {kept['step']})" if kept is not None else "no checkpoint: none was due yet"
                    error.args = (f"{error}; {run_dir} keeps {where}.",)
                raise
            restart_results.append(
                RestartResult(
                    restart=restart,
                    seed=restart_seed,
                    params={name: store[name].detach() for name in store.keys() if not name.startswith("__baseline")},
                    unconstrained={name: value.detach().clone() for name, value in store.named_parameters()},
                    elbo_trace=traces[restart].reset_index(drop=True),
                    model_fn=model_fn,
                    guide_fn=guide_fn,
                )
            )

    trace = pd.concat(traces, ignore_index=True)
    result = FitResult(
        params=None,
        elbo_trace=trace,
        estimator=chosen.name,
        estimator_reason=chosen.reason,
        device=torch_device,
        seed=seed,
        config=config,
        restarts=restart_results,
        model_file=model_file,
        options=options,
        data=data_tensors,
        run_dir=run_dir,
    )
    config.update(status="completed", best_restart=result.best.restart, final_elbo=[r.final_elbo for r in restart_results])
    distributed.disconnect()  # [dist]
    if writes:
        rundir.write_json(run_dir / rundir.CONFIG, config)
        rundir.plot_trace(run_dir, trace, f"{model_file.name} / {guide} / {chosen.name}")
    return result


def _relevant(estimator: str, settings: EstimatorSettings, total_steps: int) -> dict:
    """The estimator options in effect for the chosen estimator (config.json)."""
    values = settings.resolved(total_steps)
    if estimator == "score":
        return {"baseline": values["baseline"]}
    if estimator == "gumbel":
        return {name: values[name] for name in EstimatorSettings.GUMBEL_FIELDS}
    return {}


def _check_resumable(run_dir: Path, config: dict) -> None:
    old = rundir.read_config(run_dir)
    if old.get("model_sha256") != config["model_sha256"]:
        raise UsageError(f"--resume {run_dir}: the model file {config['model_path']} changed since the run started; start a new run.")
    for key in ("guide", "estimator", "estimator_settings", "options", "seed", "lr", "lr_decay", "batch_size", "num_particles", "steps", "restarts"):
        if old.get(key) != config.get(key):
            raise UsageError(f"--resume {run_dir}: {key} differs from the interrupted run ({old.get(key)!r} there, {config.get(key)!r} now).")


def _train(estimator, options, data, batches, store, optimizer, traces, restart, comm, start, total_steps, elapsed, checkpoint_fn, checkpoint_every, schedule, report_fn) -> float:
    """Run steps ``[start, total_steps)``; the ELBO goes to a device buffer read back every SYNC_EVERY steps."""
    device = batches.full.device
    buffer = torch.empty(SYNC_EVERY, device=device)
    # gumbel / iwae descend another objective than the ELBO: record it beside the ELBO
    objectives = torch.empty(SYNC_EVERY, device=device) if estimator.objective else None
    pending_steps: list[int] = []
    pending_times: list[float] = []
    known = len(store.keys())
    clock = time.perf_counter() - elapsed
    last_checkpoint = time.perf_counter()

    def flush(done: bool) -> None:
        nonlocal last_checkpoint
        if not pending_steps:
            return
        count = len(pending_steps)
        both = buffer[:count] if objectives is None else torch.stack([buffer[:count], objectives[:count]])
        both = comm.mean(both).double().cpu()  # [dist] global ELBO; the one host-device sync per SYNC_EVERY steps
        values = both if objectives is None else both[0]
        bad = (~torch.isfinite(values)).nonzero()
        keep = int(bad[0]) if len(bad) else len(pending_steps)
        rows = pd.DataFrame(
            {
                "restart": restart,
                "step": pending_steps[:keep],
                "epoch": [batches.epoch_of(step) for step in pending_steps[:keep]],
                "elbo": values[:keep].numpy(),
                "time_s": pending_times[:keep],
                **({estimator.objective: both[1, :keep].numpy()} if objectives is not None else {}),
                **{name: column[:keep] for name, column in estimator.extra_columns(pending_steps).items()},
            }
        )
        traces[restart] = rows if traces[restart].empty else pd.concat([traces[restart], rows], ignore_index=True)
        if len(bad):
            raise TrainingDiverged(f"the ELBO became {values[keep].item()} at step {pending_steps[keep]} (restart {restart})", pending_steps[keep])
        last_step = pending_steps[-1] + 1
        report_fn(last_step, float(values[-1]))
        pending_steps.clear()
        pending_times.clear()
        due = done or (checkpoint_every and last_step % checkpoint_every == 0)
        if due or (checkpoint_every is None and time.perf_counter() - last_checkpoint > CHECKPOINT_SECONDS):
            checkpoint_fn(last_step, time.perf_counter() - clock, done)
            last_checkpoint = time.perf_counter()

    with pyro.validation_enabled(False):
        for step in range(start, total_steps):
            batch = _batch(data, comm.shard(batches.index(step)), batches.num_data, batches.batch_size is None and comm.world_size == 1)  # [dist]
            try:
                elbo, loss = estimator.loss(batch, options, step=step)
                loss.backward()
            except (ValueError, RuntimeError) as error:
                if any(not torch.isfinite(value).all() for _, value in store.named_parameters()):
                    flush(done=False)
                    raise TrainingDiverged(f"parameters became non-finite before step {step} (restart {restart}): {str(error).splitlines()[0]}", step) from None
                raise
            if len(store.keys()) != known:  # a site created parameters lazily: let Adam see them too
                seen = {id(p) for group in optimizer.param_groups for p in group["params"]}
                new = [p for p in _trainable(store).values() if id(p) not in seen]
                if new:  # (a decaying-average baseline is state, not a parameter: no group for it)
                    comm.broadcast_(new)  # [dist] lazily created (the neural baseline): rank 0's values
                    optimizer.add_param_group({"params": new})
                known = len(store.keys())
            if schedule[1] != 1.0:  # a function of the step alone, so resuming needs no scheduler state
                for group in optimizer.param_groups:
                    group["lr"] = schedule[0] * schedule[1] ** (step / total_steps)
            comm.average_gradients_([p for group in optimizer.param_groups for p in group["params"]])  # [dist]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            buffer[len(pending_steps)] = elbo
            if objectives is not None:
                objectives[len(pending_steps)] = -loss.detach()  # the objective, since loss = -objective
            pending_steps.append(step)
            pending_times.append(time.perf_counter() - clock)
            last = step + 1 == total_steps
            if last or len(pending_steps) == SYNC_EVERY or (checkpoint_every and (step + 1) % checkpoint_every == 0):
                flush(done=last)
    return time.perf_counter() - clock


def resume(run_dir: str | Path, *, progress: bool = False, log_fn=None) -> FitResult:
    """Continue an interrupted run from its last checkpoint, with the settings in its config.json."""
    config = rundir.read_config(run_dir)
    data = None if config["data"] == "built-in" else config["data"]
    if data == "in-memory":
        raise UsageError(f"{run_dir}: the run was fitted on in-memory data; call ppvi.fit(..., data=..., out=..., resume=True).")
    return fit(
        config["model"],
        guide=config["guide"],
        estimator=config["estimator_requested"],
        **config.get("estimator_settings", {}),
        data=data,
        options=config["options"],
        steps=None if config.get("epochs") else config["steps"],
        epochs=config.get("epochs"),
        batch_size=config["batch_size"],
        lr=config["lr"],
        lr_decay=config.get("lr_decay"),
        num_particles=config["num_particles"],
        vectorize_particles=config.get("vectorize_particles"),
        device=config["device"].split(":")[0],
        seed=config["seed"],
        restarts=config["restarts"],
        out=run_dir,
        resume=True,
        checkpoint_every=config.get("checkpoint_every"),
        progress=progress,
        log_fn=log_fn,
    )
