"""ppvi.data: CSV reading, data checks, the synthetic mixture generator and the shipped Old Faithful set."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ppvi.data import Batch, check_points, old_faithful, parse_synthetic, read_csv, standardize, synthetic_gmm
from ppvi.errors import DataError

SYNTHETIC_DEFAULTS = dict(n=500, k=3, d=2, seed=0)


# --- read_csv ------------------------------------------------------------------------------------


def test_read_csv_without_header(tmp_path):
    path = tmp_path / "plain.csv"
    path.write_text("1,2.5\n-3,4e1\n5,6\n")
    assert torch.equal(read_csv(path), torch.tensor([[1.0, 2.5], [-3.0, 40.0], [5.0, 6.0]]))


def test_read_csv_skips_a_header_row(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("eruptions,waiting\n3.6,79\n1.8,54\n")
    assert torch.equal(read_csv(path), torch.tensor([[3.6, 79.0], [1.8, 54.0]]))


def test_read_csv_returns_the_default_float_dtype(tmp_path):
    path = tmp_path / "ints.csv"
    path.write_text("1\n2\n3\n")
    values = read_csv(path)
    assert values.dtype == torch.get_default_dtype() and values.shape == (3, 1)


@pytest.fixture
def writable_arrays_only(monkeypatch):
    """Fail if ppvi hands torch a read-only NumPy array (torch warns once per process, so catch it at the call)."""
    original = torch.as_tensor

    def as_tensor(data, *args, **kwargs):
        if isinstance(data, np.ndarray):
            assert data.flags.writeable, "read-only NumPy array passed to torch.as_tensor"
        return original(data, *args, **kwargs)

    monkeypatch.setattr(torch, "as_tensor", as_tensor)


def test_read_csv_hands_torch_a_writable_array(tmp_path, writable_arrays_only):
    # Regression: pandas' copy-on-write arrays are read-only, and torch warns about them
    # (a UserWarning from ppvi, an error under the test settings and noise for users).
    path = tmp_path / "plain.csv"
    path.write_text("1,2\n3,4\n")
    read_csv(path)


def test_old_faithful_hands_torch_a_writable_array(writable_arrays_only):
    old_faithful()


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "empty"),
        ("1,2\n3,x\n", "non-numeric value 'x' in row 2, column 2"),
        ("1,2\n3,\n", "missing value in row 2, column 2"),
        ("1,2\nNaN,4\n", "'NaN' in row 2, column 1 is NaN"),
        ("1,2\n3,inf\n", "not finite"),
        ("1,2\n", "1 row(s)"),
        ("a,b\n", "0 row(s)"),
    ],
    ids=["empty", "non-numeric", "missing", "nan", "inf", "one-row", "header-only"],
)
def test_read_csv_rejects_bad_content_naming_file_and_problem(tmp_path, text, needle):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError) as error:
        read_csv(path)
    assert str(path) in str(error.value) and needle in str(error.value)


def test_read_csv_rejects_a_folder(tmp_path):
    with pytest.raises(DataError, match="folder"):
        read_csv(tmp_path)


# --- check_points and standardize ----------------------------------------------------------------


def test_check_points_rejects_3d_input():
    with pytest.raises(DataError, match=r"shape \(4, 2, 2\)"):
        check_points(torch.zeros(4, 2, 2), name="cube")


def test_check_points_turns_a_vector_into_one_column():
    assert check_points(torch.arange(3.0), name="v").shape == (3, 1)


def test_check_points_rejects_integer_values():
    with pytest.raises(DataError, match="floating-point"):
        check_points(torch.arange(6).reshape(3, 2), name="ints")


def test_check_points_rejects_nan_naming_its_position():
    values = torch.ones(3, 2)
    values[2, 1] = float("nan")
    with pytest.raises(DataError, match="row 3, column 2 is not finite"):
        check_points(values, name="x")


def test_standardize_gives_zero_mean_unit_std_and_only_centres_constant_columns():
    values = torch.tensor([[1.0, 5.0], [2.0, 5.0], [6.0, 5.0]])
    scaled = standardize(values)
    assert torch.allclose(scaled.mean(0), torch.zeros(2), atol=1e-6)
    assert scaled[:, 0].std().item() == pytest.approx(1.0)
    assert torch.equal(scaled[:, 1], torch.zeros(3))


def test_batch_exposes_data_by_attribute():
    batch = Batch({"x": torch.ones(2, 1)}, torch.tensor([4, 7]), num_data=10)
    assert torch.equal(batch.x, torch.ones(2, 1)) and len(batch) == 2
    with pytest.raises(AttributeError, match="'y'"):
        batch.y  # noqa: B018 - the attribute access is what raises


# --- synthetic mixtures --------------------------------------------------------------------------


def test_synthetic_gmm_is_reproducible_for_a_seed():
    (x1, truth1), (x2, truth2) = synthetic_gmm(200, 3, 2, seed=7), synthetic_gmm(200, 3, 2, seed=7)
    assert torch.equal(x1, x2)
    assert all(torch.equal(truth1[key], truth2[key]) for key in ("locs", "weights", "labels"))


def test_synthetic_gmm_differs_between_seeds():
    assert not torch.equal(synthetic_gmm(200, 3, 2, seed=0)[0], synthetic_gmm(200, 3, 2, seed=1)[0])


@pytest.mark.parametrize("k, d, separation", [(3, 2, 6.0), (5, 1, 4.0), (4, 3, 8.0)])
def test_synthetic_gmm_means_are_at_least_separation_apart(k, d, separation):
    x, truth = synthetic_gmm(300, k, d, seed=0, separation=separation)
    assert x.shape == (300, d) and truth["locs"].shape == (k, d)
    for a, b in itertools.combinations(range(k), 2):
        assert torch.linalg.norm(truth["locs"][a] - truth["locs"][b]).item() >= separation


def test_synthetic_gmm_labels_and_weights_are_consistent():
    _, truth = synthetic_gmm(400, 3, 2, seed=2)
    assert truth["weights"].sum().item() == pytest.approx(1.0)
    assert set(truth["labels"].tolist()) <= {0, 1, 2}


def test_synthetic_gmm_rejects_too_few_points():
    with pytest.raises(DataError, match="n >= 2"):
        synthetic_gmm(1, 2, 2)


def test_parse_synthetic_defaults():
    assert parse_synthetic("synthetic", **SYNTHETIC_DEFAULTS) == SYNTHETIC_DEFAULTS
    assert parse_synthetic("synthetic:", **SYNTHETIC_DEFAULTS) == SYNTHETIC_DEFAULTS


def test_parse_synthetic_overrides_keep_the_default_types():
    settings = parse_synthetic("synthetic:n=200, k=4", **SYNTHETIC_DEFAULTS)
    assert settings == dict(n=200, k=4, d=2, seed=0)
    assert isinstance(settings["n"], int)


@pytest.mark.parametrize("spec", ["synthetic:q=1", "synthetic:n", "synthetic:n=abc", "synthetic:k=2.5"])
def test_parse_synthetic_rejects_malformed_specs(spec):
    with pytest.raises(DataError, match="synthetic"):
        parse_synthetic(spec, **SYNTHETIC_DEFAULTS)


# --- Old Faithful --------------------------------------------------------------------------------


def test_old_faithful_has_272_rows_of_two_columns():
    assert old_faithful().shape == (272, 2)


def test_old_faithful_column_means_match_r_datasets_faithful():
    # R: colMeans(faithful) -> eruptions 3.487783, waiting 70.897059
    means = old_faithful().double().mean(0)
    assert means[0].item() == pytest.approx(3.487783, abs=5e-6)
    assert means[1].item() == pytest.approx(70.897059, abs=5e-6)
