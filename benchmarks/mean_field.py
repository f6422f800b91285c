"""Gaussian guides against NUTS on the mean-field example models: fit time, k-hat, moment errors.

For each model (eight schools centered and non-centered, linear regression, logistic regression)
and each guide (``meanfield``, ``fullrank``, ``lowrank``), in one process:

- ``fit_s``: wall time of ``ppvi.fit`` per restart (the call's time divided by ``--restarts``);
- ``khat``: PSIS k-hat of log p(x, z) - log q(z), pooled over the restarts' draws
  (``ppvi.diagnostics.psis_diagnostics``; Yao et al. 2018: < 0.5 good, 0.5-0.7 usable, > 0.7
  unreliable);
- ``max_mean_diff_sd``: the largest |VI mean - NUTS mean| / NUTS sd over every scalar parameter;
- ``sd_ratio_min``, ``sd_ratio_max``: the range of VI sd / NUTS sd over the same parameters;
- ``nuts_s``, ``nuts_div``: wall time and divergent transitions of Pyro's NUTS on the same model
  and data (one chain, ``--nuts-draws`` after ``--nuts-warmup`` warm-up steps).

VI moments are those of the guide's draws (``--draws`` per restart, restarts pooled), NUTS moments
those of its draws, so both carry Monte Carlo error: for means, about 1 / sqrt(draws) VI sds and
1 / sqrt(ESS) NUTS sds (``--details`` writes every parameter's moments with NUTS's
``nuts_mcse_mean``).

Eight schools: NUTS on the centered form meets the funnel (divergent transitions, a biased
reference), so both parameterizations are compared against NUTS on the non-centered form, with
theta = mu + tau * eta added to its draws; ``nuts_s`` and ``nuts_div`` of the centered rows are
still those of NUTS on the centered model, for the timing. Compared parameters: mu, tau, theta
(centered); mu, tau, eta, theta (non-centered, theta a deterministic site of the guide's draws).

Fit settings are each model file's ``FIT_DEFAULTS`` (steps, learning rate and its decay,
particles), unless ``--steps`` overrides the number of steps. A warm-up fit runs first, so that
no timed call pays for imports or lazy initialisation.

Usage::

    python benchmarks/mean_field.py                              # everything (several minutes on 2 cores)
    python benchmarks/mean_field.py --steps 200 --draws 200 --nuts-draws 100 --nuts-warmup 100   # a quick run
    python benchmarks/mean_field.py --models linear_regression --guides meanfield,fullrank
    python benchmarks/mean_field.py --out results.csv --details details.csv

References
----------
Yao, Vehtari, Simpson & Gelman (2018). Yes, but did it work?: Evaluating variational inference. ICML.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import pandas as pd
import torch

import ppvi
from ppvi import diagnostics

EXAMPLES = {  # label -> (gallery model, options)
    "eight_schools_centered": ("eight_schools", {"parameterization": "centered"}),
    "eight_schools_noncentered": ("eight_schools", {"parameterization": "noncentered"}),
    "linear_regression": ("linear_regression", {}),
    "logistic_regression": ("logistic_regression", {}),
}
GUIDES = ("meanfield", "fullrank", "lowrank")


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - started


def nuts(result, args):
    """NUTS on the fit's model and data: (InferenceData, seconds, divergences)."""
    reference, seconds = timed(diagnostics.nuts_reference, result, args.nuts_draws, warmup_steps=args.nuts_warmup, seed=args.seed)
    return reference, seconds, int(reference.sample_stats["diverging"].sum())


def with_theta(reference):
    """Eight schools non-centered NUTS draws with theta = mu + tau * eta, a deterministic site NUTS does not record."""
    posterior = reference.posterior
    posterior["theta"] = posterior["mu"] + posterior["tau"] * posterior["eta"]
    return reference


def fit_guide(model, options, guide, args):
    settings = {"steps": args.steps} if args.steps else {}
    result, seconds = timed(
        ppvi.fit, model, guide=guide, options=options, restarts=args.restarts, seed=args.seed, device=args.device, **settings
    )
    return result, seconds / args.restarts


def run(args) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, details = [], []
    ppvi.fit("linear_regression", guide="meanfield", steps=20, device=args.device)  # warm-up: imports, lazy initialisation
    eight_schools_reference = None
    for label in args.models:
        model, options = EXAMPLES[label]
        fits = {guide: fit_guide(model, options, guide, args) for guide in args.guides}
        first = next(iter(fits.values()))[0]
        print(f"{label}: fitted {', '.join(args.guides)}; running NUTS ...", flush=True)
        reference, nuts_s, nuts_div = nuts(first, args)
        if model == "eight_schools":
            if options["parameterization"] == "noncentered":
                reference = eight_schools_reference = with_theta(reference)
            else:  # compare against the non-centered NUTS, run once for both forms
                if eight_schools_reference is None:
                    noncentered = ppvi.fit(model, guide="meanfield", options={"parameterization": "noncentered"}, steps=1, device=args.device)
                    eight_schools_reference = with_theta(nuts(noncentered, args)[0])
                reference = eight_schools_reference
        for guide, (result, fit_s) in fits.items():
            idata = diagnostics.to_inference_data(result, args.draws, seed=args.seed, predictive=False)
            psis = diagnostics.psis_diagnostics(idata)
            table = diagnostics.compare_to_reference(idata, reference).table
            details.append(table.assign(example=label, guide=guide).rename_axis("parameter").reset_index())
            rows.append(
                {
                    "example": label,
                    "guide": guide,
                    "steps": int(result.config["steps"]),
                    "elbo": result.estimator_reason.rsplit("(", 1)[-1].rstrip(")"),
                    "fit_s": fit_s,
                    "khat": psis.khat_pooled,
                    "max_mean_diff_sd": table["mean_diff_sd"].abs().max(),
                    "sd_ratio_min": table["sd_ratio"].min(),
                    "sd_ratio_max": table["sd_ratio"].max(),
                    "num_params": len(table),
                    "nuts_s": nuts_s,
                    "nuts_div": nuts_div,
                }
            )
    return pd.DataFrame(rows), pd.concat(details, ignore_index=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(EXAMPLES), help=f"comma-separated, of: {', '.join(EXAMPLES)}")
    parser.add_argument("--guides", default=",".join(GUIDES), help="comma-separated, of: " + ", ".join(GUIDES))
    parser.add_argument("--steps", type=int, default=None, help="SVI steps (default: each model file's FIT_DEFAULTS)")
    parser.add_argument("--restarts", type=int, default=2, help="independent fits per guide (k-hat pooled over them)")
    parser.add_argument("--draws", type=int, default=1000, help="guide draws per restart (at least 100 for k-hat)")
    parser.add_argument("--nuts-draws", type=int, default=1000)
    parser.add_argument("--nuts-warmup", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these tiny tensors)")
    parser.add_argument("--out", default="mean_field.csv", help="CSV of the table")
    parser.add_argument("--details", default=None, help="CSV of every parameter's VI and NUTS moments")
    args = parser.parse_args(argv)
    args.models = [name for name in args.models.split(",") if name]
    args.guides = [name for name in args.guides.split(",") if name]
    unknown = [name for name in args.models if name not in EXAMPLES] + [name for name in args.guides if name not in GUIDES]
    if unknown:
        parser.error(f"unknown model(s) or guide(s): {', '.join(unknown)}")
    return args


def main(args) -> pd.DataFrame:
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    table, details = run(args)
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(table.drop(columns=["elbo", "num_params"]).to_string(index=False, float_format=lambda value: f"{value:.3g}"))
    table.to_csv(args.out, index=False)
    print(f"wrote {Path(args.out)}")
    if args.details:
        details.to_csv(args.details, index=False)
        print(f"wrote {Path(args.details)}")
    return table


if __name__ == "__main__":
    main(parse_args())
