"""Exact resume of `deepmetric train`: a real training process, stopped at random points.

The run is stopped twice, each time a random (seeded) delay after its checkpoint gained an
epoch, so in the middle of the next epoch (a batch, the per-epoch metrics or the checkpoint
write): once with Ctrl-C (SIGINT), once with kill -9 (SIGKILL) while it runs on from the
first stop. Resumed to the end, it must give the weights and the history of the same run
left alone, bit for bit, on every backend (docs/cli.md, "Exact resume").
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from deepmetric import cli

SCRIPT = Path(sys.executable).with_name("deepmetric")
RUN = ["--epochs", "16", "--steps-per-epoch", "4", "--classes-per-batch", "4"]
RUN += ["--samples-per-class", "4", "--embedding-dim", "8", "--quiet"]
MAX_DELAY = 0.1  # seconds after a checkpoint: inside the run on a fast machine too


def _start(args: list[str], out: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend())
    with log.open("a") as err:
        return subprocess.Popen(
            [str(SCRIPT), "train", *args, "--out", str(out)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            # Ctrl-C must reach the child even where the tests run with SIGINT ignored
            # (started in the background by a shell without job control)
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )


def _epochs_saved(partial: Path) -> int:
    try:
        return json.loads((partial / "state.json").read_text())["epoch"]
    except (OSError, ValueError):  # no checkpoint yet
        return 0


def _stop(child: subprocess.Popen, partial: Path, after: int, delay: float, sig, log: Path):
    """Sends `sig` `delay` seconds after the checkpoint holds `after` epochs; the exit code."""
    deadline = time.monotonic() + 300
    while _epochs_saved(partial) < after:
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            pytest.fail(f"the run ended before epoch {after}:\n{log.read_text()[-3000:]}")
        time.sleep(0.005)
    time.sleep(delay)
    child.send_signal(sig)
    return child.wait(timeout=120)


def _weights(run: Path) -> list[np.ndarray]:
    return keras.saving.load_model(run / "model.keras", safe_mode=True).get_weights()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_run_stopped_by_ctrl_c_and_kill_9_resumes_to_the_same_weights(tmp_path):
    rng = random.Random(12)
    assert cli.main(["train", *RUN, "--out", str(tmp_path), "--name", "whole"]) == 0

    partial, log = tmp_path / "cut.partial", tmp_path / "children.log"
    child = _start([*RUN, "--name", "cut"], tmp_path, log)
    code = _stop(child, partial, 1, rng.uniform(0, MAX_DELAY), signal.SIGINT, log)
    assert code == cli.EXIT_INTERRUPTED, (code, log.read_text()[-3000:])
    first = _epochs_saved(partial)
    assert 1 <= first < 16 and not (tmp_path / "cut").exists()

    child = _start(["--resume", "--name", "cut", "--quiet"], tmp_path, log)
    code = _stop(child, partial, first + 1, rng.uniform(0, MAX_DELAY), signal.SIGKILL, log)
    assert code == -signal.SIGKILL, (code, log.read_text()[-3000:])
    assert _epochs_saved(partial) > first and not (tmp_path / "cut").exists()

    args = ["train", "--resume", "--name", "cut", "--out", str(tmp_path), "--quiet"]
    assert cli.main(args) == 0
    for a, b in zip(_weights(tmp_path / "whole"), _weights(tmp_path / "cut"), strict=True):
        np.testing.assert_array_equal(a, b)
    for name in ("history.csv", "metrics.json"):
        assert (tmp_path / "whole" / name).read_text() == (tmp_path / "cut" / name).read_text()
