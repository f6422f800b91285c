"""Data-parallel VAE on MNIST: images per second and time per epoch with 1, 2, ... processes.

The same command, ``python -m ppvi fit vae --data DIR --epochs E --batch-size 128 --device D``, run with
``--nproc 1`` (one process, no process group) and ``--nproc N`` (N workers started through torchrun's
engine: gloo on CPU, NCCL on CUDA, each worker on ``cuda:LOCAL_RANK``). The global batch is 128
images in every run, so with N processes each worker computes 128 / N images per step and the
gradients are averaged by one all-reduce per step.

- data: images 0-7,999 of the real MNIST test set (``../shared/data/mnist``, or ``PPVI_MNIST``)
  written as the ``train-*`` split of a temporary folder (63 batches of 128 per epoch), images
  8,000-9,999 held out;
- step time: from rank 0's ELBO trace (``time_s``), the median difference between consecutive
  steps after the first epoch's first 10 steps (start-up and lazy initialisation excluded), so
  process start-up and import time are not counted; images/s = 128 / step time; time per epoch =
  63 step times; "wall" is the whole command, start-up included;
- held-out ELBO per image (K = 10 importance samples, ``ppvi.evaluate``) to show the runs train
  to the same place.

On a 2-core CPU, N = 2 processes with one thread each are compared with 1 process with one thread
(``--threads 1``, the default) and with 1 process using both cores (``--threads 2``): the honest
question is whether 2 workers beat 1 worker given the same cores. Nothing here asserts.

Usage::

    python benchmarks/distributed.py                          # cpu, nproc 1 and 2, 2 epochs
    python benchmarks/distributed.py --nprocs 1,2 --epochs 3 --threads 1
    python benchmarks/distributed.py --device cuda --nprocs 1,2,4,8
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ppvi  # noqa: E402
from ppvi.images import load_mnist, write_idx  # noqa: E402

MNIST = Path(os.environ.get("PPVI_MNIST", REPO.parent / "shared" / "data" / "mnist"))  # a worktree: PPVI_MNIST=/work/shared/data/mnist
NUM_TRAIN, BATCH = 8000, 128
STEPS_PER_EPOCH = -(-NUM_TRAIN // BATCH)


def make_split(folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = load_mnist(MNIST, "test")
    raw = (images * 255).round().to(torch.uint8)
    write_idx(folder / "train-images-idx3-ubyte", raw[:NUM_TRAIN])
    write_idx(folder / "train-labels-idx1-ubyte", labels[:NUM_TRAIN].to(torch.uint8))
    return {"x": images.reshape(images.shape[0], -1)[NUM_TRAIN:], "labels": labels[NUM_TRAIN:]}


def run(nproc: int, data: Path, out: Path, epochs: int, device: str, threads: int) -> dict:
    command = [sys.executable, "-m", "ppvi", "fit", "vae", "--data", str(data), "--epochs", str(epochs), "--batch-size", str(BATCH),
               "--device", device, "--seed", "0", "--out", str(out)] + (["--nproc", str(nproc)] if nproc > 1 else [])
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS=str(threads))
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"nproc {nproc} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    trace = pd.read_csv(out / "elbo.csv")
    step_time = float(trace["time_s"].diff().iloc[10:].median())
    return {"nproc": nproc, "threads/proc": threads, "step_ms": 1000 * step_time, "images_per_s": BATCH / step_time,
            "epoch_s": STEPS_PER_EPOCH * step_time, "wall_s": wall, "final_elbo": float(trace["elbo"].iloc[-STEPS_PER_EPOCH:].mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nprocs", default="1,2", help="comma-separated process counts")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="OMP/torch threads per process")
    parser.add_argument("--also-one-process-threads", type=int, default=0, help="also time 1 process with this many threads")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        heldout = make_split(folder / "data")
        plan = [(int(n), args.threads) for n in args.nprocs.split(",")]
        if args.also_one_process_threads:
            plan.append((1, args.also_one_process_threads))
        for nproc, threads in plan:
            out = folder / f"run-{nproc}-{threads}"
            row = run(nproc, folder / "data", out, args.epochs, args.device, threads)
            frame = ppvi.evaluate(out, data=heldout, num_samples=10, seed=0)
            elbo = frame.set_index("estimate").loc["elbo"]
            row.update(heldout_elbo=float(elbo["mean"]), heldout_se=float(elbo["se"]))
            rows.append(row)
            print(pd.DataFrame([row]).to_string(index=False, header=len(rows) == 1, float_format=lambda v: f"{v:.4g}"), flush=True)
    frame = pd.DataFrame(rows)
    base = frame[(frame["nproc"] == 1) & (frame["threads/proc"] == args.threads)]["images_per_s"]
    if len(base):
        frame["speedup"] = frame["images_per_s"] / float(base.iloc[0])
        frame["efficiency"] = frame["speedup"] / frame["nproc"]
    print(f"\nVAE on MNIST ({NUM_TRAIN} images, batch {BATCH} global, {args.epochs} epochs, {args.device}, {os.cpu_count()} cores)")
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main()
