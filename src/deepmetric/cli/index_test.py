"""`deepmetric index` and `deepmetric search`, in-process and through the console script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from deepmetric import cli
from deepmetric.index import Index
from deepmetric.models import build_embedding_model

SCRIPT = Path(sys.executable).with_name("deepmetric")
CLASSES = ("cat", "dog", "owl")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An image folder (3 classes x 4 grey 8x8 PNGs), a tiny model, and its index."""
    root = tmp_path_factory.mktemp("search")
    rng = np.random.default_rng(0)
    folder = root / "photos"
    for c, name in enumerate(CLASSES):
        (folder / name).mkdir(parents=True)
        for i in range(4):
            pixels = np.clip(rng.normal(60 + 70 * c, 30, (8, 8)), 0, 255).astype("uint8")
            Image.fromarray(pixels, "L").save(folder / name / f"{i}.png")
    keras.utils.set_random_seed(0)
    model = build_embedding_model((8, 8, 1), 8, pixel_scale=1 / 255)
    model.save(root / "model.keras")
    index = root / "photos.index"
    args = ["index", str(root / "model.keras"), "--data", str(folder), "--out", str(index)]
    assert cli.main([*args, "--quiet"]) == 0
    return root, folder, index, model


def _env():
    return dict(os.environ, KERAS_BACKEND=keras.backend.backend())


def test_index_holds_labels_paths_and_the_embeddings(setup):
    root, folder, index_dir, model = setup
    index = Index.load(index_dir)
    files = [folder / c / f"{i}.png" for c in CLASSES for i in range(4)]
    assert len(index) == 12 and index.dim == 8
    assert index.labels.tolist() == [c for c in CLASSES for _ in range(4)]
    assert index.metadata == [str(f) for f in files]
    x = np.stack([np.asarray(Image.open(f))[..., None] for f in files]).astype("float32")
    np.testing.assert_allclose(index.vectors, model.predict(x, verbose=0), atol=1e-5)


def test_search_json_through_the_console_script(setup, tmp_path):
    root, folder, index_dir, model = setup
    query = folder / "dog" / "2.png"
    other = tmp_path / "other.png"
    Image.fromarray(np.full((8, 8), 200, "uint8"), "L").save(other)
    argv = ["search", str(index_dir), "--model", str(root / "model.keras")]
    done = subprocess.run(
        [str(SCRIPT), *argv, str(query), str(other), "-k", "4", "--json"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    document = json.loads(done.stdout)
    assert [q["query"] for q in document["queries"]] == [str(query), str(other)]
    index = Index.load(index_dir)
    for q, path in zip(document["queries"], (query, other), strict=True):
        x = np.asarray(Image.open(path), "float32")[None, ..., None]
        e = model.predict(x, verbose=0)[0].astype("float64")
        brute = np.linalg.norm(index.vectors.astype("float64") - e, axis=1)
        order = np.argsort(brute, kind="stable")[:4]
        assert [set(n) for n in q["neighbors"]] == [{"rank", "distance", "label", "metadata"}] * 4
        assert [n["rank"] for n in q["neighbors"]] == [1, 2, 3, 4]
        # squared: the search's float32 rounding near distance 0 is amplified by the sqrt
        distances = np.array([n["distance"] for n in q["neighbors"]])
        np.testing.assert_allclose(distances**2, brute[order] ** 2, atol=1e-5)
        assert [n["metadata"] for n in q["neighbors"]] == [index.metadata[i] for i in order]
        assert [n["label"] for n in q["neighbors"]] == index.labels[order].tolist()
    assert document["queries"][0]["neighbors"][0]["metadata"] == str(query)


def test_search_text_and_npz_queries(setup, tmp_path, capsys):
    root, folder, index_dir, _ = setup
    x = np.stack([np.asarray(Image.open(folder / "owl" / f"{i}.png"))[..., None] for i in (0, 3)])
    np.savez(tmp_path / "q.npz", x=x)
    argv = ["search", str(index_dir), "--model", str(root / "model.keras"), "-k", "20"]
    assert cli.main([*argv, str(tmp_path / "q.npz"), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [q["query"] for q in document["queries"]] == [0, 1]
    assert all(len(q["neighbors"]) == 12 for q in document["queries"])  # k > rows: every row
    firsts = [q["neighbors"][0] for q in document["queries"]]
    assert [n["metadata"] for n in firsts] == [str(folder / "owl" / f"{i}.png") for i in (0, 3)]
    assert cli.main([*argv, "-k", "2", str(folder / "cat" / "1.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"query {folder / 'cat' / '1.png'}" and len(lines) == 3
    rank, distance, label, path = lines[1].split()
    assert (rank, label, path) == ("1", "cat", str(folder / "cat" / "1.png"))
    assert abs(float(distance)) < 5e-3  # itself, up to float32 rounding


def test_index_refuses_to_overwrite_unless_forced(setup, tmp_path):
    root, folder, index_dir, _ = setup
    out = tmp_path / "i"
    base = ["index", str(root / "model.keras"), "--split", "test", "--out", str(out), "--quiet"]
    assert cli.main(base) == 0  # the digits' test split
    assert len(Index.load(out)) == 540 and Index.load(out).metadata is None
    stamp = (out / "index.json").stat().st_mtime_ns
    assert cli.main(base) == 2
    assert (out / "index.json").stat().st_mtime_ns == stamp
    assert cli.main([*base, "--force", "--data", str(folder), "--split", "all"]) == 0
    assert len(Index.load(out)) == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i"]  # no temporary folder left


def _damaged(root):
    damaged = root / "damaged.index"
    Index().add(np.eye(3, dtype="float32"), labels=[0, 1, 2]).save(damaged, overwrite=True)
    (damaged / "vectors.npy").write_bytes(b"garbage")
    return damaged


def test_errors_before_the_backend_exit_2_with_one_line(setup, tmp_path):
    """Through the console script: a missing or damaged index, k < 1, an existing --out."""
    root, folder, index_dir, _ = setup
    model, query = str(root / "model.keras"), str(folder / "cat" / "0.png")
    cases = {
        "missing index": ["search", str(tmp_path / "nowhere"), "--model", model, query],
        "damaged index": ["search", str(_damaged(tmp_path)), "--model", model, query],
        "k 0": ["search", str(index_dir), "--model", model, query, "-k", "0"],
        "missing query": ["search", str(index_dir), "--model", model, str(tmp_path / "q.png")],
        "existing out": ["index", model, "--out", str(index_dir)],
    }
    before = sorted(p.name for p in tmp_path.iterdir())
    for case, argv in cases.items():
        done = subprocess.run(
            [str(SCRIPT), *argv], capture_output=True, text=True, env=_env(), timeout=60
        )
        assert done.returncode == 2, (case, done.stderr)
        err = done.stderr
        assert err.startswith("deepmetric: error: ") and err.count("\n") == 1, (case, err)
        assert done.stdout == ""
    assert (
        "vectors.npy"
        in subprocess.run(
            [str(SCRIPT), *cases["damaged index"]], capture_output=True, text=True, env=_env()
        ).stderr
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# The console script's entry, called once per argv in one child Python (one keras start).
_CHILD = """
import contextlib, io, json, sys
from deepmetric_cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(argv)
    results.append([code, err.getvalue(), out.getvalue()])
print(json.dumps(results))
"""


def test_bad_queries_and_models_exit_2_with_one_line(setup, tmp_path):
    """A query of the wrong size or mode, a model of another embedding size."""
    root, folder, index_dir, _ = setup
    Image.fromarray(np.zeros((9, 8), "uint8"), "L").save(tmp_path / "big.png")
    Image.fromarray(np.zeros((8, 8, 3), "uint8"), "RGB").save(tmp_path / "rgb.png")
    np.savez(tmp_path / "flat.npz", x=np.zeros((2, 64), "float32"))
    other = build_embedding_model((8, 8, 1), 4, pixel_scale=1 / 255)
    other.save(tmp_path / "other.keras")
    model = str(root / "model.keras")
    search = ["search", str(index_dir), "--model"]
    cases = [
        [*search, model, str(tmp_path / "big.png")],
        [*search, model, str(tmp_path / "rgb.png")],
        [*search, model, str(tmp_path / "flat.npz")],
        [*search, str(tmp_path / "other.keras"), str(folder / "cat" / "0.png")],
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(cases)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    expected = ["8x9 pixels", "colour mode RGB", "shape (64,)", "size 4"]
    for (code, err, out), words in zip(results, expected, strict=True):
        assert code == 2 and out == "", err
        assert err.startswith("deepmetric: error: ") and err.count("\n") == 1, err
        assert words in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_help_and_early_errors_import_no_backend(setup, tmp_path):
    root, folder, index_dir, _ = setup
    child = (
        "import json, sys\n"
        "from deepmetric_cli import main\n"
        "code = main(json.loads(sys.argv[1]))\n"
        "heavy = {'keras', 'jax', 'tensorflow', 'torch', 'sklearn'}\n"
        "print(json.dumps([code, sorted({m.split('.')[0] for m in sys.modules} & heavy)]))\n"
    )
    model, query = str(root / "model.keras"), str(folder / "cat" / "0.png")
    for argv in (
        ["search", "--help"],
        ["index", "--help"],
        ["search", str(_damaged(tmp_path)), "--model", model, query],
        ["search", str(index_dir), "--model", model, query, "-k", "-1"],
        ["index", model, "--out", str(index_dir)],
    ):
        done = subprocess.run(
            [sys.executable, "-c", child, json.dumps(argv)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        code, heavy = json.loads(done.stdout.strip().splitlines()[-1])
        assert heavy == [] and code == (0 if "--help" in argv else 2), (argv, done.stderr)


def test_held_out_index_keeps_the_paths_and_splits_every_class():
    from deepmetric.cli.index import held_out_index
    from deepmetric.datasets import Dataset

    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], [4, 5, 2])
    dataset = Dataset(np.zeros((11, 2, 2, 1), "uint8"), y, ["a", "b", "c"], 1 / 255)
    rows = np.arange(11)[::-1]
    embeddings = (rng.normal(size=(11, 4)) + y[rows, None]).astype("float32")
    paths = [f"p/{i}.png" for i in range(11)]
    index = held_out_index(embeddings, dataset, rows, paths, seed=3)
    assert index.metadata == [paths[i] for i in rows]
    assert index.labels.tolist() == np.array(["a", "b", "c"])[y[rows]].tolist()
    assert index.calibration["gallery"] == 6 and index.calibration["queries"] == 5
    assert index.threshold == index.calibration["threshold"]


def test_index_with_the_faiss_engine_and_another_metric(setup, tmp_path):
    pytest.importorskip("faiss")
    root, folder, index_dir, _ = setup
    out = tmp_path / "f"
    args = ["index", str(root / "model.keras"), "--data", str(folder), "--out", str(out)]
    assert cli.main([*args, "--engine", "faiss", "--metric", "cosine", "--quiet"]) == 0
    loaded, exact = Index.load(out), Index.load(index_dir)
    assert (loaded.engine, loaded.metric) == ("faiss", "cosine")
    np.testing.assert_array_equal(loaded.vectors, exact.vectors)
    assert loaded.metadata == exact.metadata
    found = loaded.search(exact.vectors, k=1)
    assert found.indices[:, 0].tolist() == list(range(12))
