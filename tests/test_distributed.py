"""Data-parallel fits (``ppvi fit --nproc 2``, i.e. torchrun's engine with gloo on CPU, 2 processes).

How the randomness is matched: every rank seeds Pyro's RNG with the same seed, so every rank draws
the same values for the *global* latents, in the same order as one process does; the minibatch
permutation comes from its own seeded generator. For a model whose guide samples only global
latents (normal_normal's mean field; gmm's mean field with the assignments enumerated exactly),
the 2-process ELBO and gradients are then the 1-process ones of the same global batch, up to the
order of float additions: the traces must agree to float32 round-off (relative 1e-4 after
hundreds of Adam steps, where differences of 1e-7 per step compound). Local latents (the vae's
z per image) are drawn per shard, so there the check is a held-out ELBO within Monte Carlo error.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import ppvi
from ppvi.distributed import DistComm

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 600  # seconds; a hung collective must fail the test, not the suite


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _ppvi(*args, nproc: int = 2, cwd=None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ppvi", "fit", *map(str, args), "--device", "cpu"] + (["--nproc", str(nproc)] if nproc > 1 else [])
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=_env(), cwd=cwd)


def _same_trace(one: pd.DataFrame, two: pd.DataFrame, rtol: float = 1e-4) -> None:
    assert list(one["step"]) == list(two["step"])
    np.testing.assert_allclose(two["elbo"].to_numpy(), one["elbo"].to_numpy(), rtol=rtol, atol=1e-3)


# --- unit: the shard and its weight (no process group needed) ---------------------------------


@pytest.mark.parametrize("size, world", [(10, 2), (7, 2), (5, 3), (3, 3)])
def test_shards_are_disjoint_cover_the_batch_and_weights_sum_to_one(size, world):
    index = torch.randperm(100)[:size]
    comms = [DistComm(rank, world, torch.device("cpu")) for rank in range(world)]
    pieces = [comm.shard(index) for comm in comms]
    assert torch.equal(torch.cat(pieces), index)  # disjoint, in order, union = the global batch
    assert sum(comm.weight for comm in comms) == pytest.approx(1.0)
    assert [comm.weight for comm in comms] == pytest.approx([len(piece) / size for piece in pieces])


def test_too_few_points_for_the_ranks_is_refused(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ppvi.UsageError, match="at least 4 points"):
        ppvi.distributed.check_world_size(3, 100)
    with pytest.raises(ppvi.UsageError, match="started with 2 process"):
        ppvi.distributed.check_world_size(8, 100, previous_world_size=2)


def test_hooks_in_a_one_rank_gloo_group(tmp_path):
    """The flatten / all-reduce / split path of the hooks, in-process (a world of one: sums are identities)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        comm = DistComm(0, 1, torch.device("cpu"))
        comm.shard(torch.arange(10))
        a, b = torch.ones(2, 3, requires_grad=True), torch.zeros(4, requires_grad=True)
        c = torch.ones(1, dtype=torch.float64, requires_grad=True)
        (a.sum() * 2 + (c * 3).sum()).backward()  # b gets no gradient
        comm.average_gradients_([a, b, c])
        assert torch.equal(a.grad, torch.full((2, 3), 2.0)) and torch.equal(b.grad, torch.zeros(4)) and c.grad.item() == 3.0
        comm.broadcast_([a, b])
        assert torch.equal(a, torch.ones(2, 3))
        assert torch.equal(comm.mean(torch.tensor([1.0, -2.0])), torch.tensor([1.0, -2.0]))
    finally:
        dist.destroy_process_group()


# --- two processes (each test starts 3 Python processes: tens of seconds on 2 busy cores) -------


@pytest.mark.slow
def test_bad_input_one_message_exit_2(tmp_path):
    done = _ppvi("normal_normal", "--steps", "-3", "--out", tmp_path / "run")
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("--steps must be a positive integer") == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_conjugate_two_processes_match_one(tmp_path):
    """normal_normal, full batch of 50 points split 25 + 25: the 1-process trace to float round-off."""
    steps = 60
    one = ppvi.fit("normal_normal", steps=steps, device="cpu", seed=3)
    done = _ppvi("normal_normal", "--steps", steps, "--seed", 3, "--out", tmp_path / "two")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("estimator:") <= 1  # rank 0 alone talks
    _same_trace(one.elbo_trace, ppvi.rundir.read_trace(tmp_path / "two"))
    config = ppvi.rundir.read_config(tmp_path / "two")
    assert config["world_size"] == 2 and config["status"] == "completed"


@pytest.mark.slow
def test_gmm_minibatch_two_processes_match_one(tmp_path):
    """gmm, minibatches of 64 (32 per rank), assignments enumerated: same trace as one process."""
    args = dict(steps=150, batch_size=64, seed=1)
    one = ppvi.fit("gmm", guide="meanfield", device="cpu", **args)
    done = _ppvi("gmm", "--guide", "meanfield", "--steps", 150, "--batch-size", 64, "--seed", 1, "--out", tmp_path / "two")
    assert done.returncode == 0, done.stderr
    assert one.estimator == "enum"
    _same_trace(one.elbo_trace, ppvi.rundir.read_trace(tmp_path / "two"))


@pytest.mark.slow
def test_uneven_shards_match_one_process(tmp_path):
    """A batch of 25 split 12 + 13: the b_r / B weights keep the 1-process gradient exact."""
    one = ppvi.fit("normal_normal", steps=60, batch_size=25, device="cpu", seed=0)
    done = _ppvi("normal_normal", "--steps", 60, "--batch-size", 25, "--out", tmp_path / "two")
    assert done.returncode == 0, done.stderr
    _same_trace(one.elbo_trace, ppvi.rundir.read_trace(tmp_path / "two"))


def _worker_pids(parent: int) -> dict[int, int]:
    """rank -> pid of the ppvi workers below ``parent`` (read from /proc: Linux)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        variables = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        if ppid == parent and b"RANK" in variables:
            found[int(variables[b"RANK"])] = int(entry.name)
    return found


@pytest.mark.slow
def test_kill_one_rank_then_resume_gives_the_uninterrupted_trace(tmp_path):
    args = ["normal_normal", "--steps", 400, "--checkpoint-every", 50, "--device", "cpu", "--nproc", 2]
    command = [sys.executable, "-m", "ppvi", "fit", *map(str, args), "--out", str(tmp_path / "killed")]
    launcher = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT
    while not (tmp_path / "killed" / "params.pt").exists():  # the first checkpoint: mid-fit
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
        time.sleep(0.05)
    os.kill(_worker_pids(launcher.pid)[1], signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=TIMEOUT)
    assert launcher.returncode == 1
    assert "rank 1 of 2 failed (killed by SIGKILL)" in stderr and stderr.count("error:") == 1, stderr
    killed_at = ppvi.rundir.load_checkpoint(tmp_path / "killed")["restarts"][0]["step"]
    assert 0 < killed_at < 400

    resumed = subprocess.run(
        [sys.executable, "-m", "ppvi", "fit", "--resume", str(tmp_path / "killed"), "--nproc", "2"],
        capture_output=True, text=True, timeout=TIMEOUT, env=_env(),
    )
    assert resumed.returncode == 0, resumed.stderr
    whole = _ppvi("normal_normal", "--steps", 400, "--checkpoint-every", 50, "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    _same_trace(ppvi.rundir.read_trace(tmp_path / "whole"), ppvi.rundir.read_trace(tmp_path / "killed"), rtol=1e-6)

    other = _ppvi("--resume", tmp_path / "killed", nproc=3)  # another world size: refused
    assert other.returncode == 2 and other.stderr.count("started with 2 process") == 1, other.stderr


@pytest.mark.slow
def test_vae_digits_two_processes_reach_the_same_held_out_elbo(tmp_path):
    """Local latents differ per shard: compare the held-out ELBO per image within Monte Carlo error."""
    args = ["--steps", 600, "--batch-size", 128, "--seed", 0]
    done = _ppvi("vae", *args, "--out", tmp_path / "two")
    assert done.returncode == 0, done.stderr
    one = _ppvi("vae", *args, "--out", tmp_path / "one", nproc=1)
    assert one.returncode == 0, one.stderr
    scores = {name: ppvi.evaluate(tmp_path / name, num_samples=10, seed=0) for name in ("one", "two")}
    elbo = {name: frame.set_index("estimate").loc["elbo"] for name, frame in scores.items()}
    # two fits from the same seed differ by their optimisation noise as well as by the evaluation's
    # Monte Carlo error: allow 4 combined standard errors plus 1 nat per image (~0.5% of the ELBO)
    gap = abs(elbo["one"]["mean"] - elbo["two"]["mean"])
    assert gap < 4 * np.hypot(elbo["one"]["se"], elbo["two"]["se"]) + 1.0, (elbo, gap)
