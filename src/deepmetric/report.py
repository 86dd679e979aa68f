"""An HTML report of a run: metrics, figures, the ROC curve and a gallery of searches.

`write_report(directory, ...)` writes `report.html`, one self-contained file
(every image is embedded as a base64 `data:` URI, no script, no external
resource), so it can be mailed or opened from any folder. It takes what a run
produces as plain values and arrays, so it does not depend on the command line:

- `metrics`: a table, one column per stage (for example before and after
  training);
- `figures`: PNG files (training curves, 2-D maps), those that exist;
- `pairs`: verification pairs, drawn as ROC / DET curves (`roc.png`, written
  beside the report by `deepmetric.export.plot_roc`) with their
  `verification_metrics` in a table;
- a gallery of held-out queries beside their nearest neighbours, as
  thumbnails framed green (same label as the query) or red (another label),
  the worst queries first.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from deepmetric.export import _to_uint8, atomic_write, plot_roc

__all__ = ["write_report"]

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { display: inline-block; margin: 0.3em; text-align: center; font-size: 0.8em; }
figure.plot img { max-width: 100%; }
.query { display: flex; align-items: flex-start; gap: 0.2em; border-bottom: 1px solid #eee; }
.query > figure:first-child { margin-right: 1em; }
.thumb { border: 3px solid #999; image-rendering: pixelated; }
.correct .thumb { border-color: #2a2; }
.wrong .thumb { border-color: #d22; }
.correct figcaption::before { content: "\\2713 "; color: #2a2; }
.wrong figcaption::before { content: "\\2717 "; color: #d22; }
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _thumbnails(images: np.ndarray, size: int) -> list[str]:
    """Each image as a PNG data URI, its longer side scaled to `size` pixels."""
    from PIL import Image

    x = images
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim == 4:
        x = x[..., :3]
    uris = []
    for image in x:
        thumb = Image.fromarray(image, "L" if image.ndim == 2 else "RGB")
        scale = size / max(thumb.size)
        if scale != 1:
            resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
            thumb = thumb.resize(
                (max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale))),
                resample,
            )
        buffer = io.BytesIO()
        thumb.save(buffer, format="PNG")
        uris.append(_data_uri(buffer.getvalue()))
    return uris


def _images(name: str, images) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3, 4)):
        raise ValueError(
            f"`{name}` must be images of shape (n, H, W) or (n, H, W, 1 | 3 | 4). "
            f"Received: {name}.shape={x.shape}"
        )
    return x


def _pixels(queries: np.ndarray, references: np.ndarray):
    """uint8 pixels, on one scale for queries and references when they are not uint8."""
    if queries.dtype == np.uint8 and references.dtype == np.uint8:
        return queries, references
    if queries.shape[1:] != references.shape[1:]:
        return _to_uint8(queries), _to_uint8(references)
    both = _to_uint8(np.concatenate([queries, references]))
    return both[: len(queries)], both[len(queries) :]


def _format(value) -> str:
    if isinstance(value, (float, np.floating)):
        return "NaN" if math.isnan(value) else f"{float(value):.4f}"
    return html.escape(str(value))


def _flatten(values: Mapping) -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            for sub, v in value.items():
                flat[f"{key}@{sub:g}" if isinstance(sub, float) else f"{key}@{sub}"] = v
        elif not isinstance(value, (list, tuple, np.ndarray)):
            flat[str(key)] = value
    return flat


def _table(columns: Mapping[str, Mapping], table_id: str) -> str:
    flat = {name: _flatten(values) for name, values in columns.items()}
    rows: list[str] = []
    for values in flat.values():
        rows += [k for k in values if k not in rows]
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in flat)
    body = "".join(
        f"<tr><td>{html.escape(r)}</td>"
        + "".join(f"<td>{_format(flat[c][r]) if r in flat[c] else ''}</td>" for c in flat)
        + "</tr>"
        for r in rows
    )
    return f'<table id="{table_id}"><tr><th>metric</th>{head}</tr>{body}</table>'


def _label(value, class_names) -> str:
    if class_names is not None and isinstance(value, (int, np.integer)):
        if 0 <= int(value) < len(class_names):
            return str(class_names[int(value)])
    return str(value)


def gallery_order(correct: np.ndarray) -> np.ndarray:
    """The queries, worst first: nearest neighbour wrong before right, then
    fewer correct neighbours among those shown, then query order.

    >>> gallery_order(np.array([[True, True], [False, True], [True, False]])).tolist()
    [1, 2, 0]
    """
    return np.lexsort((np.arange(len(correct)), correct.sum(axis=1), correct[:, 0]))


def _gallery(
    query_images, query_labels, neighbor_indices, neighbor_labels, neighbor_distances,
    reference_images, class_names, max_queries, thumbnail,
) -> str:  # fmt: skip
    q_images = _images("query_images", query_images)
    r_images = _images("reference_images", reference_images)
    q_labels = np.asarray(query_labels).reshape(-1)
    nn = np.asarray(neighbor_indices)
    nn_labels = np.asarray(neighbor_labels)
    n = len(q_images)
    if nn.ndim != 2 or len(nn) != n or nn_labels.shape != nn.shape or len(q_labels) != n:
        raise ValueError(
            "the gallery needs one label and one row of neighbours per query image: "
            f"query_images {q_images.shape}, query_labels {np.shape(query_labels)}, "
            f"neighbor_indices {nn.shape}, neighbor_labels {nn_labels.shape}"
        )
    if nn.size and (nn.min() < 0 or nn.max() >= len(r_images)):
        raise ValueError(
            f"`neighbor_indices` must index `reference_images` (0 to {len(r_images) - 1}). "
            f"Received values from {nn.min()} to {nn.max()}"
        )
    dist = None if neighbor_distances is None else np.asarray(neighbor_distances)
    if dist is not None and dist.shape != nn.shape:
        raise ValueError(
            f"`neighbor_distances` must have the shape of `neighbor_indices` {nn.shape}. "
            f"Received: {dist.shape}"
        )
    correct = nn_labels == q_labels[:, None]
    shown = gallery_order(correct)[:max_queries]
    used = np.unique(nn[shown])
    q_pixels, r_pixels = _pixels(q_images[shown], r_images[used])
    q_uris = _thumbnails(q_pixels, thumbnail)
    r_uris = dict(zip(used.tolist(), _thumbnails(r_pixels, thumbnail), strict=True))
    rows = []
    for row, qi in enumerate(shown.tolist()):
        label = html.escape(_label(q_labels[qi], class_names))
        cells = [
            f'<figure class="query-image"><img class="thumb" src="{q_uris[row]}" '
            f'alt="query {qi}"><figcaption>query {qi}<br>{label}</figcaption></figure>'
        ]
        for rank, ri in enumerate(nn[qi].tolist()):
            mark = "correct" if correct[qi, rank] else "wrong"
            text = html.escape(_label(nn_labels[qi, rank], class_names))
            if dist is not None:
                text += f"<br>d = {float(dist[qi, rank]):.3g}"
            cells.append(
                f'<figure class="{mark}"><img class="thumb" src="{r_uris[ri]}" '
                f'alt="neighbour {rank + 1} of query {qi}"><figcaption>{text}</figcaption></figure>'
            )
        rows.append(f'<div class="query" data-query="{qi}">{"".join(cells)}</div>')
    wrong_first = int((~correct[:, 0]).sum())
    return (
        f'<section id="gallery"><h2>Nearest neighbours</h2><p>{len(shown)} of {n} queries, '
        f"the worst first; {wrong_first} have a nearest neighbour of another label. Green: "
        f"same label as the query, red: another label.</p>{''.join(rows)}</section>"
    )


def write_report(
    directory,
    *,
    title: str = "deepmetric run",
    metrics: Mapping[str, Mapping] | None = None,
    figures: Mapping[str, object] | Sequence[object] | None = None,
    pairs=None,
    query_images=None,
    query_labels=None,
    neighbor_indices=None,
    neighbor_labels=None,
    neighbor_distances=None,
    reference_images=None,
    class_names: Sequence[str] | None = None,
    max_queries: int = 40,
    thumbnail: int = 64,
) -> Path:
    """Writes `directory/report.html` and returns its path.

    Each part appears when its arguments are given. The file is written to a
    temporary name and renamed, so a reader never sees half a report.

    Args:
      directory: the run directory (created if needed).
      title: the page's title.
      metrics: stage name -> {metric name -> value}, for example
        `{"before": {...}, "after": {...}}`: one table, a column per stage, a row
        per metric (nested dicts such as `tar_at_far` become rows `tar_at_far@0.01`);
        values that are not dicts form a column "value".
      figures: caption -> PNG path, or a list of PNG paths (captioned by file
        name); paths that do not exist are left out.
      pairs: `(distances, same)` of verification pairs, or stage name -> such a
        tuple: draws `roc.png` beside the report and adds a table of
        `verification_metrics` per stage.
      query_images: (n, H, W[, C]) images of the queries, for the gallery.
      query_labels: (n,) their labels.
      neighbor_indices: (n, k) rows of `reference_images`, nearest first.
      neighbor_labels: (n, k) the labels of those neighbours.
      neighbor_distances: optional (n, k) their distances, shown under them.
      reference_images: (m, H, W[, C]) the images the neighbours index.
      class_names: names shown for integer labels.
      max_queries: queries in the gallery (the worst ones, see `gallery_order`).
      thumbnail: the longer side of each thumbnail, in pixels.
    """
    from deepmetric.verification import verification_metrics

    directory = Path(directory)
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if metrics:
        scalars = {k: v for k, v in metrics.items() if not isinstance(v, Mapping)}
        metrics = {k: v for k, v in metrics.items() if isinstance(v, Mapping)}
        if scalars:  # values outside a stage form a column of their own
            metrics["value"] = scalars
        parts.append(f"<h2>Metrics</h2>{_table(metrics, 'metrics')}")
    if pairs is not None:
        named = dict(pairs) if isinstance(pairs, Mapping) else {"value": tuple(pairs)}
        roc = plot_roc(directory / "roc.png", named if isinstance(pairs, Mapping) else pairs)
        table = _table({k: verification_metrics(*v) for k, v in named.items()}, "verification")
        parts.append(
            f'<section id="verification"><h2>Verification</h2>{table}'
            f'<figure class="plot"><img src="{_data_uri(roc.read_bytes())}" alt="ROC and DET '
            f'curves"><figcaption>ROC and DET curves</figcaption></figure></section>'
        )
    if figures:
        items = (
            figures.items()
            if isinstance(figures, Mapping)
            else [(Path(str(p)).stem, p) for p in figures]
        )
        shown = [
            f'<figure class="plot"><img src="{_data_uri(Path(str(p)).read_bytes())}" '
            f'alt="{html.escape(str(c))}"><figcaption>{html.escape(str(c))}</figcaption></figure>'
            for c, p in items
            if Path(str(p)).is_file()
        ]
        if shown:
            parts.append(f'<section id="figures"><h2>Figures</h2>{"".join(shown)}</section>')
    gallery = (query_images, query_labels, neighbor_indices, neighbor_labels, reference_images)
    if any(g is not None for g in gallery):
        if any(g is None for g in gallery):
            raise ValueError(
                "the gallery needs query_images, query_labels, neighbor_indices, "
                "neighbor_labels and reference_images together"
            )
        if isinstance(max_queries, bool) or not isinstance(max_queries, int) or max_queries < 1:
            raise ValueError(f"`max_queries` must be a positive int. Received: {max_queries!r}")
        parts.append(
            _gallery(
                query_images, query_labels, neighbor_indices, neighbor_labels,
                neighbor_distances, reference_images, class_names, max_queries, thumbnail,
            )
        )  # fmt: skip
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body>{''.join(parts)}</body></html>\n"
    )

    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(page)

    return atomic_write(directory / "report.html", write)
