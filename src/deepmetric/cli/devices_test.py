"""`deepmetric train --devices N` and `--grad-cache-chunk C`."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from deepmetric import cli
from deepmetric.gradcache import GradCacheModel

SMALL = ["--epochs", "1", "--classes-per-batch", "4", "--samples-per-class", "4"]
SMALL += ["--steps-per-epoch", "2", "--embedding-dim", "4", "--quiet"]
BACKEND = keras.backend.backend()


@pytest.fixture
def tiny_data(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(6), 12)
    x = (rng.normal(size=(len(y), 5)) + y[:, None]).astype("float32")
    path = tmp_path / "data" / "tiny.npz"
    path.parent.mkdir()
    np.savez(path, x=x, y=y)
    return str(path)


CHECK_BEFORE_KERAS = """
import json, sys
import deepmetric_cli
codes = [deepmetric_cli.main(argv) for argv in json.loads(sys.argv[1])]
print(json.dumps({"codes": codes, "keras": "keras" in sys.modules}))
"""


@pytest.mark.multiprocess
def test_bad_values_exit_2_with_one_line_before_keras_loads(tmp_path):
    out = ["--out", str(tmp_path)]
    bad = [
        ["train", "--devices", "0", *out],
        ["train", "--devices", "two", *out],
        ["train", "--grad-cache-chunk", "0", *out],
        ["train", "--grad-cache-chunk", "8", "--loss", "arcface", *out],
        ["train", "--devices", "2", "--backend", "torch", *out],
    ]
    done = subprocess.run(
        [sys.executable, "-c", CHECK_BEFORE_KERAS, json.dumps(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, XLA_FLAGS=""),
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"codes": [2] * len(bad), "keras": False}
    lines = done.stderr.strip().splitlines()
    assert len(lines) == len(bad) and all(line.startswith("deepmetric: error: ") for line in lines)
    assert "--devices: expected a positive integer, got '0'" in lines[0]
    assert "got 'two'" in lines[1]
    assert "--grad-cache-chunk: expected a positive integer" in lines[2]
    assert "head 'arcface'" in lines[3]
    assert "torchrun" in lines[4] and "docs/cli.md" in lines[4]
    assert not list(tmp_path.iterdir())  # nothing written


def test_more_devices_than_available_exit_2_before_training(tmp_path, tiny_data, capsys):
    keras.ops.convert_to_numpy(keras.ops.ones(1))  # the backend has started: devices fixed
    argv = [
        "train",
        "--data",
        tiny_data,
        *SMALL,
        "--devices",
        "64",
        "--out",
        str(tmp_path / "runs"),
    ]
    assert cli.main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    if BACKEND == "torch":
        assert "torchrun" in line
    else:
        assert f"--devices 64: the {BACKEND} backend has " in line and "cpu" in line.lower()
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_grad_cache_chunk_trains_and_saves_the_embedder(tmp_path, tiny_data):
    argv = ["train", "--data", tiny_data, *SMALL, "--grad-cache-chunk", "5"]
    assert cli.main([*argv, "--out", str(tmp_path / "runs"), "--name", "r"]) == 0
    model = keras.saving.load_model(tmp_path / "runs" / "r" / "model.keras", safe_mode=True)
    assert not isinstance(model, GradCacheModel)
    assert (
        json.loads((tmp_path / "runs" / "r" / "config.json").read_text())["grad_cache_chunk"] == 5
    )


@pytest.mark.slow
@pytest.mark.multiprocess
def test_devices_2_trains_end_to_end_and_writes_the_run_once(tmp_path, tiny_data):
    """A fresh process (jax: 2 host CPUs through XLA_FLAGS set by the command; tensorflow: the
    CPU split in two logical devices) trains on 2 devices, with gradient caching on top."""
    env = dict(os.environ, KERAS_BACKEND=BACKEND, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="3")
    argv = ["train", "--data", tiny_data, *SMALL, "--devices", "2", "--grad-cache-chunk", "6"]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepmetric_cli",
            *argv,
            "--out",
            str(tmp_path / "runs"),
            "--name",
            "r",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    if BACKEND == "torch":
        assert done.returncode == 2 and "torchrun" in done.stderr
        assert not (tmp_path / "runs").exists()
        return
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [
        "r"
    ]  # one run, no partial or temporary
    config = json.loads((tmp_path / "runs" / "r" / "config.json").read_text())
    assert config["devices"] == 2 and config["grad_cache_chunk"] == 6
    assert (tmp_path / "runs" / "r" / "model.keras").is_file()
