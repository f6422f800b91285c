"""The ``ppvi`` command line: list, check, fit, compare, diagnose, evaluate, score, sample, gradvar.

``fit``'s options are generated from :class:`ppvi.config.FitConfig`; ``torchrun -m ppvi fit`` (or
``--nproc N``) runs it data-parallel. Exit codes: 0 success; 2 bad input, including errors raised
in the user's own model code (one paragraph, no traceback); 130 Ctrl-C; 1 an internal failure or a
diverged fit. ``PPVI_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import sys
import time
import types
import typing
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from . import distributed
from .errors import TrainingDiverged, UsageError

console = Console(stderr=True, highlight=False, markup=False)  # messages hold paths and [brackets], not markup
output = Console(highlight=False, markup=False)

@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ppvi")
def cli():
    """Fit Pyro model/guide pairs by variational inference, with the right gradient estimator."""


@cli.command("list")
def list_command():
    """List the gallery's models with their guides and options, and the estimators."""
    from .estimators import ESTIMATORS
    from .gallery import gallery_names, load_model

    table = Table(title="ppvi gallery (ppvi fit NAME, or ppvi fit ./your_model.py)")
    for column in ("model", "guides (first is default)", "options", "description"):
        table.add_column(column)
    for name in gallery_names():
        model_file = load_model(name)
        options = model_file.options_class
        flags = ", ".join("--" + f.name.replace("_", "-") for f in dataclasses.fields(options)) if options else ""
        table.add_row(name, ", ".join(model_file.guides), flags, model_file.title)
    output.print(table)
    output.print("estimators: " + ", ".join(ESTIMATORS))


def _model_option(field: dataclasses.Field, hints: dict) -> click.Option:
    kind = hints.get(field.name, field.type)
    flag = "--" + field.name.replace("_", "-")
    help_text = field.metadata.get("help", "")
    default = field.default if field.default is not dataclasses.MISSING else None
    if kind is bool:
        return click.Option([f"{flag}/--no-{flag[2:]}", field.name], default=default, show_default=True, help=help_text)
    if typing.get_origin(kind) is typing.Literal:
        return click.Option([flag, field.name], type=click.Choice([str(v) for v in typing.get_args(kind)]), default=default, show_default=True, help=help_text)
    click_type = {int: click.INT, float: click.FLOAT}.get(kind, click.STRING)
    return click.Option([flag, field.name], type=click_type, default=default, show_default=True, help=help_text)


def _find_model_argument(args: list[str]) -> str | None:
    """MODEL among the arguments, before the model's own options are known.

    The values of those options (``--num-components 3 gmm``) are not MODEL: prefer the first
    word that names a gallery model or a file, else the first free word (for the error message).
    """
    from .gallery import gallery_names

    skip, words, value_options = False, [], _fit_value_options()
    for arg in args:
        if skip:
            skip = False
        elif arg in value_options:
            skip = True
        elif not arg.startswith("-"):
            words.append(arg)
    names = set(gallery_names())
    known = [word for word in words if word in names or word.endswith(".py") or "/" in word]
    unnumbered = [word for word in words if not word.lstrip("-").replace(".", "", 1).isdigit()]
    return (known or unnumbered or words or [None])[0]


class FitCommand(click.Command):
    """``fit`` learns the chosen model's own options (from its Options dataclass) before parsing."""

    def parse_args(self, ctx, args):
        if not hasattr(self, "base_params"):
            self.base_params, self.base_help = list(self.params), self.help
        self.params, self.help = list(self.base_params), self.base_help  # main() may run several times in one process
        name = _find_model_argument(args)
        if name is not None:
            from .gallery import load_model

            model_file = load_model(name)  # a plain Pyro file too (ppvi.plain)
            options = model_file.options_class
            if options is not None:
                hints = typing.get_type_hints(options)
                ctx.meta["ppvi.model_options"] = [f.name for f in dataclasses.fields(options)]
                self.params = self.params + [_model_option(f, hints) for f in dataclasses.fields(options)]
            self.help = (
                f"Fit {model_file.name}: {model_file.title}\n\nConvention detected: {model_file.convention}.\n\n"
                f"Guides: {', '.join(model_file.guides)} (default {model_file.default_guide}). Options after --progress are the model's own."
            )
        return super().parse_args(ctx, args)


def _fit_config_options(command):
    """``ppvi fit``'s options, generated from :class:`~ppvi.config.FitConfig` (the one list of fit options)."""
    from .config import FitConfig

    hints = typing.get_type_hints(FitConfig)
    for item in reversed([item for item in dataclasses.fields(FitConfig) if item.metadata.get("cli", True)]):
        command = _config_option(item, hints[item.name])(command)
    return command


def _config_option(item: dataclasses.Field, kind):
    flag = "--" + item.name.replace("_", "-")
    base = typing.get_args(kind)[0] if typing.get_origin(kind) in (typing.Union, types.UnionType) else kind
    default = item.default if item.default is not dataclasses.MISSING else None
    show = default is not None
    if base is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", item.name, default=None, help=item.metadata["help"])
    if typing.get_origin(base) is tuple:
        return click.option(flag, item.name, type=_NUMBERS, default=default, help=item.metadata["help"])
    click_type = {int: click.INT, float: click.FLOAT}.get(base, click.STRING)
    return click.option(flag, item.name, type=click_type, default=default, show_default=show, help=item.metadata["help"])


class _Numbers(click.ParamType):
    name = "B1,B2"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return tuple(float(part) for part in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers", param, ctx)


_NUMBERS = _Numbers()


def _fit_value_options() -> set:
    """The fit options that take a value (so that the word after them is not MODEL)."""
    from .config import FitConfig

    hints = typing.get_type_hints(FitConfig)
    flags = {"--" + item.name.replace("_", "-") for item in dataclasses.fields(FitConfig) if hints[item.name] not in (bool, bool | None)}
    return flags | {"--data", "--out", "--resume", "--nproc"}


@cli.command("fit", cls=FitCommand)
@click.argument("model", required=False)
@_fit_config_options
@click.option("--data", help="Data: FILE.csv, a folder, or synthetic:n=...,k=...; default: the model's built-in data.")
@click.option("--out", type=click.Path(file_okay=False), help="Run directory (default: runs/MODEL-GUIDE-TIME).")
@click.option("--resume", type=click.Path(file_okay=False), help="Continue the interrupted run in this directory.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@click.option("--trust-model", is_flag=True, help="With --resume: import the model file the run's config.json names (prints its path and sha256).")
@click.option("--nproc", type=int, help="Data-parallel worker processes on this machine (starts torchrun; default 1).")
@click.pass_context
def fit_command(ctx, model, data, out, resume, progress, trust_model, nproc, **options):
    """Fit MODEL (a gallery name or a path to a .py file); `ppvi fit MODEL --help` lists its options."""
    from .config import FitConfig
    from .fitting import fit
    from .fitting import resume as resume_run

    if nproc is not None and not distributed.is_launched():  # start the workers, each runs this command without --nproc
        ctx.exit(distributed.launch(nproc, _without_nproc((ctx.find_root().obj or {}).get("argv") or sys.argv[1:])))
    if nproc is not None and nproc != int(os.environ["WORLD_SIZE"]):
        raise UsageError(f"--nproc {nproc} under torchrun with {os.environ['WORLD_SIZE']} processes: give one or the other.")

    settings = {name: options.pop(name) for name in [item.name for item in dataclasses.fields(FitConfig)] if name in options}
    model_options = options
    guide = settings.pop("guide")
    progress = sys.stderr.isatty() if progress is None else progress
    started = time.perf_counter()
    if resume is not None:
        if ctx.get_parameter_source("steps").name == "COMMANDLINE":
            console.print("note: --resume takes every setting from the run's config.json; other options are ignored.")
        result = resume_run(resume, model=model, trust_model=trust_model, progress=progress, log_fn=console.print)
    else:
        if model is None:
            raise UsageError("missing MODEL: give a gallery name (see `ppvi list`) or a path to a model file, or --resume DIR.")
        if out is None:
            stem = Path(model).stem
            out = Path("runs") / f"{stem}-{guide or 'default'}-{time.strftime('%Y%m%d-%H%M%S')}"
            while out.exists():
                out = out.with_name(out.name + "_")
        result = fit(model, guide, data=data, options=model_options, out=out, progress=progress, log_fn=console.print, **settings)
    seconds = time.perf_counter() - started
    if distributed.env_rank() != 0:
        return
    from .report import describe_fit

    output.print(describe_fit(result))
    output.print(f"[{result.device}, {seconds:.1f} s]")
    summarize_fn = getattr(result.model_file.module, "summarize", None)  # optional in a model file
    if summarize_fn is not None:
        for key, value in summarize_fn(result).items():
            output.print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    output.print(f"run directory: {result.run_dir}")


def _preload(run_dir: str, model: str | None, trust_model: bool):
    """The run, loaded here when the user named its model file (--model) or trusts it; else the folder, loaded later."""
    if model is None and not trust_model:
        return run_dir
    from .runs import load_run

    return load_run(run_dir, model=model, trust_model=trust_model, log_fn=console.print)


def _model_options(command):
    """--model PATH and --trust-model: how a user allows the model file a run directory names."""
    command = click.option("--trust-model", is_flag=True, help="Import the model file the run's config.json names (prints its path and sha256).")(command)
    return click.option("--model", "model", help="The run's model file (a run directory's own model file is imported only once you name it).")(command)


@cli.command("compare")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(dir_okay=False), help="Save the overlaid traces here (PNG).")
@click.option("--smooth", type=click.IntRange(min=1), default=1, show_default=True, help="Rolling-mean window in steps.")
def compare_command(run_dirs, out, smooth):
    """Overlay the ELBO traces of several runs (seaborn) and print their final ELBOs."""
    from .compare import compare_runs, final_elbos, plot_traces
    from .plots import save_figure

    for run_dir in run_dirs:
        if not Path(run_dir).is_dir():
            raise UsageError(f"{run_dir}: no such run directory.")
    frame = compare_runs(run_dirs)
    table = Table(title="final ELBO (median of last 10% of steps, per restart)")
    for column in ("run", "model", "guide", "estimator", "steps", "final ELBO"):
        table.add_column(column)
    for row in final_elbos(frame).itertuples(index=False):
        table.add_row(row.run, row.model, row.guide, row.estimator, str(row.steps), ", ".join(f"{v:.4g}" for v in row.final_elbo))
    output.print(table)
    if out is not None:
        from matplotlib.figure import Figure  # a bare figure: no backend to choose, no pyplot state

        figure = Figure(figsize=(7, 4), layout="constrained")
        plot_traces(frame, ax=figure.subplots(), smooth=smooth)
        save_figure(figure, out)
        output.print(f"wrote {out}")


@cli.command("check")
@click.argument("model")
@click.option("--guide", help="Guide: a name from the file, file.py:guide_fn, or an autoguide name (AutoNormal...).")
@click.option("--data", help="Data: FILE.csv (columns to arguments by name, else the whole table as the first), or the model's own.")
@click.option("--batch-size", type=int, help="Also check a minibatch of this size (the scaling, or why it is refused).")
def check_command(model, guide, data, batch_size):
    """Load MODEL (file.py, file.py:model_fn or a gallery name) and its guide without fitting; print its sites,
    data plate and minibatch scaling, the estimators that apply and auto's pick, and every problem (exit 2 on an error)."""
    from .check import check

    report = check(model, guide, data=data, batch_size=batch_size)
    output.print(report.text(), soft_wrap=True)
    if report.errors:
        raise UsageError(f"{len(report.errors)} error(s) in {model}: {report.errors[0]}")


@cli.command("diagnose")
@click.argument("run_dir", type=click.Path())
@click.option("--num-samples", type=int, help="Guide draws per restart (default: 16,000 pooled over the restarts, at least 1,000 each; fewer for large data).")
@click.option("--reference", help="Also run a reference sampler and compare: nuts (small models only).")
@click.option("--nuts-samples", type=int, default=1000, show_default=True, help="NUTS draws (after half as many warm-up steps, at least 200).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the draws (and of NUTS).")
@click.option("--progress/--no-progress", default=None, help="NUTS progress bar (default: when stderr is a terminal).")
@_model_options
def diagnose_command(run_dir, num_samples, reference, nuts_samples, seed, progress, model, trust_model):
    """Judge a fitted guide: ArviZ summary, PSIS k-hat, R-hat across restarts, PSIS-LOO, and optionally NUTS.

    Writes posterior.nc, summary.csv and diagnostics.json (and nuts_comparison.csv,
    nuts_forest.png with --reference nuts) into RUN_DIR.
    """
    from .diagnostics import diagnose, format_diagnosis

    progress = sys.stderr.isatty() if progress is None else progress
    diagnosis = diagnose(
        _preload(run_dir, model, trust_model), num_samples=num_samples, seed=seed, reference=reference, nuts_samples=nuts_samples,
        progress=progress, log_fn=console.print
    )
    output.print(format_diagnosis(diagnosis), soft_wrap=True)


@contextlib.contextmanager
def _points_progress(description: str, enabled: bool | None):
    """A rich progress bar over data points (on stderr); yields the ``progress(done, total)`` callback evaluate calls."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    enabled = sys.stderr.isatty() if enabled is None else enabled
    columns = (TextColumn(description), BarColumn(), MofNCompleteColumn(), TextColumn("points"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not enabled) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@cli.command("evaluate")
@click.argument("run_dir", type=click.Path())
@click.option("--data", help="Points to evaluate (a --data source for the run's model); default: the training data.")
@click.option("--split", type=click.Choice(["train", "test"]), help="With --data DIR of MNIST IDX files: test reads its t10k-* split.")
@click.option("--iwae-k", "iwae_k", type=int, default=100, show_default=True, help="K, importance samples per data point (ppvi.evaluate.DEFAULT_IWAE_K).")
@click.option("--batch-size", type=int, default=100, show_default=True, help="Data points per batch (memory: batch size x 100 samples at a time).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the draws (and of the binarization, for the vae).")
@_model_options
@click.option("--progress/--no-progress", default=None, help="Progress bar over the data points (default: when stderr is a terminal).")
def evaluate_command(run_dir, data, split, iwae_k, batch_size, seed, model, trust_model, progress):
    """ELBO and IWAE estimate of log p(x) per data point (nats), for amortized local-latent models (vae, ppca)."""
    from .evaluate import evaluate

    if iwae_k < 1:
        raise UsageError(f"--iwae-k must be at least 1 (got {iwae_k}).")
    with _points_progress(f"evaluate K={iwae_k}", progress) as advance:
        frame = evaluate(_preload(run_dir, model, trust_model), data=data, num_samples=iwae_k, batch_size=batch_size, seed=seed,
                         split=split, progress=advance)
    table = Table(title=f"{frame.attrs['data']}: {int(frame['num_points'][0])} points, K = {iwae_k} (nats per point)")
    for column in ("estimate", "mean", "standard error"):
        table.add_column(column)
    for _, row in frame.iterrows():
        table.add_row(row["estimate"], f"{row['mean']:.4f}", f"{row['se']:.4f}")
    output.print(table)


@cli.command("score")
@click.argument("run_dir", type=click.Path())
@click.option("--data", help="Points to score (a --data source for the run's model); default: the training data.")
@click.option("--split", type=click.Choice(["train", "test"]), help="With --data DIR of MNIST IDX files: test reads its t10k-* split.")
@click.option("--iwae-k", "iwae_k", type=int, default=100, show_default=True, help="K, importance samples per data point (ppvi.evaluate.DEFAULT_IWAE_K).")
@click.option("--batch-size", type=int, default=100, show_default=True, help="Data points per batch.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the draws (and of the binarization, for the vae).")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="CSV to write: index, log_p, elbo[, label], in data order.")
@_model_options
@click.option("--progress/--no-progress", default=None, help="Progress bar over the data points (default: when stderr is a terminal).")
def score_command(run_dir, data, split, iwae_k, batch_size, seed, out, model, trust_model, progress):
    """Per-example IWAE log p(x) as CSV, to rank the least likely inputs (sort by log_p)."""
    from .evaluate import score

    if iwae_k < 1:
        raise UsageError(f"--iwae-k must be at least 1 (got {iwae_k}).")
    with _points_progress(f"score K={iwae_k}", progress) as advance:
        frame = score(_preload(run_dir, model, trust_model), data=data, num_samples=iwae_k, out=out, batch_size=batch_size, seed=seed,
                      split=split, progress=advance)
    lowest = frame.nsmallest(1, "log_p").iloc[0]
    output.print(f"wrote {out}: {len(frame)} rows; mean log_p {frame['log_p'].mean():.4f}, lowest {lowest['log_p']:.4f} (index {int(lowest['index'])})")


@cli.command("sample")
@click.argument("run_dir", type=click.Path())
@click.option("-n", "n", type=int, default=16, show_default=True, help="Prior samples (or, with --reconstruct, inputs to reconstruct).")
@click.option("--out", type=click.Path(dir_okay=False), help="PNG to write (default: RUN_DIR/samples.png, reconstructions.png, manifold.png or latent.png).")
@click.option("--reconstruct", is_flag=True, help="The first n inputs (top row) beside decode(encode(x).loc) (bottom row).")
@click.option("--manifold", "manifold_", is_flag=True, help="Decode a grid x grid lattice of Gaussian quantiles (latent_dim 2 only).")
@click.option("--latent", is_flag=True, help="Scatter of the posterior means of q(z | x), coloured by label (PCA beyond 2 dims).")
@click.option("--grid", type=int, default=15, show_default=True, help="Side of the --manifold lattice.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the prior draws.")
@_model_options
def sample_command(run_dir, n, out, reconstruct, manifold_, latent, grid, seed, model, trust_model):
    """Images from a fitted generative model (one whose model defines decode(z), like vae): a PNG grid."""
    import numpy as np

    from . import sampling

    if sum((reconstruct, manifold_, latent)) > 1:
        raise UsageError("give at most one of --reconstruct, --manifold, --latent.")
    if n < 1:
        raise UsageError(f"-n must be at least 1 (got {n}).")
    if grid < 1:
        raise UsageError(f"--grid must be at least 1 (got {grid}).")
    from .runs import load_run

    result = load_run(run_dir, model=model, trust_model=trust_model, log_fn=console.print)
    kind = "reconstructions" if reconstruct else "manifold" if manifold_ else "latent" if latent else "samples"
    out = Path(out) if out is not None else Path(run_dir) / f"{kind}.png"
    if latent:
        sampling.save_figure(sampling.latent_scatter(result), out)
        output.print(f"wrote {out}")
        return
    if reconstruct:
        inputs, outputs = sampling.reconstructions(result, n, seed)
        images, rows, cols = np.concatenate([inputs, outputs]), 2, len(inputs)
    elif manifold_:
        lattice = sampling.manifold(result, grid)
        images, rows, cols = lattice.reshape(-1, *lattice.shape[2:]), grid, grid
    else:
        images = sampling.prior_samples(result, n, seed)
        rows, cols = sampling.prior_grid_shape(n)
    height, width = sampling.save_grid(images, out, rows=rows, cols=cols)
    output.print(f"wrote {out}: {rows}x{cols} tiles of {images.shape[1]}x{images.shape[2]}, {width}x{height} pixels")


@cli.command("gradvar")
@click.argument("target", required=False)
@click.option("--estimator", "estimators", multiple=True, help="Estimator to measure (repeatable): reparam, score:none, score:average, score:neural, enum, "
              "gumbel, iwae. Default: every one that fits.")
@click.option("--num-draws", type=int, default=100, show_default=True, help="D, independent gradient draws per estimator.")
@click.option("--guide", help="Guide of MODEL (default: its first).")
@click.option("--data", help="Data for MODEL (default: its built-in data).")
@click.option("--batch-size", type=int, help="The fixed minibatch's size (default: the model's or the run's).")
@click.option("--num-particles", type=int, default=1, show_default=True, help="Samples per gradient estimate (K of iwae, default 5).")
@click.option("--warmup", type=int, default=200, show_default=True, help="Steps fitting a score baseline to the fixed parameters first.")
@click.option("--temperature", type=float, help="Gumbel-softmax temperature (default 1.0).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the draws (and of MODEL's initial parameters).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--out", type=click.Path(file_okay=False), help="Folder for gradvar.csv and gradvar.png.")
@click.option("--worked-example", is_flag=True, help="The lecture's z ~ N(theta, 1), f = z^2 example: score vs pathwise over N samples.")
@click.option("--theta", type=float, default=2.0, show_default=True, help="theta of the worked example.")
@click.option("--repetitions", type=int, default=100, show_default=True, help="Repetitions per N in the worked example.")
def gradvar_command(target, estimators, num_draws, guide, data, batch_size, num_particles, warmup, temperature, seed, device, out,
                    worked_example, theta, repetitions):
    """Gradient variance per estimator at fixed parameters: TARGET is a model (its initial parameters) or a run directory.

    Prints mean norm, total variance and signal-to-noise ratio per parameter group; with
    --out writes gradvar.csv and gradvar.png. --worked-example reproduces the lecture's
    table instead (no TARGET).
    """
    if worked_example:
        from .worked_example import format_table, plot_worked_example
        from .worked_example import worked_example as run_example

        if target is not None:
            raise UsageError("--worked-example takes no MODEL or run directory.")
        if repetitions < 2:
            raise UsageError(f"--repetitions must be at least 2 (got {repetitions}).")
        frame = run_example(theta=theta, repetitions=repetitions, seed=seed)
        output.print(f"z ~ N(theta={theta:g}, 1), f(z) = z^2: d/dtheta E[f] = {2 * theta:g}; {repetitions} repetitions per N")
        output.print(format_table(frame))
        if out is not None:
            from .rundir import atomic_write

            Path(out).mkdir(parents=True, exist_ok=True)
            atomic_write(Path(out) / "worked_example.csv", lambda temporary: frame.to_csv(temporary, index=False))
            plot_worked_example(frame, Path(out) / "worked_example.png")
            output.print(f"wrote {Path(out) / 'worked_example.csv'} and worked_example.png")
        return
    from .gradvar import gradient_variance, plot_gradient_variance

    if target is None:
        raise UsageError("missing TARGET: a gallery model name, a model file, or a run directory (or --worked-example).")
    is_run = Path(target).is_dir() and (Path(target) / "config.json").exists()
    frame = gradient_variance(
        None if is_run else target, run=target if is_run else None, estimators=list(estimators) or None, guide=guide, data=data,
        num_draws=num_draws, batch_size=batch_size, num_particles=num_particles, warmup=warmup, temperature=temperature,
        seed=seed, device=device, log_fn=console.print,
    )
    table = Table(title=f"gradient variance per estimator ({num_draws} draws at fixed parameters)")
    for column in ("estimator", "group", "params", "|mean|", "variance", "SNR", "mean coord SNR"):
        table.add_column(column)
    for _, row in frame.iterrows():
        table.add_row(row["estimator"], row["group"], str(row["num_params"]), f"{row['mean_norm']:.4g}", f"{row['variance']:.4g}",
                      f"{row['snr']:.3g}", f"{row['mean_coord_snr']:.3g}")
    output.print(table)
    if out is not None:
        from .rundir import atomic_write

        Path(out).mkdir(parents=True, exist_ok=True)
        atomic_write(Path(out) / "gradvar.csv", lambda temporary: frame.to_csv(temporary, index=False))
        plot_gradient_variance(frame, Path(out) / "gradvar.png")
        output.print(f"wrote {Path(out) / 'gradvar.csv'} and gradvar.png")


REPORT_TO = "the ppvi issue tracker (with the command you ran and the traceback)"


def _without_nproc(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip or arg == "--nproc":
            skip = not skip
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def _rank_scope() -> None:
    """Under torchrun: rank 0 alone talks, before the process group (every rank refuses bad input the
    same way); after it, a failing rank's message names the rank (``rank 1: error: ...``)."""
    if not distributed.is_launched():
        return
    rank = distributed.env_rank()
    connected = distributed.dist.is_initialized()
    console.quiet = rank != 0 and not connected
    if connected and not getattr(console, "_ppvi_ranked", False):
        original = console.print
        console.print = lambda text="", *args, **kwargs: original(f"rank {rank}: {text}", *args, **kwargs)
        console._ppvi_ranked = True


def main(argv=None) -> int:
    """Entry point of the console script; returns the exit code.

    The one error boundary: 0 success; 2 a user's mistake or an unusable file, disk or folder (one
    paragraph, no traceback); 130 Ctrl-C (with the resume hint); 1 a diverged fit or a bug in ppvi
    ("internal error", where to report it, ``PPVI_DEBUG=1`` for the traceback).
    """
    debug = bool(os.environ.get("PPVI_DEBUG"))
    args = sys.argv[1:] if argv is None else list(argv)
    if distributed.env_rank() != 0:
        console.quiet = output.quiet = True
    try:
        code = cli.main(args=args, prog_name="ppvi", standalone_mode=False, obj={"argv": args})
        return code if isinstance(code, int) else 0
    except click.exceptions.Exit as stop:
        return stop.exit_code
    except click.ClickException as error:
        if distributed.env_rank() == 0:
            error.show()
        return 2 if error.exit_code in (1, 2) else error.exit_code
    except distributed.PeerLost:  # another rank failed and says why; torchrun stops this one
        if debug:
            raise
        return 1
    except click.exceptions.Abort as stop:  # click turns Ctrl-C into Abort (its cause) outside standalone mode
        if isinstance(stop.__cause__, KeyboardInterrupt):
            return _interrupted(args)
        console.print("aborted.")
        return 1
    except KeyboardInterrupt:
        return _interrupted(args)
    except UsageError as error:
        if debug:
            raise
        _rank_scope()
        # Pyro appends a table of trace shapes to errors raised inside a model or guide: keep the message
        message = re.split(r"\n\s*Trace Shapes:", str(error))[0].rstrip()
        console.print(f"error: {message}", soft_wrap=True)
        return 2
    except TrainingDiverged as error:  # every rank sees the same all-reduced ELBO: rank 0 says it
        if debug:
            raise
        console.print(f"error: training diverged: {error}", soft_wrap=True)
        return 1
    except (OSError, MemoryError) as error:  # a full disk, a folder that is a file, no permission: not a bug in ppvi
        if debug:
            raise
        console.print(f"error: {_describe_os_error(error, args)}", soft_wrap=True)
        return 2
    except Exception as error:  # an internal failure: say so plainly, traceback on request
        if debug:
            raise
        _rank_scope()
        console.print(
            f"internal error: {type(error).__name__}: {error}\nThis is a bug in ppvi: please report it to {REPORT_TO}; "
            "set PPVI_DEBUG=1 to see the traceback.",
            soft_wrap=True,
        )
        return 1


def _run_dir_argument(args: list[str]) -> str | None:
    """The run directory a ``fit`` command line writes (--resume DIR or --out DIR), if it names one."""
    for flag in ("--resume", "--out"):
        for index, arg in enumerate(args[:-1]):
            if arg == flag:
                return args[index + 1]
        for arg in args:
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
    return None


def _interrupted(args: list[str]) -> int:
    run_dir = _run_dir_argument(args) if "fit" in args else None
    if run_dir is not None and (Path(run_dir) / "config.json").is_file():
        console.print(f"interrupted; continue with `ppvi fit --resume {run_dir}`.", soft_wrap=True)
    elif run_dir is not None:
        console.print(f"interrupted before anything was saved in {run_dir}; start the fit again.", soft_wrap=True)
    elif "fit" in args:
        console.print("interrupted; continue with `ppvi fit --resume RUN_DIR` (the run directory printed above).", soft_wrap=True)
    else:
        console.print("interrupted.")
    return 130


def _describe_os_error(error: BaseException, args: list[str]) -> str:
    if isinstance(error, MemoryError):
        return "out of memory (MemoryError); use smaller data, a smaller --batch-size or fewer samples."
    path = error.filename if getattr(error, "filename", None) else None
    cause = error.strerror or str(error) or type(error).__name__
    text = f"{path}: {cause}" if path else f"{type(error).__name__}: {cause}"
    hint = {
        errno.ENOSPC: "free some space",
        errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
        errno.EACCES: "choose a folder you may write",
        errno.EROFS: "choose a folder on a writable disk",
        errno.EDQUOT: "free some space",
    }.get(error.errno)
    text += f" ({type(error).__name__}); {hint}." if hint else f" ({type(error).__name__})."
    run_dir = _run_dir_argument(args) if "fit" in args else None
    if run_dir is not None and (Path(run_dir) / "params.pt").is_file():
        text += f" The last checkpoint in {run_dir} is intact: continue with `ppvi fit --resume {run_dir}`."
    return text


if __name__ == "__main__":
    sys.exit(main())


def run() -> None:
    """Console-script wrapper: exit with :func:`main`'s code."""
    sys.exit(main())
