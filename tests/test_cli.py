"""The command line contract (DESIGN.md): exit codes, messages, and what `ppvi fit` accepts.

Bad input: exit code 2, one message on stderr naming the problem, no traceback,
and no run directory left behind. Most tests call ``ppvi.cli.main`` in-process
(the real entry point minus interpreter start-up); one runs the console script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

GMM_GUIDES = ("meanfield", "map", "amortized")


def assert_rejected(result, out_dir: Path, *needles: str) -> None:
    """Exit 2, an `error:` message on stderr holding every needle, no traceback, no run directory."""
    assert result.code == 2, result.text
    assert "Traceback" not in result.text
    assert result.err.startswith("error: "), result.err
    assert len(result.err.strip().splitlines()) == 1, result.err  # one paragraph (soft-wrapped)
    for needle in needles:
        assert needle in result.err, (needle, result.err)
    assert not out_dir.exists(), sorted(out_dir.iterdir())


@pytest.fixture
def csv_file(tmp_path):
    """Write ``text`` (str or bytes) to tmp_path/NAME and return the path."""

    def write(name: str, text) -> Path:
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    return write


# --- bad data ------------------------------------------------------------------------------------


def test_missing_data_file_is_rejected(cli, tmp_path):
    missing = tmp_path / "nope.csv"
    result = cli("fit", "gmm", "--data", missing, "--out", tmp_path / "run")
    assert_rejected(result, tmp_path / "run", str(missing), "no such file")


def test_binary_garbage_data_is_rejected(cli, tmp_path, csv_file):
    path = csv_file("garbage.csv", bytes(range(256)) * 8)
    result = cli("fit", "gmm", "--data", path, "--out", tmp_path / "run")
    assert_rejected(result, tmp_path / "run", str(path), "not a readable CSV")


def test_ragged_csv_is_rejected(cli, tmp_path, csv_file):
    path = csv_file("ragged.csv", "1,2\n3,4,5\n6,7\n")
    result = cli("fit", "gmm", "--data", path, "--out", tmp_path / "run")
    assert_rejected(result, tmp_path / "run", str(path), "not a readable CSV")


def test_non_numeric_value_is_rejected_with_its_position(cli, tmp_path, csv_file):
    path = csv_file("words.csv", "1,2\n3,abc\n5,6\n")
    result = cli("fit", "gmm", "--data", path, "--out", tmp_path / "run")
    assert_rejected(result, tmp_path / "run", str(path), "non-numeric value 'abc'", "row 2, column 2")


def test_nan_value_is_rejected_as_nan(cli, tmp_path, csv_file):
    path = csv_file("nan.csv", "1,2\n3,4\nnan,6\n")
    result = cli("fit", "gmm", "--data", path, "--out", tmp_path / "run")
    assert_rejected(result, tmp_path / "run", str(path), "NaN", "row 3, column 1")


def test_infinite_value_is_rejected_as_not_finite(cli, tmp_path, csv_file):
    path = csv_file("inf.csv", "1,2\n3,-inf\n5,6\n")
    result = cli("fit", "gmm", "--data", path, "--out", tmp_path / "run")
    assert_rejected(result, tmp_path / "run", str(path), "-inf", "not finite")


def test_single_row_is_rejected(cli, tmp_path, csv_file):
    path = csv_file("one.csv", "1.5,2.5\n")
    result = cli("fit", "gmm", "--data", path, "--out", tmp_path / "run")
    assert_rejected(result, tmp_path / "run", str(path), "1 row", "at least 2")


def test_more_components_than_points_is_rejected(cli, tmp_path, csv_file):
    path = csv_file("three.csv", "1,2\n3,4\n5,6\n")
    result = cli("fit", "gmm", "--data", path, "--num-components", 5, "--out", tmp_path / "run")
    assert_rejected(result, tmp_path / "run", "--num-components 5", "(3)")


def test_malformed_synthetic_spec_is_rejected(cli, tmp_path):
    result = cli("fit", "gmm", "--data", "synthetic:q=1", "--out", tmp_path / "run")
    assert_rejected(result, tmp_path / "run", "synthetic:q=1", "n, k, d, seed")


# --- unknown names and impossible settings --------------------------------------------------------


def test_unknown_model_lists_the_gallery(cli, tmp_path):
    result = cli("fit", "no_such_model", "--out", tmp_path / "run")
    assert_rejected(result, tmp_path / "run", "'no_such_model'", "beta_bernoulli", "gmm", "normal_normal")


def test_unknown_guide_lists_the_models_guides(cli, tmp_path):
    result = cli("fit", "gmm", "--guide", "fancy", "--out", tmp_path / "run")
    assert_rejected(result, tmp_path / "run", "'fancy'", *GMM_GUIDES)


def test_unknown_estimator_lists_the_estimators(cli, tmp_path):
    result = cli("fit", "gmm", "--estimator", "magic", "--out", tmp_path / "run")
    assert_rejected(result, tmp_path / "run", "'magic'", "auto", "reparam", "score", "enum")


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--steps", "0"), ("--steps", "-5"), ("--lr", "0"), ("--lr", "-0.1"), ("--batch-size", "0"), ("--batch-size", "-4"),
        ("--epochs", "0"), ("--num-particles", "0"), ("--restarts", "0"), ("--checkpoint-every", "0"), ("--lr-decay", "0"),
    ],
)
def test_non_positive_setting_is_rejected(cli, tmp_path, flag, value):
    result = cli("fit", "gmm", flag, value, "--out", tmp_path / "run")
    assert_rejected(result, tmp_path / "run", flag, "positive")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_is_rejected(cli, tmp_path):
    result = cli("fit", "gmm", "--device", "cuda", "--out", tmp_path / "run")
    assert_rejected(result, tmp_path / "run", "--device cuda", "GPU")


def test_negative_seed_is_rejected(cli, tmp_path):
    result = cli("fit", "gmm", "--seed", "-1", "--out", tmp_path / "run")
    assert_rejected(result, tmp_path / "run", "--seed", "non-negative")


def test_steps_and_epochs_together_are_rejected(cli, tmp_path):
    result = cli("fit", "gmm", "--steps", 5, "--epochs", 2, "--out", tmp_path / "run")
    assert_rejected(result, tmp_path / "run", "--steps", "--epochs")


def test_unknown_device_is_rejected(cli, tmp_path):
    result = cli("fit", "gmm", "--device", "tpu", "--out", tmp_path / "run")
    assert_rejected(result, tmp_path / "run", "'tpu'", "auto, cpu or cuda")


def test_invalid_model_option_is_rejected(cli, tmp_path):
    result = cli("fit", "gmm", "--num-components", 0, "--out", tmp_path / "run")
    assert_rejected(result, tmp_path / "run", "--num-components", "at least 1")


def test_out_folder_that_is_not_empty_is_refused_without_resume(cli, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = cli("fit", "gmm", "--steps", 5, "--out", out)
    assert result.code == 2, result.text
    assert "Traceback" not in result.text
    assert "not empty" in result.err and "--resume" in result.err
    assert sorted(path.name for path in out.iterdir()) == ["notes.txt"]


def test_forced_reparam_with_map_guide_names_site_z_and_the_working_estimator(cli, tmp_path):
    # The map guide leaves z to the model: only enumeration can sum it out.
    result = cli("fit", "gmm", "--guide", "map", "--estimator", "reparam", "--out", tmp_path / "run")
    assert_rejected(result, tmp_path / "run", "'reparam'", "'z'", "Estimators that work: enum")


def test_forced_reparam_with_discrete_meanfield_site_names_site_z(cli, tmp_path):
    result = cli("fit", "gmm", "--guide", "meanfield", "--estimator", "reparam", "--out", tmp_path / "run")
    assert_rejected(result, tmp_path / "run", "'reparam'", "'z'", "enum", "score")


def test_compare_on_missing_folder_exits_2(cli, tmp_path):
    result = cli("compare", tmp_path / "not_a_run", "--out", tmp_path / "cmp.png")
    assert result.code == 2, result.text
    assert "Traceback" not in result.text
    assert "not_a_run" in result.err
    assert not (tmp_path / "cmp.png").exists()


def test_bad_input_in_a_real_process_exits_2_without_traceback(tmp_path):
    """The console script itself: sys.exit with main's code, message on stderr, nothing on disk."""
    script = Path(sys.executable).with_name("ppvi")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "ppvi.cli"]
    completed = subprocess.run(
        command + ["fit", "gmm", "--data", "missing.csv", "--out", "run"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 2, completed.stderr
    assert "Traceback" not in completed.stdout + completed.stderr
    assert "missing.csv" in completed.stderr and "no such file" in completed.stderr
    assert not (tmp_path / "run").exists()


# --- discovery: list and per-model help ------------------------------------------------------------


def test_list_shows_every_gallery_model_with_its_guides(cli):
    result = cli("list")
    assert result.code == 0, result.text
    for name in ("gmm", "normal_normal", "beta_bernoulli", *GMM_GUIDES, "meanfield"):
        assert name in result.out, name


def test_list_names_the_estimators(cli):
    result = cli("list")
    assert "auto, reparam, score, enum" in result.out


def test_fit_gmm_help_shows_its_model_options(cli):
    result = cli("fit", "gmm", "--help")
    assert result.code == 0, result.text
    assert "--num-components" in result.out and "--concentration" in result.out


def test_fit_normal_normal_help_shows_prior_scale(cli):
    result = cli("fit", "normal_normal", "--help")
    assert result.code == 0, result.text
    assert "--prior-scale" in result.out
    assert "--num-components" not in result.out  # options belong to their own model


def test_generic_fit_help_after_a_models_help_is_generic_again(cli):
    # Regression: the per-model help text stuck to the command for later calls in the same process.
    cli("fit", "gmm", "--help")
    result = cli("fit", "--help")
    assert result.code == 0, result.text
    assert "Fit gmm" not in result.out and "--num-components" not in result.out


def test_model_option_is_passed_to_the_model(cli, tmp_path):
    result = cli("fit", "gmm", "--num-components", 3, "--steps", 2, "--out", tmp_path / "run")
    assert result.code == 0, result.text
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["options"]["num_components"] == 3


def test_summary_line_keeps_device_and_time(cli, tmp_path):
    # Regression: rich markup swallowed the bracketed "[cpu, 1.2 s]" at the end of the summary.
    result = cli("fit", "normal_normal", "--steps", 3, "--device", "cpu", "--out", tmp_path / "run")
    assert result.code == 0, result.text
    assert "[cpu, " in result.out


# --- what `ppvi fit` accepts ---------------------------------------------------------------------


def read_config(run_dir: Path) -> dict:
    return json.loads((run_dir / "config.json").read_text())


def test_auto_picks_reparam_for_normal_normal(cli, tmp_path):
    result = cli("fit", "normal_normal", "--steps", 5, "--out", tmp_path / "run")
    assert result.code == 0, result.text
    assert read_config(tmp_path / "run")["estimator"] == "reparam"


def test_auto_picks_enum_for_gmm_meanfield(gmm_run):
    run_dir, result = gmm_run
    assert result.code == 0, result.text
    assert read_config(run_dir)["estimator"] == "enum"


def test_auto_prints_its_choice_and_reason(gmm_run):
    _, result = gmm_run
    assert "estimator: enum" in result.err and "'z'" in result.err


def test_epochs_with_minibatches_run_ceil_n_over_b_steps_per_epoch(cli, tmp_path):
    result = cli("fit", "gmm", "--epochs", 2, "--batch-size", 100, "--out", tmp_path / "run")
    assert result.code == 0, result.text
    trace = pd.read_csv(tmp_path / "run" / "elbo.csv")
    assert list(trace["step"]) == list(range(6))  # ceil(272 / 100) * 2
    assert list(trace["epoch"]) == [0, 0, 0, 1, 1, 1]


def test_restarts_give_separate_traces_with_different_elbos(cli, tmp_path):
    result = cli("fit", "gmm", "--restarts", 2, "--steps", 10, "--out", tmp_path / "run")
    assert result.code == 0, result.text
    trace = pd.read_csv(tmp_path / "run" / "elbo.csv")
    first, second = (trace[trace["restart"] == r] for r in (0, 1))
    assert list(first["step"]) == list(second["step"]) == list(range(10))
    assert not (first["elbo"].to_numpy() == second["elbo"].to_numpy()).all()


def test_synthetic_data_spec_fits_gmm(cli, tmp_path):
    result = cli("fit", "gmm", "--data", "synthetic:n=200,k=3", "--num-components", 3, "--steps", 5, "--out", tmp_path / "run")
    assert result.code == 0, result.text
    config = read_config(tmp_path / "run")
    assert config["num_data"] == 200 and config["data"] == "synthetic:n=200,k=3"


def test_csv_data_file_fits_gmm(cli, tmp_path, csv_file):
    rows = "\n".join(f"{i % 7 * 0.5},{(i * 3) % 11 * 0.25}" for i in range(40))
    path = csv_file("points.csv", "a,b\n" + rows + "\n")
    result = cli("fit", "gmm", "--data", path, "--steps", 3, "--out", tmp_path / "run")
    assert result.code == 0, result.text
    assert read_config(tmp_path / "run")["num_data"] == 40


USER_MODEL = '''
"""Normal mean with unit noise: a user's own model file, loaded by path."""

import torch

import pyro
import pyro.distributions as dist
from pyro.distributions import constraints


def load_data(source, options):
    return {"x": torch.tensor([0.5, 1.0, 1.5, 2.0, 2.5])}


def model(batch, options):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", batch.num_data, subsample=batch.index):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=batch.x)


def guide(batch, options):
    loc = pyro.param("mu_loc", lambda: torch.tensor(0.0))
    scale = pyro.param("mu_scale", lambda: torch.tensor(1.0), constraint=constraints.positive)
    pyro.sample("mu", dist.Normal(loc, scale))


GUIDES = {"normal": guide}
'''


def test_users_model_file_fits_by_path_without_registration(cli, tmp_path, monkeypatch):
    (tmp_path / "my_mean.py").write_text(textwrap.dedent(USER_MODEL))
    monkeypatch.chdir(tmp_path)
    result = cli("fit", "./my_mean.py", "--steps", 20, "--out", "run")
    assert result.code == 0, result.text
    config = read_config(tmp_path / "run")
    assert Path(config["model"]) == tmp_path / "my_mean.py"
    assert config["guide"] == "normal" and config["estimator"] == "reparam"
    assert len(pd.read_csv(tmp_path / "run" / "elbo.csv")) == 20


def test_missing_users_model_file_is_rejected(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("fit", "./absent.py", "--out", "run")
    assert_rejected(result, tmp_path / "run", "absent.py", "does not exist")


# --- compare ---------------------------------------------------------------------------------------


def test_compare_writes_a_png(cli, gmm_run, tmp_path):
    run_dir, _ = gmm_run
    other = tmp_path / "other"
    assert cli("fit", "gmm", "--steps", 10, "--seed", 1, "--out", other).code == 0
    result = cli("compare", run_dir, other, "--out", tmp_path / "cmp.png")
    assert result.code == 0, result.text
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_model_option_may_come_before_the_model_name(cli, tmp_path):
    result = cli("fit", "--num-components", "3", "gmm", "--steps", "5", "--out", tmp_path / "run")
    assert result.code == 0, result.text
    assert '"num_components": 3' in (tmp_path / "run" / "config.json").read_text()
