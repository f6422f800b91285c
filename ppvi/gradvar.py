"""Gradient variance per estimator, at fixed parameters (``ppvi gradvar``).

At one setting of the parameters (a run directory's fitted ones, or a model's seeded
initial ones) and one fixed minibatch, each estimator draws D independent gradient
estimates of its loss. Per parameter group (a ``pyro.module`` name such as ``encoder``, or a
``pyro.param`` name) the table reports:

- ``mean_norm``: ||mean gradient||;
- ``variance``: the total variance of one draw, sum_j Var[g_j] (the trace of its covariance);
- ``snr``: ||mean|| / sqrt(sum_j Var[g_j]), the signal-to-noise ratio of one draw
  (Rainforth et al. 2018 study its per-coordinate form |E g_j| / sd g_j);
- ``mean_coord_snr``: the mean over coordinates of |E g_j| / sd g_j.

Baselines are state, not parameters: before drawing, ``score`` with a baseline runs
``warmup`` steps that move only the baseline (the decaying average, and the neural
baseline's network by Adam), so its variance is that of a baseline fitted to these
parameters. Each estimator's gradient is that of the loss it descends: the ELBO for
reparam/score/enum, the relaxed ELBO for gumbel (at its initial temperature) and the
IWAE bound for iwae. Whatever else is random in the model (dynamic binarization of
images) is redrawn with each gradient, as in training, and adds the same noise to all.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pandas as pd
import torch

import pyro

from .batching import Batches, batch_at, load_data_tensors, num_points
from .errors import UsageError
from .estimators import BASELINES, EstimatorSettings, build, feasible_estimators, probe, spec
from .pyro_util import finite, is_baseline_state, positive, rng_scope

__all__ = ["DEFAULT_ESTIMATORS", "gradient_variance", "parse_estimator", "plot_gradient_variance"]

DEFAULT_ESTIMATORS = ("reparam", "score:none", "score:average", "score:neural", "enum", "gumbel", "iwae")


def parse_estimator(text: str) -> tuple[str, EstimatorSettings]:
    """``score:neural`` -> ("score", baseline="neural"); ``gumbel`` -> ("gumbel", defaults)."""
    name, _, option = text.partition(":")
    if name == "auto":
        choices = ", ".join(DEFAULT_ESTIMATORS)
        raise UsageError(f"gradvar measures named estimators, not 'auto'; choose from: {choices} (score:none|average|neural).")
    spec(name)  # refuses an unknown name, listing the registered ones
    if option and name != "score":
        raise UsageError(f"{text!r}: only score takes an option (score:none, score:average, score:neural).")
    if option and option not in BASELINES:
        raise UsageError(f"{text!r}: unknown baseline {option!r}; choose one of: {', '.join(BASELINES)}.")
    return name, EstimatorSettings(baseline=option or None)


def _group(name: str) -> str:
    return name.split("$$$")[0]


def _targets(store) -> dict[str, torch.Tensor]:
    return {name: value for name, value in store.named_parameters() if not is_baseline_state(name)}


@contextlib.contextmanager
def _setup(model, guide, data, options, run, restart, batch_size, seed, device):
    """Yield (model_fn, guide_fn, batch, options, label) with the parameters in the param store."""
    from .gallery import load_model
    from .pyro_util import resolve_device
    from .runs import load_run, restart_params

    if run is not None:
        result = load_run(run, device=device if device != "auto" else "cpu")
        chosen = result.restarts[restart] if restart is not None else result.best
        batch_size = batch_size or result.config.get("batch_size")
        with restart_params(result, chosen):
            num_data = result.config["num_data"]
            batches = Batches(num_data, batch_size, seed, result.device)
            batch = batch_at(result.data, batches.index(0), num_data, batches.batch_size is None)
            stream = Batches(num_data, batch_size, seed + 1, batch.index.device)
            sample = lambda step: batch_at(result.data, stream.index(step), num_data, stream.batch_size is None)  # noqa: E731
            yield chosen.model_fn, chosen.guide_fn, batch, result.options, f"{run} (restart {chosen.restart})", sample
        return
    model_file = load_model(model)
    guide = guide or model_file.default_guide
    if guide not in model_file.guides:
        raise UsageError(f"model {model_file.name!r} has no guide {guide!r}; its guides are: {', '.join(model_file.guides)}.")
    torch_device = resolve_device(device)
    options = model_file.make_options(options)
    _, tensors = load_data_tensors(model_file, data, options, torch_device)
    num_data = num_points(tensors)
    batch_size = batch_size or model_file.fit_defaults.get("batch_size")
    store = pyro.get_param_store()
    with store.scope(), (torch.device(torch_device) if torch_device.type != "cpu" else contextlib.nullcontext()):
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        model_fn, guide_fn = model_file.build_pair(guide, options, tensors)
        batches = Batches(num_data, batch_size, seed, torch_device)
        batch = batch_at(tensors, batches.index(0), num_data, batches.batch_size is None)
        probe(model_fn, guide_fn, batch, options)  # creates the parameters, seeded
        stream = Batches(num_data, batch_size, seed + 1, torch_device)
        sample = lambda step: batch_at(tensors, stream.index(step), num_data, stream.batch_size is None)  # noqa: E731
        yield model_fn, guide_fn, batch, options, f"{model_file.name}/{guide} at its initial parameters (seed {seed})", sample


def _draws(estimator, batch, options, targets: dict, num_draws: int) -> pd.DataFrame:
    """Mean and variance per coordinate of ``num_draws`` gradients, accumulated in float64 (Welford)."""
    groups: dict[str, list[str]] = {}
    for name in targets:
        groups.setdefault(_group(name), []).append(name)
    count = 0
    mean = {name: torch.zeros_like(value, dtype=torch.float64) for name, value in targets.items()}
    m2 = {name: torch.zeros_like(value, dtype=torch.float64) for name, value in targets.items()}
    for _ in range(num_draws):
        for value in targets.values():
            value.grad = None
        _, loss = estimator.loss(batch, options, step=0)
        loss.backward()
        count += 1
        for name, value in targets.items():
            grad = value.grad.double() if value.grad is not None else torch.zeros_like(mean[name])
            delta = grad - mean[name]
            mean[name] += delta / count
            m2[name] += delta * (grad - mean[name])
    rows = []
    for group, names in groups.items():
        mu = torch.cat([mean[n].reshape(-1) for n in names])
        var = torch.cat([m2[n].reshape(-1) for n in names]) / max(count - 1, 1)
        sd = var.sqrt()
        coord_snr = torch.where(sd > 0, mu.abs() / sd, torch.zeros_like(sd))
        total = float(var.sum())
        rows.append(
            {
                "group": group,
                "num_params": mu.numel(),
                "mean_norm": float(mu.norm()),
                "variance": total,
                "snr": float(mu.norm()) / total**0.5 if total > 0 else float("inf"),
                "mean_coord_snr": float(coord_snr.mean()),
            }
        )
    return pd.DataFrame(rows)


def _warmup(estimator, sample, options, steps: int, lr: float) -> None:
    """Fit the baseline (only the baseline) to the fixed parameters, on minibatches drawn as in training.

    Then the decaying average is frozen. Both matter: Pyro keeps one average per *batch position*,
    so on a fixed minibatch it would converge to each point's own mean cost, an input-dependent
    baseline that training (fresh batches each step) never has.
    """
    store = pyro.get_param_store()
    baseline_params = [value for name, value in store.named_parameters() if name.startswith("_ppvi_baseline.")]
    optimizer = torch.optim.Adam(baseline_params, lr=lr) if baseline_params else None
    for step in range(steps):
        _, loss = estimator.loss(sample(step), options, step=0)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    for value in store.values():
        value.grad = None
    if estimator.baselines is not None:
        estimator.baselines.baseline_beta = 1.0  # average_new = 0 * cost + 1 * average_old: frozen


def _measure(name: str, settings, text: str, pair, *, num_particles: int, num_draws: int, warmup: int, warmup_lr: float):
    """One estimator's table: built for the probed pair, its baseline warmed up, then ``num_draws`` gradients."""
    info, model_fn, guide_fn, batch, options, sample = pair
    particles = num_particles if name != "iwae" or num_particles > 1 else 5
    with pyro.validation_enabled(False):
        estimator = build(name, info, model_fn, guide_fn, batch, options, settings=settings,
                          num_particles=particles, vectorize_particles=particles > 1 and name == "iwae")
        if name == "score" and settings.resolved()["baseline"] != "none" and warmup:
            _warmup(estimator, sample, options, warmup, warmup_lr)
        frame = _draws(estimator, batch, options, _targets(pyro.get_param_store()), num_draws)
    frame.insert(0, "estimator", text if name != "iwae" else f"iwae (K={particles})")
    frame["num_draws"] = num_draws
    return frame


def _reset(store, start: dict) -> None:
    """Every estimator starts from the same parameters and no baseline state."""
    with torch.no_grad():
        for name, value in store.named_parameters():
            if name in start:
                value.copy_(start[name])
    for name in [n for n in store if is_baseline_state(n) and n not in start]:
        del store[name]


def gradient_variance(
    model: str | None = None,
    *,
    run: str | Path | None = None,
    estimators=None,
    guide: str | None = None,
    data=None,
    options=None,
    restart: int | None = None,
    num_draws: int = 100,
    batch_size: int | None = None,
    num_particles: int = 1,
    warmup: int = 200,
    warmup_lr: float = 1e-3,
    temperature: float | None = None,
    seed: int = 0,
    device: str = "auto",
    log_fn=None,
) -> pd.DataFrame:
    """Draw ``num_draws`` gradients per estimator at fixed parameters; one row per (estimator, group).

    Parameters
    ----------
    model : str, optional
        Gallery name or model file, at its seeded initial parameters (or give ``run``).
    run : path, optional
        A run directory: its fitted parameters (best restart, or ``restart``) and its data.
    estimators : list of str, optional
        Names from ``DEFAULT_ESTIMATORS`` (``score:none|average|neural`` for the baselines).
        Default: every one of them that can fit the model; a named one that cannot is an error.
    num_draws : int
        Independent gradient estimates per estimator (D).
    batch_size : int, optional
        The fixed minibatch (the first of the seeded batch stream); default the model's
        (or the run's) batch size, else the full data.
    num_particles : int
        Samples per estimate (K of iwae; iwae defaults to 5 when this is 1).
    warmup : int
        Steps fitting a score baseline to these parameters before drawing.
    temperature : float, optional
        Gumbel-softmax temperature (default 1.0).
    """
    if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 2:
        raise UsageError(f"--num-draws must be an integer of at least 2 (got {num_draws!r}).")
    finite("warmup", warmup, kind=int, low=0)
    positive("num-particles", num_particles)
    positive("batch-size", batch_size)  # 0 would otherwise mean "the default size"
    if (model is None) == (run is None):
        raise UsageError("give a MODEL (its initial parameters) or a run directory (its fitted parameters), not both.")
    explicit = estimators is not None
    requested = [parse_estimator(text) + (text,) for text in (estimators or DEFAULT_ESTIMATORS)]
    log_fn = log_fn or (lambda message: None)
    frames = []
    setup = _setup(model, guide, data, options, run, restart, batch_size, seed, device)
    with rng_scope(), setup as (model_fn, guide_fn, batch, options_value, label, sample):
        log_fn(f"gradients at {label}, a fixed batch of {len(batch.index)} points, {num_draws} draws per estimator")
        with pyro.validation_enabled(True):
            info = probe(model_fn, guide_fn, batch, options_value)
        works = feasible_estimators(info)
        start = {name: value.detach().clone() for name, value in pyro.get_param_store().named_parameters()}
        for name, settings, text in requested:
            if name not in works and not explicit:
                continue
            if name == "gumbel" and temperature is not None:
                settings = EstimatorSettings(temperature=temperature, anneal_rate=0.0, min_temperature=temperature)
            _reset(pyro.get_param_store(), start)
            pyro.set_rng_seed(seed)
            pair = (info, model_fn, guide_fn, batch, options_value, sample)
            frames.append(_measure(name, settings, text, pair, num_particles=num_particles, num_draws=num_draws,
                                   warmup=warmup, warmup_lr=warmup_lr))
            log_fn(f"  {text}: done")
    if not frames:
        raise UsageError("none of the requested estimators can fit this model/guide pair.")
    return pd.concat(frames, ignore_index=True)


def plot_gradient_variance(table: pd.DataFrame, path=None, ax=None):
    """Bar chart of each group's gradient variance per estimator (log scale); saved to ``path`` if given.

    Returns the figure; without ``ax`` it is a bare ``matplotlib.figure.Figure`` (pyplot's state
    and backend untouched: in a notebook, display it as the cell's value).
    """
    import seaborn as sns
    from matplotlib.figure import Figure

    from .rundir import atomic_write

    if ax is None:
        ax = Figure(figsize=(7, 4), layout="constrained").subplots()
    sns.barplot(data=table, x="group", y="variance", hue="estimator", ax=ax)
    ax.set_yscale("log")
    ax.set_ylabel("total variance of one gradient draw")
    ax.set_title("gradient variance per parameter group")
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(path), lambda temporary: ax.figure.savefig(temporary, format="png", dpi=110, bbox_inches="tight"))
    return ax.figure
