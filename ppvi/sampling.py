"""Generating from fitted generative models: prior samples, reconstructions, the latent manifold, latent scatter.

The protocol
------------
A model class that defines ``decode(z)`` -- pixel means of p(x | z) for a batch of codes
``z`` of shape (n, L), returned as (n, *image_shape) or (n, num_pixels) -- supports
generation. Reconstructions and the latent scatter also need its guide to define
``encode(x)`` returning (loc, scale) of q(z | x). The gallery's ``vae`` does both.
Models without ``decode`` are refused with a :class:`~ppvi.errors.UsageError`.

Image shapes
------------
A decoded image is shown as a 2-D array: a per-image shape (H, W) or (1, H, W) is kept;
a flat (P,) image (the vae's mlp flattens to H*W) is reshaped to the data's own shape when
the data dict has an ``image_shape`` entry, else to a square side = sqrt(P) (refused if P
is not a perfect square).

Image grids
-----------
Tiles of H x W pixels are laid out ``rows x cols`` with a ``PAD`` = 1 pixel border between
and around them (grey), then every pixel is drawn as ``scale x scale`` screen pixels
(``imshow`` with nearest interpolation on a figure of exactly that size, saved at ``DPI``).
The PNG is therefore exactly

    height = scale * (rows * H + (rows + 1) * PAD)
    width  = scale * (cols * W + (cols + 1) * PAD)

pixels (:func:`grid_pixel_shape`). Default scale: ``max(1, round(32 / max(H, W)))`` -- 4 for
the 8x8 digits (a 4x4 grid of them is 148 x 148), 1 for 28x28 MNIST.

Layouts: prior samples fill ``cols = ceil(sqrt(n))``, ``rows = ceil(n / cols)`` (blank tiles
at the end); reconstructions are 2 rows x n columns, inputs on top and their reconstructions
decode(encode(x).loc) beneath; the manifold is grid x grid, z1 growing to the right and z2
growing upwards.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import UsageError
from .plots import save_figure  # sampling.save_figure: the CLI saves latent_scatter with it
from .results import FitResult
from .runs import load_run, restart_params, rng_scope

__all__ = [
    "prior_samples",
    "reconstructions",
    "manifold",
    "latent_dim",
    "latent_codes",
    "latent_scatter",
    "tile",
    "grid_pixel_shape",
    "save_grid",
    "PAD",
    "DPI",
]

PAD = 1
DPI = 100
PAD_VALUE = 0.5
ENCODE_CHUNK = 512


# ----------------------------------------------------------------------------- protocol


def _model_name(result: FitResult) -> str:
    model_file = getattr(result, "model_file", None)
    return getattr(model_file, "name", None) or type(result.best.model_fn).__name__


def _decoder(result: FitResult):
    model = result.best.model_fn
    if not callable(getattr(model, "decode", None)):
        raise UsageError(f"model {_model_name(result)} does not define decode(z): not a generative model ppvi can sample.")
    return model


def _encoder(result: FitResult):
    guide = result.best.guide_fn
    if not callable(getattr(guide, "encode", None)):
        raise UsageError(
            f"the guide {result.config.get('guide', type(guide).__name__)!r} of model {_model_name(result)} does not define "
            "encode(x) returning (loc, scale) of q(z | x): reconstructions and latent plots need an amortized encoder."
        )
    return guide


def latent_dim(result: FitResult) -> int:
    """L, the latent size: the model options' ``latent_dim``, else the width of encode(x)'s loc."""
    size = getattr(result.options, "latent_dim", None)
    if isinstance(size, int) and size >= 1:
        return size
    guide = _encoder(result)
    with restart_params(result, result.best), torch.no_grad():
        loc, _ = guide.encode(result.data["x"][:1])
    return int(loc.shape[-1])


def _as_images(pixels: torch.Tensor, result: FitResult) -> np.ndarray:
    """(n, ...) pixel means -> (n, H, W) numpy array (see the module docstring)."""
    per_image = tuple(pixels.shape[1:])
    if len(per_image) == 3 and per_image[0] == 1:
        per_image = per_image[1:]
    elif len(per_image) == 1:
        stored = result.data.get("image_shape") if isinstance(result.data, dict) else None
        if stored is not None:
            per_image = tuple(int(s) for s in torch.as_tensor(stored).flatten().tolist())
            per_image = per_image[-2:]
        else:
            side = math.isqrt(per_image[0])
            if side * side != per_image[0]:
                raise UsageError(f"decoded images have {per_image[0]} pixels, not a square number; cannot infer their shape.")
            per_image = (side, side)
    if len(per_image) != 2:
        raise UsageError(f"decoded images have shape {tuple(pixels.shape[1:])}; ppvi can draw (H, W), (1, H, W) or flat square images.")
    return pixels.detach().cpu().reshape(pixels.shape[0], *per_image).float().numpy()


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{name} must be a positive integer (got {value!r}).")
    return value


# ----------------------------------------------------------------------------- generation


def prior_samples(result, n: int = 16, seed: int = 0) -> np.ndarray:
    """n draws z ~ N(0, I_L) decoded to pixel means: an (n, H, W) array in [0, 1]."""
    result = load_run(result)
    _check_count("n", n)
    model = _decoder(result)
    size = latent_dim(result)
    device = result.device
    with restart_params(result, result.best), rng_scope(seed), torch.no_grad():
        z = torch.randn(n, size, device=device)
        pixels = model.decode(z)
    return _as_images(pixels, result)


def reconstructions(result, n: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The first n inputs and decode(encode(x).loc): two (n, H, W) arrays. ``seed`` fixes any draw the model makes."""
    result = load_run(result)
    _check_count("n", n)
    model = _decoder(result)
    guide = _encoder(result)
    x = result.data["x"]
    n = min(n, x.shape[0])
    with restart_params(result, result.best), rng_scope(seed), torch.no_grad():
        loc, _ = guide.encode(x[:n])
        pixels = model.decode(loc)
    return _as_images(x[:n], result), _as_images(pixels, result)


def manifold(result, grid: int = 15) -> np.ndarray:
    """Decode a grid x grid lattice of codes at Normal(0, 1).icdf(linspace(0.05, 0.95, grid)) in each of 2 dims.

    Returns (grid, grid, H, W): row r holds z2 = q[grid - 1 - r] (largest at the top), column c holds z1 = q[c].
    Kingma & Welling's "learned MNIST manifold" figure; only for latent_dim == 2.
    """
    result = load_run(result)
    _check_count("grid", grid)
    model = _decoder(result)
    size = latent_dim(result)
    if size != 2:
        raise UsageError(f"--manifold needs a 2-dimensional latent space; this run has latent_dim = {size}.")
    device = result.device
    quantiles = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, grid)).to(device)
    z2, z1 = torch.meshgrid(quantiles.flip(0), quantiles, indexing="ij")
    z = torch.stack([z1, z2], dim=-1).reshape(-1, 2)
    with restart_params(result, result.best), torch.no_grad():
        pixels = model.decode(z)
    images = _as_images(pixels, result)
    return images.reshape(grid, grid, *images.shape[1:])


def latent_codes(result) -> np.ndarray:
    """Posterior means E_q[z | x] of every data point: (N, L)."""
    result = load_run(result)
    guide = _encoder(result)
    x = result.data["x"]
    with restart_params(result, result.best), torch.no_grad():
        locs = [guide.encode(x[start : start + ENCODE_CHUNK])[0] for start in range(0, x.shape[0], ENCODE_CHUNK)]
    return torch.cat(locs).cpu().double().numpy()


def _principal_components(codes: np.ndarray, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    centred = codes - codes.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    explained = singular**2 / max((singular**2).sum(), 1e-300)
    return centred @ vt[:k].T, explained[:k]


def latent_scatter(result, *, ax=None):
    """Seaborn scatter of the posterior means, coloured by label when the data has labels; returns the axes.

    2-D codes are plotted as they are; more dimensions by their first two principal components.
    """
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    result = load_run(result)
    codes = latent_codes(result)
    if codes.shape[1] == 1:
        points, labels_xy = np.column_stack([codes[:, 0], np.zeros(len(codes))]), ("z1", "")
    elif codes.shape[1] == 2:
        points, labels_xy = codes, ("z1", "z2")
    else:
        points, explained = _principal_components(codes)
        labels_xy = (f"PC1 ({explained[0]:.0%})", f"PC2 ({explained[1]:.0%})")
    frame = pd.DataFrame({"x": points[:, 0], "y": points[:, 1]})
    hue = None
    labels = result.data.get("labels")
    if labels is not None and len(labels) == len(frame):
        frame["label"] = pd.Categorical(torch.as_tensor(labels).cpu().numpy())
        hue = "label"
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 5), layout="constrained")
    sns.scatterplot(data=frame, x="x", y="y", hue=hue, s=8, linewidth=0, palette="tab10" if hue else None, ax=ax)
    ax.set(xlabel=labels_xy[0], ylabel=labels_xy[1], title=f"E_q[z | x] of {len(frame)} points ({codes.shape[1]}-d latent)")
    if hue:
        ax.legend(title="label", markerscale=2, fontsize="small", loc="best")
    return ax


# ----------------------------------------------------------------------------- image grids


def default_scale(height: int, width: int) -> int:
    return max(1, round(32 / max(height, width)))


def grid_pixel_shape(rows: int, cols: int, height: int, width: int, scale: int) -> tuple[int, int]:
    """(height, width) in pixels of a saved grid: scale * (rows * H + (rows + 1) * PAD), likewise for columns."""
    return scale * (rows * height + (rows + 1) * PAD), scale * (cols * width + (cols + 1) * PAD)


def tile(images: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Lay (n, H, W) images (n <= rows * cols, row-major) into one 2-D array with PAD-pixel grey borders."""
    images = np.asarray(images, dtype=np.float32)
    n, height, width = images.shape
    if n > rows * cols:
        raise ValueError(f"{n} images do not fit a {rows}x{cols} grid.")
    canvas = np.full((rows * height + (rows + 1) * PAD, cols * width + (cols + 1) * PAD), PAD_VALUE, dtype=np.float32)
    for index in range(n):
        r, c = divmod(index, cols)
        top, left = PAD + r * (height + PAD), PAD + c * (width + PAD)
        canvas[top : top + height, left : left + width] = images[index]
    return canvas


def save_grid(images: np.ndarray, path, *, rows: int, cols: int, scale: int | None = None) -> tuple[int, int]:
    """Tile (n, H, W) images and save them as a PNG of exactly :func:`grid_pixel_shape` pixels (atomically)."""
    from matplotlib.figure import Figure  # not pyplot: no global backend or figure state touched (notebooks)

    images = np.asarray(images)
    height, width = images.shape[1:]
    scale = default_scale(height, width) if scale is None else scale
    canvas = tile(images, rows, cols)
    pixel_height, pixel_width = grid_pixel_shape(rows, cols, height, width, scale)
    figure = Figure(figsize=(pixel_width / DPI, pixel_height / DPI), dpi=DPI)
    ax = figure.add_axes([0, 0, 1, 1])
    ax.set_axis_off()
    ax.imshow(canvas, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
    save_figure(figure, path, dpi=DPI)
    return pixel_height, pixel_width


def prior_grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) for n prior samples: cols = ceil(sqrt(n)), rows = ceil(n / cols)."""
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols
