"""Bad inputs and hostile files through ``ppvi``'s command line, counted by outcome (issue 13).

    PYTHONPATH=. python benchmarks/fault_cases.py [--seed 0] [--per-family 12]

Each case builds a bad input (a CSV, IDX files, a damaged or planted run directory, an out-of-range option),
runs ``ppvi.cli.main`` in this process on it, and is classified:

    clean exit 2     one message, exit code 2, no traceback, the run directory unchanged (what ppvi promises)
    exit 2 (other)   exit 2 but a traceback, a changed run directory, or code run from the run directory
    internal error   exit 1 with "internal error" (a user's mistake reported as a bug in ppvi)
    exit 1 / exit 0  diverged, or silently accepted
    crash            an exception escaped main()

The generators are seeded (numpy ``default_rng``) and shared with the fuzz tier (tests/test_fuzz.py), so
the same cases run against any ppvi on the path: run it with PYTHONPATH pointing at an old tree to count
the cases before a change.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gzip
import hashlib
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

OUTCOMES = ("clean exit 2", "exit 2 (other)", "internal error", "exit 1", "exit 0", "crash")


# --- generators: each returns (name, setup) where setup(folder, base_run) -> (argv, run_dir or None) ----------


def bad_csv_cases(rng: np.random.Generator, count: int) -> list:
    defects = ["text", "nan", "inf", "empty cell", "ragged", "1e39", "one row", "binary", "empty", "header only", "-inf", "3e38 column"]

    def make(defect: str, rows: int, cols: int, seed: int):
        def setup(folder: Path, base_run: Path):
            local = np.random.default_rng(seed)
            table = local.normal(size=(rows, cols)).round(3).astype(str).tolist()
            row, col = int(local.integers(rows)), int(local.integers(cols))
            # a one-column row with an empty cell is a blank line, which CSV readers skip: put text there instead
            replacement = {"text": "abc", "nan": "nan", "inf": "inf", "-inf": "-inf", "empty cell": "" if cols > 1 else "abc", "1e39": "1e39"}
            if defect in replacement:
                table[row][col] = replacement[defect]
            elif defect == "ragged":
                table[row] = table[row] + ["1.0"]
            elif defect == "one row":
                table = table[:1]
            elif defect == "header only":
                table = []
            elif defect == "3e38 column":
                for line in table:
                    line[0] = str(3.3e38 * (1 if local.random() < 0.5 else -1))
                table[row][col] = "1e39"
            lines = [",".join(f"c{j}" for j in range(cols))] + [",".join(line) for line in table]
            path = folder / "data.csv"
            if defect == "binary":
                path.write_bytes(local.bytes(200))
            elif defect == "empty":
                path.write_bytes(b"")
            else:
                path.write_text("\n".join(lines) + "\n")
            return ["fit", "gmm", "--data", path, "--steps", 2, "--device", "cpu", "--out", folder / "run"], None

        return setup

    return [
        (f"csv {defect} ({rows}x{cols})", make(defect, rows, cols, seed))
        for defect, rows, cols, seed in (
            (defects[i % len(defects)], int(rng.integers(2, 30)), int(rng.integers(1, 5)), int(rng.integers(2**31))) for i in range(count)
        )
    ]


def bad_idx_cases(rng: np.random.Generator, count: int) -> list:
    defects = ["wrong magic", "type code", "zero dims", "negative size", "truncated", "trailing", "header > gzip", "gzip bomb", "cut gzip", "labels count"]

    def make(defect: str, seed: int):
        def setup(folder: Path, base_run: Path):
            local = np.random.default_rng(seed)
            num_images = int(local.integers(2, 20))
            images = local.integers(0, 256, size=(num_images, 28, 28), dtype=np.uint8)
            labels = local.integers(0, 10, size=num_images, dtype=np.uint8)

            def idx(array: np.ndarray, type_code=0x08, dims=None, sizes=None) -> bytes:
                sizes = list(array.shape) if sizes is None else sizes
                dims = len(sizes) if dims is None else dims
                header = bytes([0, 0, type_code, dims]) + b"".join(int(s).to_bytes(4, "big", signed=True) for s in sizes)
                return header + array.tobytes()

            image_bytes, label_bytes = idx(images), idx(labels)
            gzipped = False
            if defect == "wrong magic":
                label_bytes = image_bytes
            elif defect == "type code":
                image_bytes = idx(images, type_code=int(local.choice([0x01, 0x07, 0x0A, 0xFF])))
            elif defect == "zero dims":
                image_bytes = idx(images, dims=0, sizes=[])
            elif defect == "negative size":
                image_bytes = idx(images, sizes=[num_images, -28, 28])
            elif defect == "truncated":
                image_bytes = image_bytes[: int(local.integers(1, len(image_bytes)))]
            elif defect == "trailing":
                image_bytes = image_bytes + local.bytes(int(local.integers(1, 100)))
            elif defect == "labels count":
                label_bytes = idx(labels[:-1])
            elif defect == "header > gzip":
                image_bytes, gzipped = gzip.compress(idx(images[:1], sizes=[60000, 28, 28])), True
            elif defect == "gzip bomb":  # 64 MiB of zeros behind a header declaring the real images
                stream = io.BytesIO()
                with gzip.GzipFile(fileobj=stream, mode="wb", compresslevel=9) as handle:
                    handle.write(image_bytes)
                    zeros = bytes(2**20)
                    for _ in range(64):
                        handle.write(zeros)
                image_bytes, gzipped = stream.getvalue(), True
            elif defect == "cut gzip":
                full = gzip.compress(image_bytes)
                image_bytes, gzipped = full[: int(local.integers(10, len(full) - 1))], True
            data = folder / "mnist"
            data.mkdir()
            (data / ("train-images-idx3-ubyte" + (".gz" if gzipped else ""))).write_bytes(image_bytes)
            (data / "train-labels-idx1-ubyte").write_bytes(label_bytes)
            return ["fit", "vae", "--data", data, "--steps", 1, "--device", "cpu", "--out", folder / "run"], None

        return setup

    return [(f"idx {defects[i % len(defects)]}", make(defects[i % len(defects)], int(rng.integers(2**31)))) for i in range(count)]


CONFIG_KEYS = ["model", "guide", "seed", "restarts", "num_data", "steps", "lr", "options", "status", "data", "batch_size", "num_particles"]
WRONG_VALUES = [None, -1, 0, 2**70, 1.5, "text", "", [], {}, True, float("nan"), 1e400]
COMMANDS = [["diagnose", "--num-samples", 10], ["compare"], ["fit", "--resume"], ["evaluate", "--iwae-k", 2]]


def _command(command: list, run_dir: Path) -> list:
    return [*command[:2], run_dir] if command[:2] == ["fit", "--resume"] else [command[0], run_dir, *command[1:]]


def bad_config_cases(rng: np.random.Generator, count: int) -> list:
    def make(kind: str, key: str, value, command: list, seed: int):
        def setup(folder: Path, base_run: Path):
            run_dir = folder / "run"
            shutil.copytree(base_run, run_dir)
            config = json.loads((run_dir / "config.json").read_text())
            local = np.random.default_rng(seed)
            if kind == "bytes":
                payload = local.bytes(int(local.integers(0, 400)))
            elif kind == "not an object":
                payload = json.dumps([config, 1, "x"][int(local.integers(3)) :][:1] if local.random() < 0.5 else 3).encode()
            elif kind == "drop":
                config.pop(key, None)
                payload = json.dumps(config).encode()
            else:
                config[key] = value
                payload = json.dumps(config).encode()
            (run_dir / "config.json").write_bytes(payload)
            return _command(command, run_dir), run_dir

        return setup

    cases = []
    for _ in range(count):
        kind = ["bytes", "not an object", "drop", "value", "value", "value"][int(rng.integers(6))]
        key = CONFIG_KEYS[int(rng.integers(len(CONFIG_KEYS)))]
        value = WRONG_VALUES[int(rng.integers(len(WRONG_VALUES)))]
        if kind == "value" and key == "lr" and value in (1.5, 2**70):
            value = -1  # learning rates a fit may write
        if kind == "value" and key in ("status", "data", "options", "batch_size") and value in (None, {}):
            value = "text" if key != "options" else {"no_such_option": 1}  # null batch size / empty options are valid
        if kind == "drop" and key not in ("model", "guide", "seed", "restarts", "data", "options", "lr", "steps", "num_particles", "batch_size"):
            key = "model"
        command = COMMANDS[int(rng.integers(len(COMMANDS)))]
        if kind == "drop" and command[0] != "fit" and key not in ("model", "guide"):
            command = COMMANDS[2]  # only --resume needs the fit settings
        cases.append((f"config.json {kind} {key if kind in ('drop', 'value') else ''} {json.dumps(value) if kind == 'value' else ''} / {command[0]}",
                      make(kind, key, value, command, int(rng.integers(2**31)))))
    return cases


def bad_params_cases(rng: np.random.Generator, count: int) -> list:
    import torch

    def saved(obj) -> bytes:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        return buffer.getvalue()

    def make(kind: str, command: list, seed: int):
        def setup(folder: Path, base_run: Path):
            run_dir = folder / "run"
            shutil.copytree(base_run, run_dir)
            local = np.random.default_rng(seed)
            real = (run_dir / "params.pt").read_bytes()
            state = torch.load(run_dir / "params.pt", weights_only=True)
            snapshot = state["restarts"][0]
            if kind == "truncated":
                payload = real[: int(local.integers(0, len(real) - 1))]
            elif kind == "random bytes":
                payload = local.bytes(int(local.integers(1, 3000)))
            elif kind == "bare tensor":
                payload = saved(torch.zeros(int(local.integers(1, 5))))
            elif kind == "list":
                payload = saved([snapshot])
            elif kind == "drop key":
                snapshot.pop(sorted(snapshot)[int(local.integers(len(snapshot)))])
                payload = saved(state)
            elif kind == "tensor to list":
                name = sorted(snapshot["unconstrained"])[0]
                snapshot["unconstrained"][name] = snapshot["unconstrained"][name].tolist()
                payload = saved(state)
            elif kind == "wrong shape":
                name = sorted(snapshot["unconstrained"])[int(local.integers(len(snapshot["unconstrained"])))]
                snapshot["unconstrained"][name] = torch.zeros(7, 3)
                payload = saved(state)
            elif kind == "renamed params":
                snapshot["unconstrained"] = {name + "_x": value for name, value in snapshot["unconstrained"].items()}
                payload = saved(state)
            else:  # pickled code
                payload = saved({"format": 1, "restarts": [_Payload()]})
            (run_dir / "params.pt").write_bytes(payload)
            return _command(command, run_dir), run_dir

        return setup

    kinds = ["truncated", "random bytes", "bare tensor", "list", "drop key", "tensor to list", "wrong shape", "renamed params", "pickled code"]
    return [
        (f"params.pt {kinds[i % len(kinds)]} / {command[0]}", make(kinds[i % len(kinds)], command, int(rng.integers(2**31))))
        for i, command in ((i, [COMMANDS[0], COMMANDS[2]][int(rng.integers(2))]) for i in range(count))
    ]


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED_BY_PARAMS",))


EVIL = 'from pathlib import Path\nPath(__file__).with_name("EXECUTED").write_text("ran")\n'


def named_cases() -> list:
    """The single cases of issue 13 that are not file variants."""

    def planted(command: list):
        def setup(folder: Path, base_run: Path):
            run_dir = folder / "run"
            shutil.copytree(base_run, run_dir)
            evil = run_dir / "evil.py"
            evil.write_text(EVIL)
            config = json.loads((run_dir / "config.json").read_text())
            config.update(model=str(evil), model_path=str(evil), model_sha256=hashlib.sha256(evil.read_bytes()).hexdigest())
            if command[0] == "fit":
                config["status"] = "running"
            (run_dir / "config.json").write_text(json.dumps(config))
            return _command(command, run_dir), run_dir

        return setup

    def option(*argv):
        return lambda folder, base_run: (["fit", *argv, "--steps", 3, "--device", "cpu", "--out", folder / "run"], None)

    def out_under_file(folder: Path, base_run: Path):
        (folder / "file").write_text("x")
        return ["fit", "normal_normal", "--steps", 3, "--device", "cpu", "--out", folder / "file" / "run"], None

    def resume_never_written(folder: Path, base_run: Path):
        return ["fit", "--resume", folder / "never"], None

    return [
        *((f"planted model file / {command[0]}", planted(command)) for command in COMMANDS if command[0] != "compare"),
        ("--prior-scale nan", option("normal_normal", "--prior-scale", "nan")),
        ("--noise-scale inf", option("linear_regression", "--noise-scale", "inf")),
        ("--lr nan", option("normal_normal", "--lr", "nan")),
        ("--lr 1e400", option("normal_normal", "--lr", "1e400")),
        ("--lr-decay nan", option("normal_normal", "--lr-decay", "nan")),
        ("--seed 2**64", option("normal_normal", "--seed", str(2**64))),
        ("--out below a file", out_under_file),
        ("--resume of a folder never written", resume_never_written),
    ]


def all_cases(seed: int = 0, per_family: int = 12) -> list:
    rng = np.random.default_rng(seed)
    return [
        *(("named", *case) for case in named_cases()),
        *(("csv", *case) for case in bad_csv_cases(rng, per_family)),
        *(("idx", *case) for case in bad_idx_cases(rng, per_family)),
        *(("config.json", *case) for case in bad_config_cases(rng, per_family)),
        *(("params.pt", *case) for case in bad_params_cases(rng, per_family)),
    ]


# --- running and classifying ------------------------------------------------------------------------


def folder_state(folder: Path | None) -> dict | None:
    if folder is None or not Path(folder).is_dir():
        return None
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def run_case(setup, folder: Path, base_run: Path) -> tuple[str, str]:
    """(outcome, the command's output) of one case, in a fresh folder."""
    from ppvi.cli import main

    argv, run_dir = setup(folder, base_run)
    before = folder_state(run_dir)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.chdir(folder):
        try:
            code = main([str(arg) for arg in argv])
        except BaseException as error:  # noqa: BLE001 - a crash is an outcome here
            return "crash", f"{type(error).__name__}: {error}"
    text = out.getvalue() + err.getvalue()
    ran_code = any((folder / name).exists() or (run_dir is not None and (run_dir / name).exists()) for name in ("EXECUTED", "PWNED_BY_PARAMS"))
    if code == 2:
        clean = "Traceback" not in text and not ran_code and folder_state(run_dir) == before
        return ("clean exit 2" if clean else "exit 2 (other)"), text
    if code == 1:
        return ("internal error" if "internal error" in text else "exit 1"), text
    return (f"exit {code}" if code in (0, 1) else "crash"), text


def fit_base_run(folder: Path) -> Path:
    from ppvi.cli import main

    run_dir = folder / "gmm-run"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(["fit", "gmm", "--guide", "meanfield", "--steps", "30", "--device", "cpu", "--out", str(run_dir)])
    assert code == 0, "the base run failed"
    return run_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-family", type=int, default=12)
    parser.add_argument("--verbose", action="store_true", help="Print every case that is not a clean exit 2.")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    counts = collections.defaultdict(collections.Counter)
    with tempfile.TemporaryDirectory() as scratch:
        base_run = fit_base_run(Path(scratch))
        for index, (family, name, setup) in enumerate(all_cases(args.seed, args.per_family)):
            folder = Path(scratch) / f"case{index}"
            folder.mkdir()
            outcome, text = run_case(setup, folder, base_run)
            counts[family][outcome] += 1
            if args.verbose and outcome != "clean exit 2":
                print(f"[{outcome}] {family}: {name}\n    {text.strip()[:300]}", file=sys.stderr)
    print(f"{'family':<12}" + "".join(f"{outcome:>16}" for outcome in OUTCOMES))
    for family, counter in counts.items():
        print(f"{family:<12}" + "".join(f"{counter[outcome]:>16}" for outcome in OUTCOMES))
    total = sum(counts.values(), collections.Counter())
    print(f"{'total':<12}" + "".join(f"{total[outcome]:>16}" for outcome in OUTCOMES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
