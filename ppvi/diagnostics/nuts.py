"""NUTS reference: Pyro's NUTS on the same model and full data, a table and a forest plot of VI against it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

import pyro
from pyro.infer import config_enumerate

from .. import rundir
from ..batching import num_points
from ..errors import UsageError
from ..pyro_util import device_scope, rng_scope
from ..runs import full_batch, load_run, restart_params
from .arviz_util import az, quiet
from .draws import check_count
from .layout import Layout, build_layout

if TYPE_CHECKING:
    from ..results import FitResult

__all__ = ["MAX_NUTS_DATA", "MAX_NUTS_LATENT_DIM", "NutsComparison", "check_nuts", "compare_to_reference", "nuts_reference", "plot_comparison"]

MAX_NUTS_LATENT_DIM = 1000  # continuous latent dimensions NUTS is asked to explore
MAX_NUTS_DATA = 10_000  # data points per gradient evaluation


@dataclass(frozen=True)
class NutsComparison:
    """VI against NUTS, element by element."""

    table: pd.DataFrame  # vi_mean, vi_sd, nuts_mean, nuts_sd, nuts_mcse_mean, mean_diff, mean_diff_sd, sd_ratio
    reference: object  # az.InferenceData of the NUTS draws
    num_divergences: int


def check_nuts(result: FitResult, layout: Layout) -> None:
    """Refuse models NUTS cannot take or that are too large for it (limits: this module's constants)."""
    num_data = num_points(result.data)
    latent_dim = sum(int(np.prod(site.shape)) for site in layout.latent.values() if not site.discrete)
    discrete = [name for name, site in layout.latent.items() if site.discrete]
    if discrete:
        raise UsageError(
            f"--reference nuts: the model has discrete latent site(s) {', '.join(map(repr, discrete))} that are not per-data-point "
            "sites NUTS could sum out by enumeration; NUTS needs continuous latents."
        )
    if latent_dim > MAX_NUTS_LATENT_DIM:
        raise UsageError(f"--reference nuts: the model has {latent_dim} continuous latent dimensions; ppvi runs NUTS up to {MAX_NUTS_LATENT_DIM}.")
    if num_data > MAX_NUTS_DATA:
        raise UsageError(f"--reference nuts: the data have {num_data} points; ppvi runs NUTS (full-data gradients) up to {MAX_NUTS_DATA}.")


def _run_nuts(result: FitResult, layout: Layout, num_samples: int, warmup_steps: int, seed: int, progress: bool):
    """NUTS samples (grouped by chain) and the indices of divergent transitions."""
    from pyro.infer import MCMC, NUTS

    best = result.best
    model_fn = config_enumerate(best.model_fn, default="parallel") if layout.marginalized else best.model_fn
    with restart_params(result, best), rng_scope(seed), device_scope(result.device):
        kernel = NUTS(model_fn, max_plate_nesting=layout.max_plate_nesting, jit_compile=False)
        mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps, num_chains=1, disable_progbar=not progress)
        mcmc.run(full_batch(result), result.options)
        return mcmc.get_samples(group_by_chain=True), mcmc.diagnostics().get("divergences", {}).get("chain 0", [])


def nuts_reference(run, num_samples: int = 1000, *, warmup_steps: int | None = None, seed: int = 0, progress: bool = False):
    """Run Pyro's NUTS on the same model and full data; return its posterior as InferenceData (one chain).

    Discrete per-data-point sites are summed out by enumeration, as in the VI diagnostics.
    Model parameters (``pyro.param`` in the model, if any) are held at the best restart's values.

    Raises
    ------
    UsageError
        Models too large for NUTS (more than ``MAX_NUTS_LATENT_DIM`` continuous latent dimensions
        or ``MAX_NUTS_DATA`` data points), or with discrete latent sites it cannot sum out.
    """
    result = load_run(run)
    num_samples = check_count("nuts-samples", num_samples)
    seed = check_count("seed", seed, minimum=0)
    layout = build_layout(result)
    check_nuts(result, layout)
    warmup_steps = warmup_steps if warmup_steps is not None else max(200, num_samples // 2)
    samples, divergences = _run_nuts(result, layout, num_samples, warmup_steps, seed, progress)
    # pyro.deterministic sites are not among NUTS's samples: they are left out of the comparison
    posterior = {name: samples[name].reshape(1, num_samples, *site.shape).detach().cpu().numpy() for name, site in layout.kept.items() if name in samples}
    diverging = np.zeros((1, num_samples), dtype=bool)
    diverging[0, list(divergences)] = True
    coords = {name: np.arange(size) for name, size in layout.plate_sizes.items()}
    dims = {name: layout.latent[name].dims for name in posterior}
    used = {dim for names in dims.values() for dim in names}
    attrs = {"ppvi_model": result.model_file.name, "ppvi_reference": "nuts", "ppvi_warmup_steps": warmup_steps, "ppvi_seed": seed}
    return az.InferenceData(
        posterior=az.dict_to_dataset(posterior, coords={k: v for k, v in coords.items() if k in used}, dims=dims, attrs=attrs, library=pyro),
        sample_stats=az.dict_to_dataset({"diverging": diverging}, attrs=attrs, library=pyro),
    )


def compare_to_reference(vi, reference) -> NutsComparison:
    """Per element: VI and NUTS means and sds side by side, their differences in NUTS sds, and sd ratios.

    Elements are matched by name and index, so a mixture's components are compared as labelled:
    where VI and NUTS settle in different label modes, the differences show the relabelling.
    """
    with quiet():
        ours = az.summary(vi, kind="stats", round_to="none")
        theirs = az.summary(reference, round_to="none")
    common = [label for label in ours.index if label in theirs.index]
    table = pd.DataFrame(
        {
            "vi_mean": ours.loc[common, "mean"],
            "vi_sd": ours.loc[common, "sd"],
            "nuts_mean": theirs.loc[common, "mean"],
            "nuts_sd": theirs.loc[common, "sd"],
            "nuts_mcse_mean": theirs.loc[common, "mcse_mean"],
        }
    )
    table["mean_diff"] = table["vi_mean"] - table["nuts_mean"]
    table["mean_diff_sd"] = table["mean_diff"] / table["nuts_sd"]  # in posterior sds, as NUTS estimates them
    table["sd_ratio"] = table["vi_sd"] / table["nuts_sd"]
    divergences = int(reference.sample_stats["diverging"].sum()) if "sample_stats" in reference.groups() else 0
    return NutsComparison(table, reference, divergences)


def plot_comparison(vi, reference, path: Path, names=("VI", "NUTS")) -> Path:
    """ArviZ forest plot of VI against the reference (94% HDIs, chains combined), saved as PNG."""
    import matplotlib.pyplot as plt  # ArviZ draws through pyplot; headless machines fall back to Agg by themselves

    var_names = [name for name in vi.posterior.data_vars if name in reference.posterior.data_vars]
    with quiet():
        axes = az.plot_forest([vi, reference], model_names=list(names), var_names=var_names, combined=True)
    figure = np.ravel(axes)[0].figure
    rundir.atomic_write(Path(path), lambda temporary: figure.savefig(temporary, format="png", dpi=110))
    plt.close(figure)
    return Path(path)
