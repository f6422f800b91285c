"""The fit loop's own mechanics: minibatch streams and devices."""

import pytest
import torch

import ppvi
from ppvi.batching import Batches


@pytest.mark.parametrize("num_data, batch_size", [(10, 4), (10, 3), (7, 7), (100, 1)])
def test_minibatches_visit_every_point_once_per_epoch(num_data, batch_size):
    batches = Batches(num_data, batch_size, seed=0, device=torch.device("cpu"))
    epochs = 3
    steps = epochs * num_data // batch_size
    stream = torch.cat([batches.index(step) for step in range(steps)])
    assert all(len(batches.index(step)) == min(batch_size, num_data) for step in range(steps))
    for epoch in range(steps * batch_size // num_data):
        assert sorted(stream[epoch * num_data : (epoch + 1) * num_data].tolist()) == list(range(num_data))


def test_minibatch_of_a_step_depends_only_on_seed_and_step():
    first = Batches(50, 8, seed=3, device=torch.device("cpu"))
    again = Batches(50, 8, seed=3, device=torch.device("cpu"))
    assert torch.equal(first.index(17), again.index(17))  # what makes --resume exact
    assert not torch.equal(first.index(17), Batches(50, 8, seed=4, device=torch.device("cpu")).index(17))


def test_auto_device_is_cpu_without_a_gpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert ppvi.resolve_device("auto").type == expected


def test_result_carries_estimator_reason_seed_and_config():
    result = ppvi.fit("normal_normal", steps=20, seed=5)
    assert result.estimator == "reparam" and "'mu'" in result.estimator_reason
    assert result.seed == 5 and result.config["seed"] == 5
    assert list(result.elbo_trace.columns) == ["restart", "step", "epoch", "elbo", "time_s"]
    assert len(result.elbo_trace) == 20


def test_fit_leaves_the_callers_param_store_and_rng_as_they_were():
    import pyro

    pyro.clear_param_store()
    pyro.param("callers_own", torch.tensor(3.0))
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    ppvi.fit("normal_normal", steps=20, restarts=2, device="cpu", seed=7)
    assert list(pyro.get_param_store().keys()) == ["callers_own"]
    assert torch.equal(torch.rand(3), expected_draw)  # the global RNG was not reseeded by the fit


def test_fit_config_is_written_once_and_read_back(tmp_path):
    from ppvi.config import FitConfig
    from ppvi.rundir import read_config

    ppvi.fit("normal_normal", steps=10, lr=0.05, betas=(0.8, 0.99), device="cpu", out=tmp_path / "run")
    settings = FitConfig.from_dict(read_config(tmp_path / "run")["settings"])
    assert settings.lr == 0.05 and settings.betas == (0.8, 0.99) and settings.steps == 10
