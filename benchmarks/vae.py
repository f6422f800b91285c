"""VAE on MNIST: ``ppvi fit vae`` against a hand-written PyTorch loop, per-epoch time and held-out ELBO / IWAE.

The same VAE, trained for the same epochs on the same split, in one process:

- data: the real MNIST test set (``../shared/data/mnist``, ``t10k-*``); images 0-7,999 are written
  with ``ppvi.images.write_idx`` as the ``train-*`` split of a temporary folder (what ``ppvi fit vae
  --data DIR`` reads), images 8,000-9,999 are held out;
- network: ppvi's ``vae`` MLP with ``hidden_dim=400``, ``latent_dim=50``: 784-400-(2x50) encoder and
  50-400-784 decoder, one softplus hidden layer each way, Bernoulli likelihood on dynamically
  binarized pixels (the encoder sees the intensities), q scale = softplus(raw) + 1e-4. The
  hand-written loop builds the *same* modules (``models/vae.py``'s ``MLPEncoder`` / ``MLPDecoder``
  classes, so the architecture and PyTorch's default initialisation match exactly);
- optimisation: Adam, lr 1e-3, batches of 128 cut from per-epoch permutations exactly as ppvi cuts
  them (``ceil(8000 / 128) = 63`` full batches per epoch), loss = -(N / B) * minibatch ELBO, as
  Pyro's subsample scale makes it.

Methods timed:

- ``ppvi, MeanFieldELBO``: ``ppvi.fit("vae", ...)`` (estimator auto = reparam with analytic KL) with
  ``ppvi.losses.MeanFieldELBO`` as its analytic-KL loss;
- ``ppvi, TraceMeanField_ELBO``: the same fit with Pyro's ``TraceMeanField_ELBO`` as that loss. Each
  run sets the class by patching the module-global name in ``ppvi.estimators`` that
  ``make_estimator`` constructs (``TraceMeanField_ELBO``, and ``MeanFieldELBO`` where it exists),
  restored after the run, so both are timed whichever class ``ppvi/estimators.py`` ships;
- ``hand-written``: encoder, reparameterized sample, analytic KL, ``binary_cross_entropy_with_logits``,
  ``torch.optim.Adam``;
- ``pyro TraceMeanField_ELBO``: the same model and guide written as plain Pyro functions taking
  tensors (``poutine.scale`` instead of a subsampled plate), no ppvi loop: separates Pyro's cost
  from ppvi's;
- ``pyro JitTraceMeanField_ELBO``: the same functions under Pyro's JIT ELBO, compiled once
  (``CachedJitTraceMeanField_ELBO``: Pyro 1.9.2's class re-traces at every call, see its docstring);
- ``pyro MeanFieldELBO``: the same functions with ``ppvi.losses.MeanFieldELBO`` (one pass of each,
  log_prob at the observed site only and the analytic KL);
- ``pyro Jit..., as shipped``: Pyro 1.9.2's JitTraceMeanField_ELBO unmodified (timing only).

``--no-pyro`` times the two ppvi fits and the hand-written loop alone.

Per-epoch time is the mean step time (from the second step to the last, so the first step's lazy
initialisation is excluded; for ppvi read from its ELBO trace's ``time_s``) times 63 steps; steps
are timed by the wall clock, or with ``--clock cpu`` by this thread's CPU time. A
warm-up of every method runs first. "fit total" is the whole ``ppvi.fit`` call (data loading from
the IDX folder, site inspection, the steps).

Held-out scores, on images 8,000-9,999, K importance samples per image (default 200): ppvi's run
with ``ppvi.evaluate.evaluate``; the hand-written (and plain-Pyro) models with the same estimator
written here (log w = log N(z; 0, I) + log Bernoulli(x | decoder(z)) - log q(z | x); ELBO = mean_k
log w, IWAE = logsumexp_k log w - log K). To make the two exactly paired, the held-out images are
binarized *once* (seeded) and both evaluations get those 0/1 images (binarizing 0/1 again is the
identity), so the encoders also see the binarized images at evaluation. Differences are reported
with the standard error of the paired per-image difference.

Usage::

    python benchmarks/vae.py                     # 3 epochs, 1 thread, cpu (a few minutes)
    python benchmarks/vae.py --clock cpu         # step times in this thread's CPU time (shared machines)
    python benchmarks/vae.py --epochs 20 --threads 2
    python benchmarks/vae.py --device cuda --iwae-k 500
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from torch.nn import functional as F

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.infer import JitTraceMeanField_ELBO, TraceMeanField_ELBO

import ppvi
import ppvi.estimators
from ppvi.batching import Batches  # the same batch stream as ppvi's loop
from ppvi.evaluate import evaluate
from ppvi.images import load_mnist, write_idx
from ppvi.losses import MeanFieldELBO

FIT_MODULE = sys.modules["ppvi.fitting"]  # the module; the package's ``ppvi.fit`` is the function

REPO = Path(__file__).resolve().parents[1]
MNIST = Path(os.environ.get("PPVI_MNIST", REPO.parent / "shared" / "data" / "mnist"))  # PPVI_MNIST: another copy of the folder
NUM_TRAIN, NUM_HELDOUT = 8000, 2000
HIDDEN, LATENT, BATCH, LR = 400, 50, 128, 1e-3
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}  # --clock
clock = CLOCKS["wall"]


@contextlib.contextmanager
def ppvi_clock():
    """Make ppvi.fit's step times (its ELBO trace's ``time_s``) read ``clock``: it calls ``time.perf_counter``."""
    saved = FIT_MODULE.time
    FIT_MODULE.time = types.SimpleNamespace(**{**vars(time), "perf_counter": clock})
    try:
        yield
    finally:
        FIT_MODULE.time = saved


def _vae_module():
    spec = importlib.util.spec_from_file_location("ppvi_models_vae", REPO / "models" / "vae.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


VAE = _vae_module()


def make_split(folder: Path):
    """Write images 0-7,999 of the MNIST test set as folder/train-*; return (train x, held-out x) flattened."""
    images, labels = load_mnist(MNIST, "test")
    raw = (images * 255).round().to(torch.uint8)
    write_idx(folder / "train-images-idx3-ubyte", raw[:NUM_TRAIN])
    write_idx(folder / "train-labels-idx1-ubyte", labels[:NUM_TRAIN].to(torch.uint8))
    x = images.reshape(images.shape[0], -1)
    return x[:NUM_TRAIN], x[NUM_TRAIN : NUM_TRAIN + NUM_HELDOUT], labels[NUM_TRAIN : NUM_TRAIN + NUM_HELDOUT]


def encode(encoder, x):
    loc, raw_scale = encoder(x).chunk(2, dim=-1)
    return loc, F.softplus(raw_scale) + 1e-4


# ---------------------------------------------------------------------------------------------
# hand-written PyTorch


def hand_loss(encoder, decoder, x, num_data):
    """-(N / B) * ELBO of the minibatch: reparameterized z, analytic KL, BCE with logits on binarized x."""
    loc, scale = encode(encoder, x)
    z = loc + scale * torch.randn_like(loc)
    logits = decoder(z)
    target = torch.bernoulli(x)
    log_lik = -F.binary_cross_entropy_with_logits(logits, target, reduction="sum")
    kl = 0.5 * (loc.pow(2) + scale.pow(2) - 1.0 - 2.0 * scale.log()).sum()
    return -(num_data / x.shape[0]) * (log_lik - kl)


def timed_steps(step_fn, x, batches, total_steps, sync):
    """Run total_steps; return seconds per step from the second step's start to the end."""
    start = None
    for step in range(total_steps):
        if step == 1:
            sync()
            start = clock()
        step_fn(x.index_select(0, batches.index(step)))
    sync()
    return (clock() - start) / max(total_steps - 1, 1)


def train_hand(x, epochs, seed, device, sync):
    torch.manual_seed(seed)
    decoder = VAE.MLPDecoder(LATENT, HIDDEN, 784).to(device)
    encoder = VAE.MLPEncoder(LATENT, HIDDEN, 784).to(device)
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=LR)
    batches = Batches(x.shape[0], BATCH, seed, device)

    def step(xb):
        loss = hand_loss(encoder, decoder, xb, x.shape[0])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    per_step = timed_steps(step, x, batches, epochs * batches.steps_per_epoch(), sync)
    return encoder, decoder, per_step


# ---------------------------------------------------------------------------------------------
# plain Pyro, tensors as arguments (eager or JIT)


class CachedJitTraceMeanField_ELBO(JitTraceMeanField_ELBO):
    """Pyro 1.9.2's JitTraceMeanField_ELBO, compiled once.

    Its ``differentiable_loss`` tests ``getattr(self, "_loss_and_surrogate_loss", None)`` (a name it
    never sets) before building its ``pyro.ops.jit.trace`` closure, so it builds a new closure, and
    re-traces the model and guide with ``torch.jit.trace``, at every call: slower than no JIT at all.
    Setting that name after the first call makes later calls reuse the compiled function.
    """

    def differentiable_loss(self, model, guide, *args, **kwargs):
        loss = super().differentiable_loss(model, guide, *args, **kwargs)
        self._loss_and_surrogate_loss = self._differentiable_loss
        return loss


def train_pyro(x, epochs, seed, device, sync, jit):
    pyro.clear_param_store()
    torch.manual_seed(seed)
    decoder = VAE.MLPDecoder(LATENT, HIDDEN, 784).to(device)
    encoder = VAE.MLPEncoder(LATENT, HIDDEN, 784).to(device)
    scale_factor = x.shape[0] / BATCH

    def model(xb, target):
        pyro.module("decoder", decoder)
        with pyro.plate("data", xb.shape[0]), poutine.scale(scale=scale_factor):
            z = pyro.sample("z", dist.Normal(xb.new_zeros(LATENT), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=target)

    def guide(xb, target):
        pyro.module("encoder", encoder)
        loc, scale = encode(encoder, xb)
        with pyro.plate("data", xb.shape[0]), poutine.scale(scale=scale_factor):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    if jit == "lean":
        elbo = MeanFieldELBO(max_plate_nesting=1)
    elif jit == "as-is":
        elbo = JitTraceMeanField_ELBO(max_plate_nesting=1, ignore_jit_warnings=True)
    elif jit:
        elbo = CachedJitTraceMeanField_ELBO(max_plate_nesting=1, ignore_jit_warnings=True)
    else:
        elbo = TraceMeanField_ELBO(max_plate_nesting=1)
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=LR)
    batches = Batches(x.shape[0], BATCH, seed, device)

    def step(xb):
        elbo.differentiable_loss(model, guide, xb, torch.bernoulli(xb)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with pyro.validation_enabled(False):
        per_step = timed_steps(step, x, batches, epochs * batches.steps_per_epoch(), sync)
    return encoder, decoder, per_step


# ---------------------------------------------------------------------------------------------
# held-out ELBO / IWAE for a pair of modules


@torch.no_grad()
def hand_scores(encoder, decoder, x, num_samples, seed, chunk=100, batch=100):
    """Per-image (iwae, elbo) estimates of log p(x) for binary images x, float64 (N,)."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    iwae, elbo = [], []
    for start in range(0, x.shape[0], batch):
        xb = x[start : start + batch]
        loc, scale = encode(encoder, xb)
        weights = []
        for done in range(0, num_samples, chunk):
            k = min(chunk, num_samples - done)
            eps = torch.randn((k, *loc.shape), generator=generator, device=x.device)
            z = loc + scale * eps
            log_q = dist.Normal(loc, scale).log_prob(z).sum(-1)
            log_prior = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
            log_lik = -F.binary_cross_entropy_with_logits(decoder(z), xb.expand(k, *xb.shape), reduction="none").sum(-1)
            weights.append(log_prior + log_lik - log_q)
        w = torch.cat(weights, 0).double().cpu()
        iwae.append(torch.logsumexp(w, 0) - math.log(num_samples))
        elbo.append(w.mean(0))
    return torch.cat(iwae), torch.cat(elbo)


def paired(a, b):
    difference = a - b
    return float(difference.mean()), float(difference.std() / math.sqrt(len(difference)))


METHODS = {  # label -> jit setting of train_pyro (None: not a plain-Pyro run)
    "ppvi, MeanFieldELBO": None,
    "ppvi, TraceMeanField_ELBO": None,
    "hand-written": None,
    "pyro TraceMeanField_ELBO": False,
    "pyro JitTraceMeanField_ELBO": True,
    "pyro MeanFieldELBO": "lean",
    "pyro Jit..., as shipped": "as-is",
}
PPVI_LOSSES = {"ppvi, MeanFieldELBO": MeanFieldELBO, "ppvi, TraceMeanField_ELBO": TraceMeanField_ELBO}


@contextlib.contextmanager
def analytic_kl_loss(cls):
    """Make ppvi.fit's analytic-KL estimator construct cls: patch the names make_estimator looks up."""
    import ppvi.estimators.reparam as reparam

    saved = reparam.MeanFieldELBO
    try:
        reparam.MeanFieldELBO = cls
        yield
    finally:
        reparam.MeanFieldELBO = saved


def main(args):
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    device = ppvi.resolve_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    options = {"latent_dim": LATENT, "hidden_dim": HIDDEN, "architecture": "mlp", "likelihood": "bernoulli"}
    methods = [name for name in METHODS if not (args.no_pyro and METHODS[name] is not None)]
    steps_per_epoch = math.ceil(NUM_TRAIN / BATCH)
    with tempfile.TemporaryDirectory(prefix="ppvi-vae-bench-") as folder:
        x_train, x_heldout, labels_heldout = make_split(Path(folder))
        x_train = x_train.to(device)
        binary_heldout = torch.bernoulli(x_heldout, generator=torch.Generator().manual_seed(args.seed + 12345)).to(device)
        fit_kwargs = dict(data=folder, options=options, batch_size=BATCH, lr=LR, device=args.device, seed=args.seed)

        def run(method, epochs, x):
            """Train one method; return (seconds per step, held-out scorer)."""
            if method in PPVI_LOSSES:
                start = time.perf_counter()
                with analytic_kl_loss(PPVI_LOSSES[method]), ppvi_clock():
                    result = ppvi.fit("vae", epochs=epochs, **fit_kwargs)
                total = time.perf_counter() - start
                times = result.elbo_trace["time_s"].to_numpy()
                step = (times[-1] - times[0]) / max(len(times) - 1, 1)  # from the end of step 0 to the end of the last

                def scorer():
                    frame = evaluate(result, data={"x": binary_heldout, "labels": labels_heldout.to(device)}, num_samples=args.iwae_k, seed=args.seed)
                    return frame.attrs["iwae"], frame.attrs["elbo"], f"{result.estimator}; fit total {total:.2f} s"
                return step, scorer
            if method == "hand-written":
                encoder, decoder, step = train_hand(x, epochs, args.seed, device, sync)
            else:
                encoder, decoder, step = train_pyro(x, epochs, args.seed, device, sync, jit=METHODS[method])
            return step, lambda: (*hand_scores(encoder, decoder, binary_heldout, args.iwae_k, args.seed), "")

        for method in methods:  # warm-up: imports, lazy initialisation, allocator
            if method in PPVI_LOSSES:
                with analytic_kl_loss(PPVI_LOSSES[method]):
                    ppvi.fit("vae", steps=5, **fit_kwargs)
            else:
                run(method, 1, x_train[:1024])

        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(
            f"torch {torch.__version__}, pyro {pyro.__version__} on {name}, {args.threads} CPU thread(s); VAE 784-{HIDDEN}-{LATENT} softplus MLP, "
            f"Bernoulli; Adam {LR}, batch {BATCH}, {steps_per_epoch} steps/epoch, {args.epochs} epochs x {args.repeats} rounds; "
            f"held-out {NUM_HELDOUT}, K={args.iwae_k}; {args.clock} clock\n",
            flush=True,
        )
        steps = {method: [] for method in methods}
        scorers = {}
        for round_ in range(args.repeats):  # rounds rotate the order, so no method always runs first
            order = methods[round_ % len(methods):] + methods[: round_ % len(methods)]
            for method in order:
                step, scorer = run(method, args.epochs, x_train)
                steps[method].append(step)
                scorers.setdefault(method, scorer)  # held-out scores of round 0's fits
            print(f"round {round_}: " + ", ".join(f"{m} {1000 * steps[m][-1]:.2f}" for m in methods) + " ms/step", flush=True)
        scores = {method: scorers[method]() for method in methods}

    median = {method: statistics.median(values) for method, values in steps.items()}
    hand_iwae, hand_elbo, _ = scores["hand-written"]
    print(f"\n{'method':<28} {'ms/step':>8} {'s/epoch':>8} {'/ hand':>7} {'ELBO':>8} {'IWAE':>8} {'ELBO - hand':>14} {'IWAE - hand':>14}  notes")
    for method in methods:
        iwae, elbo, note = scores[method]
        d_elbo, se_elbo = paired(elbo, hand_elbo)
        d_iwae, se_iwae = paired(iwae, hand_iwae)
        ratios = sorted(step / hand for step, hand in zip(steps[method], steps["hand-written"]))
        spread = f"per-round ratios {ratios[0]:.3f}-{ratios[-1]:.3f}" if len(ratios) > 1 else ""
        print(
            f"{method:<28} {1000 * median[method]:>8.2f} {median[method] * steps_per_epoch:>8.3f} {median[method] / median['hand-written']:>7.3f} "
            f"{float(elbo.mean()):>8.2f} {float(iwae.mean()):>8.2f} {d_elbo:>+7.2f} +-{se_elbo:4.2f} {d_iwae:>+7.2f} +-{se_iwae:4.2f}  "
            + "; ".join(part for part in (note, spread) if part)
        )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="passes over the 8,000 training images (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    parser.add_argument("--iwae-k", type=int, default=200, help="importance samples per held-out image (default 200)")
    parser.add_argument("--repeats", type=int, default=3, help="timing rounds, order rotated each round; medians are reported (default 3)")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall",
        help="wall (default) or cpu: this thread's CPU time (time.thread_time), less disturbed by other jobs on a shared machine; "
        "with one torch thread the step's arithmetic runs on this thread (not for --device cuda)",
    )
    parser.add_argument("--no-pyro", action="store_true", help="skip the plain-Pyro and JIT runs")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
