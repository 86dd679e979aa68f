"""Data sets for training and evaluating embedding models, all read offline.

`load_digits()` gives scikit-learn's bundled 8x8 digits (no download), and
`load_glyphs()` a many-class set of character images rendered from the fonts that come
with matplotlib (about 200 classes, no download). `load(path)` reads an image folder
(one sub-folder per class), an `.npz` with arrays `x` and `y`, or MNIST-format IDX
files. Each returns a `Dataset(x, y, class_names, pixel_scale)`: `x` as the data set
stores it (raw pixels, not rescaled), `y` integer labels 0..n-1, `class_names[i]` the
name of label i, and `pixel_scale` the factor that maps the pixels to [0, 1] (None for
feature vectors), for the model's `Rescaling` layer.

`split_indices(y, by="samples" | "classes")` holds out part of a data set for
evaluation: a stratified share of each class's samples (`split_samples`), or whole
classes that training never sees (`split_classes`, the protocol of "A Metric
Learning Reality Check", Musgrave et al. 2020).

Bad input raises `DataError` (a `ValueError`) with a one-line message.
"""

from __future__ import annotations

import functools
import gzip
import os
import unicodedata
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = [
    "SPLITS",
    "DataError",
    "Dataset",
    "class_labels",
    "glyph_classes",
    "load",
    "load_digits",
    "load_glyphs",
    "pixel_scale_of",
    "split_classes",
    "split_indices",
    "split_samples",
]


class DataError(ValueError):
    """A data set that cannot be read: missing, empty, unreadable or inconsistent."""


class Dataset(NamedTuple):
    """Examples `x`, integer labels `y`, the names of the classes, the pixel scale."""

    x: np.ndarray
    y: np.ndarray
    class_names: list[str]
    pixel_scale: float | None

    @property
    def is_image(self) -> bool:
        return self.x.ndim >= 3


def pixel_scale_of(x: np.ndarray) -> float | None:
    """The factor that maps image pixels to [0, 1]; None for feature vectors.

    uint8 images and integer images up to 255 get 1/255, values up to 16 (the
    digits) 1/16, values in [0, 1] none, larger values 1/max.

    >>> pixel_scale_of(np.zeros((2, 8, 8), "uint8"))
    0.00392156862745098
    """
    if x.ndim < 3:
        return None
    if x.dtype == np.uint8:
        return 1 / 255
    peak = float(np.max(x)) if x.size else 0.0
    if peak <= 1.0:
        return None
    if peak <= 16.0:
        return 1 / 16
    if peak <= 255.0:
        return 1 / 255
    return 1 / peak


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits, as (1797, 8, 8, 1) images.

    Pixels keep their raw values 0..16 (float32); labels are ints 0..9.

    >>> data = load_digits()
    >>> data.x.shape, data.y[:3].tolist(), data.pixel_scale
    ((1797, 8, 8, 1), [0, 1, 2], 0.0625)
    """
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x = digits.images.astype("float32")[..., None]
    y = digits.target.astype("int64")
    return Dataset(x, y, [str(c) for c in range(10)], 1 / 16)


# The fonts of `load_glyphs`: matplotlib's own TrueType files (mpl-data/fonts/ttf). DejaVu
# Sans, Sans Mono, Serif and STIX General in four styles each cover Latin, Greek and
# Cyrillic; six Computer Modern faces add Latin letters and digits. Left out: the "Display"
# subsets, LastResort (a placeholder box for every character), STIXNonUnicode and STIXSize*
# (symbols at private code points), cmsy10 and cmex10 (symbols at the letters' codes).
GLYPH_FONTS = (
    "DejaVuSans",
    "DejaVuSans-Bold",
    "DejaVuSans-Oblique",
    "DejaVuSans-BoldOblique",
    "DejaVuSansMono",
    "DejaVuSansMono-Bold",
    "DejaVuSansMono-Oblique",
    "DejaVuSansMono-BoldOblique",
    "DejaVuSerif",
    "DejaVuSerif-Bold",
    "DejaVuSerif-Italic",
    "DejaVuSerif-BoldItalic",
    "STIXGeneral",
    "STIXGeneralBol",
    "STIXGeneralItalic",
    "STIXGeneralBolIta",
    "cmr10",
    "cmb10",
    "cmti10",
    "cmss10",
    "cmtt10",
    "cmmi10",
)
# A class needs distinct glyphs in at least this many fonts.
GLYPH_MIN_FONTS = 6
# Two renders are one glyph when their ink masks (pixels above half) at 64 x 64 differ in at
# most this many pixels: 0 for a shared outline, over 6 for different letters (measured).
_SAME_GLYPH_PIXELS = 4
# A character is a homoglyph of an earlier class (Greek A of Latin A, Cyrillic o of Latin o)
# when its glyph is the same in at least this share of the fonts both have (homoglyphs: 10
# of 16 and more; the closest distinct pairs, Cyrillic k and Greek kappa: 5 of 16).
_HOMOGLYPH_SHARE = 0.4
# The reference canvas on which the classes are chosen, whatever `size` is asked for.
_REFERENCE_CANVAS = 64


def _glyph_candidates() -> list[str]:
    """Digits and the letters without diacritics of Basic Latin, Latin-1, Latin
    Extended-A, Greek and Cyrillic (U+0400-U+047F), in code point order."""
    blocks = [(0x30, 0x3A), (0x41, 0x5B), (0x61, 0x7B), (0xC0, 0x180), (0x391, 0x3CA)]
    chars = [chr(c) for low, high in [*blocks, (0x400, 0x480)] for c in range(low, high)]
    return [
        c
        for c in chars
        if unicodedata.category(c)[0] in "LN" and len(unicodedata.normalize("NFD", c)) == 1
    ]


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.lru_cache(maxsize=2)
def _font_renders(canvas: int) -> dict[str, np.ndarray]:
    """Every font of `GLYPH_FONTS` drawing every candidate on a `canvas` x `canvas` image:
    font -> (candidates, canvas, canvas) uint8, white on black; all black where the font's
    character map lacks the character (glyph index 0: no fallback glyph is drawn).

    A fixed size (0.625 canvas) on a fixed baseline (0.6875 canvas), centred on the advance
    width, so that case and position stay part of the glyph (o and O differ).
    """
    from matplotlib.ft2font import FT2Font
    from PIL import Image, ImageDraw, ImageFont

    chars = _glyph_candidates()
    renders = {}
    for name in GLYPH_FONTS:
        path = str(_font_dir() / f"{name}.ttf")
        charmap = FT2Font(path)
        font = ImageFont.truetype(path, round(0.625 * canvas))
        out = np.zeros((len(chars), canvas, canvas), dtype="uint8")
        for i, char in enumerate(chars):
            if charmap.get_char_index(ord(char)) == 0:
                continue
            image = Image.new("L", (canvas, canvas), 0)
            ImageDraw.Draw(image).text(
                (canvas / 2, 0.6875 * canvas), char, fill=255, font=font, anchor="ms"
            )
            out[i] = np.asarray(image)
        renders[name] = out
    return renders


def _same_glyphs(masks: np.ndarray) -> np.ndarray:
    """(n, n) bool: which pairs of the ink masks (n, side, side), none of them blank,
    differ in at most `_SAME_GLYPH_PIXELS` pixels. Only the pairs whose ink counts allow
    it (their difference is a lower bound) are compared pixel by pixel."""
    n = len(masks)
    flat = masks.reshape(n, -1)
    ink = flat.sum(axis=1, dtype="int64")
    close = np.abs(ink[:, None] - ink[None, :]) <= _SAME_GLYPH_PIXELS
    i, j = np.nonzero(close & (ink[:, None] > 0) & (ink[None, :] > 0))
    same = np.zeros((n, n), dtype=bool)
    same[i, j] = (flat[i] != flat[j]).sum(axis=1) <= _SAME_GLYPH_PIXELS
    return same


@functools.lru_cache(maxsize=1)
def _glyph_table() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The classes of `load_glyphs` and the fonts that draw each: ((char, fonts), ...).

    From the candidates (`_glyph_candidates`) and `GLYPH_FONTS`, on the reference canvas:
    a font draws a character when its character map has it (glyph index not 0) and the
    render is not blank. A character is left out as a homoglyph when its glyph equals an
    earlier class's in at least `_HOMOGLYPH_SHARE` of their common fonts. Of a kept class,
    a font is left out where its glyph equals the glyph of an earlier class in that font
    (the Cyrillic italic p, drawn as a Latin italic n) or the glyph of the class in an
    earlier font (one outline shared by two faces). A class keeps its place if at least
    `GLYPH_MIN_FONTS` fonts remain.
    """
    chars = _glyph_candidates()
    renders = _font_renders(_REFERENCE_CANVAS)
    masks: dict[str, np.ndarray] = {name: images > 127 for name, images in renders.items()}
    drawn: dict[str, np.ndarray] = {name: np.any(m, axis=(1, 2)) for name, m in masks.items()}
    same: dict[str, np.ndarray] = {name: _same_glyphs(m) for name, m in masks.items()}
    same_count = np.sum([s.astype("int32") for s in same.values()], axis=0)
    shared_count = np.sum([np.outer(d, d).astype("int32") for d in drawn.values()], axis=0)
    table: list[tuple[str, tuple[str, ...]]] = []
    kept: list[int] = []
    for i, char in enumerate(chars):
        if any(
            shared_count[i, k] and same_count[i, k] >= _HOMOGLYPH_SHARE * shared_count[i, k]
            for k in kept
        ):
            continue
        fonts = [f for f in GLYPH_FONTS if drawn[f][i] and not same[f][i, kept].any()]
        if fonts:  # one font per outline
            twins = _same_glyphs(np.stack([masks[f][i] for f in fonts]))
            fonts = [f for j, f in enumerate(fonts) if not twins[j, :j].any()]
        if len(fonts) >= GLYPH_MIN_FONTS:
            table.append((char, tuple(fonts)))
            kept.append(i)
    return tuple(table)


def glyph_classes() -> list[str]:
    """The characters that are the classes of `load_glyphs`, in label order."""
    return [char for char, _ in _glyph_table()]


@functools.lru_cache(maxsize=4)
def _glyph_templates(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The clean renders of `load_glyphs` at `size` x `size`, three stroke weights each.

    Returns (templates, owner): templates (renders, 3, size, size) float32 in [0, 1]
    (thinner, as drawn, bolder: the 2x render mixed 30% / 50% with its one-pixel erosion
    / dilation, then a 2x2 box average, scaled to a maximum of 1), owner (renders,) the
    class of each render, the renders sorted by class, then font.
    """
    chars = _glyph_candidates()
    renders = _font_renders(2 * size)
    picked, owner = [], []
    for label, (char, fonts) in enumerate(_glyph_table()):
        for font in fonts:
            picked.append(renders[font][chars.index(char)])
            owner.append(label)
    drawn = np.stack(picked).astype("float32") / 255
    padded = np.pad(drawn, ((0, 0), (1, 1), (1, 1)))
    canvas = 2 * size
    low, high = drawn.copy(), drawn.copy()
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        shifted = padded[:, 1 + dy : 1 + dy + canvas, 1 + dx : 1 + dx + canvas]
        np.minimum(low, shifted, out=low)
        np.maximum(high, shifted, out=high)
    weights = np.stack([0.7 * drawn + 0.3 * low, drawn, 0.5 * drawn + 0.5 * high], axis=1)
    templates = weights.reshape(len(drawn), 3, size, 2, size, 2).mean(axis=(3, 5))
    templates /= templates.max(axis=(2, 3), keepdims=True)  # hairlines at full ink too
    return templates.astype("float32"), np.asarray(owner, dtype="int64")


def _warp(images: np.ndarray, angle, scale, shift) -> np.ndarray:
    """Each image (n, s, s) rotated by `angle` (radians), scaled by `scale` and shifted
    by `shift` (n, 2) pixels (x, y) about its centre: bilinear, zero outside."""
    n, size, _ = images.shape
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))
    centre = size / 2
    ys, xs = np.mgrid[0:size, 0:size].reshape(2, 1, -1).astype("float32") + 0.5 - centre
    cos, sin = (np.cos(angle) / scale)[:, None], (np.sin(angle) / scale)[:, None]
    u, v = xs - shift[:, :1], ys - shift[:, 1:]
    qx = cos * u + sin * v + centre - 0.5
    qy = -sin * u + cos * v + centre - 0.5
    x0, y0 = np.floor(qx), np.floor(qy)
    fx, fy = qx - x0, qy - y0
    # A point whose four neighbours all lie outside the image is 0; the padding's zero
    # border stands for the outside neighbours of the others.
    inside = (x0 >= -1) & (x0 <= size - 1) & (y0 >= -1) & (y0 <= size - 1)
    side = size + 2
    corner = (
        (np.arange(n, dtype="int64") * side * side)[:, None]
        + (np.clip(y0, -1, size - 1).astype("int64") + 1) * side
        + np.clip(x0, -1, size - 1).astype("int64")
        + 1
    )
    flat = padded.reshape(-1)
    out = (1 - fy) * ((1 - fx) * flat[corner] + fx * flat[corner + 1])
    out += fy * ((1 - fx) * flat[corner + side] + fx * flat[corner + side + 1])
    out *= inside
    return out.reshape(n, size, size)


def _blur(images: np.ndarray) -> np.ndarray:
    """The 3 x 3 binomial blur ([1, 2, 1] / 4 on each axis) of (n, s, s) images."""
    p = np.pad(images, ((0, 0), (1, 1), (1, 1)))
    rows = (p[:, :, :-2] + 2 * p[:, :, 1:-1] + p[:, :, 2:]) / 4
    return (rows[:, :-2] + 2 * rows[:, 1:-1] + rows[:, 2:]) / 4


def load_glyphs(
    classes: int | str | None = None,
    examples_per_class: int = 40,
    size: int = 32,
    seed: int = 0,
) -> Dataset:
    """Character glyphs rendered from matplotlib's fonts: a many-class image set, offline.

    Each class is one character, each example that character drawn by one of matplotlib's
    TrueType fonts (`GLYPH_FONTS`: DejaVu Sans, Sans Mono, Serif and STIX General in four
    styles, six Computer Modern faces) with a seeded augmentation. No file is downloaded or
    written: the fonts come with matplotlib, the images are drawn by Pillow's FreeType
    renderer (both are dependencies of the command line), and the clean renders are cached
    in memory. The first call takes one to two seconds, later ones a fraction.

    Classes: the digits, then the letters without diacritics of Basic Latin, Latin-1,
    Latin Extended-A, Greek and Cyrillic (U+0400-U+047F), in code point order
    (`glyph_classes()`: 193 with matplotlib 3.11's fonts), left out:
    a character whose glyph is the same as an earlier class's in 40% or more of the
    fonts that draw both (Greek and Cyrillic A, B, E, H, ..., Cyrillic a, e, o, p, c, y,
    x), and one drawn distinctly by fewer than `GLYPH_MIN_FONTS` fonts. A font draws a
    character only when its character map has it (glyph index not 0: no fallback glyph,
    no empty image), and is left out for a class where its glyph equals the glyph of an
    earlier class in that font (Cyrillic italic p is a Latin italic n in DejaVu Serif
    Italic) or the class's glyph in an earlier font (DejaVu Sans Mono shares outlines with
    DejaVu Sans). Glyphs keep their size and height on a common baseline, so o and O, or
    p and P, differ in size and position as in text.

    Augmentation, per example (drawn from `seed`): a font (each of the class's fonts in
    turn, in a shuffled order), a stroke weight (thinner, as drawn, bolder), a rotation in
    [-12, 12] degrees, a scale in [0.85, 1.1], a shift of up to 2/32 of the image on each
    axis, a blur (a binomial 3 x 3 blur mixed in with a weight in [0, 0.7]), an ink
    contrast in [0.8, 1] and Gaussian pixel noise of standard deviation up to 0.08 (of
    the full scale). The same arguments give the same images.

    Args:
      classes: None (all), a number n (the first n classes), or a string of characters
        (those classes, in that order).
      examples_per_class: examples of each class.
      size: the side of the square images, from 16 to 128 pixels.
      seed: seed of the augmentation.

    Returns:
      A `Dataset` of (n, size, size, 1) uint8 images, white glyphs on black, labels
      0..classes-1 grouped by class, the characters as class names, pixel scale 1/255.

    Raises:
      ValueError: a bad `classes`, `examples_per_class` or `size`.

    >>> data = load_glyphs(classes="AbЖ", examples_per_class=4, size=24)
    >>> data.x.shape, data.class_names, data.y.tolist()
    ((12, 24, 24, 1), ['A', 'b', 'Ж'], [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    """
    for name, value in (("examples_per_class", examples_per_class), ("size", size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"`{name}` must be an int. Received: {name}={value!r}")
    if examples_per_class < 1:
        raise ValueError(f"`examples_per_class` must be at least 1. Received: {examples_per_class}")
    if not 16 <= size <= 128:
        raise ValueError(f"`size` must be from 16 to 128. Received: size={size}")
    names = glyph_classes()
    if classes is None:
        labels = list(range(len(names)))
    elif isinstance(classes, str):
        unknown = sorted(set(classes) - set(names))
        if unknown or len(set(classes)) != len(classes) or not classes:
            raise ValueError(
                "`classes` must be distinct characters of glyph_classes(); "
                f"received {classes!r}"
                + (f" (not classes: {''.join(unknown)!r})" if unknown else "")
            )
        labels = [names.index(c) for c in classes]
    elif isinstance(classes, (int, np.integer)) and not isinstance(classes, bool):
        if not 1 <= classes <= len(names):
            raise ValueError(
                f"`classes` as a number must be from 1 to {len(names)}. Received: {classes}"
            )
        labels = list(range(int(classes)))
    else:
        raise ValueError(
            "`classes` must be None, a number of classes or a string of characters. "
            f"Received: {classes!r}"
        )
    templates, owner = _glyph_templates(int(size))
    rng = np.random.default_rng(seed)
    picks = []
    for label in labels:
        renders = np.flatnonzero(owner == label)
        turns = -(-examples_per_class // len(renders))
        order = np.concatenate([rng.permutation(renders) for _ in range(turns)])
        picks.append(order[:examples_per_class])
    render = np.concatenate(picks)
    count = len(render)
    weight = rng.integers(0, 3, count)
    angle = np.deg2rad(rng.uniform(-12, 12, count)).astype("float32")
    scale = rng.uniform(0.85, 1.1, count).astype("float32")
    shift = rng.uniform(-size / 16, size / 16, (count, 2)).astype("float32")
    blur = rng.uniform(0, 0.7, count).astype("float32")[:, None, None]
    contrast = rng.uniform(0.8, 1, count).astype("float32")[:, None, None]
    noise = rng.uniform(0, 0.08, count).astype("float32")[:, None, None]
    images = _warp(templates[render, weight], angle, scale, shift)
    images = (1 - blur) * images + blur * _blur(images)
    images = images * contrast + noise * rng.standard_normal(images.shape, dtype="float32")
    x = np.round(np.clip(images, 0, 1) * 255).astype("uint8")[..., None]
    y = np.repeat(np.arange(len(labels), dtype="int64"), examples_per_class)
    return Dataset(x, y, [names[i] for i in labels], 1 / 255)


def class_labels(y, name: str = "y") -> np.ndarray:
    """Class labels as a 1-D numpy array of integers or strings, never through a float.

    The one label normaliser of the numpy side (data sets, samplers, evaluation).
    Accepts shape (n,) or (n, 1); integer arrays keep their dtype, integer-valued
    floats become int64, bytes and object arrays of strings become str, object
    arrays of Python ints become int64.

    Raises:
      ValueError: the shape is not (n,) or (n, 1), or a float label is not an integer.
      TypeError: the labels are neither integers nor strings (booleans, a mixture).

    >>> class_labels([[3.0], [1.0]]).tolist(), class_labels([b"a", "b"]).tolist()
    ([3, 1], ['a', 'b'])
    """
    array = np.asarray(y)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise ValueError(
            f"`{name}` must hold one class label per item, with shape (num_items,) or "
            f"(num_items, 1). Received: {name}.shape={np.shape(y)}"
        )
    if array.dtype.kind == "O":
        values = [v.decode() if isinstance(v, bytes) else v for v in array.tolist()]
        if all(isinstance(v, str) for v in values):
            return np.array(values, dtype=str)
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            return np.array(values, dtype=np.int64)
        raise TypeError(f"`{name}` must hold integer or string labels, not a mixture.")
    if array.dtype.kind in "iu":
        return array
    if array.dtype.kind in "US":
        return array.astype(str)
    if array.dtype.kind == "f":
        integral = np.isfinite(array) & (array == np.round(array))
        if not np.all(integral):
            raise ValueError(
                f"`{name}` must hold class labels: integers or strings. Float labels must be "
                f"integer-valued; received values such as {array[~integral][:3].tolist()}"
            )
        return array.astype(np.int64)
    raise TypeError(
        f"`{name}` must hold integer or string class labels. Received: {name}.dtype={array.dtype}"
    )


def _labels_to_ints(y: np.ndarray, name: str) -> tuple[np.ndarray, list[str]]:
    """Labels 0..n-1 and the name of each: integers in [0, 2^31) are kept as given."""
    try:
        labels = class_labels(y, "labels")
    except (ValueError, TypeError) as e:
        raise DataError(f"{name}: {e}") from None
    if labels.dtype.kind in "iu" and labels.size:
        low, high = int(labels.min()), int(labels.max())
        if low >= 0 and high < 2**31:
            return labels.astype("int64"), [str(c) for c in range(high + 1)]
    classes, codes = np.unique(labels, return_inverse=True)
    return codes.reshape(-1).astype("int64"), [str(c) for c in classes.tolist()]


def _check_lengths(x: np.ndarray, y: np.ndarray, name: str) -> None:
    if len(x) != len(y):
        raise DataError(f"{name}: {len(x)} examples but {len(y)} labels")
    if len(x) == 0:
        raise DataError(f"{name}: the data set is empty")


def _check_finite(x: np.ndarray, name: str) -> None:
    """DataError naming `name`, the count of NaN/inf values and the first row holding one."""
    if x.dtype.kind not in "fc":
        return
    bad = ~np.isfinite(x.reshape(len(x), -1))
    count = int(bad.sum())
    if count:
        rows = np.flatnonzero(bad.any(axis=1))
        raise DataError(
            f"{name}: {count} non-finite values (NaN or inf) in {len(rows)} rows of the "
            f"features; the first is row {int(rows[0])}"
        )


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def _check_npz_file(path: Path) -> None:
    """DataError unless `path` is a zip archive, as `numpy.savez` writes (before numpy reads
    it: `np.load` takes any other file for a pickle and says so)."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror or e})") from None
    if head[:4] in _ZIP_MAGIC:
        return
    kind = "a single .npy array" if head == b"\x93NUMPY" else "not a zip archive"
    raise DataError(
        f"{path}: not an .npz file ({kind}); expected the arrays x and y saved with "
        "numpy.savez or numpy.savez_compressed"
    )


def _load_npz(path: Path) -> Dataset:
    _check_npz_file(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            files = set(f.files)
            if "x" not in files:
                raise DataError(f"{path}: no array 'x' in the .npz (found: {sorted(files)})")
            if "y" not in files:
                raise DataError(f"{path}: no array 'y' in the .npz (found: {sorted(files)})")
            arrays = {}
            for key in ("x", "y", "class_names"):
                if key not in files:
                    continue
                try:
                    arrays[key] = f[key]
                except ValueError as e:
                    if "allow_pickle" not in str(e):
                        raise
                    raise DataError(
                        f"{path}: the array {key!r} holds Python objects (a pickled object "
                        "array), which deepmetric does not unpickle; save numbers or strings"
                    ) from None
            x, y = arrays["x"], arrays["y"]
            names = arrays.get("class_names")
            names = None if names is None else [str(n) for n in names.tolist()]
    except DataError:
        raise
    except Exception as e:  # zipfile and format errors from numpy
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    if x.ndim < 2:
        raise DataError(
            f"{path}: 'x' must have shape (n, features) or (n, H, W[, C]), got {x.shape}"
        )
    if x.dtype.kind not in "iuf" or x.dtype == np.float16:
        try:
            x = x.astype("float32")
        except (TypeError, ValueError) as e:
            raise DataError(f"{path}: 'x' must hold numbers, got dtype {x.dtype} ({e})") from None
    _check_lengths(x, y, str(path))
    _check_finite(x, str(path))
    labels, class_names = _labels_to_ints(y, str(path))
    if names is not None and len(names) >= len(class_names):
        class_names = names
    if x.ndim == 3:
        x = x[..., None]
    return Dataset(x, labels, class_names, pixel_scale_of(x))


_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> np.ndarray:
    """Reads one IDX file (the MNIST format), gzip-compressed or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read IDX file ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(dims)) if dims else 1
    if len(data) < header + count * dtype.itemsize:
        raise DataError(f"{path}: truncated IDX data (expected shape {dims})")
    return (
        np.frombuffer(data, dtype, count=count, offset=header)
        .reshape(dims)
        .astype(dtype.newbyteorder("="))
    )


def _idx_pairs(folder: Path) -> list[tuple[Path, Path]]:
    pairs = []
    for images in sorted(folder.iterdir()):
        if "idx3" in images.name and "images" in images.name:
            labels = folder / images.name.replace("images", "labels").replace("idx3", "idx1")
            if labels.exists():
                pairs.append((images, labels))
    return pairs


def _load_idx(pairs: list[tuple[Path, Path]]) -> Dataset:
    xs, ys = [], []
    for images, labels in pairs:
        x, y = read_idx(images), read_idx(labels)
        if x.ndim not in (2, 3, 4):
            raise DataError(f"{images}: expected (n, H, W) images, got shape {x.shape}")
        _check_lengths(x, y, str(images))
        _check_finite(x, str(images))
        xs.append(x)
        ys.append(y)
    x = np.concatenate(xs)
    if x.ndim == 3:
        x = x[..., None]
    y, class_names = _labels_to_ints(np.concatenate(ys), str(pairs[0][0]))
    return Dataset(x, y, class_names, pixel_scale_of(x))


def _read_image(path: Path, mode: str | None, size: tuple[int, int] | None):
    from PIL import Image

    with Image.open(path) as opened:
        opened.load()
        if mode is None:
            mode = "L" if opened.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
        image = opened.convert(mode)
        if size is not None and image.size != size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        return np.asarray(image, dtype="uint8"), mode, image.size


def _load_image_folder(folder: Path) -> Dataset:
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{folder}: empty folder (expected one sub-folder of images per class)")
    files = [
        (label, f)
        for label, c in enumerate(classes)
        for f in sorted((folder / c).iterdir())
        if f.is_file() and not f.name.startswith(".")
    ]
    if not files:
        raise DataError(f"{folder}: the class folders {classes} contain no files")
    # The first readable image fixes the colour mode (grey or RGB) and the size.
    mode = size = None
    images, labels = [], []
    for label, f in files:
        try:
            pixels, mode, size = _read_image(f, mode, size)
        except Exception as e:  # PIL raises many kinds on corrupt files
            warnings.warn(f"skipping unreadable image {f}: {type(e).__name__}", stacklevel=3)
            continue
        images.append(pixels)
        labels.append(label)
    if not images:
        raise DataError(f"{folder}: none of the {len(files)} files is a readable image")
    counts = np.bincount(labels, minlength=len(classes))
    if not counts.all():
        empty = [classes[i] for i in np.flatnonzero(counts == 0)]
        more = f" (nor do {len(empty) - 1} more: {', '.join(empty[1:6])})" if empty[1:] else ""
        raise DataError(
            f"{folder}: the class folder {folder / empty[0]} holds no readable image{more}"
        )
    x = np.stack(images)
    if x.ndim == 3:
        x = x[..., None]
    return Dataset(x, np.array(labels, dtype="int64"), classes, 1 / 255)


def load(path) -> Dataset:
    """Reads a data set from `path`.

    - a folder with one sub-folder per class, holding images (PIL can read them; all
      are converted to the colour mode and resized to the size of the first readable
      image; an unreadable file is skipped with a warning that names it);
    - a folder with MNIST-format IDX files (`*images-idx3-ubyte[.gz]` beside the
      matching `*labels-idx1-ubyte[.gz]`; several pairs, such as train and t10k, are
      concatenated), or the images IDX file itself, or a pair `(images, labels)`;
    - an `.npz` with arrays `x` (n, features) or (n, H, W[, C]) and `y` (integers or
      class names, which are sorted and numbered; an optional `class_names` array
      names integer labels);
    - the name "digits" for `load_digits()`, "glyphs" for `load_glyphs()`.

    Raises:
      DataError: the path is missing, the folder is empty, no image is readable,
        the .npz has no `x`, or the numbers of examples and labels differ.
    """
    if isinstance(path, (tuple, list)):
        if len(path) != 2:
            raise DataError(f"expected a pair (images, labels) of IDX files, got {path!r}")
        images, labels = (Path(p) for p in path)
        for p in (images, labels):
            if not p.exists():
                raise DataError(f"{p}: no such file")
        return _load_idx([(images, labels)])
    if str(path) == "digits":
        return load_digits()
    if str(path) == "glyphs":
        return load_glyphs()
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        if not any(path.iterdir()):
            raise DataError(f"{path}: empty folder")
        pairs = _idx_pairs(path)
        if pairs:
            return _load_idx(pairs)
        return _load_image_folder(path)
    if path.suffix == ".npz":
        return _load_npz(path)
    if "idx3" in path.name:
        labels = path.with_name(path.name.replace("images", "labels").replace("idx3", "idx1"))
        if not labels.exists():
            raise DataError(f"{path}: no matching labels file {labels.name}")
        return _load_idx([(path, labels)])
    raise DataError(f"{path}: unknown data format (expected an image folder, an .npz or IDX files)")


SPLITS = ("samples", "classes")


def _check_split_labels(y) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        labels = class_labels(y, "y")
    except (ValueError, TypeError) as e:
        raise DataError(str(e)) from None
    classes, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if len(classes) < 2:
        raise DataError(f"the data has {len(classes)} class; metric learning needs at least 2")
    return labels, codes.reshape(-1), counts


def _check_test_size(test_size) -> None:
    if isinstance(test_size, bool) or not isinstance(test_size, (int, float, np.number)):
        raise DataError(f"`test_size` must be a fraction or a count. Received: {test_size!r}")
    if isinstance(test_size, (float, np.floating)) and not 0 < test_size < 1:
        raise DataError(f"a fractional `test_size` must be in (0, 1). Received: {test_size}")


def split_samples(y, test_size: float | int = 0.3, seed: int = 0):
    """A stratified split of the samples: `(train_indices, test_indices)`.

    Every class keeps about `test_size` of its samples for the test side
    (scikit-learn's `train_test_split(..., stratify=y, random_state=seed)` on the
    indices, so `x[train]` equals the `x_train` that call returns for `x`), and
    the test classes are the training classes: this measures how well the model
    embeds new samples of classes it has seen. `test_size` is a fraction of the
    samples, or their number when an int. The indices are in the order that
    `train_test_split` returns.

    Raises:
      DataError: fewer than 2 classes, a class with a single sample, or a
        `test_size` that leaves a side with fewer samples than classes.
    """
    from sklearn.model_selection import train_test_split

    labels, _, counts = _check_split_labels(y)
    _check_test_size(test_size)
    if counts.min() < 2:
        single = np.unique(labels)[counts < 2]
        more = f" (and {len(single) - 1} more)" if len(single) > 1 else ""
        raise DataError(
            f"class {single[0].item()!r}{more} has 1 example; every class needs at least 2 "
            "examples for the stratified split"
        )
    try:
        train, test = train_test_split(
            np.arange(len(labels)), test_size=test_size, stratify=labels, random_state=seed
        )
    except ValueError as e:
        raise DataError(f"cannot split the data with test_size={test_size}: {e}") from None
    return train.astype(np.int64), test.astype(np.int64)


def split_classes(y, test_size: float | int = 0.3, seed: int = 0):
    """A class-disjoint split: `(train_indices, test_indices)`, no class on both sides.

    Whole classes are held out: `test_size` is the fraction of the classes
    (rounded, at least 1 and at most all but one), or their number when an int,
    drawn at random with `seed`; every sample of a test class is a test sample.
    This is the protocol of "A Metric Learning Reality Check" (Musgrave, Belongie
    and Lim, ECCV 2020) and of the CUB-200, Cars-196 and SOP benchmarks: test
    classes are never seen in training, so the metrics measure how the embedding
    generalises to new classes, which is what retrieval and verification need.
    Both index arrays are ascending.

    Raises:
      DataError: fewer than 2 classes, or a `test_size` that leaves a side
        without a class.

    >>> train, test = split_classes([0, 0, 1, 1, 2, 2], test_size=1, seed=0)
    >>> len(train), len(test)
    (4, 2)
    """
    _, codes, counts = _check_split_labels(y)
    _check_test_size(test_size)
    num_classes = len(counts)
    if isinstance(test_size, (float, np.floating)):
        num_test = min(max(int(round(test_size * num_classes)), 1), num_classes - 1)
    else:
        num_test = int(test_size)
        if not 1 <= num_test <= num_classes - 1:
            raise DataError(
                f"`test_size` as a number of classes must be from 1 to {num_classes - 1}. "
                f"Received: {test_size}"
            )
    held_out = np.random.default_rng(seed).choice(num_classes, num_test, replace=False)
    is_test = np.isin(codes, held_out)
    return np.flatnonzero(~is_test).astype(np.int64), np.flatnonzero(is_test).astype(np.int64)


def split_indices(y, *, by: str = "samples", test_size: float | int = 0.3, seed: int = 0):
    """`split_samples` (by="samples") or `split_classes` (by="classes") of labels `y`.

    Returns `(train_indices, test_indices)`, for `x[train]`, `y[train]`, ...
    """
    if by not in SPLITS:
        raise ValueError(f"`by` must be one of {SPLITS}. Received: by={by!r}")
    split = split_samples if by == "samples" else split_classes
    return split(y, test_size, seed)
