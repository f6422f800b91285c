"""Early stopping of the MNIST VAE on a held-out split against a fixed 20 epochs (issue 11).

Data: the real MNIST test set (``../shared/data/mnist``, or ``PPVI_MNIST``); images 0-7,999 are written
as the ``train-*`` split of a temporary folder (``ppvi fit vae --data DIR`` reads it) and images
8,000-9,999 as its ``t10k-*`` split, which neither fit sees. Both fits are ``ppvi.fit("vae", data=DIR)``
with the gallery's settings (batch 128, lr 3e-3, same seed):

- ``fixed 20 epochs``: ``epochs=20``, trained on all 8,000 images;
- ``early stopping``: no ``epochs``: ppvi holds out a seeded 10% (800 images), evaluates their ELBO once
  an epoch under fixed random numbers, stops after 5 evaluations without a gain and restores the best
  parameters (at most the gallery's 100 epochs).

Reported for each: epochs run, wall time, and on the 2,000 unseen images the ELBO and the IWAE bound
(K = 100) per image, with their standard errors over images.

    python benchmarks/early_stopping.py
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

import ppvi
from ppvi.evaluate import iwae_bound
from ppvi.images import load_mnist, write_idx

REPO = Path(__file__).resolve().parents[1]
MNIST = Path(os.environ.get("PPVI_MNIST", REPO.parent / "shared" / "data" / "mnist"))
NUM_TRAIN = 8000


def make_folder(folder: Path) -> None:
    images, labels = load_mnist(MNIST, "test")
    raw = (images * 255).round().to(torch.uint8)
    for split, part in (("train", slice(0, NUM_TRAIN)), ("t10k", slice(NUM_TRAIN, None))):
        write_idx(folder / f"{split}-images-idx3-ubyte", raw[part])
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels[part].to(torch.uint8))


def main() -> None:
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        make_folder(folder)
        print(f"{'run':18} {'epochs':>6} {'time s':>7} {'test ELBO/image':>16} {'test IWAE-100/image':>20}  status")
        for label, settings in (("fixed 20 epochs", {"epochs": 20}), ("early stopping", {})):
            start = time.perf_counter()
            result = ppvi.fit("vae", data=str(folder), seed=0, device="cpu", **settings)
            seconds = time.perf_counter() - start
            iwae, elbo = iwae_bound(result, str(folder), 100, split="test")
            sem = lambda values: float(values.std() / len(values) ** 0.5)  # noqa: E731
            epochs = len(result.elbo_trace) * result.config["batch_size"] / result.config["num_data"]  # passes over its training points
            status = result.config.get("convergence", {}).get("0", {}).get("status", "fixed budget")
            test = f"{float(elbo.mean()):9.2f} ± {sem(elbo):4.2f} {float(iwae.mean()):13.2f} ± {sem(iwae):4.2f}"
            print(f"{label:18} {epochs:6.1f} {seconds:7.1f} {test}  {status}", flush=True)


if __name__ == "__main__":
    main()
