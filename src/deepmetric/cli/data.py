"""Data, models and metrics as the commands use them: bad input becomes a CliError."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import keras
import numpy as np

from deepmetric import datasets
from deepmetric.cli.parser import BUNDLED_DATA, CliError, note
from deepmetric.evaluation import retrieval_metrics

SKIPPED = "skipping unreadable image "


def load_data(spec: str) -> datasets.Dataset:
    """`deepmetric.datasets.load(spec)`; an unreadable image is noted, not fatal."""
    return load_data_and_paths(spec)[0]


def load_data_and_paths(spec: str) -> tuple[datasets.Dataset, list[str] | None]:
    """`load_data(spec)` and, for a folder of class folders, the file of each example.

    The paths are those `deepmetric.datasets.load` reads, in its order (sorted class
    folders, sorted files, hidden names left out), without the unreadable files it skips,
    as `<spec>/<class>/<file>`; None for the other kinds of data.
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data = datasets.load(spec)
    except datasets.DataError as e:
        raise CliError(str(e)) from None
    skipped = set()
    for w in caught:
        if SKIPPED in str(w.message):
            note(f"warning: {w.message}")
            skipped.add(str(w.message).split(SKIPPED, 1)[1].rsplit(": ", 1)[0])
    return data, _image_paths(spec, data, skipped)


def _image_paths(spec: str, data: datasets.Dataset, skipped: set[str]) -> list[str] | None:
    folder = Path(os.path.expanduser(str(spec)))
    if spec in BUNDLED_DATA or not folder.is_dir() or not data.is_image:
        return None
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths = [
        str(f)
        for c in classes
        for f in sorted((folder / c).iterdir())
        if f.is_file() and not f.name.startswith(".") and str(f) not in skipped
    ]
    return paths if len(paths) == len(data.x) else None


def label_names(data: datasets.Dataset, y) -> np.ndarray:
    """The class names of the integer labels `y`: the labels of the indexes the commands write."""
    names = np.asarray(data.class_names, dtype=str)
    return names[np.asarray(y, dtype="int64")]


def split_indices(
    data, test_size: float, seed: int, by: str = "samples"
) -> tuple[np.ndarray, np.ndarray]:
    """The rows of the train and test parts of `split` (`datasets.split_indices(by=by)`:
    held-out samples of every class, or held-out classes).

    With `by="samples"`, a CliError naming the class (its folder for an image folder) of a
    class with 1 example.
    """
    counts = np.bincount(np.asarray(data.y, dtype="int64"), minlength=len(data.class_names))
    single = [data.class_names[i] for i in np.flatnonzero(counts == 1)]
    if single and by == "samples":
        more = f" (and {len(single) - 1} more: {', '.join(single[1:6])})" if single[1:] else ""
        raise CliError(
            f"class {single[0]!r}{more} has 1 example; the stratified split of the data "
            "needs at least 2 per class"
        )
    try:
        return datasets.split_indices(data.y, by=by, test_size=test_size, seed=seed)
    except datasets.DataError as e:
        raise CliError(str(e).replace("test_size=", "--test-size ")) from None


def select_indices(data, part: str, test_size: float, seed: int) -> np.ndarray:
    """The rows of `part`: "all", or the "train" / "test" part of `split`."""
    if part == "all":
        return np.arange(len(data.y))
    train, test = split_indices(data, test_size, seed)
    return train if part == "train" else test


def split(data, test_size: float, seed: int):
    """The stratified train/test split of `deepmetric train`: x_train, x_test, y_train, y_test.

    `train_test_split(x, y, test_size, stratify=y, random_state=seed)`, by `split_indices`.
    """
    train, test = split_indices(data, test_size, seed)
    return data.x[train], data.x[test], data.y[train], data.y[test]


def select(data, part: str, test_size: float, seed: int):
    """(x, y) of `part`: "all", or the "train" / "test" part of `split`."""
    rows = select_indices(data, part, test_size, seed)
    return (data.x, data.y) if part == "all" else (data.x[rows], data.y[rows])


def load_model(path: str) -> keras.Model:
    """The saved model at `path`, loaded in safe mode without compiling it."""
    if not os.path.exists(path):
        raise CliError(f"{path}: no such model file")
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as e:
        raise CliError(f"{path}: cannot load the model ({type(e).__name__}: {e})") from None


def embed(model, x, batch_size: int = 256) -> np.ndarray:
    """The model's float32 embeddings of `x`; CliError if the shapes do not match."""
    expected = tuple(model.input_shape[1:])
    if len(expected) != x.ndim - 1 or any(
        e is not None and e != s for e, s in zip(expected, x.shape[1:], strict=True)
    ):
        raise CliError(
            f"the model takes inputs of shape {expected}, the data has shape {x.shape[1:]}"
        )
    return np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype="float32")


def metrics(embeddings, labels, *, recall_at=(1, 2, 4, 8), seed=0) -> dict[str, float]:
    """The retrieval and clustering metrics of `deepmetric.evaluation`, as floats."""
    values = retrieval_metrics(
        embeddings, labels, recall_at=tuple(recall_at), clustering=True, seed=seed
    )
    return {k: float(v) for k, v in values.items()}


def format_table(columns: dict[str, dict[str, float]]) -> str:
    """A text table: one row per metric, one column per dict."""
    rows = list(dict.fromkeys(k for col in columns.values() for k in col))
    width = max([len("metric"), *map(len, rows)])
    lines = ["metric".ljust(width) + "".join(f"  {h:>8}" for h in columns)]
    for name in rows:
        cells = "".join(
            f"  {col[name]:8.4f}" if name in col else f"  {'-':>8}" for col in columns.values()
        )
        lines.append(name.ljust(width) + cells)
    return "\n".join(lines)
