"""The run directory: its files, atomic writes, divergence, resume (also after kill -9), compare_runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import ppvi
from ppvi import rundir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_config(run_dir: Path) -> dict:
    return json.loads((run_dir / "config.json").read_text())


def temporary_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith(".") and path.name.endswith(".tmp"))


# --- what a successful fit leaves behind ------------------------------------------------------------


def test_successful_fit_exits_0(gmm_run):
    _, result = gmm_run
    assert result.code == 0, result.text
    assert "Traceback" not in result.text


def test_config_records_estimator_with_reason_seed_device_versions(gmm_run):
    run_dir, _ = gmm_run
    config = read_config(run_dir)
    assert config["model"] == "gmm" and config["guide"] == "meanfield"
    assert config["estimator"] == "enum" and config["estimator_reason"].strip()
    assert config["seed"] == 0 and config["device"] == "cpu"
    assert {"ppvi", "pyro", "torch", "python"} <= set(config["versions"])
    assert config["versions"]["torch"] == torch.__version__
    assert config["status"] == "completed"


def test_elbo_csv_has_the_trace_columns_and_one_row_per_step(gmm_run):
    run_dir, _ = gmm_run
    trace = pd.read_csv(run_dir / "elbo.csv")
    assert list(trace.columns[:5]) == ["restart", "step", "epoch", "elbo", "time_s"]
    assert list(trace["step"]) == list(range(30))
    assert (trace["restart"] == 0).all()
    assert np.isfinite(trace["elbo"]).all()
    assert trace["time_s"].is_monotonic_increasing


def test_params_pt_loads_with_weights_only(gmm_run):
    run_dir, _ = gmm_run
    state = torch.load(run_dir / "params.pt", weights_only=True)
    (snapshot,) = state["restarts"]
    assert snapshot["step"] == 30 and snapshot["done"]
    assert snapshot["params"] and set(snapshot["params"]) == set(snapshot["unconstrained"])
    assert all(isinstance(value, torch.Tensor) for value in snapshot["params"].values())
    assert all(torch.isfinite(value).all() for value in snapshot["params"].values())


def test_elbo_png_is_a_png(gmm_run):
    run_dir, _ = gmm_run
    assert (run_dir / "elbo.png").read_bytes()[:8] == PNG_MAGIC


def test_no_temporary_files_are_left(gmm_run):
    run_dir, _ = gmm_run
    assert temporary_files(run_dir) == []
    assert sorted(path.name for path in run_dir.iterdir()) == ["config.json", "elbo.csv", "elbo.png", "params.pt"]


def test_run_files_are_readable_by_others_like_any_new_file(gmm_run):
    # Regression: mkstemp made every run file owner-only (mode 0600) whatever the umask.
    run_dir, _ = gmm_run
    umask = os.umask(0)
    os.umask(umask)
    for path in run_dir.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name


# --- atomic writes ----------------------------------------------------------------------------------


def test_atomic_write_replaces_the_file(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")
    rundir.atomic_write(target, lambda temporary: Path(temporary).write_text("new"))
    assert target.read_text() == "new"
    assert temporary_files(tmp_path) == []


def test_failed_atomic_write_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")

    def half_write(temporary):
        Path(temporary).write_text("ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        rundir.atomic_write(target, half_write)
    assert target.read_text() == "old"
    assert temporary_files(tmp_path) == []


def test_read_config_of_a_plain_folder_is_a_usage_error(tmp_path):
    with pytest.raises(ppvi.UsageError, match="not a ppvi run directory"):
        rundir.read_config(tmp_path)


# --- NaN during training ----------------------------------------------------------------------------

DIVERGING_MODEL = '''
"""A Normal mean whose ELBO turns NaN once a pushed parameter passes 2.55 (a test fixture).

The factor adds `drift` to the log joint: a constant gradient, so Adam (lr 0.1) moves
drift by 0.1 per step, and the ELBO is NaN from step 26 on, deterministically.
"""

import torch

import pyro
import pyro.distributions as dist

FIT_DEFAULTS = {"lr": 0.1}


def load_data(source, options):
    return {"x": torch.linspace(-1.0, 1.0, 10)}


def model(batch, options):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    drift = pyro.param("drift")
    pyro.factor("push", drift + (float("nan") if drift.item() > 2.55 else 0.0))
    with pyro.plate("data", batch.num_data, subsample=batch.index):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=batch.x)


def guide(batch, options):
    pyro.param("drift", lambda: torch.tensor(0.0))
    loc = pyro.param("loc", lambda: torch.tensor(0.0))
    pyro.sample("mu", dist.Normal(loc, 1.0))


GUIDES = {"meanfield": guide}
'''


@pytest.fixture(scope="module")
def diverged_run(tmp_path_factory, cli):
    folder = tmp_path_factory.mktemp("diverging")
    model_file = folder / "diverging.py"
    model_file.write_text(textwrap.dedent(DIVERGING_MODEL))
    run_dir = folder / "run"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)  # Pyro's own notice
        result = cli("fit", model_file, "--steps", 100, "--checkpoint-every", 10, "--seed", 0, "--out", run_dir)
    return run_dir, result


def test_nan_elbo_exits_1(diverged_run):
    _, result = diverged_run
    assert result.code == 1, result.text
    assert "Traceback" not in result.text


def test_nan_elbo_message_names_the_step(diverged_run):
    _, result = diverged_run
    assert "diverged" in result.err and "at step 26" in result.err, result.err


def test_nan_elbo_marks_the_config_diverged(diverged_run):
    run_dir, _ = diverged_run
    config = read_config(run_dir)
    assert config["status"] == "diverged"
    assert "step 26" in config["error"]


def test_nan_elbo_keeps_the_last_finite_checkpoint(diverged_run):
    run_dir, _ = diverged_run
    (snapshot,) = torch.load(run_dir / "params.pt", weights_only=True)["restarts"]
    assert snapshot["step"] == 20 and not snapshot["done"]
    assert all(torch.isfinite(value).all() for value in snapshot["unconstrained"].values())
    assert snapshot["params"]["drift"].item() == pytest.approx(2.0, abs=1e-4)  # 20 Adam steps of 0.1


def test_nan_elbo_trace_keeps_every_finite_step_before_the_nan(diverged_run):
    # the ELBO turns NaN at step 26; rows after the step-20 checkpoint are dropped only on --resume
    run_dir, _ = diverged_run
    trace = pd.read_csv(run_dir / "elbo.csv")
    assert list(trace["step"]) == list(range(26))
    assert np.isfinite(trace["elbo"]).all()


# --- resume -----------------------------------------------------------------------------------------


class Interrupted(Exception):
    """Stands in for a kill right after a checkpoint was written."""


def interrupt_after_checkpoints(monkeypatch, count: int) -> None:
    original, written = rundir.save_checkpoint, []

    def save_then_stop(run_dir, state):
        original(run_dir, state)
        written.append(state)
        if len(written) == count:
            raise Interrupted

    monkeypatch.setattr(rundir, "save_checkpoint", save_then_stop)


@pytest.mark.parametrize("batch_size", [None, 64], ids=["full-batch", "minibatch"])
def test_resume_after_interruption_reproduces_the_uninterrupted_trace(tmp_path, monkeypatch, batch_size):
    settings = dict(guide="meanfield", steps=30, batch_size=batch_size, checkpoint_every=10, seed=3, device="cpu")
    reference = ppvi.fit("gmm", out=tmp_path / "reference", **settings)

    interrupt_after_checkpoints(monkeypatch, count=2)  # stop right after the checkpoint at step 20
    with pytest.raises(Interrupted):
        ppvi.fit("gmm", out=tmp_path / "resumed", **settings)
    monkeypatch.undo()
    assert torch.load(tmp_path / "resumed" / "params.pt", weights_only=True)["restarts"][0]["step"] == 20

    resumed = ppvi.resume(tmp_path / "resumed")
    assert list(resumed.elbo_trace["step"]) == list(range(30))
    np.testing.assert_array_equal(resumed.elbo_trace["elbo"].to_numpy(), reference.elbo_trace["elbo"].to_numpy())
    on_disk = pd.read_csv(tmp_path / "resumed" / "elbo.csv")
    np.testing.assert_array_equal(on_disk["elbo"].to_numpy(), pd.read_csv(tmp_path / "reference" / "elbo.csv")["elbo"].to_numpy())


def test_resume_refuses_a_changed_setting(tmp_path, monkeypatch):
    interrupt_after_checkpoints(monkeypatch, count=1)
    with pytest.raises(Interrupted):
        ppvi.fit("normal_normal", steps=20, checkpoint_every=5, seed=0, device="cpu", out=tmp_path / "run")
    monkeypatch.undo()
    with pytest.raises(ppvi.UsageError, match="seed differs"):
        ppvi.fit("normal_normal", steps=20, checkpoint_every=5, seed=1, device="cpu", out=tmp_path / "run", resume=True)


def test_resume_of_a_plain_folder_exits_2(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    result = cli("fit", "--resume", tmp_path / "empty")
    assert result.code == 2, result.text
    assert "not a ppvi run directory" in result.err and "Traceback" not in result.text


def ppvi_command() -> list[str]:
    script = Path(sys.executable).with_name("ppvi")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ppvi.cli"]


def test_kill_9_then_resume_reproduces_the_uninterrupted_run(cli, tmp_path):
    """The real thing: SIGKILL a `ppvi fit` process after its first checkpoint, then `ppvi fit --resume`."""
    arguments = ["fit", "normal_normal", "--steps", "200", "--checkpoint-every", "10", "--seed", "1", "--device", "cpu", "--no-progress"]
    killed_dir = tmp_path / "killed"
    process = subprocess.Popen(ppvi_command() + arguments + ["--out", str(killed_dir)], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (killed_dir / "params.pt").exists():
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL, "the fit finished before the kill"
    checkpoint_step = torch.load(killed_dir / "params.pt", weights_only=True)["restarts"][0]["step"]
    assert 10 <= checkpoint_step < 200

    resumed = cli("fit", "--resume", killed_dir, "--no-progress")
    assert resumed.code == 0, resumed.text
    reference = cli(*arguments, "--out", tmp_path / "reference")  # the same command, never interrupted
    assert reference.code == 0, reference.text
    resumed_trace, reference_trace = (pd.read_csv(folder / "elbo.csv") for folder in (killed_dir, tmp_path / "reference"))
    assert list(resumed_trace["step"]) == list(range(200))
    np.testing.assert_array_equal(resumed_trace["elbo"].to_numpy(), reference_trace["elbo"].to_numpy())
    assert read_config(killed_dir)["status"] == "completed"


# --- compare_runs ------------------------------------------------------------------------------------


def test_compare_runs_returns_one_tidy_frame_with_a_run_column(cli, gmm_run, tmp_path):
    run_dir, _ = gmm_run
    other = tmp_path / "short"
    assert cli("fit", "normal_normal", "--steps", 7, "--out", other).code == 0
    frame = ppvi.compare_runs([run_dir, other])
    assert isinstance(frame, pd.DataFrame)
    assert {"run", "model", "guide", "estimator", "restart", "step", "epoch", "elbo", "time_s"} <= set(frame.columns)
    assert frame.groupby("run").size().to_dict() == {run_dir.name: 30, "short": 7}
    assert frame.set_index("run")["model"].groupby(level=0).first().to_dict() == {run_dir.name: "gmm", "short": "normal_normal"}


def test_compare_runs_on_a_missing_folder_is_a_usage_error(tmp_path):
    with pytest.raises(ppvi.UsageError):
        ppvi.compare_runs([tmp_path / "absent"])


def test_writing_plots_leaves_matplotlibs_backend_alone(tmp_path):
    # In a notebook, a library call that switched pyplot to Agg silently stopped every later figure from showing.
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        ppvi.fit("normal_normal", steps=5, out=tmp_path / "run")
        ppvi.plot_gradient_variance(ppvi.gradient_variance("normal_normal", estimators=["reparam"], num_draws=3), tmp_path / "g.png")
        assert matplotlib.get_backend() == "svg"
        assert (tmp_path / "run" / "elbo.png").exists() and (tmp_path / "g.png").exists()
    finally:
        matplotlib.use(before)


@pytest.mark.parametrize(
    "estimator_settings",
    [dict(estimator="score", baseline="neural"), dict(estimator="score", baseline="average"), dict(estimator="gumbel")],
    ids=["score-neural", "score-average", "gumbel"],
)
def test_resume_is_exact_with_baselines_and_temperature_schedules(tmp_path, monkeypatch, estimator_settings):
    # The neural baseline's network, the decaying averages (param store state) and gumbel's step-indexed
    # temperature must all come back from the checkpoint for the resumed trace to match bit for bit.
    small = {"num_variables": 3, "num_classes": 4, "hidden_dim": 16}
    settings = dict(options=small, steps=30, batch_size=64, checkpoint_every=10, seed=1, device="cpu", **estimator_settings)
    reference = ppvi.fit("catvae", out=tmp_path / "reference", **settings)
    interrupt_after_checkpoints(monkeypatch, count=2)
    with pytest.raises(Interrupted):
        ppvi.fit("catvae", out=tmp_path / "resumed", **settings)
    monkeypatch.undo()
    resumed = ppvi.resume(tmp_path / "resumed")
    np.testing.assert_array_equal(resumed.elbo_trace["elbo"].to_numpy(), reference.elbo_trace["elbo"].to_numpy())
    assert resumed.config["estimator_options"] == reference.config["estimator_options"]


@pytest.mark.parametrize("batch_size,every", [(None, 100), (20, 50)], ids=["stationarity", "early-stopping"])
def test_resume_goes_on_where_the_stopping_rule_was(tmp_path, monkeypatch, batch_size, every):
    """Interrupted mid-fit (after a learning-rate cut, or after held-out evaluations), then resumed: the rule's
    phases, averages and best checkpoint come back with the parameters, so the resumed fit stops at the same step
    with the same values as the uninterrupted one (before, the rule started afresh and stopped elsewhere)."""
    x = 1.5 + torch.randn(200, generator=torch.Generator().manual_seed(0))
    settings = dict(data={"x": x}, batch_size=batch_size, checkpoint_every=every, seed=0, device="cpu", auto_stop=True)
    reference = ppvi.fit("normal_normal", out=tmp_path / "reference", **settings)
    stop = reference.config["convergence"]["0"]["stop_step"]
    assert stop is not None and stop > 4 * every, reference.config["convergence"]

    interrupt_after_checkpoints(monkeypatch, count=4)  # stop right after the fourth checkpoint, mid-rule
    with pytest.raises(Interrupted):
        ppvi.fit("normal_normal", out=tmp_path / "resumed", **settings)
    monkeypatch.undo()
    resumed = ppvi.fit("normal_normal", out=tmp_path / "resumed", resume=True, **settings)
    assert resumed.config["convergence"]["0"]["stop_step"] == stop
    for name, value in reference.params.items():
        torch.testing.assert_close(resumed.params[name], value)
