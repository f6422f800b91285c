"""Gaussian mixture: ppvi's stochastic VI against scikit-learn, wall time and held-out log-likelihood.

For each training size n, draw n + H points from one synthetic mixture (K = 5 unit-variance
clusters in D = 2, ``ppvi.data.synthetic_gmm``), fit on the first n and score the last H, in one
process:

- ppvi ``gmm`` with guide ``meanfield`` and ``map`` (estimator auto = enum), minibatch SVI;
- scikit-learn ``BayesianGaussianMixture`` (mean-field VB by coordinate ascent, diag covariances);
- scikit-learn ``GaussianMixture`` (EM, diag covariances).

The held-out log-likelihood per point is computed the same way for all four, from plug-in
parameters: sum over k of weight_k * prod_d Normal(x_d | loc_kd, scale_kd). For ppvi's meanfield
guide: weights = Dirichlet mean (normalised concentration), locs = locs_loc, scales =
exp(scales_loc), the median of the LogNormal q(scale); for map the point estimates; for
scikit-learn ``weights_``, ``means_`` and ``sqrt(covariances_)``. Data are not standardised
(``standardize=False``), so every method sees the same numbers.

``--separation`` sets the least distance between cluster means in cluster sds. The default, 2,
gives overlapping clusters with soft responsibilities, where scikit-learn's coordinate ascent
needs tens to hundreds of iterations (the regime of the targets in the issue). With
``--separation 6`` (``synthetic_gmm``'s default) the responsibilities are 0 or 1, and
BayesianGaussianMixture reaches its fixed point in 2 iterations after its k-means start.

Times are wall times of the fit calls (ppvi: everything inside ``ppvi.fit``, k-means included).
A warm-up fit runs first so that no timed call pays for imports or lazy initialisation.

Usage::

    python benchmarks/gmm.py                            # n = 10k, 100k, 1M on CPU
    python benchmarks/gmm.py --sizes 10000,100000 --threads 2
    python benchmarks/gmm.py --device cpu,cuda --bgm-max-iter 100

``--bgm-max-iter`` caps BayesianGaussianMixture's coordinate-ascent iterations (default 500,
as in the issue's measurements). Its convergence test compares the change of the *total* lower
bound (a sum over the n points) with tol = 1e-3, so it gets stricter as n grows; with
overlapping clusters it may run to the cap (the issue's 1M run stopped at 500 iterations, not
converged, after 329 s). A lower cap shortens the script; it can only shorten BGM's time, so the
time ratios printed stay conservative for ppvi. The notes give BGM's iterations, seconds per
iteration and whether it converged.

ppvi "reaches" BGM's held-out log-likelihood when it is below BGM's by no more than the larger of
two noise levels: twice the standard error of the paired per-point difference on the held-out
set (what 10,000 points can resolve), and the (number of parameters) / (2 n) nats per point that
any fit on n points loses to the sampling error of its parameters (the AIC argument; 24
parameters here).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time

import numpy as np
import torch
from scipy.special import logsumexp

try:  # without scikit-learn (a bare GPU machine, say) the script times ppvi alone
    import sklearn
    from sklearn.mixture import BayesianGaussianMixture, GaussianMixture
    from threadpoolctl import threadpool_limits
except ImportError:
    sklearn = None

import ppvi
from ppvi.data import synthetic_gmm

NUM_COMPONENTS, DIM = 5, 2


def ppvi_settings(num_data: int) -> dict:
    """Minibatch SVI settings for a data set of ``num_data`` points.

    A step costs about the same for any batch up to a few thousand points (it is bound by Pyro's
    per-step overhead, 4-9 ms on one CPU thread), and the globals start at k-means on 10,000
    points, already close: 100 steps, with a learning rate decaying 100-fold (0.05 to 0.0005).
    The posterior narrows like 1 / sqrt(n), so at a million points the batch grows to 16,384 to
    keep the optimiser's final jitter below it: with 4,096 the held-out log-likelihood of 4 seeds
    spread from +3e-5 to -2.6e-4 nats around BGM's; with 16,384, -4e-5 to 0 (map and meanfield). One particle,
    as measured: the model's default of 8 is for its full-batch stopping rule.
    """
    return dict(batch_size=min(num_data, 4096 if num_data <= 100_000 else 16_384), steps=100, lr=0.05, lr_decay=0.01, num_particles=1)


def num_parameters() -> int:
    return NUM_COMPONENTS * (2 * DIM + 1) - 1  # locs, scales, weights (on the simplex)


def heldout_logliks(weights, locs, scales, x) -> np.ndarray:
    """Per held-out point: log sum_k weights_k prod_d Normal(x_d | locs_kd, scales_kd)."""
    weights, locs, scales = (np.asarray(value, dtype=np.float64) for value in (weights, locs, scales))
    z = (x[:, None, :] - locs[None]) / scales[None]
    log_normal = -0.5 * z**2 - np.log(scales)[None] - 0.5 * math.log(2 * math.pi)
    return logsumexp(np.log(weights)[None] + log_normal.sum(-1), axis=1)


def plug_in(params: dict):
    """(weights, locs, scales) of a ppvi gmm fit, as numpy arrays (see the module docstring)."""
    params = {name: value.detach().double().cpu().numpy() for name, value in params.items()}
    if "weights_map" in params:
        return params["weights_map"], params["locs_map"], params["scales_map"]
    concentration = params["weights_concentration"]
    return concentration / concentration.sum(), params["locs_loc"], np.exp(params["scales_loc"])


def run_ppvi(guide, x_train, x_test, device, seed):
    """Return (seconds, per-point held-out log-likelihoods, note)."""
    settings = ppvi_settings(x_train.shape[0])
    note = f"batch {settings['batch_size']}, {settings['steps']} steps"
    start = time.perf_counter()
    try:
        result = ppvi.fit(
            "gmm", guide=guide, data=x_train, options={"num_components": NUM_COMPONENTS, "standardize": False},
            device=device, seed=seed, **settings,
        )
    except ppvi.TrainingDiverged as error:
        return time.perf_counter() - start, np.full(len(x_test), np.nan), f"{note}: DIVERGED ({error})"
    params = {name: value.cpu() for name, value in result.params.items()}  # waits for the device
    seconds = time.perf_counter() - start
    return seconds, heldout_logliks(*plug_in(params), x_test), f"{result.estimator}, {note}"


def run_sklearn(estimator, x_train, x_test):
    start = time.perf_counter()
    estimator.fit(x_train)
    seconds = time.perf_counter() - start
    logliks = heldout_logliks(estimator.weights_, estimator.means_, np.sqrt(estimator.covariances_), x_test)
    note = f"{estimator.n_iter_} iter ({seconds / estimator.n_iter_:.3g} s/iter), " + ("converged" if estimator.converged_ else "NOT converged")
    return seconds, logliks, note


def benchmark(num_data, args):
    """Fit every method on n points; return {method: (seconds, per-point held-out log-likelihoods, note)}."""
    x, _ = synthetic_gmm(num_data + args.heldout, NUM_COMPONENTS, DIM, seed=args.seed, separation=args.separation)
    x_train, x_test = x[:num_data], x[num_data:].double().numpy()
    rows = {}
    for device in args.devices:
        for guide in args.guides:
            rows[f"ppvi {guide} ({device})"] = run_ppvi(guide, x_train, x_test, device, args.seed)
    if sklearn is not None:
        x_numpy = x_train.double().numpy()
        bgm = BayesianGaussianMixture(
            n_components=NUM_COMPONENTS, covariance_type="diag", weight_concentration_prior_type="dirichlet_distribution",
            weight_concentration_prior=1.0, max_iter=args.bgm_max_iter, random_state=args.seed,
        )
        rows["sklearn BayesianGM"] = run_sklearn(bgm, x_numpy, x_test)
        rows["sklearn GaussianMixture"] = run_sklearn(GaussianMixture(NUM_COMPONENTS, covariance_type="diag", random_state=args.seed), x_numpy, x_test)
    return rows


def print_ratios(num_data, rows):
    if "sklearn BayesianGM" not in rows:
        return
    bgm_time, bgm_ll, _ = rows["sklearn BayesianGM"]
    gm_time, gm_ll, _ = rows["sklearn GaussianMixture"]
    for method, (seconds, loglik, _) in rows.items():
        if method.startswith("ppvi"):
            difference = loglik - bgm_ll
            standard_error = difference.std() / math.sqrt(len(difference))
            tolerance = max(2 * standard_error, num_parameters() / (2 * num_data))
            verdict = "reaches" if difference.mean() >= -tolerance else "BELOW"
            print(
                f"{'':>9}  {method:<24} time / BGM {seconds / bgm_time:6.3f}, / GM {seconds / gm_time:6.2f};  "
                f"ll - BGM {difference.mean():+.5f} +- {standard_error:.5f} ({verdict} BGM's, tolerance {tolerance:.1e});  "
                f"ll - GM {(loglik - gm_ll).mean():+.5f}"
            )


def main(args):
    torch.set_num_threads(args.threads)
    limits = threadpool_limits(args.threads) if sklearn is not None else contextlib.nullcontext()
    with limits:
        warm_x, _ = synthetic_gmm(2000, NUM_COMPONENTS, DIM, seed=1)  # imports, lazy initialisation, CUDA context
        for device in args.devices:
            for guide in args.guides:
                options = {"num_components": NUM_COMPONENTS, "standardize": False}
                ppvi.fit("gmm", guide=guide, data=warm_x, options=options, steps=5, device=device)
        if sklearn is not None:
            GaussianMixture(NUM_COMPONENTS, covariance_type="diag").fit(warm_x.numpy())
        devices = [ppvi.resolve_device(device) for device in args.devices]
        names = [torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu" for device in devices]
        peers = f"scikit-learn {sklearn.__version__} on cpu" if sklearn is not None else "scikit-learn not installed: ppvi alone"
        print(
            f"ppvi (torch {torch.__version__}) on {', '.join(names)}; {peers}; {args.threads} CPU thread(s); "
            f"K={NUM_COMPONENTS}, D={DIM}, cluster separation {args.separation} sd, seed {args.seed}, held-out {args.heldout} points\n"
        )
        print(f"{'n':>9}  {'method':<24} {'time (s)':>9} {'held-out ll':>12}  notes")
        for num_data in args.sizes:
            rows = benchmark(num_data, args)
            for method, (seconds, logliks, note) in rows.items():
                print(f"{num_data:>9,}  {method:<24} {seconds:>9.2f} {logliks.mean():>12.5f}  {note}")
            print_ratios(num_data, rows)
            print(flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=lambda text: [int(size) for size in text.split(",")], default=[10_000, 100_000, 1_000_000],
                        help="training set sizes, comma-separated (default 10000,100000,1000000)")
    parser.add_argument("--heldout", type=int, default=10_000, help="held-out points from the same mixture (default 10000)")
    parser.add_argument("--guides", type=lambda text: text.split(","), default=["meanfield", "map"], help="ppvi guides (default meanfield,map)")
    parser.add_argument("--device", dest="devices", type=lambda text: text.split(","), default=["cpu"],
                        help="device(s) for ppvi, comma-separated: cpu, cuda, auto (default cpu); scikit-learn runs on the CPU")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch and for scikit-learn's BLAS/OpenMP (default 1)")
    parser.add_argument("--bgm-max-iter", type=int, default=500, help="cap on BayesianGaussianMixture's iterations (default 500)")
    parser.add_argument("--separation", type=float, default=2.0,
                        help="least distance between cluster means, in cluster sds (default 2: overlapping; 6 is synthetic_gmm's default)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
