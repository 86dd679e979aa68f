"""Tests of deepmetric.export: files parsed back, sprite size, valid PNGs."""

import numpy as np
import pytest
from PIL import Image

from deepmetric import export


def _read_tsv(path):
    return [line.split("\t") for line in path.read_text().splitlines()]


def test_projector_vectors_and_single_column_metadata(tmp_path):
    vecs = np.random.default_rng(0).normal(size=(5, 3)).astype("float32")
    written = export.write_projector(tmp_path, vecs, [0, 1, 2, 1, 0])
    assert {p.name for p in written} == {"vecs.tsv", "meta.tsv"}
    back = np.array(_read_tsv(tmp_path / "vecs.tsv"), dtype="float32")
    np.testing.assert_allclose(back, vecs, rtol=1e-6)
    assert (tmp_path / "meta.tsv").read_text() == "0\n1\n2\n1\n0\n"
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_projector_columns_get_a_header(tmp_path):
    export.write_projector(tmp_path, np.zeros((2, 2)), [1, 0], class_names=["zero", "one"])
    assert _read_tsv(tmp_path / "meta.tsv") == [["label", "class"], ["1", "one"], ["0", "zero"]]
    export.write_projector(tmp_path, np.zeros((2, 2)), {"kind": ["a\tb", "c"], "id": [1, 2]})
    assert _read_tsv(tmp_path / "meta.tsv") == [["kind", "id"], ["a b", "1"], ["c", "2"]]


def test_projector_sprite_and_config(tmp_path):
    images = np.random.default_rng(1).uniform(0, 16, size=(10, 8, 8, 1))
    export.write_projector(tmp_path, np.ones((10, 4)), np.arange(10), images=images)
    sprite = Image.open(tmp_path / "sprite.png")
    # 10 images -> a 4 x 4 grid of 32 px thumbnails (8 px digits enlarged)
    assert sprite.size == (128, 128)
    config = (tmp_path / "projector_config.pbtxt").read_text()
    assert 'tensor_path: "vecs.tsv"' in config and 'metadata_path: "meta.tsv"' in config
    assert 'image_path: "sprite.png"' in config
    assert config.count("single_image_dim: 32") == 2


@pytest.mark.parametrize("n, size", [(10000, 100), (5, 3000), (1, 9000), (300000, 28)])
def test_sprite_layout_never_exceeds_8192(n, size):
    grid, (w, h) = export.sprite_layout(n, size, size)
    assert grid * grid >= n and grid * max(w, h) <= export.MAX_SPRITE_SIZE


def test_large_images_are_shrunk_into_the_sprite():
    images = np.broadcast_to(np.full((1, 3000, 2000), 7, "uint8"), (5, 3000, 2000))
    sprite, (w, h) = export.make_sprite(images)
    assert sprite.shape == (3 * h, 3 * w) and max(sprite.shape) <= export.MAX_SPRITE_SIZE
    assert (w, h) == (1820, 2730)


def test_mismatched_metadata(tmp_path):
    with pytest.raises(ValueError, match="one per embedding"):
        export.write_projector(tmp_path, np.zeros((3, 2)), [0, 1])


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_plot_embeddings_png(tmp_path, method):
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(3), 10)
    emb = rng.normal(size=(30, 5)) + labels[:, None]
    path = export.plot_embeddings(tmp_path / "map.png", emb, labels, method, title="t")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100


def test_plot_embeddings_umap_needs_umap_learn(tmp_path):
    try:
        import umap  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="umap-learn"):
            export.plot_embeddings(tmp_path / "m.png", np.zeros((5, 3)), [0] * 5, "umap")
        assert not (tmp_path / "m.png").exists()
    else:
        pytest.skip("umap-learn is installed")


def test_plot_embeddings_bad_method(tmp_path):
    with pytest.raises(ValueError, match="method"):
        export.plot_embeddings(tmp_path / "m.png", np.zeros((5, 3)), [0] * 5, "lda")


def test_plot_history_png(tmp_path):
    history = {
        "loss": [1.0, 0.5, 0.3],
        "val_precision_at_1": [0.8, 0.9, 0.95],
        "val_map_at_r": [0.5, 0.7, 0.8],
        "learning_rate": [1e-3, 5e-4, 1e-4],
    }
    path = export.plot_history(tmp_path / "curves.png", history)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= 3 * 400


def test_sprite_thumbnails_are_framed_and_the_grid_is_unchanged():
    """7 black 8 x 8 images: a 3 x 3 grid of 32 px tiles, each framed by grey lines
    on its own edge; the two unused cells stay white, without frames."""
    sprite, (w, h) = export.make_sprite(np.zeros((7, 8, 8), "uint8"))
    assert sprite.shape == (96, 96) and (w, h) == (32, 32)
    tile = sprite[32:64, 32:64]
    assert np.all(tile[0] == export._FRAME) and np.all(tile[-1] == export._FRAME)
    assert np.all(tile[:, 0] == export._FRAME) and np.all(tile[:, -1] == export._FRAME)
    assert np.all(tile[1:-1, 1:-1] == 0)
    assert np.all(sprite[64:, 32:] == 255)


def test_plot_history_draws_recall_at_1_once_when_it_equals_precision_at_1(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    history = {"val_precision_at_1": [0.8, 0.9], "val_recall_at_1": [0.8, 0.9],
               "val_recall_at_4": [0.9, 0.95], "loss": [1.0, 0.5]}  # fmt: skip
    seen = []
    original = plt.Axes.legend

    def legend(ax, *args, **kwargs):
        seen.append([line.get_label() for line in ax.get_lines()])
        return original(ax, *args, **kwargs)

    monkeypatch.setattr(plt.Axes, "legend", legend)
    export.plot_history(tmp_path / "c.png", history)
    export.plot_history(tmp_path / "d.png", {**history, "val_recall_at_1": [0.7, 0.9]})
    assert seen[1] == ["val_precision_at_1 = val_recall_at_1", "val_recall_at_4"]
    assert seen[3] == ["val_precision_at_1", "val_recall_at_1", "val_recall_at_4"]


def test_plot_roc_draws_the_roc_points_and_the_eer(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    from scipy.stats import norm

    from deepmetric.evaluation import verification_metrics, verification_roc

    rng = np.random.default_rng(0)
    same = rng.random(400) < 0.5
    before = rng.normal(1.0, 0.4, 400) - 0.3 * same
    after = rng.normal(1.0, 0.3, 400) - 0.8 * same
    drawn = []
    original = plt.Figure.savefig

    def savefig(fig, *args, **kwargs):
        drawn.append(
            [[(ln.get_xdata(), ln.get_ydata()) for ln in ax.get_lines()] for ax in fig.axes]
        )
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", savefig)
    path = export.plot_roc(
        tmp_path / "roc.png", {"before": (before, same), "after": (after, same)}, title="pairs"
    )
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1000, 440)
    roc, det = drawn[0]
    far, tar, _ = verification_roc(after, same)
    np.testing.assert_allclose(roc[1][0], np.maximum(far, 1e-4))
    np.testing.assert_allclose(roc[1][1], tar)
    eer = norm.ppf(verification_metrics(after, same)["eer"])
    np.testing.assert_allclose([det[3][0][0], det[3][1][0]], [eer, eer])
    export.plot_roc(tmp_path / "one.png", (after, same))
    assert (tmp_path / "one.png").stat().st_size > 0
