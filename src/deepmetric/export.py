"""Looking at an embedding space: Embedding Projector files, 2-D maps, training curves.

`write_projector` writes the files that the TensorFlow Embedding Projector
(projector.tensorflow.org, or TensorBoard's projector plugin) loads: `vecs.tsv`,
`meta.tsv` and, for images, a sprite of thumbnails with `projector_config.pbtxt`.
`plot_embeddings` draws a 2-D map coloured by class, `plot_history` the training
curves, `plot_roc` the ROC and DET curves of verification pairs. Every file is
written to a temporary name in its directory and renamed into place, so an
interrupted export never leaves a half-written file.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["plot_embeddings", "plot_history", "plot_roc", "write_projector", "atomic_write"]

MAX_SPRITE_SIZE = 8192
_MIN_THUMBNAIL = 32
_FRAME = 160  # grey level of the line around each sprite thumbnail


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write: Callable[[str], None]) -> Path:
    """Calls `write(tmp_path)` for a temporary file beside `path`, then renames it.

    The temporary file keeps `path`'s suffix (matplotlib and PIL choose the format by
    it) and is removed if `write` fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _write_text(path, text: str) -> Path:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)

    return atomic_write(path, write)


def _cell(value) -> str:
    text = value.decode() if isinstance(value, bytes) else str(value)
    return text.replace("\t", " ").replace("\n", " ").replace("\r", " ")


def _metadata_columns(metadata, class_names, n) -> dict[str, list]:
    if isinstance(metadata, Mapping):
        columns = {str(k): list(np.asarray(v).reshape(-1).tolist()) for k, v in metadata.items()}
    else:
        labels = np.asarray(metadata).reshape(-1)
        if class_names is not None and labels.dtype.kind in "iu":
            names = [str(c) for c in class_names]
            columns = {
                "label": labels.tolist(),
                "class": [names[i] if 0 <= i < len(names) else str(i) for i in labels.tolist()],
            }
        else:
            columns = {"label": labels.tolist()}
    for key, values in columns.items():
        if len(values) != n:
            raise ValueError(
                f"metadata column {key!r} has {len(values)} values, expected one per "
                f"embedding ({n})"
            )
    return columns


def _to_uint8(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images)
    if x.dtype == np.uint8:
        return x
    x = x.astype("float64")
    lo, hi = float(np.min(x)), float(np.max(x))
    if hi <= lo:
        return np.zeros(x.shape, "uint8")
    return np.round((x - lo) / (hi - lo) * 255).astype("uint8")


def sprite_layout(n: int, height: int, width: int) -> tuple[int, tuple[int, int]]:
    """The grid size (columns = rows) and thumbnail size (w, h) of a sprite of n images.

    >>> sprite_layout(540, 8, 8)
    (24, (32, 32))
    >>> sprite_layout(10000, 100, 100)
    (100, (81, 81))
    """
    grid = max(1, math.ceil(math.sqrt(n)))
    scale = max(1.0, _MIN_THUMBNAIL / max(height, width))
    scale = min(scale, MAX_SPRITE_SIZE / (grid * max(height, width)))
    tw, th = max(1, int(width * scale)), max(1, int(height * scale))
    if grid * max(tw, th) > MAX_SPRITE_SIZE:
        raise ValueError(f"{n} images do not fit a {MAX_SPRITE_SIZE}px sprite")
    return grid, (tw, th)


def make_sprite(images: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """A square grid of thumbnails in row-major order, at most 8192 x 8192 pixels.

    Thumbnails keep the images' aspect ratio; small images are enlarged to about 32
    pixels so the Projector shows them, large sets are shrunk to fit the limit. Each
    thumbnail of at least 8 x 8 pixels gets a 1-pixel grey frame on its own edge, so
    that neighbouring tiles stay apart without changing the grid.

    Returns:
      The sprite as a uint8 array (H, W) or (H, W, 3), and the thumbnail size (w, h).
    """
    from PIL import Image

    x = _to_uint8(images)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (3, 4)):
        raise ValueError(
            f"`images` must have shape (n, H, W), (n, H, W, 1), (n, H, W, 3) or (n, H, W, 4). "
            f"Received: images.shape={np.shape(images)}"
        )
    if x.ndim == 4:
        x = x[..., :3]
    n, h, w = x.shape[:3]
    grid, (tw, th) = sprite_layout(n, h, w)
    scale = tw / w
    mode = "L" if x.ndim == 3 else "RGB"
    sprite = Image.new(mode, (grid * tw, grid * th), 255 if mode == "L" else (255, 255, 255))
    for i in range(n):
        thumb = Image.fromarray(x[i], mode)
        if thumb.size != (tw, th):
            resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
            thumb = thumb.resize((tw, th), resample)
        sprite.paste(thumb, ((i % grid) * tw, (i // grid) * th))
    pixels = np.array(sprite)
    if min(tw, th) >= 8:
        tiles = pixels[: th * (-(-n // grid)), :]  # the rows that hold a thumbnail
        tiles[::th] = tiles[th - 1 :: th] = _FRAME
        tiles[:, ::tw] = tiles[:, tw - 1 :: tw] = _FRAME
        pixels[(n - 1) // grid * th :, (n - 1) % grid * tw + tw :] = 255  # no empty frames
    return pixels, (tw, th)


def write_projector(directory, embeddings, metadata, images=None, class_names=None) -> list[Path]:
    """Writes Embedding Projector files for `embeddings` into `directory`.

    - `vecs.tsv`: one embedding per line, tab-separated floats, no header.
    - `meta.tsv`: with one column, one label per line and no header; with several
      columns, a header row first (the Projector's rule).
    - with `images`: `sprite.png` (square grid of thumbnails, row-major, at most
      8192 x 8192 px) and `projector_config.pbtxt` pointing at the three files, so
      the Projector shows each point as its thumbnail.

    Args:
      directory: output folder (created if needed).
      embeddings: (n, d) array.
      metadata: n labels, or a mapping from column name to n values.
      images: optional (n, H, W[, C]) images in the order of `embeddings`.
      class_names: names of integer labels; adds a `class` column beside `label`.

    Returns:
      The paths written.
    """
    directory = Path(directory)
    vecs = np.asarray(embeddings, dtype="float64")
    if vecs.ndim != 2:
        raise ValueError(f"`embeddings` must be 2-D (n, d). Received shape {vecs.shape}")
    n = vecs.shape[0]
    columns = _metadata_columns(metadata, class_names, n)
    written = [
        _write_text(
            directory / "vecs.tsv",
            "".join("\t".join(f"{v:.7g}" for v in row) + "\n" for row in vecs),
        )
    ]
    names = list(columns)
    lines = ["\t".join(names) + "\n"] if len(names) > 1 else []
    lines += ["\t".join(_cell(columns[c][i]) for c in names) + "\n" for i in range(n)]
    written.append(_write_text(directory / "meta.tsv", "".join(lines)))
    if images is not None:
        from PIL import Image

        if len(images) != n:
            raise ValueError(f"{len(images)} images for {n} embeddings")
        sprite, (tw, th) = make_sprite(images)
        written.append(
            atomic_write(directory / "sprite.png", lambda p: Image.fromarray(sprite).save(p))
        )
        config = (
            "embeddings {\n"
            '  tensor_path: "vecs.tsv"\n'
            '  metadata_path: "meta.tsv"\n'
            "  sprite {\n"
            '    image_path: "sprite.png"\n'
            f"    single_image_dim: {tw}\n"
            f"    single_image_dim: {th}\n"
            "  }\n"
            "}\n"
        )
        written.append(_write_text(directory / "projector_config.pbtxt", config))
    return written


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def project_2d(embeddings, method: str = "pca", *, seed: int = 0) -> np.ndarray:
    """Projects (n, d) embeddings to (n, 2) by PCA, t-SNE or UMAP."""
    x = np.asarray(embeddings, dtype="float64")
    if method == "pca":
        from sklearn.decomposition import PCA

        out = PCA(n_components=min(2, *x.shape), random_state=seed).fit_transform(x)
    elif method == "tsne":
        from sklearn.manifold import TSNE
        from threadpoolctl import threadpool_limits

        tsne = TSNE(2, perplexity=min(30.0, max(1.0, (len(x) - 1) / 3)), random_state=seed)
        # scikit-learn's t-SNE runs 1000 short OpenMP loops; on a small set the
        # threads mostly wait for each other, so up to 10,000 points it runs on one
        # thread.
        with threadpool_limits(1 if len(x) <= 10_000 else None):
            out = tsne.fit_transform(x)
    elif method == "umap":
        try:
            import umap  # type: ignore[import-not-found]
        except ImportError:
            raise ImportError(
                "method='umap' needs the umap-learn package (pip install umap-learn); "
                "use method='pca' or 'tsne' without it"
            ) from None
        out = umap.UMAP(n_components=2, random_state=seed).fit_transform(x)
    else:
        raise ValueError(f"`method` must be 'pca', 'tsne' or 'umap'. Received: method={method!r}")
    if out.shape[1] < 2:
        out = np.pad(out, ((0, 0), (0, 2 - out.shape[1])))
    return out


def plot_embeddings(
    path,
    embeddings,
    labels,
    method: str = "pca",
    title: str | None = None,
    *,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
) -> Path:
    """Writes a PNG map of `embeddings` in 2-D, one colour per class.

    Args:
      path: the PNG to write.
      embeddings: (n, d) array.
      labels: n integer labels.
      method: "pca" (scikit-learn, default), "tsne" (scikit-learn) or "umap"
        (needs umap-learn; without it an `ImportError` that says so).
      title: the plot's title; default "<method> of the embeddings".
      class_names: legend names of the labels.
      seed: random state of the projection.
    """
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(embeddings):
        raise ValueError(f"{len(labels)} labels for {len(embeddings)} embeddings")
    points = project_2d(embeddings, method, seed=seed)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 6), dpi=100)
    try:
        classes = np.unique(labels)
        cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
        for i, c in enumerate(classes):
            keep = labels == c
            name = class_names[int(c)] if class_names is not None else str(c)
            ax.scatter(*points[keep].T, s=8, color=cmap(i % cmap.N), label=name, alpha=0.8)
        if len(classes) <= 20:
            # Beside the axes, where it covers no point; the saved figure grows to hold it.
            ax.legend(
                markerscale=2, fontsize="small", loc="upper left",
                bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False,
            )  # fmt: skip
        ax.set_title(title or f"{method.upper()} of the embeddings")
        ax.set_xticks([])
        ax.set_yticks([])
        return atomic_write(path, lambda p: fig.savefig(p, format="png", bbox_inches="tight"))
    finally:
        plt.close(fig)


_METRIC_WORDS = ("precision", "map_at_r", "recall", "mrr", "nmi", "ami")


def plot_history(path, history: Mapping[str, Sequence[float]]) -> Path:
    """Writes a PNG of the training curves in `history` (as `keras.callbacks.History`).

    One panel for the losses (`loss`, `val_loss`, ...), one for the retrieval metrics
    (keys with precision, map_at_r, recall, mrr, nmi or ami), one for the learning rate
    (`learning_rate` or `lr`) if logged. Recall@1 equals precision@1 by definition (a
    relevant item among the first one): where a history holds both with the same
    values, one line is drawn, labelled with both names.
    """
    history = {k: [float(v) for v in vs] for k, vs in history.items() if k != "epoch"}
    labels = {k: k for k in history}
    for key in list(history):
        twin = key.replace("precision_at_1", "recall_at_1")
        if key.endswith("precision_at_1") and twin in history and history[twin] == history[key]:
            del history[twin]
            labels[key] = f"{key} = {twin}"
    losses = [k for k in history if k.endswith("loss")]
    metrics = [k for k in history if any(w in k for w in _METRIC_WORDS)]
    rates = [k for k in history if k in ("learning_rate", "lr")]
    panels = [
        (p, t) for p, t in ((losses, "loss"), (metrics, "retrieval"), (rates, "learning rate")) if p
    ]
    if not panels:
        panels = [(list(history), "history")]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), dpi=100, squeeze=False)
    try:
        for ax, (keys, title) in zip(axes[0], panels, strict=True):
            for key in keys:
                values = history[key]
                ax.plot(
                    range(1, len(values) + 1),
                    values,
                    marker="." if len(values) < 30 else None,
                    label=labels[key],
                )
            ax.set_title(title)
            ax.set_xlabel("epoch")
            if keys:
                ax.legend(fontsize="small")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        return atomic_write(path, lambda p: fig.savefig(p, format="png"))
    finally:
        plt.close(fig)


_DET_TICKS = (0.001, 0.01, 0.05, 0.2, 0.5, 0.8, 0.95)


def plot_roc(path, curves, *, title: str | None = None) -> Path:
    """Writes a PNG of the ROC and DET curves of verification pairs.

    Left, the ROC: TAR against FAR on a logarithmic FAR axis (the low-FAR end is
    where verification systems operate). Right, the DET curve: FRR against FAR,
    both on the normal-deviate (probit) scale of Martin et al. 1997, where
    Gaussian scores give straight lines; its diagonal FAR = FRR crosses each
    curve at the equal error rate, which is marked. The points are those of
    `deepmetric.evaluation.verification_roc`.

    Args:
      path: the PNG to write.
      curves: `(distances, same)` of one set of pairs, or a mapping from a legend
        name to such a tuple (for example before and after training).
      title: the figure's title.
    """
    from scipy.stats import norm

    from deepmetric.verification import verification_metrics, verification_roc

    named = dict(curves) if isinstance(curves, Mapping) else {"": tuple(curves)}
    plt = _pyplot()
    fig, (roc, det) = plt.subplots(1, 2, figsize=(10, 4.4), dpi=100)
    try:
        lo, hi = norm.ppf(5e-4), norm.ppf(0.995)
        for name, (distances, same) in named.items():
            far, tar, _ = verification_roc(distances, same)
            m = verification_metrics(distances, same)
            label = f"{name + ': ' if name else ''}AUC {m['roc_auc']:.4f}, EER {m['eer']:.4f}"
            (line,) = roc.plot(np.maximum(far, 1e-4), tar, label=label)
            clip = np.clip(np.c_[far, 1 - tar], 5e-4, 0.995)
            det.plot(norm.ppf(clip[:, 0]), norm.ppf(clip[:, 1]), color=line.get_color())
            eer = norm.ppf(np.clip(m["eer"], 5e-4, 0.995))
            det.plot([eer], [eer], "o", color=line.get_color())
        roc.set_xscale("log")
        roc.set_xlim(1e-4, 1)
        roc.set_ylim(0, 1.01)
        roc.set_xlabel("false accept rate (FAR)")
        roc.set_ylabel("true accept rate (TAR)")
        roc.set_title("ROC")
        roc.legend(fontsize="small", loc="lower right")
        ticks = norm.ppf(_DET_TICKS)
        names = [f"{t:g}" for t in _DET_TICKS]
        det.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        det.set_xticks(ticks, names)
        det.set_yticks(ticks, names)
        det.set_xlim(lo, hi)
        det.set_ylim(lo, hi)
        det.set_xlabel("false accept rate (FAR)")
        det.set_ylabel("false reject rate (FRR)")
        det.set_title("DET (EER where it meets the diagonal)")
        for ax in (roc, det):
            ax.grid(alpha=0.3)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        return atomic_write(path, lambda p: fig.savefig(p, format="png"))
    finally:
        plt.close(fig)
