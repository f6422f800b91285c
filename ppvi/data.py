"""Data sources and checks: CSV files, built-in sets, seeded synthetic generators.

Every loader returns float tensors with one data point per row and rejects bad
data (missing file, non-numeric or non-finite values, too few rows) with a
:class:`~ppvi.errors.DataError` that names the file and the problem.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .errors import DataError

__all__ = [
    "Batch",
    "read_csv",
    "old_faithful",
    "synthetic_gmm",
    "parse_synthetic",
    "check_points",
    "standardize",
]


@dataclass(frozen=True)
class Batch:
    """A minibatch as the model and guide see it.

    Attributes
    ----------
    data : dict of str to Tensor
        The per-point tensors of this batch (``batch.x`` is ``batch.data["x"]``).
    index : LongTensor
        Positions of these points in the full data set: pass it to
        ``pyro.plate("data", batch.num_data, subsample=batch.index)`` so that
        Pyro scales the likelihood by ``num_data / len(index)``.
    num_data : int
        Size of the full data set.
    """

    data: dict
    index: torch.Tensor
    num_data: int

    def __getattr__(self, name):
        try:
            return self.data[name]
        except KeyError:
            raise AttributeError(f"batch has no data named {name!r} (it has {sorted(self.data)})") from None

    def __len__(self) -> int:
        return int(self.index.shape[0])


def read_csv(path: str | Path, *, min_rows: int = 2) -> torch.Tensor:
    """Read a numeric CSV (header row optional, one point per row) into a float tensor.

    A first row that is not entirely numeric is taken as the header.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file.")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, expected a CSV file.")
    try:
        # Raw text, no NA guessing: an empty cell is missing, a literal "nan" is a NaN value.
        frame = pd.read_csv(path, header=None, dtype=str, skip_blank_lines=True, keep_default_na=False, na_filter=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty.") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a readable CSV file ({str(error).strip().splitlines()[0]}).") from None
    frame = frame.fillna("").apply(lambda column: column.str.strip())
    numeric = frame.apply(pd.to_numeric, errors="coerce")
    if len(frame) and numeric.iloc[0].isna().all() and (frame.iloc[0] != "").all():
        frame, numeric = frame.iloc[1:], numeric.iloc[1:]  # header row
    missing = (frame == "").to_numpy()
    not_a_number = frame.apply(lambda column: column.str.lower().isin(["nan", "+nan", "-nan"])).to_numpy()
    for row, col in np.argwhere(numeric.isna().to_numpy()):  # row-major: report the first problem
        if missing[row, col]:
            raise DataError(f"{path}: missing value in row {row + 1}, column {col + 1}.")
        if not_a_number[row, col]:
            raise DataError(f"{path}: value {frame.iloc[row, col]!r} in row {row + 1}, column {col + 1} is NaN; every value must be a finite number.")
        raise DataError(
            f"{path}: non-numeric value {frame.iloc[row, col]!r} in row {row + 1}, column {col + 1}; "
            "every value must be a number."
        )
    # copy=True: pandas (copy-on-write) hands out read-only arrays, which torch warns about
    wide = numeric.to_numpy(dtype=np.float64, copy=True)
    limit = torch.finfo(torch.get_default_dtype()).max
    for row, col in np.argwhere(np.isfinite(wide) & (np.abs(wide) > limit))[:1]:  # finite here, infinite once converted
        raise DataError(
            f"{path}: value {frame.iloc[row, col]} in row {row + 1}, column {col + 1} is beyond the range of "
            f"{torch.get_default_dtype()} (+-{limit:.3g}); rescale the data."
        )
    values = torch.as_tensor(wide, dtype=torch.get_default_dtype())
    return check_points(values, name=str(path), min_rows=min_rows)


def check_points(values: torch.Tensor, *, name: str, min_rows: int = 2) -> torch.Tensor:
    """Check a (num_points, num_features) float tensor: finite, 2-D, at least ``min_rows`` rows."""
    if values.dim() == 1:
        values = values.unsqueeze(-1)
    if values.dim() != 2:
        raise DataError(f"{name}: expected a table of points (rows) by features (columns), got shape {tuple(values.shape)}.")
    if not torch.is_floating_point(values):
        raise DataError(f"{name}: expected floating-point values, got {values.dtype}.")
    if values.shape[0] < min_rows:
        raise DataError(f"{name}: has {values.shape[0]} row(s); at least {min_rows} data points are needed.")
    if values.shape[1] < 1:
        raise DataError(f"{name}: has no columns.")
    finite = torch.isfinite(values)
    if not finite.all():
        row, col = (~finite).nonzero()[0].tolist()
        raise DataError(f"{name}: value {values[row, col].item()} in row {row + 1}, column {col + 1} is not finite.")
    return values


def standardize(values: torch.Tensor, *, name: str = "data") -> torch.Tensor:
    """Centre each column and scale it to unit standard deviation (constant columns are only centred).

    Computed in float64 on each column divided by its largest magnitude, so finite values near the
    type's limit (3e38 in float32) do not overflow in the sum of squares; a result that is still not
    finite (infinite input) raises a DataError naming ``name`` and the cause.
    """
    wide = values.double()
    # (x - mean) / std is unchanged by dividing x by its largest magnitude first, and then no square can overflow
    magnitude = wide.abs().amax(dim=0, keepdim=True)
    wide = wide / torch.where(magnitude > 0, magnitude, torch.ones_like(magnitude))
    scale = wide.std(dim=0, keepdim=True)
    result = (wide - wide.mean(dim=0, keepdim=True)) / torch.where(scale > 0, scale, torch.ones_like(scale))
    if not torch.isfinite(result).all():
        column = int((~torch.isfinite(result)).nonzero()[0, 1])
        raise DataError(f"{name}: column {column + 1} overflows when standardised (values too large for {values.dtype}); rescale the data.")
    return result.to(values.dtype)


def old_faithful() -> torch.Tensor:
    """Old Faithful geyser eruptions (Azzalini & Bowman 1990; R's ``datasets::faithful``).

    Returns
    -------
    Tensor of shape (272, 2)
        Eruption duration (minutes) and waiting time to the next eruption (minutes).
    """
    with resources.files("ppvi").joinpath("datasets/old_faithful.csv").open() as handle:
        frame = pd.read_csv(handle)
    return torch.as_tensor(frame.to_numpy(dtype=np.float64, copy=True), dtype=torch.get_default_dtype())


def parse_synthetic(source: str, **defaults) -> dict:
    """Parse ``synthetic`` or ``synthetic:n=1000,k=3,d=2,seed=0`` into keyword arguments."""
    _, _, spec = source.partition(":")
    settings = dict(defaults)
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, equals, value = item.partition("=")
        if not equals or key not in settings:
            raise DataError(
                f"--data {source!r}: expected 'synthetic:' followed by key=value pairs among "
                f"{', '.join(settings)} (e.g. synthetic:n=1000,k=3)."
            )
        try:
            settings[key] = type(settings[key])(value)
        except ValueError:
            raise DataError(f"--data {source!r}: {key}={value!r} is not a valid {type(settings[key]).__name__}.") from None
    return settings


def synthetic_gmm(n: int = 500, k: int = 3, d: int = 2, *, seed: int = 0, separation: float = 6.0):
    """Draw ``n`` points from a well-separated mixture of ``k`` spherical unit-variance Gaussians in ``d`` dimensions.

    Component means are drawn uniformly from a box and re-drawn until every pair
    is at least ``separation`` standard deviations apart; weights are drawn
    from Dirichlet(5, ..., 5) so that no component is tiny.

    Returns
    -------
    x : Tensor (n, d)
    truth : dict with ``locs`` (k, d), ``weights`` (k,) and ``labels`` (n,)
    """
    if n < 2 or k < 1 or d < 1:
        raise DataError(f"synthetic mixture needs n >= 2, k >= 1, d >= 1 (got n={n}, k={k}, d={d}).")
    generator = np.random.default_rng(seed)
    half_width = separation * max(1.0, math.ceil(k ** (1.0 / d)))
    for _ in range(10_000):
        locs = generator.uniform(-half_width, half_width, size=(k, d))
        gaps = np.linalg.norm(locs[:, None] - locs[None], axis=-1) + np.eye(k) * 1e9
        if gaps.min() >= separation:
            break
    weights = generator.dirichlet(np.full(k, 5.0))
    labels = generator.choice(k, size=n, p=weights)
    x = locs[labels] + generator.standard_normal((n, d))
    dtype = torch.get_default_dtype()
    truth = {
        "locs": torch.as_tensor(locs, dtype=dtype),
        "weights": torch.as_tensor(weights, dtype=dtype),
        "labels": torch.as_tensor(labels),
    }
    return torch.as_tensor(x, dtype=dtype), truth
