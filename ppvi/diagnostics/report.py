"""Every diagnostic at once (:func:`diagnose`), its files in the run directory, its JSON and its text."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .. import rundir
from ..errors import UsageError
from ..runs import load_run
from .draws import check_count, to_inference_data
from .layout import Layout, build_layout
from .loo import LooReport, loo_report
from .nuts import NutsComparison, check_nuts, compare_to_reference, nuts_reference, plot_comparison
from .psis import PsisReport, psis_diagnostics
from .rhat import RestartAgreement, restart_agreement
from .summary import summarize

__all__ = [
    "DRAW_BUDGET",
    "MAX_PRINTED_ROWS",
    "POOLED_DRAWS",
    "Diagnosis",
    "default_num_samples",
    "diagnose",
    "format_diagnosis",
]

POOLED_DRAWS = 16_000  # draws over all restarts by default: 8 blocks for the pooled k-hat (sd ~0.04 seed to seed, see .psis)
MIN_DEFAULT_DRAWS = 1000  # per restart, by default
DRAW_BUDGET = 100_000_000  # restarts x draws x observed values per draw, by default (the cost of the model's likelihood)
MIN_BUDGET_DRAWS = 100  # per restart, however large the data (PSIS's minimum)
MAX_PRINTED_ROWS = 60  # of the summary tables ppvi diagnose prints (the CSV files hold them all)
POSTERIOR_FILE, SUMMARY_FILE, REPORT_FILE = "posterior.nc", "summary.csv", "diagnostics.json"
COMPARISON_FILE, FOREST_FILE = "nuts_comparison.csv", "nuts_forest.png"


def default_num_samples(restarts: int, layout: Layout) -> int:
    """Draws per restart when none are asked for: ``POOLED_DRAWS`` over all restarts (at least 1,000 each),
    fewer where restarts x draws x observed values would pass ``DRAW_BUDGET`` (at least 100 each)."""
    wanted = max(MIN_DEFAULT_DRAWS, math.ceil(POOLED_DRAWS / restarts))
    per_draw = max(1, sum(int(np.prod(site.shape)) for site in layout.observed.values()))
    affordable = DRAW_BUDGET // (restarts * per_draw)
    return int(max(MIN_BUDGET_DRAWS, min(wanted, affordable)))


@dataclass(frozen=True)
class Diagnosis:
    """What ``ppvi diagnose`` reports; plain data, built once."""

    model: str
    guide: str
    num_samples: int
    seed: int
    idata: object = field(repr=False)  # az.InferenceData
    summary: pd.DataFrame = field(repr=False)
    psis: PsisReport = field(repr=False)
    restarts: RestartAgreement = field(repr=False)
    loo: LooReport = field(repr=False)
    nuts: NutsComparison | None = field(default=None, repr=False)
    run_dir: Path | None = None
    files: tuple = ()
    left_out: tuple = ()  # local latent sites not in the posterior table
    convergence: dict = field(default_factory=dict)  # restart -> the stopping rule's summary (config.json); {} for fixed budgets

    @property
    def num_restarts(self) -> int:
        return int(self.idata.sample_stats.sizes["chain"])

    def to_json(self) -> dict:
        report = {
            "model": self.model,
            "guide": self.guide,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "restarts": self.num_restarts,
            "marginalized_sites": [s for s in self.idata.sample_stats.attrs.get("ppvi_marginalized", "").split(", ") if s],
            "left_out_sites": list(self.left_out),
            "psis": _psis_json(self.psis),
            "rhat": {
                "max": _number(self.restarts.rhat.max()) if len(self.restarts.rhat) else None,
                "flagged": {label: _number(self.restarts.rhat[label]) for label in self.restarts.flagged},
                "note": self.restarts.note,
            },
            "convergence": self.convergence,
            "loo": {key: (_number(value) if isinstance(value, float) else value) for key, value in dataclasses.asdict(self.loo).items()},
        }
        if self.nuts is not None:
            table = self.nuts.table
            report["nuts"] = {
                "num_samples": int(self.nuts.reference.posterior.sizes["draw"]),
                "num_divergences": self.nuts.num_divergences,
                "max_abs_mean_diff_sd": _number(table["mean_diff_sd"].abs().max()),
                "sd_ratio_range": [_number(table["sd_ratio"].min()), _number(table["sd_ratio"].max())],
            }
        return report


def _number(value):
    return None if value is None or not np.isfinite(value) else float(value)


def _psis_json(psis: PsisReport) -> dict:
    return {
        "khat": [_number(k) for k in psis.khat],
        "khat_pooled": _number(psis.khat_pooled),
        "khat_range": [_number(k) for k in psis.khat_range],
        "khat_mean": _number(psis.khat_mean),
        "khat_max": _number(psis.khat_max),
        "verdict": psis.verdict,
        "verdict_from": "pooled",
        "note": psis.note,
    }


def _check_arguments(num_samples, seed, reference, nuts_samples) -> None:
    if num_samples is not None:
        check_count("num-samples", num_samples)
    check_count("seed", seed, minimum=0)
    if reference not in (None, "nuts"):
        raise UsageError(f"unknown --reference {reference!r}; the reference available is: nuts.")
    if reference is not None:
        check_count("nuts-samples", nuts_samples)


def _left_out_line(layout: Layout) -> str | None:
    if not layout.left_out:
        return None
    sizes = ", ".join(f"'{name}' ({' x '.join(map(str, layout.latent[name].shape))})" for name in layout.left_out)
    return (
        f"left out of the posterior table: local latent site(s) {sizes}, one value per data point in plate "
        f"{layout.data_plate!r}; their densities still enter log p and log q (k-hat, LOO)"
    )


def diagnose(
    run,
    *,
    num_samples: int | None = None,
    seed: int = 0,
    reference: str | None = None,
    nuts_samples: int = 1000,
    write: bool = True,
    progress: bool = False,
    log_fn: Callable[[str], None] | None = None,
) -> Diagnosis:
    """Draw from the guide, compute every diagnostic, and write them into the run directory.

    Parameters
    ----------
    run : path or FitResult
        Run directory or in-memory fit (an in-memory fit without ``run_dir`` writes nothing).
    num_samples : int, optional
        Guide draws per restart; by default :func:`default_num_samples` (16,000 over all
        restarts, at least 1,000 each, fewer for large data).
    seed : int
        Seed of the draws (and of NUTS).
    reference : {None, "nuts"}
        Also run NUTS and compare (small models only).
    nuts_samples : int
        NUTS draws after as many warm-up steps as half of them (at least 200).
    write : bool
        Write posterior.nc, summary.csv, diagnostics.json (and nuts_comparison.csv,
        nuts_forest.png) atomically into the run directory; the :class:`Diagnosis` says which.
    """
    log_fn = log_fn or (lambda message: None)
    _check_arguments(num_samples, seed, reference, nuts_samples)
    result = load_run(run)
    layout = build_layout(result)
    if reference == "nuts":
        check_nuts(result, layout)  # refuse before spending time on the draws
    if num_samples is None:
        num_samples = default_num_samples(len(result.restarts), layout)
        log_fn(f"drawing {num_samples} x {len(result.restarts)} restart(s) from the guide, each draw scored on the full data (--num-samples sets it)")
    if layout.left_out:
        log_fn(_left_out_line(layout))
    idata = to_inference_data(result, num_samples, seed, layout=layout)
    psis = psis_diagnostics(idata)
    nuts = None
    if reference == "nuts":
        log_fn(f"running NUTS: {nuts_samples} draws after {max(200, nuts_samples // 2)} warm-up steps ...")
        nuts = compare_to_reference(idata, nuts_reference(result, nuts_samples, seed=seed, progress=progress))
    diagnosis = Diagnosis(
        model=result.model_file.name, guide=result.config.get("guide", ""), num_samples=num_samples, seed=seed, idata=idata,
        summary=summarize(idata, psis), psis=psis, restarts=restart_agreement(idata), loo=loo_report(idata), nuts=nuts,
        run_dir=result.run_dir, left_out=layout.left_out, convergence=result.config.get("convergence", {}),
    )
    if write and result.run_dir is not None:
        diagnosis = dataclasses.replace(diagnosis, files=tuple(_write(diagnosis, Path(result.run_dir))))
    return diagnosis


def _write(diagnosis: Diagnosis, run_dir: Path) -> list[Path]:
    paths = [run_dir / POSTERIOR_FILE, run_dir / SUMMARY_FILE, run_dir / REPORT_FILE]
    rundir.atomic_write(paths[0], lambda temporary: diagnosis.idata.to_netcdf(temporary))
    rundir.atomic_write(paths[1], lambda temporary: diagnosis.summary.to_csv(temporary, index_label="parameter"))
    rundir.write_json(paths[2], diagnosis.to_json())
    if diagnosis.nuts is not None:
        paths.append(run_dir / COMPARISON_FILE)
        rundir.atomic_write(paths[-1], lambda temporary: diagnosis.nuts.table.to_csv(temporary, index_label="parameter"))
        paths.append(plot_comparison(diagnosis.idata, diagnosis.nuts.reference, run_dir / FOREST_FILE))
    return paths


def _text(value: float) -> str:
    return "nan" if value is None or np.isnan(value) else f"{value:.3g}"


def _table(frame: pd.DataFrame, file: str) -> list[str]:
    lines = [frame.head(MAX_PRINTED_ROWS).to_string(float_format=lambda v: f"{v:.4g}")]
    if len(frame) > MAX_PRINTED_ROWS:
        lines.append(f"... {len(frame) - MAX_PRINTED_ROWS} more rows in {file}")
    return lines


def _summary_lines(diagnosis: Diagnosis) -> list[str]:
    lines = []
    marginalized = diagnosis.idata.sample_stats.attrs.get("ppvi_marginalized", "")
    if marginalized:
        lines.append(f"summed out exactly (not in the posterior table): {marginalized}")
    if diagnosis.left_out:
        lines.append(f"left out of the posterior table (local latents, one value per data point): {', '.join(diagnosis.left_out)}")
    if diagnosis.summary.empty:
        return lines + ["", "ArviZ summary: no global latent sites to summarise"]
    if "psis_mean" in diagnosis.summary.columns:
        lines += ["", "ArviZ summary (psis_mean: PSIS-corrected mean):"]
    else:
        lines += ["", "ArviZ summary (no PSIS-corrected means: k-hat does not say they can be trusted):"]
    return lines + _table(diagnosis.summary, SUMMARY_FILE)


def _psis_lines(psis: PsisReport, restarts: int, draws: int) -> list[str]:
    lines = ["PSIS k-hat of p(x, z) / q(z) (Yao et al. 2018; < 0.5 good, 0.5-0.7 usable with care, > 0.7 unreliable):"]
    if psis.khat:
        low, high = psis.khat_range
        spread = f"per restart {_text(low)} to {_text(high)}" if restarts > 1 else "one restart"
        lines.append(f"  pooled over {restarts} restart(s) x {draws} draws: {_text(psis.khat_pooled)} ({spread})")
        if restarts > 1:
            lines.append("  " + "  ".join(f"restart {i}: {_text(k)}" for i, k in enumerate(psis.khat)))
    lines.append(f"  verdict: {psis.note}")
    return lines


def _convergence_lines(convergence: dict) -> list[str]:
    """How each restart's optimisation ended, beside k-hat: k-hat judges the q a fit reached, and a fit that
    had not converged may not have reached the q it would end at."""
    if not convergence:
        return ["optimisation: a fixed budget of steps (no stopping rule ran: the fit was given --steps or --epochs)"]
    lines = ["optimisation:"] + [f"  restart {restart}: {summary.get('status', '?')}" for restart, summary in sorted(convergence.items())]
    if any(summary.get("converged") is False or summary.get("elbo_rising") for summary in convergence.values()):
        lines.append("  a restart did not converge: the k-hat above judges the q it stopped at, not the optimum; fit it longer first")
    return lines


def loo_line(loo: LooReport) -> str:
    head = f"PSIS-LOO ({loo.var_name}, {loo.num_points} observations): "
    corrected = f"corrected for q: elpd_loo {loo.elpd_loo_corrected:.2f} (se {loo.se_corrected:.2f})"
    if np.isfinite(loo.elpd_loo):
        return head + f"elpd_loo {loo.elpd_loo:.2f} (se {loo.se:.2f}), p_loo {loo.p_loo:.2f}; {corrected}; {loo.note}"
    if np.isfinite(loo.elpd_loo_corrected):
        return head + f"elpd_loo not finite (az.loo); {corrected}; {loo.note}"
    return f"PSIS-LOO: {loo.note}"


def format_diagnosis(diagnosis: Diagnosis) -> str:
    """The report ``ppvi diagnose`` prints."""
    restarts = diagnosis.num_restarts
    lines = [f"{diagnosis.model} / {diagnosis.guide}: {diagnosis.num_samples} guide draws x {restarts} restart(s) (chains)"]
    lines += _summary_lines(diagnosis)
    lines += [""] + _psis_lines(diagnosis.psis, restarts, diagnosis.num_samples)
    lines += _convergence_lines(diagnosis.convergence)
    lines.append(f"R-hat across restarts: {diagnosis.restarts.note}")
    lines += [f"  {label}: R-hat {diagnosis.restarts.rhat[label]:.4g}: restarts disagree (different modes?)" for label in diagnosis.restarts.flagged]
    lines.append(loo_line(diagnosis.loo))
    if diagnosis.nuts is not None:
        nuts = diagnosis.nuts
        lines += [
            "",
            (
                f"VI against NUTS ({int(nuts.reference.posterior.sizes['draw'])} draws, {nuts.num_divergences} divergences); "
                "mean_diff_sd = (VI mean - NUTS mean) / NUTS sd:"
            ),
            *_table(nuts.table, COMPARISON_FILE),
        ]
    if diagnosis.files:
        lines += ["", "wrote " + ", ".join(str(path) for path in diagnosis.files)]
    return "\n".join(lines)
