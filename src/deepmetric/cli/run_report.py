"""The verification figures and the HTML report of a `deepmetric train` run.

`verification` draws balanced same / different pairs of the held-out split
(`deepmetric.evaluation.verification_pairs`, seeded with the run's --seed) and scores the
embeddings before and after training on them (`verification_metrics`, Euclidean distances):
the "verification" entry of metrics.json. `write` writes `report.html` into the run folder
(`deepmetric.report.write_report`): the metrics before and after, the figures of the run,
the ROC / DET curves of those pairs (`roc.png`), and for image data a gallery of the
held-out queries with their nearest held-out neighbours, the worst first.

Nothing here imports keras (the run directory uses it, see `rundir`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# Pairs of each kind (same / different class), as LFW's 3,000; fewer where fewer exist.
PAIRS = 3000
# Neighbours of each query in the report's gallery.
GALLERY_K = 5


def pairs_of(labels, seed: int):
    """`(first, second, same)`: up to `PAIRS` same-class and as many different-class
    pairs of the held-out `labels`; None when there is no same-class pair (every held-out
    class has a single example)."""
    from deepmetric.verification import verification_pairs

    _, counts = np.unique(np.asarray(labels), return_counts=True)
    n = int(counts.sum())
    same = int(np.sum(counts * (counts - 1) // 2))
    count = min(PAIRS, same, n * (n - 1) // 2 - same)
    if count < 1:
        return None
    return verification_pairs(labels, count, seed=seed)


def verification(stages: dict[str, np.ndarray], labels, seed: int):
    """(metrics.json's "verification" entry, stage -> (distances, same)) or (None, {}).

    The entry: the number of pairs of each kind, the seed, the metric, and
    `verification_metrics` of each stage's embeddings (`tar_at_far` keyed by the FAR as a
    string, as JSON writes it).
    """
    from deepmetric.verification import pair_distances, verification_metrics

    drawn = pairs_of(labels, seed)
    if drawn is None:
        return None, {}
    first, second, same = drawn
    pairs = {k: (pair_distances(e, first, second), same) for k, e in stages.items()}
    entry: dict[str, Any] = {"pairs": int(same.sum()), "seed": seed, "metric": "euclidean"}
    for stage, (distances, is_same) in pairs.items():
        figures = verification_metrics(distances, is_same)
        figures["tar_at_far"] = {repr(f): v for f, v in figures["tar_at_far"].items()}
        entry[stage] = figures
    return entry, pairs


def write(folder: Path, *, title: str, metrics: dict, pairs: dict, embeddings, x_test, y_test,
          data) -> Path:  # fmt: skip
    """`folder/report.html` (and `roc.png` when there are pairs) of the run in `folder`."""
    from deepmetric.index import exact_search
    from deepmetric.report import write_report

    gallery: dict[str, Any] = {}
    k = min(GALLERY_K, len(y_test) - 1)
    if data.is_image and k >= 1:
        distances, nn = exact_search(embeddings, embeddings, k, exclude_self=True)
        gallery = {
            "query_images": x_test, "query_labels": y_test, "neighbor_indices": nn,
            "neighbor_labels": y_test[nn], "neighbor_distances": distances,
            "reference_images": x_test, "class_names": list(data.class_names),
        }  # fmt: skip
    figures = {
        "training curves": folder / "training_curves.png",
        "map before training": folder / "map_before.png",
        "map after training": folder / "map_after.png",
    }
    return write_report(folder, title=title, metrics=metrics, figures=figures,
                        pairs=pairs or None, **gallery)  # fmt: skip
