"""`deepmetric evaluate MODEL`: the retrieval metrics of a saved model on data."""

from __future__ import annotations

from pathlib import Path

from deepmetric.cli import data
from deepmetric.cli.rundir import write_json


def run(args) -> int:
    model = data.load_model(args.model)
    dataset = data.load_data(args.data)
    x, y = data.select(dataset, args.split, args.test_size, args.seed)
    metrics = data.metrics(data.embed(model, x), y, recall_at=args.recall_at, seed=args.seed)
    if args.json:
        write_json(Path(args.json), metrics)
    if not args.quiet:
        print(data.format_table({"value": metrics}))
    return 0
