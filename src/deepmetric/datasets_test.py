"""Tests of deepmetric.datasets: every format from small files made here."""

import gzip
import struct
import warnings

import numpy as np
import pytest
from PIL import Image

from deepmetric import datasets
from deepmetric.datasets import DataError


def _image_folder(root, classes=("cat", "dog"), per_class=3, size=(5, 4), mode="L"):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
            pixels = rng.integers(0, 256, size=shape, dtype="uint8")
            Image.fromarray(pixels, mode).save(root / c / f"{i}.png")
    return root


def _write_idx(path, array, compress):
    codes = {np.dtype("uint8"): 0x08, np.dtype(">i4"): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    data = header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


def test_load_digits():
    data = datasets.load_digits()
    assert data.x.shape == (1797, 8, 8, 1) and data.y.shape == (1797,)
    assert data.x.min() == 0 and data.x.max() == 16
    assert data.y.dtype.kind == "i" and set(data.y.tolist()) == set(range(10))
    assert data.pixel_scale == 1 / 16 and data.is_image
    assert datasets.load("digits").x.shape == data.x.shape


def test_image_folder_grey(tmp_path):
    data = datasets.load(_image_folder(tmp_path / "imgs"))
    assert data.x.shape == (6, 4, 5, 1) and data.x.dtype == np.uint8
    assert data.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.class_names == ["cat", "dog"] and data.pixel_scale == 1 / 255


def test_image_folder_rgb_resized_to_first(tmp_path):
    root = _image_folder(tmp_path / "imgs", mode="RGB", per_class=2)
    Image.new("RGB", (9, 9)).save(root / "dog" / "big.png")
    data = datasets.load(root)
    assert data.x.shape == (5, 4, 5, 3)


def test_corrupt_image_is_skipped_with_warning(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    bad = root / "cat" / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.warns(UserWarning, match="broken.png"):
        data = datasets.load(root)
    assert len(data.y) == 6


def test_only_unreadable_images(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"junk")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="readable image"):
            datasets.load(tmp_path)


def test_npz_with_int_labels(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.random.default_rng(0).normal(size=(4, 3)), y=np.array([0, 1, 1, 0]))
    data = datasets.load(path)
    assert data.x.shape == (4, 3) and data.y.tolist() == [0, 1, 1, 0]
    assert data.pixel_scale is None and not data.is_image


def test_npz_with_class_names_and_images(tmp_path):
    path = tmp_path / "d.npz"
    x = np.random.default_rng(0).integers(0, 256, size=(3, 6, 6), dtype="uint8")
    np.savez(path, x=x, y=np.array(["b", "a", "b"]))
    data = datasets.load(path)
    assert data.x.shape == (3, 6, 6, 1) and data.pixel_scale == 1 / 255
    assert data.y.tolist() == [1, 0, 1] and data.class_names == ["a", "b"]


@pytest.mark.parametrize("compress", [False, True])
def test_idx_folder_and_files(tmp_path, compress):
    ext = ".gz" if compress else ""
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("t10k", 3)):
        _write_idx(
            tmp_path / f"{split}-images-idx3-ubyte{ext}",
            rng.integers(0, 256, size=(n, 4, 4), dtype="uint8"),
            compress,
        )
        _write_idx(
            tmp_path / f"{split}-labels-idx1-ubyte{ext}",
            rng.integers(0, 3, size=n).astype("uint8"),
            compress,
        )
    data = datasets.load(tmp_path)
    assert data.x.shape == (8, 4, 4, 1) and data.y.shape == (8,)
    single = datasets.load(tmp_path / f"t10k-images-idx3-ubyte{ext}")
    assert single.x.shape == (3, 4, 4, 1)
    pair = datasets.load(
        (tmp_path / f"train-images-idx3-ubyte{ext}", tmp_path / f"train-labels-idx1-ubyte{ext}")
    )
    assert pair.x.shape == (5, 4, 4, 1)


def _mismatched_npz(tmp_path):
    np.savez(tmp_path / "m.npz", x=np.zeros((3, 2)), y=np.zeros(2, "int64"))
    return tmp_path / "m.npz"


def _npz_without_x(tmp_path):
    np.savez(tmp_path / "nox.npz", features=np.zeros((3, 2)), y=np.zeros(3, "int64"))
    return tmp_path / "nox.npz"


def _empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p / "missing", "no such file"),
        (_empty_folder, "empty folder"),
        (_npz_without_x, "no array 'x'"),
        (_mismatched_npz, "3 examples but 2 labels"),
    ],
)
def test_errors_are_one_line_data_errors(tmp_path, make, match):
    with pytest.raises(DataError, match=match) as info:
        datasets.load(make(tmp_path))
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_bad_idx_magic(tmp_path):
    (tmp_path / "x-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04")
    (tmp_path / "x-labels-idx1-ubyte").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="magic"):
        datasets.load(tmp_path)


def test_pixel_scale_of():
    assert datasets.pixel_scale_of(np.zeros((2, 3))) is None
    assert datasets.pixel_scale_of(np.full((1, 2, 2), 0.5)) is None
    assert datasets.pixel_scale_of(np.full((1, 2, 2), 16.0)) == 1 / 16
    assert datasets.pixel_scale_of(np.full((1, 2, 2), 200.0)) == 1 / 255


def _npz_with(tmp_path, y):
    path = tmp_path / "l.npz"
    np.savez(path, x=np.zeros((len(y), 2)), y=np.asarray(y))
    return path


def test_npz_labels_outside_0_to_2_31_are_numbered_in_order(tmp_path):
    data = datasets.load(_npz_with(tmp_path, [10, -1, 5, 10]))
    assert data.y.tolist() == [2, 0, 1, 2] and data.class_names == ["-1", "5", "10"]
    data = datasets.load(_npz_with(tmp_path, [2.0, 0.0, 2.0]))
    assert data.y.tolist() == [2, 0, 2] and data.class_names == ["0", "1", "2"]


@pytest.mark.parametrize(
    "y, match", [([0.5, 1.0], "integer-valued"), ([True, False], "dtype=bool")]
)
def test_npz_bad_labels_are_data_errors(tmp_path, y, match):
    with pytest.raises(DataError, match=match):
        datasets.load(_npz_with(tmp_path, y))


@pytest.mark.parametrize(
    "y, expected",
    [
        ([[3], [1]], [3, 1]),
        (np.array([16777217, 16777216], "int64"), [16777217, 16777216]),
        ([2.0, 7.0], [2, 7]),
        (np.array(["b", "a"], object), ["b", "a"]),
        (np.array([b"x", "y"], object), ["x", "y"]),
        (np.array([4, 5], object), [4, 5]),
        (np.array([b"p", b"q"]), ["p", "q"]),
    ],
)
def test_class_labels(y, expected):
    labels = datasets.class_labels(y)
    assert labels.ndim == 1 and labels.tolist() == expected
    assert labels.dtype.kind in "iuU"


@pytest.mark.parametrize(
    "y, error, match",
    [
        (np.zeros((2, 2)), ValueError, r"y.shape=\(2, 2\)"),
        ([1.5, 2.0], ValueError, "integer-valued"),
        ([np.nan], ValueError, "integer-valued"),
        (np.array([1, "a"], object), TypeError, "mixture"),
        ([True], TypeError, "bool"),
        ([1 + 2j], TypeError, "complex"),
    ],
)
def test_class_labels_errors(y, error, match):
    with pytest.raises(error, match=match):
        datasets.class_labels(y)


def test_split_classes_is_disjoint_sized_and_seeded():
    y = np.repeat(np.arange(10), np.arange(2, 12))
    train, test = datasets.split_classes(y, test_size=0.3, seed=1)
    assert set(y[train]).isdisjoint(y[test])
    assert len(set(y[test])) == 3 and len(set(y[train])) == 7
    assert sorted(np.r_[train, test].tolist()) == list(range(len(y)))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    again = datasets.split_classes(y, test_size=0.3, seed=1)
    assert np.array_equal(again[1], test)
    assert any(
        set(y[datasets.split_classes(y, 0.3, seed)[1]]) != set(y[test]) for seed in range(2, 6)
    )
    assert len(set(y[datasets.split_classes(y, 4)[1]])) == 4
    assert len(set(y[datasets.split_classes(y, 0.01)[1]])) == 1  # at least one class
    assert len(set(y[datasets.split_classes(y, 0.99)[0]])) == 1  # at least one left to train
    names = np.array(["cat", "dog", "owl"]).repeat(2)
    train, test = datasets.split_indices(names, by="classes", test_size=1)
    assert len(set(names[test])) == 1 and set(names[train]).isdisjoint(names[test])


def test_split_samples_matches_the_stratified_split():
    from sklearn.model_selection import train_test_split

    data = datasets.load_digits()
    train, test = datasets.split_indices(data.y, by="samples", test_size=0.3, seed=2)
    x_train, x_test, y_train, y_test = train_test_split(
        data.x, data.y, test_size=0.3, stratify=data.y, random_state=2
    )
    assert np.array_equal(data.x[train], x_train) and np.array_equal(data.y[test], y_test)
    assert set(data.y[train]) == set(data.y[test])
    counts = np.bincount(data.y[test]) / np.bincount(data.y)
    assert np.all(np.abs(counts - 0.3) < 0.02)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: datasets.split_classes([0, 0, 0], 0.5), "at least 2"),
        (lambda: datasets.split_classes([0, 1, 2], 3), "from 1 to 2"),
        (lambda: datasets.split_classes([0, 1], 1.5), r"in \(0, 1\)"),
        (lambda: datasets.split_samples([0, 0, 1], 0.5), "at least 2 examples"),
        (lambda: datasets.split_samples([0, 0, 1, 1], 0.1), "cannot split"),
        (lambda: datasets.split_indices([0, 1], by="rows"), "`by` must be one of"),
    ],
)
def test_split_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _non_finite_npz(tmp_path):
    x = np.ones((6, 3), "float32")
    x[4, 1], x[4, 2], x[5, 0] = np.nan, np.inf, -np.inf
    np.savez(tmp_path / "nan.npz", x=x, y=np.arange(6) % 2)
    return tmp_path / "nan.npz"


def _non_finite_idx(tmp_path):
    x = np.ones((4, 2, 2), ">f4")
    x[2, 1, 1] = np.nan
    header = bytes([0, 0, 0x0D, 3]) + struct.pack(">3I", *x.shape)
    (tmp_path / "f-images-idx3-ubyte").write_bytes(header + x.tobytes())
    _write_idx(tmp_path / "f-labels-idx1-ubyte", np.array([0, 1, 0, 1], "uint8"), False)
    return tmp_path / "f-images-idx3-ubyte"


def _text_npz(tmp_path):
    (tmp_path / "text.npz").write_text("x,y\n1,2\n")
    return tmp_path / "text.npz"


def _npy_npz(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((3, 2)))
    (tmp_path / "a.npy").rename(tmp_path / "a.npz")
    return tmp_path / "a.npz"


def _object_npz(tmp_path):
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}] * 4, dtype=object), y=np.arange(4))
    return tmp_path / "obj.npz"


def _empty_class_folder(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    (root / "emu").mkdir()
    (root / "emu" / "notes.txt").write_text("not an image")
    return root


@pytest.mark.parametrize(
    "make, match",
    [
        (_non_finite_npz, r"nan.npz: 3 non-finite values \(NaN or inf\) in 2 rows.* row 4$"),
        (_non_finite_idx, r"f-images-idx3-ubyte: 1 non-finite values .* in 1 rows.* row 2$"),
        (_text_npz, r"text.npz: not an .npz file \(not a zip archive\)"),
        (_npy_npz, r"a.npz: not an .npz file \(a single .npy array\)"),
        (_object_npz, r"obj.npz: the array 'x' holds Python objects"),
        (_empty_class_folder, r"class folder .*emu holds no readable image"),
    ],
)
def test_bad_files_are_named_in_one_line(tmp_path, make, match):
    path = make(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match=match) as info:
            datasets.load(path)
    message = str(info.value)
    assert "\n" not in message and "pickled data" not in message and "allow_pickle" not in message


def test_split_names_the_class_with_one_example():
    with pytest.raises(DataError, match=r"class 'emu' has 1 example"):
        datasets.split_samples(np.array(["cat", "cat", "dog", "dog", "emu"]))


def test_load_glyphs_has_many_classes_of_uint8_images():
    data = datasets.load_glyphs(examples_per_class=3)
    names = datasets.glyph_classes()
    assert len(names) >= 100 and data.class_names == names
    assert data.x.shape == (3 * len(names), 32, 32, 1) and data.x.dtype == np.uint8
    assert data.y.tolist() == np.repeat(np.arange(len(names)), 3).tolist()
    assert data.pixel_scale == 1 / 255 and data.is_image
    assert len(set(names)) == len(names) and all(len(c) == 1 for c in names)
    assert datasets.load("glyphs").x.shape[1:] == (32, 32, 1)


def test_load_glyphs_is_deterministic_per_seed():
    first = datasets.load_glyphs(classes=12, examples_per_class=6, seed=3)
    again = datasets.load_glyphs(classes=12, examples_per_class=6, seed=3)
    other = datasets.load_glyphs(classes=12, examples_per_class=6, seed=4)
    np.testing.assert_array_equal(first.x, again.x)
    assert first.y.tolist() == other.y.tolist()
    # every image of another seed differs (another font, angle, scale, shift or noise)
    assert (first.x != other.x).reshape(len(first.x), -1).any(axis=1).all()


def test_load_glyphs_classes_and_size():
    data = datasets.load_glyphs(classes="ЖAb", examples_per_class=2, size=24)
    assert data.class_names == ["Ж", "A", "b"] and data.x.shape == (6, 24, 24, 1)
    assert datasets.load_glyphs(classes=5, examples_per_class=1).class_names == list("01234")


def test_glyph_images_are_never_blank():
    """Every image shows its glyph: at least 4 pixels above 96 of 255, which the pixel
    noise alone (standard deviation at most 0.08 * 255 = 20) reaches with a probability
    of about 1e-6 per pixel."""
    x = datasets.load_glyphs().x[..., 0]
    assert ((x > 96).sum(axis=(1, 2)) >= 4).all()
    assert (x[:, 0, :] < 96).mean() > 0.99  # and the glyphs stay inside the frame


def test_glyph_classes_are_distinct_characters_of_their_fonts():
    """No class is a homoglyph of another (Greek and Cyrillic A are Latin A's outline),
    no font draws a character it lacks (glyph index 0), and no two renders in the data
    are the same glyph: not two classes in one font, not one class in two fonts."""
    from matplotlib.ft2font import FT2Font

    names = datasets.glyph_classes()
    for homoglyph in ("\u0391", "\u0410", "\u043e", "\u0440", "\u0421"):  # Α А о р С
        assert homoglyph not in names
    for kept in ("A", "a", "\u0416", "\u043f", "\u03bb", "\u00df"):  # Ж п λ ß
        assert kept in names
    table = datasets._glyph_table()
    renders = datasets._font_renders(64)
    candidates = datasets._glyph_candidates()
    for font in datasets.GLYPH_FONTS:
        charmap = FT2Font(str(datasets._font_dir() / f"{font}.ttf"))
        chars = [c for c, fonts in table if font in fonts]
        assert all(charmap.get_char_index(ord(c)) for c in chars), font
        if chars:
            masks = renders[font][[candidates.index(c) for c in chars]] > 127
            same = datasets._same_glyphs(masks)
            assert same.sum() == len(chars), font  # each class only equals itself
    for char, fonts in table:
        assert len(fonts) >= datasets.GLYPH_MIN_FONTS
        masks = np.stack([renders[f][candidates.index(char)] for f in fonts]) > 127
        assert datasets._same_glyphs(masks).sum() == len(fonts), char
    templates, owner = datasets._glyph_templates(32)
    flat = templates[:, 1].reshape(len(templates), -1)
    _, first = np.unique(flat, axis=0, return_index=True)
    assert len(first) == len(flat)  # no render twice, within a class or across classes
    assert owner.tolist() == sorted(owner.tolist()) and set(owner.tolist()) == set(
        range(len(names))
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"classes": "A!"}, "not classes: '!'"),
        ({"classes": "AA"}, "distinct characters"),
        ({"classes": 0}, "from 1 to"),
        ({"classes": 1.5}, "None, a number of classes or a string"),
        ({"examples_per_class": 0}, "at least 1"),
        ({"size": 8}, "from 16 to 128"),
        ({"size": 32.0}, "`size` must be an int"),
    ],
)
def test_load_glyphs_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        datasets.load_glyphs(**kwargs)
