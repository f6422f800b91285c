"""Automatic stopping against fixed budgets, on every full-batch gallery model (issue 11).

For each model: a reference fit (20,000 steps, the gallery lr decayed 1000x, 8 particles) stands in for
the optimum of the variational objective; then the gallery's fixed budget and the automatic stop are run
with the same seed (the fixed budget with one particle, as the gallery's schedules were tuned; the rule
through ``max_steps``, at most 3x the fixed budget, with the model's default particles). For both, the
table gives steps, wall time, and the distance of q from the reference q: the largest
|mean - reference mean| / reference sd over the latent elements, and the largest |log(sd / reference sd)|,
from 4,000 draws of each guide (Monte Carlo error of the mean ~0.02 sd).

    python benchmarks/stopping.py [model[/guide] ...]
"""

from __future__ import annotations

import sys
import time

import numpy as np

import ppvi
from ppvi.diagnostics import to_inference_data

MODELS = ["normal_normal", "beta_bernoulli", "linear_regression", "linear_regression/fullrank", "linear_regression/lowrank",
          "logistic_regression", "eight_schools", "gmm/meanfield"]  # ppca keeps a fixed schedule (FIT_DEFAULTS auto_stop False)
DRAWS = 4000


def moments(result, draws: int = DRAWS, seed: int = 1) -> dict:
    """Per latent variable with at most 64 elements: (mean, sd) of q from ``draws`` draws."""
    posterior = to_inference_data(result, num_samples=draws, seed=seed, predictive=False).posterior
    out = {}
    for name, values in posterior.data_vars.items():
        flat = values.values.reshape(values.shape[0] * values.shape[1], -1)
        if flat.shape[1] <= 64:
            out[name] = (flat.mean(0), flat.std(0))
    return out


def distance(fit: dict, reference: dict) -> tuple[float, float]:
    """Largest |mean error| / reference sd and |log sd ratio|; a mixture's (K=2) components are matched in either order."""
    if "locs" in reference:
        swapped = {name: tuple(v.reshape(2, -1)[::-1].ravel() for v in value) for name, value in fit.items()}
        return min(_distance(fit, reference), _distance(swapped, reference))
    return _distance(fit, reference)


def _distance(fit: dict, reference: dict) -> tuple[float, float]:
    mean_error = max(float(np.max(np.abs(fit[k][0] - reference[k][0]) / reference[k][1])) for k in reference)
    sd_error = max(float(np.max(np.abs(np.log(fit[k][1] / reference[k][1])))) for k in reference)
    return mean_error, sd_error


def run(spec: str, **settings):
    name, _, guide = spec.partition("/")
    start = time.perf_counter()
    result = ppvi.fit(name, guide or None, seed=0, device="cpu", **settings)
    return result, time.perf_counter() - start


def main(specs: list[str]) -> None:
    print(f"{'model':28} {'run':6} {'steps':>6} {'time s':>7} {'mean err/sd':>11} {'|log sd ratio|':>14}  status")
    for spec in specs:
        defaults = ppvi.gallery.load_model(spec.partition("/")[0]).fit_defaults
        reference, _ = run(spec, steps=20000, lr_decay=0.001, num_particles=8)
        target = moments(reference)
        steps = defaults.get("steps", 1000)
        for label, settings in (("fixed", {"steps": steps, "num_particles": 1}), ("auto", {"max_steps": 3 * steps})):
            result, seconds = run(spec, **settings)
            mean_error, sd_error = distance(moments(result), target)
            status = result.config.get("convergence", {}).get("0", {}).get("status", "")
            print(f"{spec:28} {label:6} {len(result.elbo_trace):6d} {seconds:7.1f} {mean_error:11.3f} {sd_error:14.3f}  {status[:90]}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or MODELS)
