"""Rebuilding a fitted run from its directory (ppvi.runs).

The truth each test checks against is what the fit itself returned in memory:
a run rebuilt from disk must put exactly those parameters, options and data
back, and anything that would make the rebuilt run differ from the fit
(missing files, an unfinished run, a changed model file, data that only
existed in memory) is refused with a UsageError.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

import pyro

import ppvi
from ppvi.runs import full_batch, load_run, restart_params


@pytest.fixture(scope="module")
def normal_run(tmp_path_factory):
    """A two-restart normal_normal fit (short: only the parameters' identity matters here)."""
    run_dir = tmp_path_factory.mktemp("runs") / "normal"
    result = ppvi.fit("normal_normal", steps=60, restarts=2, seed=3, device="cpu", out=run_dir)
    return run_dir, result


def test_each_restart_loads_back_its_own_fitted_parameters(normal_run):
    run_dir, fitted = normal_run
    loaded = load_run(run_dir)
    assert len(loaded.restarts) == 2
    for restart in range(2):
        with restart_params(loaded, restart):
            assert torch.equal(pyro.param("mu_loc").detach(), fitted.restarts[restart].params["mu_loc"])
            assert torch.equal(pyro.param("mu_scale").detach(), fitted.restarts[restart].params["mu_scale"])


def test_options_data_and_best_restart_are_rebuilt_as_the_fit_made_them(normal_run):
    run_dir, fitted = normal_run
    loaded = load_run(run_dir)
    assert dataclasses.asdict(loaded.options) == dataclasses.asdict(fitted.options)  # the model file is a fresh module
    assert torch.equal(loaded.data["x"], fitted.data["x"])
    assert loaded.best.restart == fitted.best.restart
    assert loaded.estimator == fitted.estimator


def test_restart_params_restores_the_param_store_afterwards(normal_run):
    run_dir, _ = normal_run
    loaded = load_run(run_dir)
    pyro.clear_param_store()
    pyro.param("unrelated", torch.tensor(7.0))
    with restart_params(loaded, 0):
        assert "unrelated" not in pyro.get_param_store()
    assert set(pyro.get_param_store().keys()) == {"unrelated"}
    pyro.clear_param_store()


def test_a_fit_result_in_memory_passes_through(normal_run):
    _, fitted = normal_run
    assert load_run(fitted) is fitted


def test_a_guide_owning_a_network_gets_its_weights_back(tmp_path):
    # gmm "amortized": q(z | x) from an encoder registered with pyro.module
    run_dir = tmp_path / "amortized"
    fitted = ppvi.fit("gmm", guide="amortized", steps=20, seed=0, device="cpu", out=run_dir)
    loaded = load_run(run_dir)
    batch = full_batch(loaded)
    with restart_params(loaded, 0) as restart:
        logits = restart.guide_fn.encoder(batch.x)
    with restart_params(fitted, 0) as restart:
        expected = restart.guide_fn.encoder(batch.x)
    assert torch.allclose(logits, expected)
    untrained = type(loaded.restarts[0].guide_fn)(loaded.options, loaded.data).encoder(batch.x)
    assert not torch.allclose(logits, untrained)  # the weights did change during the fit


# --- refusals ------------------------------------------------------------------------------------


def test_missing_run_directory_is_refused(tmp_path):
    with pytest.raises(ppvi.UsageError, match="no such run directory"):
        load_run(tmp_path / "nope")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ppvi.UsageError, match="no config.json"):
        load_run(tmp_path)


def test_run_without_params_is_refused(normal_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(normal_run[0], copy)
    (copy / "params.pt").unlink()
    with pytest.raises(ppvi.UsageError, match="no params.pt"):
        load_run(copy)


@pytest.mark.parametrize("status", ["running", "diverged"])
def test_unfinished_run_is_refused(normal_run, tmp_path, status):
    copy = tmp_path / "copy"
    shutil.copytree(normal_run[0], copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "status": status}))
    with pytest.raises(ppvi.UsageError, match="not completed"):
        load_run(copy)


def test_changed_model_file_is_refused(tmp_path):
    model_path = tmp_path / "my_model.py"
    shutil.copy(ppvi.load_model("normal_normal").path, model_path)
    ppvi.fit(str(model_path), steps=5, device="cpu", out=tmp_path / "run")
    model_path.write_text(model_path.read_text() + "\n# edited after the fit\n")
    with pytest.raises(ppvi.UsageError, match="changed since the fit"):
        load_run(tmp_path / "run")


def test_in_memory_data_cannot_be_rebuilt(tmp_path):
    ppvi.fit("normal_normal", data={"x": torch.randn(20)}, steps=5, device="cpu", out=tmp_path / "run")
    with pytest.raises(ppvi.UsageError, match="in-memory data"):
        load_run(tmp_path / "run")
