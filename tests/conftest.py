"""Shared test helpers: the GPU tier skips itself without CUDA; the CLI runs in-process."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import pytest
import torch

# One intra-op thread: the tests' tensors are tiny, and two threads contending for two busy cores
# made single operations ~40x slower (measured: a 272x2 softmax, 1.5 ms instead of 0.03 ms).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def run_cli(*args) -> CliResult:
    """Run ``ppvi ARGS...`` in this process (the real entry point, minus interpreter start-up)."""
    from ppvi.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(arg) for arg in args])
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def cli():
    """``cli("fit", "gmm", ...)`` -> CliResult(code, out, err)."""
    return run_cli


@pytest.fixture(scope="session")
def gmm_run(tmp_path_factory):
    """One successful ``ppvi fit gmm --guide meanfield --steps 30`` run, shared by the run-directory tests."""
    run_dir = tmp_path_factory.mktemp("gmm_run") / "run"
    result = run_cli("fit", "gmm", "--guide", "meanfield", "--steps", 30, "--seed", 0, "--device", "cpu", "--out", run_dir)
    return run_dir, result
