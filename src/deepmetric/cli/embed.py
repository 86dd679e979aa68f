"""`deepmetric embed MODEL`: the embeddings of data by a saved model, as .npy or .tsv."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deepmetric.cli import data
from deepmetric.export import atomic_write


def run(args) -> int:
    output = Path(args.output)  # suffix, existence and folder checked by parser.check_paths
    model = data.load_model(args.model)
    dataset = data.load_data(args.data)
    x, _ = data.select(dataset, args.split, args.test_size, args.seed)
    embeddings = data.embed(model, x, args.batch_size)
    if output.suffix == ".npy":
        atomic_write(output, lambda p: np.save(p, embeddings))
    else:
        atomic_write(output, lambda p: np.savetxt(p, embeddings, fmt="%.7g", delimiter="\t"))
    if not args.quiet:
        print(f"wrote {embeddings.shape[0]} embeddings of size {embeddings.shape[1]} to {output}")
    return 0
