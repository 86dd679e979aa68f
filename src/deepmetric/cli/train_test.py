"""`deepmetric train` and the commands on its run, in-process and through the console script."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from deepmetric import cli, datasets
from deepmetric.cli import train as train_command
from deepmetric.evaluation import pair_distances, verification_metrics, verification_pairs
from deepmetric.index import Index

SMALL = ["--epochs", "1", "--classes-per-batch", "4", "--samples-per-class", "4"]
SMALL += ["--steps-per-epoch", "3", "--embedding-dim", "8", "--quiet"]
METRICS = {"precision_at_1", "r_precision", "map_at_r", "mrr", "nmi", "ami"}
METRICS |= {f"recall_at_{k}" for k in (1, 2, 4, 8)}
RUN_FILES = {
    "model.keras",
    "metrics.json",
    "config.json",
    "history.csv",
    "vecs.tsv",
    "meta.tsv",
    "sprite.png",
    "projector_config.pbtxt",
    "map_before.png",
    "map_after.png",
    "training_curves.png",
    "index",
    "report.html",
    "roc.png",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One small training run on the digits, shared by the tests of its outputs."""
    out = tmp_path_factory.mktemp("runs")
    assert cli.main(["train", *SMALL, "--out", str(out), "--name", "small"]) == 0
    return out / "small"


def test_train_writes_every_output(run):
    assert {p.name for p in run.iterdir()} == RUN_FILES
    assert not list(run.parent.glob(".*")) and not list(run.parent.glob("*.partial"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"before", "after", "calibration", "verification"}
    for side in ("before", "after"):
        assert set(metrics[side]) == METRICS
        assert all(0.0 <= v <= 1.0 for v in metrics[side].values())
    rows = list(csv.DictReader((run / "history.csv").open()))
    assert len(rows) == 1 and rows[0]["epoch"] == "1"
    assert {"loss", "learning_rate", "val_map_at_r", "val_precision_at_1"} <= set(rows[0])
    vecs = np.loadtxt(run / "vecs.tsv", delimiter="\t")
    meta = (run / "meta.tsv").read_text().splitlines()
    assert vecs.shape == (540, 8) and meta[0] == "label\tclass" and len(meta) == 541
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-4)
    assert "single_image_dim: 32" in (run / "projector_config.pbtxt").read_text()
    for png in ("sprite.png", "map_before.png", "map_after.png", "training_curves.png"):
        with Image.open(run / png) as image:
            assert image.format == "PNG"
    config = json.loads((run / "config.json").read_text())
    assert config["epochs_trained"] == 1 and config["loss"] == "triplet_semihard"


def test_train_writes_the_calibrated_index_of_the_held_out_split(run):
    """index/ holds the 540 held-out embeddings (vecs.tsv) and the threshold of metrics.json,
    chosen by Index.calibrate on the query half against an index of the gallery half."""
    index = Index.load(run / "index")
    vecs = np.loadtxt(run / "vecs.tsv", delimiter="\t")
    np.testing.assert_allclose(index.vectors, vecs, atol=1e-6)
    names = [line.split("\t")[1] for line in (run / "meta.tsv").read_text().splitlines()[1:]]
    assert index.labels.tolist() == names and index.metadata is None
    calibration = json.loads((run / "metrics.json").read_text())["calibration"]
    assert set(calibration) == {"threshold", "precision", "recall", "f1", "accuracy"} | {
        "gallery",
        "queries",
    }
    assert calibration["gallery"] + calibration["queries"] == 540
    assert index.threshold == calibration["threshold"]
    assert all(0.0 <= calibration[k] <= 1.0 for k in ("precision", "recall", "f1", "accuracy"))
    # the same halves, by hand: classes sorted, shuffled with the seed, dealt in turn
    labels = index.labels
    order = np.random.default_rng(0).permutation(540)
    order = order[np.argsort(labels[order], kind="stable")]
    gallery = Index().add(index.vectors[order[0::2]], labels=labels[order[0::2]])
    again = gallery.calibrate(index.vectors[order[1::2]], labels[order[1::2]])
    assert again.threshold == pytest.approx(calibration["threshold"], abs=1e-5)
    assert again.f1 == pytest.approx(calibration["f1"], abs=1e-6)
    matched = index.match(index.vectors[:5])
    assert matched.tolist() == labels[:5].tolist()  # each row finds itself at distance 0


def test_train_writes_the_verification_figures_of_held_out_pairs(run):
    """metrics.json's "verification": verification_metrics of 3,000 same-class and 3,000
    different-class pairs of the held-out split (verification_pairs, seeded with --seed),
    on the trained model's held-out embeddings (index/, as vecs.tsv) and the untrained one's."""
    entry = json.loads((run / "metrics.json").read_text())["verification"]
    assert set(entry) == {"pairs", "seed", "metric", "before", "after"}
    assert (entry["pairs"], entry["seed"], entry["metric"]) == (3000, 0, "euclidean")
    index = Index.load(run / "index")
    y = np.array([int(name) for name in index.labels])  # the digits' classes are "0".."9"
    first, second, same = verification_pairs(y, 3000, seed=0)
    expected = verification_metrics(pair_distances(index.vectors, first, second), same)
    after = entry["after"]
    assert set(after) == set(expected) == set(entry["before"])
    for key in ("roc_auc", "eer", "eer_threshold", "best_accuracy", "best_threshold"):
        assert after[key] == pytest.approx(expected[key], abs=1e-6), key
    assert {float(f): v for f, v in after["tar_at_far"].items()} == pytest.approx(
        expected["tar_at_far"], abs=1e-6
    )


def test_train_writes_the_html_report(run):
    """report.html: one self-contained page with the metrics, the figures, the ROC curve and
    the gallery of held-out queries (its rendering is tested in deepmetric/report_test.py)."""
    page = (run / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for part in ('id="metrics"', 'id="verification"', 'id="figures"', 'id="gallery"'):
        assert part in page, part
    assert page.count('class="query"') == 40  # max_queries of the 540 held-out examples
    assert "map after training" in page and "<script" not in page


def test_saved_model_loads_in_safe_mode_and_embeds(run, tmp_path):
    model = keras.saving.load_model(run / "model.keras", safe_mode=True)
    assert model.input_shape == (None, 8, 8, 1)
    out = tmp_path / "e.npy"
    assert cli.main(["embed", str(run / "model.keras"), "--output", str(out), "--quiet"]) == 0
    assert np.load(out).shape == (1797, 8)
    tsv = tmp_path / "e.tsv"
    args = ["embed", str(run / "model.keras"), "--split", "test", "--output", str(tsv)]
    assert cli.main([*args, "--quiet"]) == 0
    assert np.loadtxt(tsv, delimiter="\t").shape == (540, 8)


def test_evaluate_matches_train_metrics(run, tmp_path, capsys):
    path = tmp_path / "m.json"
    args = ["evaluate", str(run / "model.keras"), "--split", "test", "--json", str(path)]
    assert cli.main(args) == 0
    assert "map_at_r" in capsys.readouterr().out
    after = json.loads((run / "metrics.json").read_text())["after"]
    assert json.loads(path.read_text())["map_at_r"] == pytest.approx(after["map_at_r"], abs=1e-4)


def test_export_command(run, tmp_path):
    out = tmp_path / "proj"
    args = ["export", str(run / "model.keras"), "--split", "test", "--out", str(out), "--quiet"]
    assert cli.main(args) == 0
    assert {p.name for p in out.iterdir()} == {
        "vecs.tsv",
        "meta.tsv",
        "sprite.png",
        "projector_config.pbtxt",
        "map.png",
    }


def test_resume_after_interruption(tmp_path, monkeypatch):
    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise KeyboardInterrupt

    original = train_command.callbacks
    monkeypatch.setattr(train_command, "callbacks", lambda *a: [*original(*a), Interrupt()])
    args = ["train", *SMALL, "--epochs", "2", "--data", "digits", "--out", str(tmp_path)]
    assert cli.main([*args, "--name", "r"]) == cli.EXIT_INTERRUPTED
    assert not (tmp_path / "r").exists()
    state = json.loads((tmp_path / "r.partial" / "state.json").read_text())
    assert state["epoch"] == 1 and len(state["history"]["loss"]) == 1

    monkeypatch.setattr(train_command, "callbacks", original)
    resume = ["train", "--resume", "--name", "r", "--out", str(tmp_path), "--quiet"]
    assert cli.main([*resume, "--split", "classes"]) == cli.EXIT_USAGE  # fixed on resume
    assert cli.main([*resume, "--split", "samples"]) == 0
    rows = list(csv.DictReader((tmp_path / "r" / "history.csv").open()))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert json.loads((tmp_path / "r" / "config.json").read_text())["epochs_trained"] == 2
    assert not (tmp_path / "r.partial").exists()


@pytest.mark.slow
def test_train_on_the_glyphs_with_a_fixed_split_seed(tmp_path):
    """`--data glyphs` trains on the bundled many-class glyphs; `--split-seed` draws the
    held-out classes apart from `--seed` (the weights and batches)."""
    args = ["train", *SMALL, "--data", "glyphs", "--split", "classes", "--test-size", "0.1"]
    assert cli.main([*args, "--seed", "1", "--split-seed", "5", "--out", str(tmp_path)]) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    config = json.loads((run / "config.json").read_text())
    assert config["data"] == "glyphs" and config["split_seed"] == 5 and config["seed"] == 1
    glyphs = datasets.load_glyphs()
    _, test = datasets.split_classes(glyphs.y, 0.1, seed=5)
    _, other = datasets.split_classes(glyphs.y, 0.1, seed=1)
    names = np.asarray(glyphs.class_names)
    meta = (run / "meta.tsv").read_text(encoding="utf-8").splitlines()[1:]
    held_out = sorted({line.split("\t")[1] for line in meta})
    assert held_out == sorted(set(names[glyphs.y[test]])) != sorted(set(names[glyphs.y[other]]))
    assert len(held_out) == round(0.1 * len(names)) and config["num_train"] == len(glyphs.y) - len(
        test
    )
    metrics = json.loads((run / "metrics.json").read_text())["after"]
    assert 0 < metrics["map_at_r"] <= 1


def test_console_script(run, tmp_path):
    script = Path(sys.executable).with_name("deepmetric")
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend())
    done = subprocess.run(
        [str(script), "evaluate", str(run / "model.keras"), "--split", "test"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "precision_at_1" in done.stdout


def test_console_entry_imports_keras_after_the_arguments(run, tmp_path):
    """`deepmetric_cli` (the console script's entry) loads the model with deepmetric lazy."""
    env = dict(os.environ, KERAS_BACKEND="jax")
    argv = ["evaluate", str(run / "model.keras"), "--split", "test"]
    done = subprocess.run(
        [sys.executable, "-m", "deepmetric_cli", *argv, "--backend", keras.backend.backend()],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "precision_at_1" in done.stdout


HEADS = [
    "arcface",
    "cosface",
    "sub_center_arcface",
    "normalized_softmax",
    "proxy_nca",
    "proxy_anchor",
]


@pytest.mark.parametrize("head", HEADS)
def test_heads_train_and_save_the_embedder(head, tmp_path, monkeypatch):
    """`--loss HEAD` trains a head on top of the embedder; the run saves the embedder alone.

    With `--split classes` the 3 held-out digits (`datasets.split_classes`) are never seen
    in training: the head has one proxy for each of the 7 training classes, and the
    held-out examples (meta.tsv) are all the examples of the 3 others.
    """
    proxies = []
    trainer = train_command.Objective.trainer

    def spy(self, embedder, num_classes):
        proxies.append(num_classes)
        return trainer(self, embedder, num_classes)

    monkeypatch.setattr(train_command.Objective, "trainer", spy)
    args = ["train", *SMALL, "--loss", head, "--split", "classes"]
    assert cli.main([*args, "--out", str(tmp_path), "--name", "h"]) == 0
    assert proxies == [7]
    model = keras.saving.load_model(tmp_path / "h" / "model.keras", safe_mode=True)
    assert len(model.inputs) == 1 and tuple(model.outputs[0].shape) == (None, 8)
    config = json.loads((tmp_path / "h" / "config.json").read_text())
    assert config["loss"] == head and config["split"] == "classes"
    digits = datasets.load_digits()
    _, test = datasets.split_classes(digits.y, 0.3, seed=0)
    meta = (tmp_path / "h" / "meta.tsv").read_text().splitlines()[1:]
    held_out = sorted(int(line.split("\t")[1]) for line in meta)
    assert held_out == sorted(digits.y[test].tolist()) and len(set(held_out)) == 3
    assert config["num_train"] == 1797 - len(test)
    rows = list(csv.DictReader((tmp_path / "h" / "history.csv").open()))
    assert np.isfinite(float(rows[0]["loss"])) and "val_map_at_r" in rows[0]
    assert cli.main(["evaluate", str(tmp_path / "h" / "model.keras"), "--split", "test"]) == 0


@pytest.mark.parametrize("head", ["cosface", "proxy_anchor"])
def test_head_on_labels_that_are_not_0_to_c_minus_1(head, tmp_path):
    """Labels 5, 9, 42 become proxy indices 0, 1, 2 (the sorted unique training labels)."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.array([5, 9, 42]), 20)
    x = (rng.normal(size=(60, 6)) + y[:, None] / 10.0).astype("float32")
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = ["--data", str(tmp_path / "d.npz"), "--classes-per-batch", "3"]
    args = ["train", *SMALL, *data, "--loss", head, "--out", str(tmp_path), "--name", "g"]
    assert cli.main(args) == 0
    model = keras.saving.load_model(tmp_path / "g" / "model.keras", safe_mode=True)
    assert tuple(model.outputs[0].shape) == (None, 8)
    rows = list(csv.DictReader((tmp_path / "g" / "history.csv").open()))
    assert np.isfinite(float(rows[0]["loss"]))


def test_head_resume_keeps_the_proxies(tmp_path, monkeypatch):
    """The checkpoint is the trainer (proxies and optimizer included); resuming continues it."""

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise KeyboardInterrupt

    original = train_command.callbacks
    monkeypatch.setattr(train_command, "callbacks", lambda *a: [*original(*a), Interrupt()])
    args = ["train", *SMALL, "--epochs", "2", "--loss", "proxy_anchor", "--out", str(tmp_path)]
    assert cli.main([*args, "--name", "r"]) == cli.EXIT_INTERRUPTED
    partial = tmp_path / "r.partial"
    state = json.loads((partial / "state.json").read_text())
    trainer = keras.saving.load_model(partial / state["model_file"], safe_mode=True)
    proxies = keras.ops.convert_to_numpy(trainer.layers[-1].proxies)
    assert proxies.shape == (10, 8)

    monkeypatch.setattr(train_command, "callbacks", original)
    seen = []

    def spy(*a):
        callbacks = original(*a)

        class Check(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                seen.append(keras.ops.convert_to_numpy(self.model.layers[-1].proxies))

        return [Check(), *callbacks]

    monkeypatch.setattr(train_command, "callbacks", spy)
    assert cli.main(["train", "--resume", "--name", "r", "--out", str(tmp_path), "--quiet"]) == 0
    np.testing.assert_array_equal(seen[0], proxies)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["epochs_trained"] == 2


def test_interrupt_guard_keeps_a_ctrl_c_that_was_swallowed():
    """SIGINT raises KeyboardInterrupt and sets the flag; were the exception dropped (as native
    code under JAX did), `check()` at the next batch raises it again; the handler is restored."""
    import signal

    from deepmetric.cli.train import InterruptGuard

    # pytest-xdist's workers ignore SIGINT (where the guard rightly installs nothing): the
    # default handler of a command-line process, for this test.
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _check_interrupt_guard(InterruptGuard())
    finally:
        signal.signal(signal.SIGINT, outer)


def _check_interrupt_guard(guard):
    import os
    import signal

    before = signal.getsignal(signal.SIGINT)
    with guard.installed():
        guard.on_train_batch_end(0)  # nothing yet
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs at the next bytecodes
                pass
        except KeyboardInterrupt:
            pass  # swallowed, as by the native code
        assert guard.interrupted
        with pytest.raises(KeyboardInterrupt):
            guard.on_train_batch_begin(1)
    assert signal.getsignal(signal.SIGINT) is before
