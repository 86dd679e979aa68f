"""`deepmetric index MODEL --data DATA --out DIR`: a saved nearest-neighbour index of data.

The rows are the embeddings of --data (--split all by default) by MODEL; the labels are the
class names of the data set (strings: the folder names of an image folder, "0".."9" for
the digits); for an image folder the metadata of each row is its file path. The folder is
written by `deepmetric.index.Index.save` (atomic; an existing --out only with --force, and
only when it holds an index or is empty) and read back with `Index.load`.
"""

from __future__ import annotations

import numpy as np

from deepmetric.cli import data
from deepmetric.cli.parser import CliError
from deepmetric.index import Index


def build(model, dataset, rows, paths, *, metric="euclidean", engine="exact", batch_size=256):
    """The Index of `dataset`'s `rows` embedded by `model`, labelled by class name."""
    try:
        index = Index(metric=metric, engine=engine)
    except (ImportError, ValueError) as e:
        raise CliError(f"--engine {engine}: {e}") from None
    embeddings = data.embed(model, dataset.x[rows], batch_size)
    metadata = None if paths is None else [paths[i] for i in rows]
    return index.add(embeddings, labels=data.label_names(dataset, dataset.y[rows]),
                     metadata=metadata)  # fmt: skip


def run(args) -> int:
    dataset, paths = data.load_data_and_paths(args.data)
    rows = data.select_indices(dataset, args.split, args.test_size, args.seed)
    model = data.load_model(args.model)
    index = build(model, dataset, rows, paths, metric=args.metric, engine=args.engine,
                  batch_size=args.batch_size)  # fmt: skip
    try:
        index.save(args.out, overwrite=args.force)
    except (FileExistsError, OSError) as e:
        raise CliError(str(e)) from None
    if not args.quiet:
        print(f"wrote an index of {len(index)} embeddings of size {index.dim} to {args.out}")
    return 0


def held_out_index(embeddings, dataset, rows, paths, seed: int) -> Index:
    """The Index of the held-out split of `deepmetric train`, with a calibrated threshold.

    `embeddings` are the trained model's of `dataset`'s `rows`. The threshold is chosen on
    a split of the held-out set, because a row searched in an index that holds it finds
    itself at distance 0: the rows, shuffled with `seed` and sorted by class, go in turn
    to a gallery and to a query half (each class with 2 or more held-out examples is in
    both); `Index.calibrate` (best F1, nearest neighbour) picks the threshold of the query
    half against an index of the gallery half. The returned index holds every held-out row
    and carries that threshold; its `calibration` adds the sizes of the two halves.
    """
    labels = data.label_names(dataset, dataset.y[rows])
    order = np.random.default_rng(seed).permutation(len(rows))
    order = order[np.argsort(labels[order], kind="stable")]
    gallery, queries = order[0::2], order[1::2]
    calibration = Index().add(embeddings[gallery], labels=labels[gallery])
    calibration.calibrate(embeddings[queries], labels[queries])
    index = Index().add(embeddings, labels=labels,
                        metadata=None if paths is None else [paths[i] for i in rows])  # fmt: skip
    index.threshold = calibration.threshold
    index.calibration = {**(calibration.calibration or {}), "protocol": "half_split",
                         "gallery": len(gallery)}  # fmt: skip
    return index
