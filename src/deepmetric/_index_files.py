"""The on-disk form of a `deepmetric.index.Index`: a folder of open formats, no pickle.

- `index.json`: `{"format": "deepmetric.index", "version": 1, ...}` with the settings
  (metric, engine, structure and its options), the size and dimension, the label
  kind ("int", "str" or null), whether there is metadata, and the calibrated threshold;
- `vectors.npy`: the float32 (size, dim) embeddings;
- `labels.npy`: the (size,) integer or unicode labels, when the index has labels;
- `metadata.json`: a JSON list, one item per row, when the index has metadata;
- `faiss.index`: the faiss structure (`faiss.write_index`), for the faiss engine.

`write` fills a temporary folder beside the target and renames it into place, so a
reader never sees half an index. `read` checks every file against `index.json` and
raises `IndexFileError` naming the file that is missing, damaged or of another version.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "deepmetric.index"
VERSION = 1
SETTINGS = "index.json"


class IndexFileError(ValueError):
    """A saved index that cannot be read: a file missing, damaged or of another version."""


def write(directory, settings: dict, arrays: dict, metadata, faiss_index, *, overwrite: bool):
    """Writes an index folder atomically; `arrays` maps file names to numpy arrays."""
    target = Path(directory)
    if target.exists():
        if not overwrite:
            raise FileExistsError(
                f"{target} exists; pass overwrite=True to replace the index saved there."
            )
        if not target.is_dir() or (any(target.iterdir()) and not (target / SETTINGS).is_file()):
            raise FileExistsError(
                f"{target} exists and does not hold a saved index; overwrite=True only "
                "replaces an index folder (one with index.json) or an empty folder."
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for name, array in arrays.items():
            np.save(temp / name, array, allow_pickle=False)
        if metadata is not None:
            (temp / "metadata.json").write_text(json.dumps(metadata), encoding="utf-8")
        if faiss_index is not None:
            import faiss

            faiss.write_index(faiss_index, str(temp / "faiss.index"))
        settings = {"format": FORMAT, "version": VERSION, **settings}
        (temp / SETTINGS).write_text(json.dumps(settings, indent=2), encoding="utf-8")
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.rename(target, old / "index")
            os.rename(temp, target)
            shutil.rmtree(old)
        else:
            os.rename(temp, target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def check_metadata(metadata, n: int) -> list:
    """`metadata` as a list of n items that `json.dumps` can write."""
    metadata = list(metadata)
    if len(metadata) != n:
        raise ValueError(f"`metadata` must have one item per row: {n}. Received: {len(metadata)}")
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as error:
        raise TypeError(f"`metadata` items must be JSON-serialisable. Received: {error}") from None
    return metadata


def _damaged(path: Path, why: str) -> IndexFileError:
    return IndexFileError(f"{path}: {why}")


def read_settings(directory) -> dict[str, Any]:
    folder = Path(directory)
    if not folder.is_dir():
        raise IndexFileError(f"{folder}: no saved index here (not a folder)")
    path = folder / SETTINGS
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IndexFileError(f"{path}: missing; not a saved index") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _damaged(path, f"damaged ({error})") from None
    if not isinstance(settings, dict) or settings.get("format") != FORMAT:
        raise _damaged(path, f'not a deepmetric index (no "format": {FORMAT!r})')
    if settings.get("version") != VERSION:
        raise _damaged(
            path,
            f"format version {settings.get('version')!r}; this deepmetric reads version {VERSION}",
        )
    for key, kind in [("size", int), ("dim", int), ("metric", str), ("engine", str)]:
        if not isinstance(settings.get(key), kind):
            raise _damaged(path, f"{key!r} missing or not a {kind.__name__}")
    threshold = settings.setdefault("threshold", None)
    if threshold is not None and not isinstance(threshold, (int, float)):
        raise _damaged(path, "'threshold' must be a number or null")
    settings["threshold"] = None if threshold is None else float(threshold)
    if not isinstance(settings.setdefault("calibration", None), (dict, type(None))):
        raise _damaged(path, "'calibration' must be an object or null")
    return settings


def read_rows(directory, settings: dict, *, faiss: bool):
    """(vectors, labels or None, metadata or None, faiss structure or None), checked."""
    size, dim = settings["size"], settings["dim"]
    vectors = read_array(directory, "vectors.npy", (size, dim), "f")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    labels = metadata = structure = None
    if settings.get("labels") is not None:
        kinds = "U" if settings["labels"] == "str" else "iu"
        labels = read_array(directory, "labels.npy", (size,), kinds)
    if settings.get("metadata"):
        metadata = read_metadata(directory, size)
    if faiss:
        structure = read_faiss(directory, size, dim)
    return vectors, labels, metadata, structure


def read_array(directory, name: str, shape: tuple, kinds: str) -> np.ndarray:
    """`name` from the folder: its shape must be `shape`, its dtype kind one of `kinds`."""
    path = Path(directory) / name
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise IndexFileError(f"{path}: missing") from None
    except (OSError, ValueError, EOFError) as error:
        raise _damaged(path, f"damaged ({error})") from None
    if not isinstance(array, np.ndarray) or array.shape != shape or array.dtype.kind not in kinds:
        raise _damaged(
            path,
            f"expected shape {shape} of kind {kinds!r} as index.json says; found "
            f"shape {getattr(array, 'shape', None)}, dtype {getattr(array, 'dtype', None)}",
        )
    return array


def read_metadata(directory, size: int) -> list:
    path = Path(directory) / "metadata.json"
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IndexFileError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _damaged(path, f"damaged ({error})") from None
    if not isinstance(metadata, list) or len(metadata) != size:
        raise _damaged(path, f"expected a list of {size} items as index.json says")
    return metadata


def read_faiss(directory, size: int, dim: int):
    import faiss

    path = Path(directory) / "faiss.index"
    if not path.is_file():
        raise IndexFileError(f"{path}: missing")
    try:
        structure = faiss.read_index(str(path))
    except RuntimeError as error:
        raise _damaged(path, f"damaged ({str(error).splitlines()[0]})") from None
    if structure.ntotal != size or structure.d != dim:
        raise _damaged(
            path,
            f"holds {structure.ntotal} vectors of dimension {structure.d}; index.json says "
            f"{size} of dimension {dim}",
        )
    return structure
