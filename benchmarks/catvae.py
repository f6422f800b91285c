"""Categorical VAE on MNIST: score-function baselines against Gumbel-softmax, held-out ELBO / IWAE, collapse and gradient variance.

ppvi's ``catvae`` (Jang, Gu & Poole 2017's 784-(20x10)-200 setup: 20 categorical latent variables of
10 classes, one ReLU hidden layer of 200 units in the MLP encoder and decoder, Bernoulli likelihood on
dynamically binarized pixels, the encoder sees the intensities) trained with five estimators for the
same number of epochs, from the same seed, on the same data:

- ``score none``: score function (REINFORCE, TraceGraph_ELBO) without a baseline;
- ``score average``: with Pyro's decaying-average baseline;
- ``score neural``: decaying average plus ppvi's NVIL-style network on q's logits;
- ``gumbel``: Gumbel-softmax with ppvi's default schedule tau_t = max(0.5, exp(-r t)), r such that
  tau reaches 0.5 halfway through the fit (``--anneal-rate R`` fixes r instead; Jang et al. used
  r = 3e-5, which leaves a fit of a few thousand steps near tau = 0.8);
- ``gumbel ST``: the same schedule, straight-through (discrete forward, relaxed backward).

Data: the real MNIST test set (``../shared/data/mnist``); images 0-7,999 are written with
``ppvi.images.write_idx`` as the ``train-*`` split of a temporary folder (``make_split`` of
``benchmarks/vae.py``, imported from there), images 8,000-9,999 are held out. Optimisation: Adam with
lr 1e-3 and batches of 100, as Jang et al. (not catvae's FIT_DEFAULTS lr 3e-3 / batch 128), 80 steps
per epoch.

Per method it reports:

- held-out -ELBO and -IWAE (nats per image, K importance samples, default 100, standard error over the
  2,000 images) from ``ppvi.evaluate.evaluate``; as in ``benchmarks/vae.py`` the held-out images are
  binarized *once* (seeded) and every method scores those same 0/1 images (the model's binarization of
  0/1 pixels is the identity; the encoders therefore see binarized images at evaluation). The paired
  per-image difference of -ELBO against ``gumbel`` is given with its standard error;
- seconds per epoch: mean step time from the ELBO trace's ``time_s`` (end of step 0 to the end of the
  last step, so lazy initialisation is excluded) times 80;
- the final training ELBO per image (the run's ``final_elbo``, the median of the last tenth of the
  steps' ELBO estimates, divided by 8,000; for gumbel the trace's ``elbo`` is the discrete ELBO);
- KL(q(z | x) || uniform) per held-out image, from the encoder's logits (the run's guide instance,
  ``guide_fn.logits(x)``, with the fitted parameters loaded) on the same binarized images:
  sum_v [sum_c q_vc log q_vc + log C], at most 20 log 10 = 46.05 nats. Near 0 means the posterior
  collapsed onto the prior and the code carries nothing;
- gradient variance (``ppvi.gradvar.gradient_variance``): total variance of one gradient draw
  (sum over coordinates) per parameter group (encoder, decoder) for score none / average / neural and
  gumbel, D draws (default 200) on the run's first minibatch of 100, at the fitted parameters of the
  ``score neural`` run and, as a second point, of the ``gumbel`` run (each row says which).
  Baselines are warmed up to those parameters first (gradvar's default 200 steps); at the ``score
  neural`` run the warm-up does not reach the neural network (gradvar keeps the run's trained network
  as it is, see benchmarks/README.md), at the ``gumbel`` run it fits a fresh one. The gumbel gradient
  is that of the relaxed ELBO at the gumbel run's final temperature.

Usage::

    python benchmarks/catvae.py                    # 100 epochs, 1 thread, cpu (about 20 min)
    python benchmarks/catvae.py --quick            # smoke run: 1 epoch, small K and D (under a minute)
    python benchmarks/catvae.py --epochs 300 --threads 2 --device cuda
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import tempfile
import time
from pathlib import Path

import torch

import pyro
import pyro.poutine as poutine

import ppvi
from ppvi.evaluate import evaluate
from ppvi.gradvar import gradient_variance
from ppvi.runs import restart_params

REPO = Path(__file__).resolve().parents[1]
BATCH, LR, NUM_VARIABLES, NUM_CLASSES, HIDDEN = 100, 1e-3, 20, 10, 200

METHODS = {  # label -> ppvi.fit keyword arguments
    "score none": dict(estimator="score", baseline="none"),
    "score average": dict(estimator="score", baseline="average"),
    "score neural": dict(estimator="score", baseline="neural"),
    "gumbel": dict(estimator="gumbel"),
    "gumbel ST": dict(estimator="gumbel", straight_through=True),  # --anneal-rate is added to both in main
}
GRADVAR_ESTIMATORS = ["score:none", "score:average", "score:neural", "gumbel"]
GRADVAR_RUNS = ("score neural", "gumbel")


def _vae_benchmark():
    spec = importlib.util.spec_from_file_location("ppvi_bench_vae", REPO / "benchmarks" / "vae.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_split = _vae_benchmark().make_split  # the same 8,000 / 2,000 split as benchmarks/vae.py


@torch.no_grad()
def kl_to_uniform(result, x, batch=500):
    """Per-image KL(q(z | x) || uniform) in nats from the fitted encoder's logits, float64 (N,)."""
    chosen = result.best
    with restart_params(result, chosen):
        guide = chosen.guide_fn
        out = []
        for start in range(0, x.shape[0], batch):
            log_q = torch.log_softmax(guide.logits(x[start : start + batch]).double(), -1)
            out.append((log_q.exp() * log_q).sum(-1).add(math.log(log_q.shape[-1])).sum(-1))
        kl = torch.cat(out).cpu()
        # the guide's trace (what evaluate scores) must give the same q: a check that the encoder holds the fitted weights
        probe = poutine.trace(guide).get_trace(ppvi.data.Batch({"x": x[:5]}, torch.arange(5, device=x.device), x.shape[0]), result.options)
        site_logits = torch.log_softmax(probe.nodes["z"]["fn"].base_dist.logits.double(), -1)
        assert torch.allclose(site_logits, torch.log_softmax(guide.logits(x[:5]).double(), -1)), "guide.logits disagrees with the guide's z site"
    return kl


def per_epoch_seconds(trace, steps_per_epoch):
    times = trace["time_s"].to_numpy()
    return (times[-1] - times[0]) / max(len(times) - 1, 1) * steps_per_epoch


def mean_se(values):
    values = values.double()
    return float(values.mean()), float(values.std() / math.sqrt(len(values)))


def main(args):
    if args.quick:
        args.epochs, args.iwae_k, args.num_draws, args.warmup, args.heldout = 1, 10, 10, 10, 200
    torch.set_num_threads(args.threads)
    device = ppvi.resolve_device(args.device)
    options = {"num_variables": NUM_VARIABLES, "num_classes": NUM_CLASSES, "hidden_dim": HIDDEN}
    with tempfile.TemporaryDirectory(prefix="ppvi-catvae-bench-") as folder:
        folder = Path(folder)
        x_train, x_heldout, labels_heldout = make_split(folder)
        x_heldout, labels_heldout = x_heldout[: args.heldout], labels_heldout[: args.heldout]
        binary = torch.bernoulli(x_heldout, generator=torch.Generator().manual_seed(args.seed + 12345)).to(device)
        heldout = {"x": binary, "labels": labels_heldout.to(device)}
        num_train = x_train.shape[0]
        steps_per_epoch = math.ceil(num_train / BATCH)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(
            f"torch {torch.__version__}, pyro {pyro.__version__} on {name}, {args.threads} CPU thread(s); catvae 784-({NUM_VARIABLES}x"
            f"{NUM_CLASSES})-{HIDDEN}, Bernoulli; Adam {LR}, batch {BATCH}, {steps_per_epoch} steps/epoch, {args.epochs} epochs, "
            f"seed {args.seed}; held-out {binary.shape[0]} images binarized once, K={args.iwae_k}\n",
            flush=True,
        )
        fit_kwargs = dict(data=str(folder), options=options, epochs=args.epochs, batch_size=BATCH, lr=LR, device=args.device, seed=args.seed)
        rows, results = {}, {}
        for method, kwargs in METHODS.items():
            if kwargs["estimator"] == "gumbel" and args.anneal_rate is not None:
                kwargs = {**kwargs, "anneal_rate": args.anneal_rate}
            start = time.perf_counter()
            result = ppvi.fit("catvae", out=folder / "runs" / method.replace(" ", "-"), **kwargs, **fit_kwargs)
            total = time.perf_counter() - start
            trace = result.best.elbo_trace
            frame = evaluate(result, data=heldout, num_samples=args.iwae_k, seed=args.seed)
            kl = kl_to_uniform(result, binary)
            rows[method] = dict(
                neg_elbo=-frame.attrs["elbo"], neg_iwae=-frame.attrs["iwae"], kl=kl,
                s_epoch=per_epoch_seconds(trace, steps_per_epoch), fit_s=total,
                train_elbo=result.best.final_elbo / num_train,
                temperature=float(trace["temperature"].iloc[-1]) if "temperature" in trace else None,
                floor_step=int(trace["step"][trace["temperature"] <= trace["temperature"].min() + 1e-9].iloc[0]) if "temperature" in trace else None,
            )
            results[method] = result
            r = rows[method]
            print(
                f"{method}: -ELBO {mean_se(r['neg_elbo'])[0]:.2f}, -IWAE {mean_se(r['neg_iwae'])[0]:.2f}, KL(q||unif) {float(kl.mean()):.2f}, "
                f"{r['s_epoch']:.2f} s/epoch, fit {total:.1f} s, train ELBO {r['train_elbo']:.2f}"
                + (f", final tau {r['temperature']:.3f} (reached at step {r['floor_step']})" if r["temperature"] is not None else ""),
                flush=True,
            )

        gradvar = []
        tau = rows["gumbel"]["temperature"]
        for method in GRADVAR_RUNS:
            frame = gradient_variance(
                run=results[method].run_dir, estimators=GRADVAR_ESTIMATORS, num_draws=args.num_draws, batch_size=BATCH,
                warmup=args.warmup, temperature=tau, seed=args.seed, device=args.device,
            )
            frame.insert(0, "params_of", method)
            gradvar.append(frame)
            print(f"gradient variance at the {method} run's parameters: done", flush=True)

    reference = rows["gumbel"]["neg_elbo"]
    print(f"\n### held-out scores, {binary.shape[0]} images (nats per image; +- standard error over images)\n")
    print(f"| method | -ELBO | -IWAE (K={args.iwae_k}) | -ELBO minus gumbel's (paired) | KL(q(z|x) \\|\\| uniform) | train ELBO | s / epoch |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for method, r in rows.items():
        e, e_se = mean_se(r["neg_elbo"])
        i, i_se = mean_se(r["neg_iwae"])
        d, d_se = mean_se(r["neg_elbo"] - reference)
        k, k_se = mean_se(r["kl"])
        diff = "0" if method == "gumbel" else f"{d:+.2f} +- {d_se:.2f}"
        print(f"| {method} | {e:.2f} +- {e_se:.2f} | {i:.2f} +- {i_se:.2f} | {diff} | {k:.2f} +- {k_se:.2f} | {r['train_elbo']:.2f} | {r['s_epoch']:.2f} |")
    print(f"\n### gradient variance (total variance of one draw, sum over coordinates; D={args.num_draws}, batch {BATCH}; gumbel at tau={tau:.3f})\n")
    print("| parameters of | group | " + " | ".join(GRADVAR_ESTIMATORS) + " | neural / none | neural / average | gumbel / neural | gumbel / none |")
    print("|---|---|" + "---:|" * (len(GRADVAR_ESTIMATORS) + 4))
    for frame in gradvar:
        for group in ("encoder", "decoder"):
            sub = frame[frame["group"] == group].set_index("estimator")["variance"]
            v = {name: float(sub[name]) for name in GRADVAR_ESTIMATORS}
            ratios = (
                v["score:neural"] / v["score:none"], v["score:neural"] / v["score:average"],
                v["gumbel"] / v["score:neural"], v["gumbel"] / v["score:none"],
            )
            print(f"| {frame['params_of'].iloc[0]} | {group} | " + " | ".join(f"{v[name]:.3g}" for name in GRADVAR_ESTIMATORS)
                  + " | " + " | ".join(f"{ratio:.3g}" for ratio in ratios) + " |")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100, help="passes over the 8,000 training images, every method (default 100)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    parser.add_argument("--iwae-k", type=int, default=100, help="importance samples per held-out image (default 100)")
    parser.add_argument("--num-draws", type=int, default=200, help="gradient draws per estimator for the variance (default 200)")
    parser.add_argument("--warmup", type=int, default=200, help="baseline warm-up steps before the gradient draws (default 200)")
    parser.add_argument("--anneal-rate", type=float, default=None, help="gumbel anneal rate r per step "
                        "(default ppvi's: tau reaches 0.5 at mid-fit; Jang et al.: 3e-5)")
    parser.add_argument("--heldout", type=int, default=2000, help="held-out images scored, from image 8,000 on (default all 2,000)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 epoch, K=10, 10 draws, 10 warm-up steps, 200 held-out images")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
