"""Run directories and outputs that cannot be corrupted, data checked on the way in, a
diverged training stopped, and --help / path errors answered before keras loads.

Through the console script in a subprocess, except where a write failure is injected
(in-process, with monkeypatch) or the outputs of a real export are compared.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from deepmetric import cli
from deepmetric.cli import rundir
from deepmetric.models import build_embedding_model

SCRIPT = Path(sys.executable).with_name("deepmetric")
SMALL = ["--epochs", "1", "--classes-per-batch", "4", "--samples-per-class", "4"]
SMALL += ["--steps-per-epoch", "2", "--embedding-dim", "8", "--quiet"]  # and --data tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    """48 feature vectors of 4 classes (an MLP trains on them in a moment)."""
    rng = np.random.default_rng(0)
    y = np.arange(48) % 4
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, x=(rng.normal(size=(48, 3)) + y[:, None]).astype("float32"), y=y)
    return str(path)


def _script(*argv, cwd=None, env=None, timeout=300):
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend(), **(env or {}))
    return subprocess.run(
        [str(SCRIPT), *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def _one_error_line(done, code=2) -> str:
    """The single `deepmetric: error: ...` line of a run that exited with `code`."""
    lines = [
        line
        for line in done.stderr.splitlines()
        if not line.startswith(("WARNING: All log messages", "I0000"))  # absl start-up lines
    ]
    assert done.returncode == code, done.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("deepmetric: error: "), done.stderr
    return lines[0]


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# In a fresh Python: the console script's entry, then the modules a backend would load.
_CHILD = """
import json, sys
from deepmetric_cli import main
code = main(json.loads(sys.argv[1]))
heavy = ("keras", "jax", "tensorflow", "torch", "matplotlib", "sklearn")
print(json.dumps([code, sorted({m.split(".")[0] for m in sys.modules} & set(heavy))]))
sys.exit(code)
"""


@pytest.fixture
def files(tmp_path):
    """A stand-in model file, an existing output of each kind, and a regular file."""
    (tmp_path / "model.keras").write_bytes(b"a model file (only its existence is checked)")
    (tmp_path / "done.npy").write_bytes(b"")
    (tmp_path / "done.json").write_text("{}")
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "vecs.tsv").write_text("0\n")
    (tmp_path / "plain").write_text("a regular file")
    return tmp_path


# Each command's --help and path errors, answered without keras (argv, expected code, text).
EARLY = [
    (["--help"], 0, "train"),
    (["train", "--help"], 0, "idx3"),
    (["evaluate", "--help"], 0, ".npz"),
    (["embed", "--help"], 0, "--force"),
    (["export", "--help"], 0, "--force"),
    (["index", "--help"], 0, "IDX"),
    (["search", "--help"], 0, "QUERY"),
    (["train", "--data", "nowhere"], 2, "nowhere: no such file or folder"),
    (["train", "--out", "plain/runs"], 2, "plain is a file, not a directory"),
    (["evaluate", "missing.keras"], 2, "missing.keras: no such model file"),
    (["evaluate", "model.keras", "--data", "nowhere"], 2, "no such file or folder"),
    (["evaluate", "model.keras", "--json", "done.json"], 2, "exists; pass --force"),
    (["evaluate", "model.keras", "--json", "plain/m.json"], 2, "not a directory"),
    (["embed", "model.keras", "--output", "done.npy"], 2, "exists; pass --force"),
    (["embed", "model.keras", "--output", "e.txt"], 2, "must end in .npy or .tsv"),
    (["embed", "model.keras", "--output", "plain/e.npy"], 2, "not a directory"),
    (["export", "model.keras", "--out", "proj"], 2, "exists; pass --force"),
    (["export", "model.keras", "--out", "plain"], 2, "not a directory"),
    (["export", "model.keras", "--out", "plain/proj"], 2, "not a directory"),
    (["index", "model.keras", "--out", "plain/ix"], 2, "not a directory"),
    (["search", "nowhere", "--model", "model.keras", "model.keras"], 2, "no such index"),
]


@pytest.mark.parametrize("argv, code, text", EARLY, ids=[" ".join(a) for a, _, _ in EARLY])
def test_help_and_path_errors_of_every_command_import_no_backend(files, argv, code, text):
    before = _files(files)
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(argv)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=files,
    )
    result, heavy = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == code and heavy == [], done.stderr
    assert text in (done.stdout if code == 0 else _one_error_line(done, code))
    assert _files(files) == before  # nothing written, no probe file left


def test_console_script_refuses_without_room(files):
    """The free-space floor is checked with the file system's real free space."""
    done = _script("train", "--out", "runs", cwd=files, env={"DEEPMETRIC_MIN_FREE_MB": "1e12"})
    assert "MB free" in _one_error_line(done)
    assert not (files / "runs").exists()


def test_export_replaces_only_its_own_folder_with_force(tiny, tmp_path, capsys):
    model = build_embedding_model((3,), 4)
    model.save(tmp_path / "m.keras")
    args = ["export", str(tmp_path / "m.keras"), "--data", tiny, "--quiet"]
    out = tmp_path / "proj"
    assert cli.main([*args, "--out", str(out)]) == 0
    written = _files(out)
    (out / "vecs.tsv").write_text("stale\n")
    assert cli.main([*args, "--out", str(out)]) == 2
    assert (out / "vecs.tsv").read_text() == "stale\n"
    assert cli.main([*args, "--out", str(out), "--force"]) == 0
    assert _files(out) == written and (out / "vecs.tsv").read_text() != "stale\n"
    (out / "mine.txt").write_text("not export's")
    assert cli.main([*args, "--out", str(out), "--force"]) == 2
    assert "files that export does not write (mine.txt)" in capsys.readouterr().err
    assert not list(tmp_path.glob(".proj.tmp-*"))


def test_bad_data_exits_2_with_one_line_through_the_console_script(tmp_path):
    x = np.ones((40, 3), "float32")
    x[7, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=np.arange(40) % 4)
    done = _script("train", "--data", "nan.npz", *SMALL, "--out", "runs", cwd=tmp_path)
    line = _one_error_line(done)
    assert "1 non-finite values" in line and "row 7" in line
    assert not (tmp_path / "runs").exists()


def _digit_folder(root: Path, per_class: dict) -> Path:
    from PIL import Image

    for name, count in per_class.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((8, 8), i * 9, "uint8")).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize(
    "case, text",
    [
        ("single", "class 'owl' has 1 example"),
        ("text", "not an .npz file (not a zip archive)"),
        ("object", "the array 'x' holds Python objects"),
    ],
)
def test_bad_data_messages_in_process(tmp_path, capsys, case, text):
    if case == "single":
        data = _digit_folder(tmp_path / "imgs", {"cat": 4, "dog": 4, "owl": 1})
    elif case == "text":
        data = tmp_path / "x.npz"
        data.write_text("1,2,3\n")
    else:
        data = tmp_path / "o.npz"
        np.savez(data, x=np.array([object()] * 4, dtype=object), y=np.arange(4))
    assert cli.main(["train", "--data", str(data), *SMALL, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and text in err and "pickled data" not in err, err


def _lock_file(out: Path, name: str, timeout=60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            holder = json.loads((out / f"{name}.lock").read_text())
            if holder:
                return holder
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError("the first run never took its lock")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_second_run_of_the_same_name_is_refused_and_a_dead_holder_taken_over(tiny, tmp_path):
    """A run holds <out>/<name>.lock; a second console script with the same name exits 2
    naming the holder's PID; after kill -9 of the holder, its lock (a dead PID) is taken
    over by the next run, which trains and removes it."""
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend())
    first = subprocess.Popen(
        [
            str(SCRIPT),
            "train",
            *SMALL,
            "--data",
            tiny,
            "--epochs",
            "50",
            "--out",
            "runs",
            "--name",
            "x",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        holder = _lock_file(tmp_path / "runs", "x")
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        for extra in ([], ["--resume"]):
            argv = ["train", *SMALL, "--data", tiny, "--out", "runs", "--name", "x", *extra]
            second = _script(*argv, cwd=tmp_path)
            line = _one_error_line(second)
            assert f"in use by process {first.pid} on {socket.gethostname()}" in line, line
        assert first.poll() is None  # the holder ran on, undisturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert json.loads((tmp_path / "runs" / "x.lock").read_text())["pid"] == first.pid
    if (tmp_path / "runs" / "x.partial").exists():  # the holder finished an epoch
        shutil.rmtree(tmp_path / "runs" / "x.partial")

    third = _script("train", *SMALL, "--data", tiny, "--out", "runs", "--name", "x", cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"taking over the lock runs/x.lock left by process {first.pid}" in third.stderr
    assert (tmp_path / "runs" / "x" / "model.keras").exists()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["x"]


def test_lock_is_exclusive_and_released_in_process(tmp_path):
    lock = rundir.RunLock.acquire(tmp_path / "a.lock", tmp_path / "a")
    with pytest.raises(cli.CliError, match=f"in use by process {os.getpid()}"):
        rundir.RunLock.acquire(tmp_path / "a.lock", tmp_path / "a")  # another open file
    lock.release()
    assert not (tmp_path / "a.lock").exists()
    again = rundir.RunLock.acquire(tmp_path / "a.lock", tmp_path / "a")
    again.release()


def test_injected_write_error_in_the_checkpoint_keeps_the_previous_one(tiny, tmp_path, monkeypatch):
    """An OSError (no space) writing epoch 2's checkpoint: exit 2, one line, and the
    checkpoint of epoch 1 is complete and loads."""
    original = rundir.atomic_write

    def full_disk(path, write):
        if Path(path).name == "epoch-0002.keras":
            raise OSError(28, "No space left on device")
        return original(path, write)

    monkeypatch.setattr(rundir, "atomic_write", full_disk)
    argv = ["train", *SMALL, "--data", tiny, "--epochs", "3", "--out", str(tmp_path)]
    code = cli.main([*argv, "--name", "f"])
    assert code == 2
    partial = tmp_path / "f.partial"
    state = json.loads((partial / "state.json").read_text())
    assert state["epoch"] == 1 and state["model_file"] == "epoch-0001.keras"
    assert sorted(p.name for p in partial.glob("epoch-*")) == ["epoch-0001.keras"]
    model = keras.saving.load_model(partial / "epoch-0001.keras")
    assert model.output_shape == (None, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.partial"]  # no lock, no run


def test_injected_write_error_in_the_commit_keeps_the_checkpoint(
    tiny, tmp_path, monkeypatch, capsys
):
    """An OSError writing the run's outputs: exit 2, one line, no half-written run, and
    `--resume` writes the outputs from the kept checkpoint."""
    from deepmetric.cli import rundir as module

    def fail(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(module, "write_projector", fail)
    args = ["train", *SMALL, "--data", tiny, "--out", str(tmp_path), "--name", "c"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Permission denied" in err and "epoch 1" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.partial"]
    monkeypatch.undo()
    assert cli.main(["train", "--resume", "--name", "c", "--out", str(tmp_path), "--quiet"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


DIVERGE = ["--loss", "multi_similarity", "--learning-rate", "1e30", "--steps-per-epoch", "3"]


@pytest.mark.slow
def test_training_stops_at_the_first_non_finite_loss(tiny, tmp_path):
    """Adam at rate 1e30: step 1's loss is finite, the update makes the weights huge, and
    step 2's forward pass overflows (multi-similarity gives NaN for NaN embeddings)."""
    argv = ["train", *SMALL, *DIVERGE, "--data", tiny, "--epochs", "2", "--out", "runs"]
    argv += ["--name", "d"]
    done = _script(*argv, cwd=tmp_path)
    line = _one_error_line(done, code=cli.EXIT_DIVERGED)
    assert "loss became nan at epoch 1, step 2" in line and "no checkpoint" in line, line
    assert not (tmp_path / "runs").exists()


def test_divergence_keeps_the_last_good_checkpoint(tiny, tmp_path, capsys):
    """A warm-up from rate 0: epoch 1 (rate 0) is checkpointed; epoch 2's step at rate 5e29
    makes every held-out embedding NaN, which stops the run before the checkpoint."""
    argv = ["train", *SMALL, *DIVERGE, "--data", tiny, "--steps-per-epoch", "1", "--epochs", "3"]
    argv += ["--schedule", "cosine", "--warmup-steps", "2", "--out", str(tmp_path)]
    assert cli.main([*argv, "--name", "g"]) == cli.EXIT_DIVERGED
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "after epoch 2" in err and "checkpoint of epoch 1" in err
    state = json.loads((tmp_path / "g.partial" / "state.json").read_text())
    assert state["epoch"] == 1 and len(state["history"]["loss"]) == 1
    model = keras.saving.load_model(tmp_path / "g.partial" / state["model_file"])
    assert all(np.isfinite(keras.ops.convert_to_numpy(w)).all() for w in model.weights)
