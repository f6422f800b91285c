"""The fit loop: data in, estimator chosen (with the reason), SVI steps, ELBO trace and checkpoints out.

One function, :func:`fit`, serves the command line, notebooks and tests; :func:`train`
runs the steps of one restart. The loop never forces a host-device sync per step:
each step's ELBO goes into a device buffer (:class:`ElboBuffer`) read back every
``SYNC_EVERY`` steps and at checkpoints, which is also when NaN/inf is detected.
Pyro's param store and the RNGs are scoped to the fit: the caller's are as they were.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

import pyro

from . import distributed, rundir
from .batching import Batches, batch_at, load_data_tensors, num_points
from .checkpoint import RunWriter
from .config import FitConfig
from .convergence import EarlyStopping, Stationarity, default_threads, fixed_budget_summary, heldout_split, load_unconstrained_, q_scales, threads_scope
from .distributed import LocalComm
from .errors import TrainingDiverged, UsageError
from .estimators import EstimatorSettings, build, probe
from .gallery import ModelFile, gallery_dir, load_pair
from .init import disperse_, precondition_, start_
from .pyro_util import device_scope, fit_scope, loop_needs_device_scope, resolve_device, rng_scope, trainable_params
from .results import FitResult, RestartResult
from .runs import resolve_model
from .version import __version__

__all__ = ["fit", "resume", "train", "resolve_device", "FitConfig", "FitResult", "RestartResult", "ElboBuffer", "SYNC_EVERY"]

SYNC_EVERY = 50  # steps between reads of the ELBO buffer (one host-device sync each)
HELDOUT_FRACTION = 0.1  # of the points, held out for early stopping (minibatch fits without --steps/--epochs)
HELDOUT_SEED_OFFSET = 7919  # the held-out ELBO's random numbers: fixed, and apart from training's


def fit(model, guide=None, *, data=None, options=None, out=None, resume: bool = False, progress: bool = False,
        log_fn: Callable[[str], None] | None = None, **settings) -> FitResult:
    """Fit a model/guide pair by stochastic variational inference.

    Parameters
    ----------
    model : str, Path, callable or ModelFile
        A gallery name (``"gmm"``), a file (a ppvi model file, or plain Pyro: ``"file.py"``,
        ``"file.py:model_fn"``), or a Pyro model callable with its own signature (``model(x, y=None)``).
    guide : str, callable or autoguide, optional
        A name from the file's ``GUIDES``, an autoguide name (``"AutoNormal"``), class or instance,
        a guide callable, or ``"file.py:guide_fn"``; default: the file's first guide, else AutoNormal.
    data : None, str, Tensor, dict or tuple
        None for the model's built-in (or module-level) data, a ``--data`` string (file, folder,
        ``synthetic:...``), or tensors with one data point per row: a tensor (the first argument),
        a dict (keyword arguments) or a tuple (positional arguments).
    options : dict or the model's Options, optional
        Model options (``{"num_components": 3}``).
    out, resume : path, bool
        Run directory to write (config.json, elbo.csv, params.pt, elbo.png); continue it from its last checkpoint.
    progress, log_fn : bool, callable
        A progress bar with the running ELBO; a receiver of one-line messages (the estimator and why).
    **settings
        The fit options of :class:`~ppvi.config.FitConfig` (``estimator``, ``steps``, ``lr``, ``seed``, ``restarts`` ...).
    """
    config = FitConfig.from_options(guide=guide if isinstance(guide, str) else None, **settings)
    model_file = load_pair(model, guide, seed=config.seed)  # a gallery name, a file, or Pyro callables
    guide = config.guide if config.guide in model_file.guides else model_file.default_guide
    if config.guide is not None and guide != config.guide and hasattr(model, "build_pair"):
        raise UsageError(f"model {model_file.name!r} has no guide {config.guide!r}; its guides are: {', '.join(model_file.guides)}.")
    estimator_settings = _estimator_settings(config)
    defaults = model_file.fit_defaults
    defaults |= defaults.pop("by_guide", {}).get(guide, {})  # a guide's own defaults over the model's
    config = dataclasses.replace(config.resolve(defaults), guide=guide)
    options = model_file.make_options(options)
    device = distributed.local_device(resolve_device(config.device))  # cuda:LOCAL_RANK under torchrun
    source, tensors = load_data_tensors(model_file, data, options, device)
    train_data, heldout = _split_heldout(tensors, config)
    batches = Batches(num_points(train_data), config.batch_size, config.seed, device)
    total_steps = config.steps if config.steps is not None else config.epochs * batches.steps_per_epoch()
    writer = RunWriter(out, resume=resume, device=device, writer=distributed.env_rank() == 0, checkpoint_every=config.checkpoint_every)
    # refuse what cannot run at this world size on every rank alike, then join the process group (one barrier)
    distributed.check_world_size(batches.batch_size, batches.num_data, rundir.read_config(out).get("world_size", 1) if resume else None)
    comm = distributed.connect(device)
    record = _record(model_file, config, options, source, batches, total_steps, device) | {"world_size": comm.world_size}
    if heldout is not None:
        record["heldout"] = {"num_data": num_points(heldout), "seed": config.seed, "fraction": HELDOUT_FRACTION}
    job = FitJob(model_file, config, estimator_settings, options, train_data, batches, total_steps, device, record=record,
                 writer=writer, log_fn=log_fn or (lambda message: None), comm=comm, heldout=heldout)
    try:
        with fit_scope(), job.writer.opened(), _progress(progress) as bar:
            restarts = [_fit_restart(job, restart, bar) for restart in range(config.restarts)]
            result = FitResult(
                params=None, elbo_trace=pd.concat([r.elbo_trace for r in restarts], ignore_index=True),
                estimator=job.record["estimator"], estimator_reason=job.record["estimator_reason"], device=device, seed=config.seed,
                config=job.record, restarts=restarts, model_file=model_file, options=options, data=tensors,
                run_dir=Path(out) if out is not None else None,
            )
            job.record.update(status="completed", best_restart=result.best.restart, final_elbo=[r.final_elbo for r in restarts])
            job.writer.finish(job.record, f"{model_file.name} / {guide} / {result.estimator}")
    finally:
        distributed.disconnect()
    return result


@dataclasses.dataclass(frozen=True)
class FitJob:
    """What every restart of one fit shares: the resolved settings, the data on the device, the run directory."""

    model_file: ModelFile
    config: FitConfig
    estimator_settings: EstimatorSettings
    options: object
    data: dict
    batches: Batches
    total_steps: int
    device: torch.device
    record: dict  # config.json
    writer: RunWriter
    log_fn: Callable[[str], None]
    comm: object = LocalComm()  # data-parallel hooks (ppvi.distributed)
    heldout: dict | None = None  # minibatch fits that stop by themselves: the held-out points (not in ``data``)


def _split_heldout(tensors: dict, config: FitConfig) -> tuple[dict, dict | None]:
    """``(training data, held-out data or None)``: a minibatch fit that stops by itself holds out a seeded
    tenth of the points for early stopping; every other fit trains on all of them."""
    num_data = num_points(tensors)
    if not config.auto_stop or config.batch_size is None or config.batch_size >= num_data or num_data < 20:
        return tensors, None
    train, heldout = heldout_split(num_data, fraction=HELDOUT_FRACTION, seed=config.seed)
    device = next(iter(tensors.values())).device
    train, heldout = train.to(device), heldout.to(device)
    return {k: v.index_select(0, train) for k, v in tensors.items()}, {k: v.index_select(0, heldout) for k, v in tensors.items()}


def _fit_restart(job: FitJob, restart: int, bar) -> RestartResult:
    """One restart in a fresh param store: build the pair and its estimator, then train from the checkpoint (if any)."""
    config, seed = job.config, job.config.seed + restart
    with pyro.get_param_store().scope(), device_scope(job.device):
        pyro.set_rng_seed(seed)
        model_fn, guide_fn = job.model_file.build_pair(config.guide, job.options, job.data)
        first = batch_at(job.data, job.batches.index(0), job.batches.num_data, job.batches.batch_size is None)
        estimator, sites = _build_estimator(config, job.estimator_settings, model_fn, guide_fn, first, job.options, job.total_steps)
        if restart == 0:
            job.log_fn(f"estimator: {estimator.name} ({estimator.reason})")
            job.record.update(estimator=estimator.name, estimator_reason=estimator.reason, sites=sites,
                              estimator_options=estimator.options)
        store = pyro.get_param_store()
        beginning = start_(config.init if job.batches.batch_size is None else "default", model_fn, guide_fn, first, job.options)
        if restart > 0:  # restart 0 starts where `beginning` put it; the others dispersed around it
            disperse_(store, seed=seed, step_scales=beginning.step_scales)
        pyro.set_rng_seed(seed)  # training draws the same numbers however much the set-up drew
        job.comm.broadcast_([value for _, value in store.named_parameters()])  # every rank starts from rank 0's values
        optimizer = precondition_(_optimizer(store, config, job.device), beginning.step_scales)
        start, elapsed, trace = job.writer.restore(restart, store, optimizer)  # refuses parameters that do not fit the pair
        monitor = _monitor(job, store, optimizer, trace, estimator, seed) if config.auto_stop else None
        if monitor is not None and job.writer.monitor_state(restart) is not None:  # resumed: the rule goes on where it was
            monitor.load_state_dict(job.writer.monitor_state(restart))
        if restart == 0:  # every check passed: only now does the run directory change
            job.writer.start(job.record, settings_differ=lambda old: _settings_differ(old, config))
        scoped = loop_needs_device_scope(model_fn, guide_fn, first, job.options, device=job.device)
        label = f"{job.model_file.name}/{config.guide}" + (f" restart {restart}" if config.restarts > 1 else "")
        task = bar.add_task(label, total=job.total_steps, completed=start, elbo="...")
        threads = config.threads or default_threads(sum(value.numel() for value in trainable_params(store).values()))
        with device_scope(job.device) if scoped else contextlib.nullcontext(), threads_scope(threads):
            try:
                finished = job.writer.finished(restart)  # resumed after it stopped: nothing left to train
                trace, elapsed = train(
                    estimator=estimator, data=job.data, options=job.options, batches=job.batches, optimizer=optimizer,
                    config=config, total_steps=start if finished else job.total_steps, restart=restart, start=start, elapsed=elapsed,
                    trace=trace, comm=job.comm,
                    checkpoint_fn=lambda step, seconds, done, rows: job.writer.checkpoint(
                        restart, store=store, optimizer=optimizer, step=step, elapsed=seconds, seed=seed, done=done, trace=rows,
                        monitor=monitor),
                    checkpoint_due=job.writer.due,
                    progress_fn=lambda step, elbo: bar.update(task, completed=step, elbo=f"{elbo:.4g}"), monitor=monitor,
                )
            except TrainingDiverged as error:
                job.writer.diverged(restart, error, job.record)
                raise
        job.record.setdefault("start", {})[str(restart)] = beginning.note
        if monitor is None:  # a fixed budget: say whether its ELBO was still rising at the end
            summary = fixed_budget_summary(trace["elbo"].to_numpy(), budget_option="--epochs" if config.epochs else "--steps")
            job.record.setdefault("convergence", {})[str(restart)] = summary
            job.log_fn(f"{label}: {summary['status']}")
        else:
            _report_convergence(job, restart, monitor, finished, label, lambda: job.writer.checkpoint(
                restart, store=store, optimizer=optimizer, step=int(trace["step"].iloc[-1]) + 1, elapsed=elapsed, seed=seed,
                done=True, trace=trace, monitor=monitor))
        return _restart_result(restart, seed, store, trace, model_fn, guide_fn)


def _monitor(job: FitJob, store, optimizer, trace, estimator, seed: int):
    """The stopping rule: early stopping on the held-out points for a minibatch fit, else stationarity with
    iterate averaging. A resumed restart's rule state comes back from its checkpoint (``load_state_dict``); a run
    checkpointed before rule states were saved goes on at the learning rate its trace last recorded."""
    if job.heldout is not None:
        size = num_points(job.heldout)
        heldout = batch_at(job.heldout, torch.arange(size, device=job.device), size, True)

        def evaluate() -> float:  # the held-out ELBO per point, under the same random numbers each time
            with torch.no_grad(), rng_scope(seed + HELDOUT_SEED_OFFSET):
                return job.comm.mean(estimator.loss(heldout, job.options)[0].reshape(1)).item() / heldout.num_data

        return EarlyStopping(trainable_params(store), evaluate=evaluate, epoch_of=job.batches.epoch_of)
    if trace is not None and "lr" in trace and len(trace):
        for group in optimizer.param_groups:
            group["lr"] = float(trace["lr"].iloc[-1])
    return Stationarity(trainable_params(store), optimizer=optimizer, scale_fn=lambda: q_scales(store))


def _report_convergence(job: FitJob, restart: int, monitor, finished: bool, label: str, checkpoint_fn) -> None:
    """Report the stopping rule's verdict, with the iterate average as the fitted values (saved in params.pt too)."""
    key = str(restart)
    if finished:  # resumed after it had stopped: the saved values and verdict stand
        summary = job.writer.previous_config.get("convergence", {}).get(key)
        if summary is not None:
            job.record.setdefault("convergence", {})[key] = summary
        return
    averaged = monitor.averaged()[0]
    if averaged:  # the iterate average, where there is one, replaces the last iterate (here and in params.pt)
        load_unconstrained_(pyro.get_param_store(), averaged)
        checkpoint_fn()
    job.record.setdefault("convergence", {})[key] = monitor.summary()
    job.log_fn(f"{label}: {monitor.status}")


def train(*, estimator, data: dict, options, batches: Batches, optimizer, config: FitConfig, total_steps: int, restart: int = 0,
          start: int = 0, elapsed: float = 0.0, trace: pd.DataFrame | None = None, comm=None,
          checkpoint_fn=None, checkpoint_due=None, progress_fn=None, monitor=None) -> tuple[pd.DataFrame, float]:
    """Run steps ``[start, total_steps)`` of one restart; return its ELBO trace and the elapsed seconds.

    ``checkpoint_fn(step, elapsed, done, trace)`` is called at buffered reads for which
    ``checkpoint_due(step, done)`` holds; ``progress_fn(step, elbo)`` after every read.
    A non-finite ELBO raises :class:`TrainingDiverged` carrying the finite rows before it (``.trace``).
    ``monitor`` (:class:`ppvi.convergence.Stationarity`, or :class:`~ppvi.convergence.EarlyStopping` for a
    minibatch fit) sees the parameters after every step and decides at the buffered reads whether to stop
    early; it may cut the learning rate and add columns to the rows it sees (``lr``, ``heldout_elbo``).
    Its state is saved with each checkpoint, so ``--resume`` goes on where the rule was.
    """
    comm = comm or LocalComm()
    buffer = ElboBuffer(batches.full.device, objective=estimator.objective)
    frames = [trace] if trace is not None and not trace.empty else []
    clock = time.perf_counter() - elapsed
    with pyro.validation_enabled(False):
        for step in range(start, total_steps):
            batch = batch_at(data, comm.shard(batches.index(step)), batches.num_data, batches.batch_size is None and comm.world_size == 1)
            elbo, loss = _step(estimator, batch, options, step, optimizer, config, total_steps, comm, restart)
            buffer.record(step, elbo, loss, time.perf_counter() - clock)
            if monitor is not None:
                monitor.observe(step)  # device copies only
            done = step + 1 == total_steps
            if done or buffer.full() or (config.checkpoint_every and (step + 1) % config.checkpoint_every == 0):
                rows, bad = buffer.read(comm, restart=restart, batches=batches, estimator=estimator)
                frames.append(rows)
                if bad is not None:
                    raise _diverged(f"the ELBO became {bad[1]} at step {bad[0]} (restart {restart})", bad[0], frames)
                if progress_fn is not None:
                    progress_fn(step + 1, float(rows["elbo"].iloc[-1]))
                if monitor is not None and monitor.check(step, rows) is not None:  # (it may add columns to rows)
                    done = True  # converged: checkpoint as finished and stop
                if checkpoint_fn is not None and (checkpoint_due is None or checkpoint_due(step + 1, done)):
                    try:
                        checkpoint_fn(step + 1, time.perf_counter() - clock, done, pd.concat(frames, ignore_index=True))
                    except TrainingDiverged as error:
                        raise _diverged(str(error), error.step, frames) from None
                if done:
                    break
    return pd.concat(frames, ignore_index=True) if frames else _empty_trace(), time.perf_counter() - clock


class ElboBuffer:
    """Each step's ELBO (and objective) in a device buffer; read back, with one host sync, every ``SYNC_EVERY`` steps."""

    def __init__(self, device: torch.device, objective: str | None = None, size: int = SYNC_EVERY):
        self.objective = objective  # gumbel / iwae descend another objective than the ELBO: kept beside it
        self.values = torch.empty(2 if objective else 1, size, device=device)
        self.steps: list[int] = []
        self.times: list[float] = []

    def record(self, step: int, elbo: torch.Tensor, loss: torch.Tensor, seconds: float) -> None:
        self.values[0, len(self.steps)] = elbo
        if self.objective:
            self.values[1, len(self.steps)] = -loss.detach()  # the objective, since loss = -objective
        self.steps.append(step)
        self.times.append(seconds)

    def full(self) -> bool:
        return len(self.steps) == self.values.shape[1]

    def read(self, comm, *, restart: int, batches: Batches, estimator) -> tuple[pd.DataFrame, tuple | None]:
        """The finite rows recorded since the last read, and ``(step, value)`` of the first non-finite ELBO."""
        count = len(self.steps)
        values = comm.mean(self.values[:, :count]).double().cpu()  # the one host-device sync per read
        bad = (~torch.isfinite(values[0])).nonzero()
        keep = int(bad[0]) if len(bad) else count
        steps = self.steps[:keep]
        rows = pd.DataFrame({
            "restart": restart,
            "step": steps,
            "epoch": [batches.epoch_of(step) for step in steps],
            "elbo": values[0, :keep].numpy(),
            "time_s": self.times[:keep],
            **({self.objective: values[1, :keep].numpy()} if self.objective else {}),
            **{name: column[:keep] for name, column in estimator.extra_columns(self.steps).items()},
        })
        problem = (self.steps[keep], values[0, keep].item()) if len(bad) else None
        self.steps, self.times = [], []
        return rows, problem


def _step(estimator, batch, options, step: int, optimizer, config: FitConfig, total_steps: int, comm, restart: int):
    """One optimizer step; returns ``(elbo, loss)`` as device tensors (no host sync)."""
    store = pyro.get_param_store()
    try:
        elbo, loss = estimator.loss(batch, options, step=step)
        loss.backward()
    except (ValueError, RuntimeError) as error:
        if any(not torch.isfinite(value).all() for _, value in store.named_parameters()):
            raise TrainingDiverged(f"parameters became non-finite before step {step} (restart {restart}): {str(error).splitlines()[0]}", step) from None
        raise
    _adopt_new_params(store, optimizer, comm)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    comm.average_gradients_(params)  # the same list on every rank, whichever gradients this rank's shard made
    params = [p for p in params if p.grad is not None]
    if config.clip_norm is not None:  # as Pyro's ClippedAdam: each gradient element clamped to [-C, C]
        for param in params:
            param.grad.clamp_(-config.clip_norm, config.clip_norm)
    if config.lr_decay != 1.0:
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step, total_steps)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return elbo, loss


def _adopt_new_params(store, optimizer, comm) -> None:
    """A site that created parameters lazily (a neural baseline): let Adam see them too."""
    if len(store.keys()) == getattr(optimizer, "_ppvi_known", -1):
        return
    seen = {id(p) for group in optimizer.param_groups for p in group["params"]}
    new = [p for p in trainable_params(store).values() if id(p) not in seen]
    if new:  # (a decaying-average baseline is state, not a parameter: no group for it)
        comm.broadcast_(new)  # data-parallel: rank 0's initial values
        optimizer.add_param_group({"params": new})
    optimizer._ppvi_known = len(store.keys())


def _optimizer(store, config: FitConfig, device: torch.device) -> torch.optim.Optimizer:
    # fused Adam keeps its step counters on the GPU: the default implementation syncs per parameter per step
    optimizer = torch.optim.Adam(list(trainable_params(store).values()), lr=config.lr, betas=config.betas or (0.9, 0.999),
                                 fused=device.type == "cuda")
    optimizer._ppvi_known = len(store.keys())
    return optimizer


def _estimator_settings(config: FitConfig) -> EstimatorSettings:
    settings = EstimatorSettings(config.baseline, config.temperature, config.anneal_rate, config.min_temperature, config.straight_through)
    settings.check(config.estimator)  # bad values, and options that cannot apply, before any data is read
    return settings


def _build_estimator(config: FitConfig, settings: EstimatorSettings, model_fn, guide_fn, batch, options, total_steps: int):
    """Probe the pair once (this also creates its parameters), then choose and build the estimator."""
    with pyro.validation_enabled(True):
        info = probe(model_fn, guide_fn, batch, options)
        estimator = build(config.estimator, info, model_fn, guide_fn, batch, options, settings=settings,
                          num_particles=config.num_particles, vectorize_particles=config.vectorize_particles, total_steps=total_steps)
    return estimator, [dataclasses.asdict(site) for site in info.sites]


def _restart_result(restart: int, seed: int, store, trace: pd.DataFrame, model_fn, guide_fn) -> RestartResult:
    return RestartResult(
        restart=restart,
        seed=seed,
        params={name: store[name].detach() for name in store.keys() if not name.startswith("__baseline")},
        unconstrained={name: value.detach().clone() for name, value in store.named_parameters()},
        elbo_trace=trace.reset_index(drop=True),
        model_fn=model_fn,
        guide_fn=guide_fn,
    )


def _diverged(message: str, step: int, frames: list) -> TrainingDiverged:
    error = TrainingDiverged(message, step)
    error.trace = pd.concat(frames, ignore_index=True) if frames else _empty_trace()
    return error


def _empty_trace() -> pd.DataFrame:
    return pd.DataFrame(columns=["restart", "step", "epoch", "elbo", "time_s"])


def _settings_differ(old: dict, config: FitConfig) -> list[str]:
    settings = old.get("settings")
    before = FitConfig.from_dict(settings) if isinstance(settings, dict) else FitConfig.from_options(**FitConfig.legacy(old))
    return config.differences(before)


def _record(model_file, config: FitConfig, options, source, batches: Batches, total_steps: int, device: torch.device) -> dict:
    """config.json: the settings (to rerun) and what they resolved to (to read)."""
    return {
        "model": model_file.name if Path(model_file.path).parent == gallery_dir() else str(model_file.path),
        "model_path": str(model_file.path),
        "model_sha256": model_file.sha256,
        "settings": config.to_dict(),
        "guide": config.guide,
        "estimator_requested": config.estimator,
        "estimator_settings": {name: getattr(config, name) for name in ("baseline", *EstimatorSettings.GUMBEL_FIELDS)},
        "options": dataclasses.asdict(options) if options is not None else {},
        "data": source if source is not None else "built-in",
        "num_data": batches.num_data,
        "steps": total_steps,
        "epochs": config.epochs,
        "batch_size": batches.batch_size,
        "lr": config.lr,
        "lr_decay": config.lr_decay,
        "num_particles": config.num_particles,
        "vectorize_particles": config.vectorize_particles,
        "checkpoint_every": config.checkpoint_every,
        "device": str(device),
        "seed": config.seed,
        "restarts": config.restarts,
        "versions": {"ppvi": __version__, "pyro": pyro.__version__, "torch": torch.__version__, "python": platform.python_version()},
    }


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("ELBO {task.fields[elbo]}"), disable=not enabled, transient=False,
    )


def resume(run_dir: str | Path, *, model=None, trust_model: bool = False, progress: bool = False, log_fn=None) -> FitResult:
    """Continue an interrupted run from its last checkpoint, with the settings in its config.json.

    A run directory is data, never code: a model *file* it names is imported only when the caller names
    it (``model``) or trusts it (``trust_model``); see :func:`ppvi.runs.resolve_model`.
    """
    config = rundir.read_config(run_dir, require=rundir.RESUME_KEYS)
    if config.get("status") == "completed" and rundir.load_checkpoint(run_dir) is None:
        raise UsageError(f"--resume {run_dir}: the run is completed but its {rundir.PARAMS} is missing; there is nothing to continue: start a new run.")
    data = None if config.get("data") == "built-in" else config.get("data")
    if data == "in-memory":
        raise UsageError(f"{run_dir}: the run was fitted on in-memory data; call ppvi.fit(..., data=..., out=..., resume=True).")
    model_file = resolve_model(config, run_dir, model=model, trust=trust_model, log_fn=log_fn)
    settings = config.get("settings")
    settings = FitConfig.from_dict(settings).to_dict() if isinstance(settings, dict) else FitConfig.legacy(config)
    settings["device"] = str(settings.get("device", "auto")).split(":")[0]
    guide = settings.pop("guide")
    return fit(model_file, guide, data=data, options=config.get("options"), out=run_dir, resume=True,
               progress=progress, log_fn=log_fn, **settings)
