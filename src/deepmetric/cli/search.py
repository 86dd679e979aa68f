"""`deepmetric search DIR --model MODEL QUERY...`: the nearest neighbours of queries in an index.

A QUERY is an image file, or an `.npz` whose array `x` holds one query per row (feature
vectors or images, as the data sets of --data). An image must have exactly the size and
the colour mode the model takes: grey ("L" or "1") for one channel, "RGB" for three; it
is not resized or converted, so that a mismatch is an error rather than a silent change.
Pixels are passed as stored (0..255), as the image folders of `deepmetric train` are.

Per query the output lists rank, distance, label and metadata (the file path for an
index of an image folder) of its k nearest rows, nearest first. `--json` prints
`{"queries": [{"query": ..., "neighbors": [{"rank", "distance", "label", "metadata"}]}]}`,
where "query" is the file name of an image and the row number (an int) of an `.npz`
row, in the order of the arguments. An approximate index that finds fewer than k rows
lists fewer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from deepmetric.cli import data
from deepmetric.cli.parser import CliError

GREY_MODES = ("L", "1")


def read_queries(paths, input_shape) -> tuple[list, np.ndarray]:
    """(the name of each query, their inputs stacked); CliError for a query that does not fit."""
    names: list = []
    arrays = []
    shape = tuple(input_shape)
    for path in paths:
        if Path(path).suffix.lower() == ".npz":
            x = _read_npz(path)
            names.extend(range(len(x)))
        else:
            x = _read_image(path, shape)[None]
            names.append(path)
        if x.ndim - 1 != len(shape) or any(
            e is not None and e != s for e, s in zip(shape, x.shape[1:], strict=True)
        ):
            raise CliError(f"{path}: queries of shape {x.shape[1:]}, the model takes {shape}")
        arrays.append(x.astype("float32"))
    return names, np.concatenate(arrays)


def _read_npz(path: str) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive.files:
                raise CliError(f"{path}: no array 'x' (it has {sorted(archive.files)})")
            x = archive["x"]
    except CliError:
        raise
    except Exception as e:
        raise CliError(f"{path}: unreadable .npz ({type(e).__name__}: {e})") from None
    if x.ndim == 3:
        x = x[..., None]
    if not len(x) or x.dtype.kind not in "biuf":
        raise CliError(f"{path}: 'x' must hold at least one row of numbers")
    return x


def _read_image(path: str, shape: tuple) -> np.ndarray:
    from PIL import Image

    if len(shape) != 3 or shape[-1] not in (1, 3):
        raise CliError(f"{path}: the model takes inputs of shape {shape}, not images")
    height, width, channels = shape
    try:
        with Image.open(path) as image:
            image.load()
            mode, size = image.mode, image.size
            wanted = GREY_MODES if channels == 1 else ("RGB",)
            if mode not in wanted:
                raise CliError(
                    f"{path}: colour mode {mode}, the model takes {'/'.join(wanted)} images"
                )
            if (height is not None and size[1] != height) or (
                width is not None and size[0] != width
            ):
                raise CliError(
                    f"{path}: {size[0]}x{size[1]} pixels, the model takes {width}x{height}"
                )
            pixels = np.asarray(image.convert("L") if channels == 1 else image, dtype="uint8")
    except CliError:
        raise
    except Exception as e:
        raise CliError(f"{path}: unreadable image ({type(e).__name__})") from None
    return pixels[..., None] if channels == 1 else pixels


def results(names, found) -> dict:
    """The JSON document of `--json` from the queries' names and `Index.search`'s result."""
    queries = []
    for i, name in enumerate(names):
        neighbors = []
        for j, row in enumerate(found.indices[i].tolist()):
            if row < 0:
                continue
            label = None if found.labels is None else found.labels[i][j].item()
            neighbors.append(
                {
                    "rank": j + 1,
                    "distance": float(found.distances[i, j]),
                    "label": label,
                    "metadata": None if found.metadata is None else found.metadata[i][j],
                }
            )
        queries.append({"query": name, "neighbors": neighbors})
    return {"queries": queries}


def format_text(document: dict) -> str:
    """One block per query: its name, then rank, distance, label and metadata per line."""
    lines = []
    for query in document["queries"]:
        lines.append(f"query {query['query']}")
        for n in query["neighbors"]:
            meta = n["metadata"]
            if meta is not None and not isinstance(meta, str):
                meta = json.dumps(meta)
            meta = "" if meta is None else f"  {meta}"
            distance = n["distance"]
            shown = f"{distance:10.6f}" if math.isfinite(distance) else f"{distance:>10}"
            lines.append(f"  {n['rank']:3d}  {shown}  {n['label']}{meta}")
    return "\n".join(lines)


def run(args) -> int:
    index = args.loaded_index
    model = data.load_model(args.model)
    size = model.output_shape[-1]
    if size != index.dim:
        raise CliError(
            f"{args.model}: embeddings of size {size}; the index {args.index} holds "
            f"embeddings of size {index.dim}"
        )
    names, x = read_queries(args.queries, model.input_shape[1:])
    found = index.search(data.embed(model, x, args.batch_size), k=args.k)
    document = results(names, found)
    print(json.dumps(document) if args.json else format_text(document))
    return 0
