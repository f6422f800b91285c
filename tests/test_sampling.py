"""ppvi sample: prior samples, reconstructions, the 2-D manifold and the latent scatter of a short vae fit."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from ppvi.cli import main
from ppvi.runs import load_run, restart_params
from ppvi.sampling import grid_pixel_shape, latent_codes, manifold, prior_samples, reconstructions, tile

SIDE = 8  # scikit-learn's digits
SCALE = 4  # default_scale(8, 8) = round(32 / 8)


def pixels(rows, cols):
    """The documented size of a saved grid: scale * (tiles * side + (tiles + 1) * PAD), PAD = 1."""
    return (SCALE * (rows * SIDE + rows + 1), SCALE * (cols * SIDE + cols + 1))


@pytest.fixture(scope="module")
def vae2(tmp_path_factory, cli):
    run_dir = tmp_path_factory.mktemp("sample") / "vae2"
    fitted = cli("fit", "vae", "--steps", 30, "--device", "cpu", "--seed", 0, "--out", run_dir)
    assert fitted.code == 0, fitted.text
    return run_dir


@pytest.fixture(scope="module")
def vae3(tmp_path_factory, cli):
    run_dir = tmp_path_factory.mktemp("sample") / "vae3"
    fitted = cli("fit", "vae", "--latent-dim", 3, "--steps", 5, "--device", "cpu", "--seed", 0, "--out", run_dir)
    assert fitted.code == 0, fitted.text
    return run_dir


def test_grid_shape_formula():
    assert grid_pixel_shape(4, 4, 8, 8, 4) == pixels(4, 4) == (148, 148)
    canvas = tile(np.ones((3, 2, 2)), 2, 2)
    assert canvas.shape == (2 * 2 + 3, 2 * 2 + 3)
    assert canvas[1:3, 1:3].min() == 1 and canvas[4:6, 4:6].max() == 0.5  # 4th tile left blank (grey)


def test_prior_grid_png(cli, vae2, tmp_path):
    out = tmp_path / "grid.png"
    result = cli("sample", vae2, "-n", 16, "--out", out)
    assert result.code == 0, result.text
    image = mpimg.imread(out)
    assert image.shape[:2] == pixels(4, 4)
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, no temporary left


def test_prior_samples_are_pixel_means(vae2):
    images = prior_samples(vae2, 16, seed=3)
    assert images.shape == (16, SIDE, SIDE)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert np.array_equal(images, prior_samples(vae2, 16, seed=3))
    assert not np.array_equal(images, prior_samples(vae2, 16, seed=4))


def test_decode_uses_the_fitted_decoder(vae2):
    result = load_run(vae2)
    model = result.best.model_fn
    z = torch.zeros(1, 2)
    with torch.no_grad():
        fresh = model.decode(z)
    with restart_params(result, result.best), torch.no_grad():
        fitted = model.decode(z)
        weights = dict(model.decoder.named_parameters())
        for name, value in result.best.unconstrained.items():
            if name.startswith("decoder$$$"):
                assert torch.equal(weights[name.split("$$$", 1)[1]], value)
    assert not torch.allclose(fresh, fitted)  # the fitted weights, not the fresh initialisation


def test_reconstruct(cli, vae2, tmp_path):
    out = tmp_path / "rec.png"
    result = cli("sample", vae2, "--reconstruct", "-n", 6, "--out", out)
    assert result.code == 0, result.text
    assert mpimg.imread(out).shape[:2] == pixels(2, 6)
    inputs, outputs = reconstructions(vae2, 6)
    data = load_run(vae2).data["x"][:6].reshape(6, SIDE, SIDE).numpy()
    assert np.array_equal(inputs, data)
    assert outputs.shape == inputs.shape and outputs.min() >= 0 and outputs.max() <= 1


def test_manifold(cli, vae2, tmp_path):
    out = tmp_path / "manifold.png"
    result = cli("sample", vae2, "--manifold", "--grid", 5, "--out", out)
    assert result.code == 0, result.text
    assert mpimg.imread(out).shape[:2] == pixels(5, 5)
    lattice = manifold(vae2, 5)
    assert lattice.shape == (5, 5, SIDE, SIDE)
    # the centre of the lattice is z = (0, 0): the median quantile
    fitted = load_run(vae2)
    with restart_params(fitted, fitted.best), torch.no_grad():
        direct = fitted.best.model_fn.decode(torch.zeros(1, 2)).reshape(SIDE, SIDE).numpy()
    np.testing.assert_allclose(lattice[2, 2], direct, atol=1e-6)


def test_latent_scatter(cli, vae2, vae3, tmp_path):
    for run_dir, name in ((vae2, "l2.png"), (vae3, "l3.png")):
        out = tmp_path / name
        result = cli("sample", run_dir, "--latent", "--out", out)
        assert result.code == 0, result.text
        image = mpimg.imread(out)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert latent_codes(vae3).shape == (1797, 3)


def test_bad_inputs_exit_2(cli, vae2, vae3, tmp_path):
    out = tmp_path / "bad.png"
    assert main(["sample", str(vae2), "-n", "0", "--out", str(out)]) == 2
    assert main(["sample", str(vae2), "--manifold", "--grid", "0", "--out", str(out)]) == 2
    assert main(["sample", str(vae2), "--manifold", "--latent", "--out", str(out)]) == 2
    assert main(["sample", str(tmp_path / "no_such_run"), "--out", str(out)]) == 2
    refused = cli("sample", vae3, "--manifold", "--out", out)
    assert refused.code == 2 and "latent_dim = 3" in refused.err
    normal = tmp_path / "normal"
    assert cli("fit", "normal_normal", "--steps", 5, "--device", "cpu", "--out", normal).code == 0
    refused = cli("sample", normal, "--out", out)
    assert refused.code == 2 and "does not define decode(z)" in refused.err
    assert not out.exists()
