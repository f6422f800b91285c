"""The fuzz tier: generated bad CSVs, IDX files, config.json and params.pt through the command line.

    python -m pytest -m fuzz tests/test_fuzz.py

The cases come from the seeded generators of benchmarks/fault_cases.py (also the script that counts
outcomes before and after a change). Each must end in exit code 2 with one message, no traceback, no
code run from the run directory and the run directory unchanged.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEEDS = range(3)
PER_FAMILY = 20


def _fault_cases():
    spec = importlib.util.spec_from_file_location("fault_cases", ROOT / "benchmarks" / "fault_cases.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fault_cases = _fault_cases()
# the named cases of --lr, --lr-decay and --seed wait for FitConfig's validation (the lead's part of issue 13)


def generated(seed: int) -> list:
    cases = [case for case in fault_cases.all_cases(seed, PER_FAMILY) if case[0] != "named" or seed == 0]
    return [pytest.param(case, id=f"{seed}-{index}-{case[0]}") for index, case in enumerate(cases)]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    return fault_cases.fit_base_run(tmp_path_factory.mktemp("fuzz-base"))


@pytest.mark.fuzz
@pytest.mark.parametrize("case", [param for seed in SEEDS for param in generated(seed)])
def test_bad_input_exits_2_with_one_message(case, base_run, tmp_path):
    family, name, setup = case
    outcome, text = fault_cases.run_case(setup, tmp_path, base_run)
    assert outcome == "clean exit 2", f"{family}: {name}: {outcome}\n{text}"
    shutil.rmtree(tmp_path, ignore_errors=True)
