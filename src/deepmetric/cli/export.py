"""`deepmetric export MODEL`: Embedding Projector files and a 2-D map of data."""

from __future__ import annotations

from pathlib import Path

from deepmetric.cli import data
from deepmetric.cli.parser import CliError
from deepmetric.export import plot_embeddings, write_projector


def run(args) -> int:
    model = data.load_model(args.model)
    dataset = data.load_data(args.data)
    x, y = data.select(dataset, args.split, args.test_size, args.seed)
    embeddings = data.embed(model, x)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} exists and is not a directory")
    names = dataset.class_names
    images = x if dataset.is_image else None
    write_projector(out, embeddings, y, images=images, class_names=names)
    plot_embeddings(out / "map.png", embeddings, y, args.map_method, class_names=names)
    if not args.quiet:
        print(f"wrote Embedding Projector files and map.png to {out}")
    return 0
