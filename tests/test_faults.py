"""Hostile files and faults through the real command line: exit 2 with one message, never code from a run directory.

Each test reproduces a case of issue 13. The security, Ctrl-C and lock cases run ``python -m ppvi.cli`` in a
subprocess (the console script's own process); the file-schema matrix runs the same ``main()`` in-process,
which is what the subprocess calls, to keep the default tier fast.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch

import ppvi
from ppvi import rundir
from ppvi.errors import DataError, UsageError
from ppvi.images import read_idx

ROOT = Path(__file__).resolve().parents[1]


def ppvi_process(*args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("PPVI_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "ppvi.cli", *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def ppvi_cmd(*args, timeout=300):
    process = ppvi_process(*args)
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out + err


def assert_one_message(code: int, text: str, *phrases: str, exit_code: int = 2) -> None:
    assert code == exit_code, text
    assert "Traceback" not in text and "internal error" not in text, text
    for phrase in phrases:
        assert phrase in text, (phrase, text)


def folder_state(folder: Path) -> dict:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(Path(folder).iterdir()) if path.is_file()}


# --- a run directory is data, never code -------------------------------------------------------

EVIL = """
from pathlib import Path
Path(__file__).with_name("EXECUTED").write_text("the run directory ran code")
"""


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    """A completed fit of a user's model file (a copy of normal_normal), and that file."""
    folder = tmp_path_factory.mktemp("user_run")
    model_path = folder / "my_model.py"
    shutil.copy(ppvi.load_model("normal_normal").path, model_path)
    ppvi.fit(str(model_path), steps=5, device="cpu", out=folder / "run")
    return folder / "run", model_path


@pytest.fixture
def planted_run(user_run, tmp_path):
    """A copy of the user's run whose config.json names a Python file planted inside the run directory."""
    run_dir = tmp_path / "received"
    shutil.copytree(user_run[0], run_dir)
    evil = run_dir / "evil.py"
    evil.write_text(EVIL)
    config = json.loads((run_dir / "config.json").read_text())
    config.update(model=str(evil), model_path=str(evil), model_sha256=hashlib.sha256(evil.read_bytes()).hexdigest())
    (run_dir / "config.json").write_text(json.dumps(config))
    return run_dir


def test_diagnose_imports_no_file_a_run_directory_names(planted_run):
    before = folder_state(planted_run)
    code, text = ppvi_cmd("diagnose", planted_run, "--num-samples", 10)
    assert_one_message(code, text, str(planted_run / "evil.py"), "--model", "--trust-model")
    assert not (planted_run / "EXECUTED").exists()
    assert folder_state(planted_run) == before


def test_resume_imports_no_file_a_run_directory_names(planted_run):
    config = json.loads((planted_run / "config.json").read_text())
    (planted_run / "config.json").write_text(json.dumps({**config, "status": "running"}))
    code, text = ppvi_cmd("fit", "--resume", planted_run)
    assert_one_message(code, text, "evil.py", "--trust-model")
    assert not (planted_run / "EXECUTED").exists()


@pytest.mark.parametrize("command", [("evaluate",), ("score", "--out", "scores.csv"), ("sample",)])
def test_other_commands_import_no_file_a_run_directory_names(cli, planted_run, command, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    result = cli(command[0], planted_run, *command[1:])
    assert_one_message(result.code, result.text, "evil.py", "--model")
    assert not (planted_run / "EXECUTED").exists()


def test_model_named_by_the_user_is_loaded(cli, user_run):
    run_dir, model_path = user_run
    result = cli("diagnose", run_dir, "--num-samples", 20, "--model", model_path)
    assert result.code == 0, result.text


def test_trust_model_prints_the_path_and_sha256(cli, user_run):
    run_dir, model_path = user_run
    result = cli("diagnose", run_dir, "--num-samples", 20, "--trust-model")
    assert result.code == 0, result.text
    assert str(model_path) in result.err and hashlib.sha256(model_path.read_bytes()).hexdigest() in result.err


def test_gallery_runs_load_by_name(gmm_run):
    run = ppvi.load_run(gmm_run[0])
    assert run.model_file.name == "gmm"


def test_a_trusted_file_that_changed_is_refused_before_import(planted_run):
    (planted_run / "evil.py").write_text(EVIL + "\n# changed\n")
    with pytest.raises(UsageError, match="changed since the fit"):
        ppvi.load_run(planted_run, trust_model=True)
    assert not (planted_run / "EXECUTED").exists()


# --- run-directory files that ppvi did not write -----------------------------------------------

CONFIG_VARIANTS = {
    "random bytes": bytes(range(256)) * 4,
    "a JSON list": b"[1, 2, 3]",
    "no model key": json.dumps({"guide": "meanfield", "status": "completed"}).encode(),
    "model a number": json.dumps({"model": 3, "guide": "meanfield", "status": "completed"}).encode(),
}
TRACE_VARIANTS = {
    "random bytes": bytes(range(256)) * 4,
    "no elbo column": b"restart,step,loss\n0,0,1.0\n",
    "text ELBOs": b"restart,step,epoch,elbo,time_s\n0,0,0,abc,0.1\n",
    "empty": b"",
}


def params_variants(real: Path) -> dict:
    import io

    def saved(obj) -> bytes:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        return buffer.getvalue()

    data = real.read_bytes()
    return {
        "truncated": data[: len(data) // 2],
        "random bytes": bytes(range(256)) * 16,
        "bare tensor": saved(torch.zeros(3)),
        "other structure": saved({"weights": [torch.zeros(2)]}),
        "restart without params": saved({"format": 1, "restarts": [{"seed": 0, "step": 3, "done": True}]}),
    }


def corrupt_copy(source: Path, destination: Path, name: str, content: bytes) -> Path:
    shutil.copytree(source, destination)
    (destination / name).write_bytes(content)
    return destination


@pytest.mark.parametrize("variant", CONFIG_VARIANTS)
@pytest.mark.parametrize("command", ["diagnose", "compare", "resume"])
def test_config_json_not_written_by_ppvi_exits_2(cli, gmm_run, tmp_path, variant, command):
    run_dir = corrupt_copy(gmm_run[0], tmp_path / "run", "config.json", CONFIG_VARIANTS[variant])
    before = folder_state(run_dir)
    result = cli(*(["fit", "--resume", run_dir] if command == "resume" else [command, run_dir]))
    assert_one_message(result.code, result.text, "config.json: not a ppvi run file")
    assert folder_state(run_dir) == before


@pytest.mark.parametrize("variant", TRACE_VARIANTS)
@pytest.mark.parametrize("command", ["compare", "diagnose"])
def test_elbo_csv_not_written_by_ppvi_exits_2(cli, gmm_run, tmp_path, variant, command):
    run_dir = corrupt_copy(gmm_run[0], tmp_path / "run", "elbo.csv", TRACE_VARIANTS[variant])
    before = folder_state(run_dir)
    result = cli(command, run_dir)
    assert_one_message(result.code, result.text, "elbo.csv: not a ppvi run file")
    assert folder_state(run_dir) == before


@pytest.mark.parametrize("variant", ["truncated", "random bytes", "bare tensor", "other structure", "restart without params"])
@pytest.mark.parametrize("command", ["diagnose", "resume"])
def test_params_pt_not_written_by_ppvi_exits_2(cli, gmm_run, tmp_path, variant, command):
    content = params_variants(gmm_run[0] / "params.pt")[variant]
    run_dir = corrupt_copy(gmm_run[0], tmp_path / "run", "params.pt", content)
    before = folder_state(run_dir)
    result = cli(*(["fit", "--resume", run_dir] if command == "resume" else [command, run_dir]))
    assert_one_message(result.code, result.text, "params.pt: not a ppvi run file")
    assert folder_state(run_dir) == before


class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_params_pt_with_pickled_code_is_not_loaded(cli, gmm_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    shutil.copytree(gmm_run[0], run_dir)
    torch.save({"format": 1, "restarts": [Payload()]}, run_dir / "params.pt")
    result = cli("diagnose", run_dir)
    assert_one_message(result.code, result.text, "params.pt holds objects other than tensors; ppvi does not load it")
    assert "weights_only=False" not in result.text and not (tmp_path / "PWNED").exists()


def test_params_pt_from_another_model_is_named(cli, gmm_run, user_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(gmm_run[0], run_dir)
    shutil.copy(user_run[0] / "params.pt", run_dir / "params.pt")
    result = cli("diagnose", run_dir, "--num-samples", 10)
    assert_one_message(result.code, result.text, "params.pt", "another model or guide")


def test_resume_of_a_folder_never_created_says_nothing_was_saved(cli, tmp_path):
    result = cli("fit", "--resume", tmp_path / "never-written")
    assert_one_message(result.code, result.text, "nothing was saved", "start the fit again")


def test_resume_of_a_completed_run_without_params_pt_is_refused(cli, gmm_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(gmm_run[0], run_dir)
    (run_dir / "params.pt").unlink()
    before = folder_state(run_dir)
    result = cli("fit", "--resume", run_dir)
    assert_one_message(result.code, result.text, "params.pt is missing", "start a new run")
    assert folder_state(run_dir) == before


# --- one writer per run directory ----------------------------------------------------------------

HOLD = "import sys, time; from ppvi import rundir\nwith rundir.lock(sys.argv[1], takeover=True):\n    print('held', flush=True); time.sleep(60)"


def hold_lock_in_child(run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], env=env, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    child = hold_lock_in_child(tmp_path / "run")
    try:
        with pytest.raises(UsageError, match=f"PID {child.pid}"):
            with rundir.lock(tmp_path / "run"):
                pass
    finally:
        child.kill()
        child.wait()


def test_resume_takes_over_only_from_a_dead_holder(tmp_path):
    child = hold_lock_in_child(tmp_path / "run")
    child.kill()  # SIGKILL: no clean-up, its lock file stays
    child.wait()
    assert (tmp_path / "run" / rundir.LOCK).exists()
    with pytest.raises(UsageError, match="--resume"):
        with rundir.lock(tmp_path / "run"):
            pass
    with rundir.lock(tmp_path / "run", takeover=True) as path:
        assert path.read_text().strip() == str(os.getpid())
    assert not (tmp_path / "run" / rundir.LOCK).exists()


def test_fit_into_a_folder_another_writer_holds_exits_2(tmp_path):
    child = hold_lock_in_child(tmp_path / "run")
    try:
        code, text = ppvi_cmd("fit", "gmm", "--steps", 5, "--device", "cpu", "--out", tmp_path / "run")
        assert_one_message(code, text, f"PID {child.pid}")
    finally:
        child.kill()
        child.wait()


def test_params_finite_sees_one_nan_anywhere():
    state = {"restarts": [{"params": {"a": torch.zeros(3)}, "rng": {"torch": torch.zeros(5, dtype=torch.uint8)}}]}
    assert rundir.params_finite(state)
    state["restarts"][0]["params"]["b"] = torch.tensor([1.0, float("nan")])
    assert not rundir.params_finite(state)


def test_last_good_checkpoint_is_finite(cli, tmp_path):
    result = cli("fit", "gmm", "--lr", 3, "--checkpoint-every", 1, "--steps", 60, "--device", "cpu", "--out", tmp_path / "run")
    if (tmp_path / "run" / "params.pt").exists():
        assert rundir.params_finite(torch.load(tmp_path / "run" / "params.pt", weights_only=True)), result.text


# --- the command line's error boundary -----------------------------------------------------------


def test_ctrl_c_exits_130_with_the_resume_hint(tmp_path):
    run_dir = tmp_path / "run"
    # Ctrl-C as at a terminal: a test run started in the background (a shell's `cmd &` without job control) inherits
    # SIGINT ignored, and Python then never raises KeyboardInterrupt; the child gets the default action back
    process = ppvi_process("fit", "gmm", "--steps", 1_000_000, "--checkpoint-every", 20, "--device", "cpu", "--out", run_dir,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (run_dir / "config.json").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, out + err
    assert f"ppvi fit --resume {run_dir}" in err and "aborted" not in err and "Traceback" not in err


def test_internal_error_says_where_to_report_and_how_to_see_the_traceback(cli, monkeypatch):
    import ppvi.compare

    def broken(run_dirs):
        raise KeyError("a bug in ppvi")

    monkeypatch.setattr(ppvi.compare, "compare_runs", broken)
    monkeypatch.delenv("PPVI_DEBUG", raising=False)
    result = cli("compare", ".")
    assert result.code == 1
    assert "internal error" in result.err and "report" in result.err and "PPVI_DEBUG=1" in result.err


def test_out_below_a_regular_file_exits_2_naming_the_path(cli, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    result = cli("fit", "normal_normal", "--steps", 3, "--device", "cpu", "--out", tmp_path / "file" / "run")
    assert_one_message(result.code, result.text, str(tmp_path / "file"), "Not a directory")


def test_full_disk_during_a_fit_names_the_file_and_the_intact_checkpoint(cli, tmp_path, monkeypatch):
    real_save = torch.save
    calls = []

    def save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 1:  # the first checkpoint lands; the second finds the disk full
            raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: file write failed")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 100, 0))
    result = cli("fit", "normal_normal", "--steps", 40, "--checkpoint-every", 10, "--device", "cpu", "--out", tmp_path / "run")
    assert_one_message(result.code, result.text, str(tmp_path / "run" / "params.pt"), "No space left", "is intact", "--resume")
    assert torch.load(tmp_path / "run" / "params.pt", weights_only=True)["restarts"][0]["step"] == 10


# --- data ------------------------------------------------------------------------------------------


def gzip_bomb(path: Path, declared: tuple, expanded_bytes: int) -> Path:
    header = bytes([0, 0, 0x08, len(declared)]) + b"".join(size.to_bytes(4, "big") for size in declared)
    with gzip.open(path, "wb", compresslevel=9) as handle:
        handle.write(header)
        zeros = bytes(2**20)
        for _ in range(expanded_bytes // len(zeros)):
            handle.write(zeros)
    return path


def test_gzip_bomb_is_refused_without_expanding_it(tmp_path):
    bomb = gzip_bomb(tmp_path / "t10k-images-idx3-ubyte.gz", (10, 28, 28), 256 * 2**20)  # 256 KB expanding to 256 MiB
    tracemalloc.start()
    with pytest.raises(DataError, match="bytes beyond the end"):
        read_idx(bomb)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 * 2**20, peak  # the declared 7,856 bytes plus at most 1 MiB counted past them


def test_idx_header_declaring_more_than_its_gzip_can_hold_is_refused_unread(tmp_path):
    path = tmp_path / "lying.gz"
    path.write_bytes(gzip.compress(bytes([0, 0, 0x08, 3]) + (60000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2))
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


def test_csv_of_values_near_the_float32_limit_fits(cli, tmp_path):
    path = tmp_path / "big.csv"
    path.write_text("a,b\n" + "\n".join(f"{3e38 * (-1) ** i},{i}" for i in range(20)) + "\n")
    result = cli("fit", "gmm", "--data", path, "--steps", 5, "--device", "cpu", "--out", tmp_path / "run")
    assert result.code == 0, result.text  # standardised in float64: no overflow, no "-inf in row 2"


def test_csv_value_beyond_float32_names_the_file_and_the_cause(cli, tmp_path):
    path = tmp_path / "huge.csv"
    path.write_text("a,b\n1e39,1\n2,3\n4,5\n")
    result = cli("fit", "gmm", "--data", path, "--steps", 5, "--device", "cpu", "--out", tmp_path / "run")
    assert_one_message(result.code, result.text, str(path), "1e39", "beyond the range")


def test_standardising_values_near_the_float64_limit_does_not_overflow():
    standardized = ppvi.data.standardize(torch.tensor([[1e308], [-1e308]], dtype=torch.float64), name="x.csv")
    assert torch.allclose(standardized, torch.tensor([[2**-0.5], [-(2**-0.5)]], dtype=torch.float64))  # std with n - 1


def test_standardising_infinite_values_names_the_cause():
    with pytest.raises(DataError, match="x.csv: column 1 overflows when standardised"):
        ppvi.data.standardize(torch.tensor([[float("inf")], [1.0]]), name="x.csv")


@pytest.mark.parametrize("option", [("normal_normal", "--prior-scale", "nan"), ("linear_regression", "--noise-scale", "inf")])
def test_non_finite_model_options_are_refused_before_anything_runs(cli, tmp_path, option):
    result = cli("fit", *option, "--steps", 3, "--device", "cpu", "--out", tmp_path / "run")
    assert_one_message(result.code, result.text, option[1], "finite")
    assert not (tmp_path / "run").exists()


def test_seed_beyond_64_bits_is_refused(cli, tmp_path):
    result = cli("fit", "normal_normal", "--seed", 2**64, "--steps", 3, "--device", "cpu", "--out", tmp_path / "run")
    assert_one_message(result.code, result.text, "--seed")
