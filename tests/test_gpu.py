"""The CUDA path, for real (skipped without a GPU): everything on the device, no per-step host-device sync."""

import warnings

import pandas as pd
import pytest
import torch

import ppvi

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("guide", ["meanfield", "map", "amortized"])
def test_gmm_fit_keeps_every_parameter_and_the_data_on_the_gpu(guide):
    result = ppvi.fit("gmm", guide=guide, steps=100, device="cuda")
    assert result.device.type == "cuda"
    assert all(value.device.type == "cuda" for value in result.params.values())
    assert all(value.device.type == "cuda" for value in result.data.values())
    assert result.elbo_trace["elbo"].iloc[-20:].mean() > result.elbo_trace["elbo"].iloc[:20].mean()


@pytest.mark.parametrize("model, steps", [("gmm", 200), ("normal_normal", 200)])
def test_training_loop_syncs_only_when_reading_the_elbo_buffer(model, steps):
    # torch's sync debug mode warns at every synchronising call (.item(), .cpu(), nonzero, ...).
    # The loop reads its ELBO buffer back every SYNC_EVERY steps, so a 200-step fit may sync at
    # those reads plus a handful of times in set-up and at the end, never once per step.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            ppvi.fit(model, steps=steps, device="cuda")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchronizing" in str(w.message)]
    assert len(syncs) < steps / 4, f"{len(syncs)} synchronisations in {steps} steps: {syncs[:3]}"


def test_cuda_and_cpu_fits_reach_the_same_conjugate_posterior():
    cpu = ppvi.fit("normal_normal", device="cpu", seed=0)
    gpu = ppvi.fit("normal_normal", device="cuda", seed=0)
    sd = cpu.params["mu_scale"].item()
    assert gpu.params["mu_loc"].item() == pytest.approx(cpu.params["mu_loc"].item(), abs=0.1 * sd)
    assert gpu.params["mu_scale"].item() == pytest.approx(sd, rel=0.1)


def test_cli_fit_on_cuda_writes_a_complete_run_directory(tmp_path, cli):
    result = cli("fit", "gmm", "--device", "cuda", "--steps", "60", "--out", tmp_path / "run")
    assert result.code == 0, result.text
    trace = pd.read_csv(tmp_path / "run" / "elbo.csv")
    assert len(trace) == 60
    state = torch.load(tmp_path / "run" / "params.pt", weights_only=True)
    assert state["restarts"][0]["step"] == 60
