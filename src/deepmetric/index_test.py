"""Tests of `deepmetric.index.Index`: search, save/load, match and calibrate."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from deepmetric.index import METRICS, Index, IndexFileError, faiss_installed

needs_faiss = pytest.mark.skipif(not faiss_installed(), reason="faiss is not installed")
FLAT = [("exact", "flat"), pytest.param("faiss", "flat", marks=needs_faiss)]


def brute_force(queries, rows, k, metric):
    """Every distance in float64 by its definition, ranked by (distance, row)."""
    q = np.asarray(queries, np.float64)
    r = np.asarray(rows, np.float64)
    if metric in ("euclidean", "squared_euclidean"):
        d = ((q[:, None, :] - r[None, :, :]) ** 2).sum(-1)
        d = np.sqrt(d) if metric == "euclidean" else d
    elif metric == "cosine":
        nq, nr = np.linalg.norm(q, axis=1), np.linalg.norm(r, axis=1)
        cos = (q @ r.T) / np.maximum(nq[:, None] * nr[None, :], 1e-300)
        d = 1.0 - np.where((nq[:, None] > 0) & (nr[None, :] > 0), cos, 0.0)
    else:
        d = -(q @ r.T)
    order = np.array([sorted(range(len(r)), key=lambda j, row=row: (row[j], j)) for row in d])
    return np.take_along_axis(d, order[:, :k], axis=1), order[:, :k]


def tied_points(metric, n, seed):
    """Points whose float32 distances under `metric` are exact, with many exact ties.

    Integer grid points for the Euclidean and inner-product metrics. For cosine,
    directions whose norm is a power of two (one or four entries of +-1) scaled by
    powers of two, plus a zero vector: their normalised dot products are exact.
    """
    rng = np.random.default_rng(seed)
    if metric != "cosine":
        return rng.integers(-4, 8, size=(n, 3)).astype(np.float32)
    axes = [v for v in itertools.product([-1, 0, 1], repeat=4) if np.count_nonzero(v) in (1, 4)]
    x = np.array(axes, np.float32)[rng.integers(0, len(axes), n)]
    x *= (2.0 ** rng.integers(-1, 3, n))[:, None]
    x[0] = 0.0
    return x


@pytest.mark.parametrize("engine, structure", FLAT)
@pytest.mark.parametrize("metric", METRICS)
def test_search_equals_brute_force_with_ties(engine, structure, metric):
    rows, queries = tied_points(metric, 200, 0), tied_points(metric, 30, 1)
    index = Index(metric, engine).add(rows)
    found = index.search(queries, k=12)
    want_d, want_i = brute_force(queries, rows, 12, metric)
    np.testing.assert_array_equal(found.indices, want_i)
    np.testing.assert_allclose(found.distances, want_d, rtol=1e-6, atol=1e-6)
    assert found.distances.dtype == np.float32 and found.indices.dtype == np.int64
    assert found.labels is None and found.metadata is None


@pytest.mark.parametrize("engine, structure", FLAT)
@pytest.mark.parametrize("metric", METRICS)
def test_search_equals_brute_force_on_random_data(engine, structure, metric):
    rng = np.random.default_rng(2)
    rows, queries = rng.normal(size=(300, 16)), rng.normal(size=(25, 16))
    found = Index(metric, engine).add(rows).search(queries, k=7)
    want_d, want_i = brute_force(queries, rows, 7, metric)
    np.testing.assert_array_equal(found.indices, want_i)
    np.testing.assert_allclose(found.distances, want_d, rtol=1e-4, atol=1e-4)
    assert np.all(np.diff(found.distances, axis=1) >= 0)


def test_chunked_search_equals_one_chunk(monkeypatch):
    from deepmetric import _search

    rows = tied_points("euclidean", 300, 3)
    whole = Index().add(rows).search(rows, k=5)
    monkeypatch.setattr(_search, "CHUNK_BYTES", 5000)
    chunked = Index().add(rows).search(rows, k=5)
    np.testing.assert_array_equal(whole.indices, chunked.indices)
    np.testing.assert_array_equal(whole.distances, chunked.distances)


def test_k_larger_than_the_index_returns_every_row():
    index = Index().add(np.array([[0.0], [2.0], [1.0]]), labels=[5, 6, 7])
    found = index.search(np.array([[0.0]]), k=10)
    assert found.indices.tolist() == [[0, 2, 1]] and found.labels.tolist() == [[5, 7, 6]]


def test_labels_and_metadata_follow_the_rows():
    index = Index().add(np.array([[0.0], [1.0]]), labels=["a", "b"], metadata=["p0", {"f": 1}])
    index.add(np.array([[3.0]]), labels=["c"], metadata=[None])
    found = index.search(np.array([[2.9], [0.1]]), k=2)
    assert len(index) == 3 and index.dim == 1
    assert found.labels.tolist() == [["c", "b"], ["a", "b"]]
    assert found.metadata == [[None, {"f": 1}], ["p0", {"f": 1}]]


@needs_faiss
@pytest.mark.parametrize("structure", ["hnsw", "ivf"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_approximate_structures_measure_their_recall(structure, metric):
    """HNSW with ef_search 200 and IVF visiting every cell find the exact
    neighbours; IVF with one of 32 cells misses some, which the recall shows."""
    rng = np.random.default_rng(4)
    rows, queries = rng.normal(size=(3000, 16)), rng.normal(size=(100, 16))
    options = {"ef_search": 200} if structure == "hnsw" else {"nlist": 32, "nprobe": 32}
    index = Index(metric, "faiss", structure=structure, **options).add(rows)
    assert index.measure_recall(queries, k=10) >= 0.99
    found = index.search(queries, k=10)
    exact = Index(metric).add(rows).search(queries, k=10)
    np.testing.assert_allclose(found.distances[:, 0], exact.distances[:, 0], rtol=1e-4, atol=1e-5)
    if structure == "ivf":
        index.options["nprobe"] = 1
        assert index.measure_recall(queries, k=10) < 0.9


@needs_faiss
def test_approximate_structure_grows_with_add():
    rng = np.random.default_rng(5)
    index = Index(engine="faiss", structure="hnsw").add(rng.normal(size=(50, 4)))
    index.search(np.zeros((1, 4)), k=1)
    index.add(np.full((1, 4), 9.0), labels=None)
    assert index.search(np.full((1, 4), 9.0), k=1).indices.tolist() == [[50]]


@needs_faiss
def test_structure_options_reach_faiss_and_are_saved(tmp_path):
    """ef_construction and ef_search are HNSW's efConstruction and efSearch, nprobe IVF's;
    the options are saved in index.json and come back with Index.load."""
    import faiss

    rows = np.random.default_rng(6).normal(size=(300, 8))
    index = Index(engine="faiss", structure="hnsw", m=8, ef_construction=72, ef_search=24)
    index.add(rows).search(rows[:2], k=3)
    hnsw = faiss.downcast_index(index._faiss).hnsw
    assert (hnsw.efConstruction, hnsw.efSearch) == (72, 24)
    loaded = Index.load(index.save(tmp_path / "h"))
    assert loaded.options == index.options and loaded.options["ef_construction"] == 72
    assert faiss.downcast_index(loaded._faiss).hnsw.efConstruction == 72
    ivf = Index(engine="faiss", structure="ivf", nlist=4).add(rows)
    ivf.search(rows[:2], k=3)
    assert faiss.extract_index_ivf(ivf._faiss).nprobe == ivf.options["nprobe"] == 8


# ------------------------------------------------------------------ save / load


def _saved(tmp_path, **kwargs):
    rng = np.random.default_rng(6)
    index = Index(**kwargs).add(rng.normal(size=(40, 5)), labels=rng.integers(0, 4, 40),
                                metadata=[f"img_{i}.png" for i in range(40)])  # fmt: skip
    index.threshold = 0.75
    return index, index.save(tmp_path / "idx")


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"metric": "cosine"},
        pytest.param({"engine": "faiss", "structure": "hnsw"}, marks=needs_faiss),
        pytest.param({"engine": "faiss", "structure": "ivf", "nlist": 4}, marks=needs_faiss),
    ],
)
def test_save_load_round_trip(tmp_path, kwargs):
    index, path = _saved(tmp_path, **kwargs)
    loaded = Index.load(path)
    q = np.random.default_rng(7).normal(size=(9, 5))
    a, b = index.search(q, k=4), loaded.search(q, k=4)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.distances, b.distances)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.metadata == b.metadata and loaded.threshold == 0.75
    assert (loaded.metric, loaded.engine, loaded.structure) == (
        index.metric, index.engine, index.structure)  # fmt: skip
    files = sorted(p.name for p in path.iterdir())
    assert ("faiss.index" in files) == (index.structure != "flat")
    assert json.loads((path / "index.json").read_text())["version"] == 1


def test_save_load_string_labels_without_metadata(tmp_path):
    index = Index().add(np.eye(3), labels=["cat", "dog", "emu"])
    loaded = Index.load(index.save(tmp_path / "i"))
    assert loaded.labels.tolist() == ["cat", "dog", "emu"] and loaded.metadata is None
    assert loaded.match(np.eye(3)[::-1]).tolist() == ["emu", "dog", "cat"]


def test_save_does_not_overwrite_unless_asked(tmp_path):
    index, path = _saved(tmp_path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        index.save(path)
    Index().add(np.ones((2, 3))).save(path, overwrite=True)
    assert len(Index.load(path)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temporary left over
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="does not hold a saved index"):
        index.save(other, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"


def _truncate(path):
    path.write_bytes(path.read_bytes()[:40])


@pytest.mark.parametrize(
    "damage, name",
    [
        (lambda p: (p / "vectors.npy").unlink(), "vectors.npy"),
        (lambda p: _truncate(p / "vectors.npy"), "vectors.npy"),
        (lambda p: np.save(p / "vectors.npy", np.zeros((3, 5), "float32")), "vectors.npy"),
        (lambda p: np.save(p / "labels.npy", np.array([{}] * 40), allow_pickle=True), "labels.npy"),
        (lambda p: (p / "labels.npy").unlink(), "labels.npy"),
        (lambda p: (p / "metadata.json").write_text("[1, 2"), "metadata.json"),
        (lambda p: (p / "metadata.json").write_text("[1, 2]"), "metadata.json"),
        (lambda p: (p / "index.json").unlink(), "index.json"),
        (lambda p: (p / "index.json").write_text("{not json"), "index.json"),
        (lambda p: _set(p, version=99), "version 99"),
        (lambda p: _set(p, metric="hamming"), "metric"),
        (lambda p: _set(p, size="forty"), "size"),
    ],
)
def test_load_names_the_damaged_file(tmp_path, damage, name):
    _, path = _saved(tmp_path)
    damage(path)
    with pytest.raises(IndexFileError, match=name):
        Index.load(path)


def _set(path, **changes):
    settings = json.loads((path / "index.json").read_text())
    settings.update(changes)
    (path / "index.json").write_text(json.dumps(settings))


@needs_faiss
def test_load_names_a_damaged_faiss_file(tmp_path):
    _, path = _saved(tmp_path, engine="faiss", structure="hnsw")
    _truncate(path / "faiss.index")
    with pytest.raises(IndexFileError, match="faiss.index"):
        Index.load(path)


def test_load_of_a_missing_folder(tmp_path):
    with pytest.raises(IndexFileError, match="not a folder"):
        Index.load(tmp_path / "nowhere")


# ------------------------------------------------------------------ match


LINE = np.array([[0.0], [1.0], [1.5], [10.0]])


@pytest.mark.parametrize(
    "k, vote, want, threshold",
    [
        # Query 0.2: neighbours a (0.2), b (0.8), b (1.3), c (9.8).
        (1, "nearest", "a", 0.2),
        (3, "nearest", "a", 0.2),
        (3, "majority", "b", 0.8),  # b twice, a once; b's nearest row decides: 0.8
        (2, "majority", "a", 0.2),  # one each: the label whose nearest row is nearest
        (3, "weighted", "a", 0.2),  # a: 1/0.2 = 5 > b: 1/0.8 + 1/1.3 = 2.02
        (4, "majority", "b", 0.8),
    ],
)
def test_match_votes_by_hand(k, vote, want, threshold):
    index = Index().add(LINE, labels=["a", "b", "b", "c"])
    q = np.array([[0.2]])
    assert index.match(q, k=k, vote=vote).tolist() == [want]
    assert index.match(q, k=k, vote=vote, threshold=threshold + 1e-6).tolist() == [want]
    assert index.match(q, k=k, vote=vote, threshold=threshold - 1e-6).tolist() == [None]
    assert index.match(q, k=k, vote=vote, threshold=0.0, unknown="?").tolist() == ["?"]


def test_match_weighted_prefers_close_rows_over_many():
    """Rows 7 at 0, 8 at 1 and 1; query 0.01: the majority of 3 is 8 (two against
    one), the weighted vote 7 (1/0.01 = 100 against 2/0.99 = 2.02)."""
    index = Index().add(np.array([[0.0], [1.0], [1.0]]), labels=[7, 8, 8])
    q = np.array([[0.01]])
    assert index.match(q, k=3, vote="majority").tolist() == [8]
    assert index.match(q, k=3, vote="weighted").tolist() == [7]


def test_match_integer_labels_and_the_stored_threshold():
    index = Index().add(LINE, labels=[3, 4, 4, 5])
    q = np.array([[0.1], [5.0], [10.2]])
    assert index.match(q).tolist() == [3, 4, 5]  # no threshold: every query answered
    index.threshold = 1.0
    got = index.match(q)
    assert got.dtype == np.int64 and got.tolist() == [3, -1, 5]
    assert index.match(q, threshold=4.0).tolist() == [3, 4, 5]
    assert index.match(q, unknown=None).tolist() == [3, None, 5]
    small = Index().add(LINE, labels=np.array([3, 4, 4, 5], "uint8"))  # MNIST's label dtype
    assert small.match(q, threshold=1.0).tolist() == [3, -1, 5]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"vote": "plurality"}, ValueError, "vote"),
        ({"k": 0}, ValueError, "k"),
    ],
)
def test_match_bad_arguments(kwargs, error, match):
    index = Index().add(LINE, labels=[0, 1, 1, 2])
    with pytest.raises(error, match=match):
        index.match(np.zeros((1, 1)), **kwargs)


def test_match_weighted_needs_non_negative_distances():
    with pytest.raises(ValueError, match="inner_product"):
        Index("inner_product").add(LINE, labels=[0, 1, 1, 2]).match(LINE, vote="weighted")


def test_match_needs_labels():
    with pytest.raises(ValueError, match="labels"):
        Index().add(LINE).match(LINE)


# ------------------------------------------------------------------ calibrate


def _figures(index, q, truth, t, k, vote):
    """precision, recall, F1, accuracy of `match` at threshold t, by their definitions."""
    got = index.match(q, threshold=t, k=k, vote=vote, unknown=None)
    known = np.isin(truth, index.labels)
    accepted = np.array([g is not None for g in got])
    correct = np.array([g is not None and g == y for g, y in zip(got, truth, strict=True)])
    if not accepted.any():
        return None
    precision = correct.sum() / accepted.sum()
    recall = correct.sum() / known.sum()
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    accuracy = (correct.sum() + (~accepted & ~known).sum()) / len(q)
    return precision, recall, f1, accuracy


def _exhaustive(index, q, truth, k, vote, target_precision, metric):
    """The threshold by trying every distance the search returns, smallest first."""
    candidates = np.unique(index.search(q, k).distances)
    table = [(float(t), _figures(index, q, truth, t, k, vote)) for t in candidates]
    table = [(t, f) for t, f in table if f is not None]
    if target_precision is not None:
        table = [(t, f) for t, f in table if f[0] >= target_precision]
        return max(table, key=lambda tf: (tf[1][1], -tf[0]))
    column = ["precision", "recall", "f1", "accuracy"].index(metric)
    return max(table, key=lambda tf: (tf[1][column], -tf[0]))


@pytest.mark.parametrize(
    "k, vote, target_precision, metric",
    [
        (1, "nearest", None, "f1"),
        (1, "nearest", None, "accuracy"),
        (1, "nearest", None, "recall"),
        (1, "nearest", 0.9, "f1"),
        (1, "nearest", 0.7, "f1"),
        (5, "majority", None, "f1"),
        (5, "majority", 0.8, "f1"),
        (4, "weighted", None, "accuracy"),
    ],
)
def test_calibrate_equals_exhaustive_search(k, vote, target_precision, metric):
    """Six classes of clustered 2-D points; the queries include two classes the
    index does not hold, which only a rejection answers rightly."""
    rng = np.random.default_rng(8)
    centres = rng.normal(scale=3.0, size=(8, 2))
    y = rng.integers(0, 6, 120)
    x = centres[y] + rng.normal(size=(120, 2))
    qy = rng.integers(0, 8, 90)
    qx = centres[qy] + rng.normal(size=(90, 2))
    index = Index().add(x, labels=y)
    got = index.calibrate(qx, qy, target_precision=target_precision, metric=metric, k=k,
                          vote=vote)  # fmt: skip
    t, figures = _exhaustive(index, qx, qy, k, vote, target_precision, metric)
    assert got.threshold == pytest.approx(t, abs=0)
    np.testing.assert_allclose(got[1:], figures, rtol=1e-12)
    assert index.threshold == got.threshold
    assert index.match(qx, k=k, vote=vote).tolist() == index.match(
        qx, threshold=t, k=k, vote=vote).tolist()  # fmt: skip


def test_calibrate_by_hand():
    """Rows a at 0, b at 10. Queries (label, deciding distance, matched label):
    a 1 a, a 2 a, b 3 a (wrong), z 4 b (z is not in the index), b 4.5 b; 4 known.
    Candidates t: 1: P 1, R 1/4; 2: P 1, R 2/4; 3: P 2/3, R 2/4; 4: P 2/4;
    4.5: P 3/5, R 3/4. F1 = 2 TP / (accepted + known): 0.4, 0.667, 0.571, 0.5,
    0.667: the smaller of the best two is 2. Accuracy at 2: 2 correct + z rejected
    = 3/5. Precision >= 0.6: t 1, 2, 3, 4.5; the highest recall is 4.5's."""
    index = Index().add(np.array([[0.0], [10.0]]), labels=["a", "b"])
    q = np.array([[1.0], [2.0], [3.0], [6.0], [5.5]])
    got = index.calibrate(q, ["a", "a", "b", "z", "b"])
    assert got == pytest.approx((2.0, 1.0, 0.5, 2 / 3, 0.6))
    assert index.calibrate(q, ["a", "a", "b", "z", "b"], target_precision=0.6).threshold == 4.5
    assert index.calibration["target_precision"] == 0.6


def test_calibrated_threshold_is_saved(tmp_path):
    index = Index().add(np.array([[0.0], [10.0]]), labels=[0, 1])
    index.calibrate(np.array([[1.0], [4.0], [9.0]]), [0, 0, 1])
    loaded = Index.load(index.save(tmp_path / "i"))
    assert loaded.threshold == index.threshold and loaded.calibration == index.calibration


@pytest.mark.parametrize(
    "labels, kwargs, error, match",
    [
        ([0, 0, 1], {"target_precision": 1.5}, ValueError, "target_precision"),
        ([0, 0, 1], {"metric": "auc"}, ValueError, "metric"),
        ([5, 6, 7], {}, ValueError, "no calibration query"),
        ([0, 1], {}, ValueError, "one label per query"),
        (["a", "b", "c"], {}, TypeError, "label kind"),
        ([1, 0, 1], {"target_precision": 1.0}, ValueError, "highest precision"),
    ],
)
def test_calibrate_bad_input(labels, kwargs, error, match):
    index = Index().add(np.array([[0.0], [10.0]]), labels=[0, 1])
    with pytest.raises(error, match=match):
        index.calibrate(np.array([[1.0], [4.0], [9.0]]), labels, **kwargs)


# ------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"metric": "manhattan"}, "metric"),
        ({"engine": "annoy"}, "engine"),
        ({"structure": "hnsw"}, "needs engine='faiss'"),
        ({"engine": "faiss", "structure": "lsh"}, "structure"),
        ({"m": 0}, "m"),
        ({"ef_construction": 0}, "ef_construction"),
        ({"nprobe": 1.5}, "nprobe"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Index(**kwargs)


def test_bad_rows_and_queries():
    index = Index().add(np.zeros((2, 3)), labels=[0, 1])
    with pytest.raises(ValueError, match="dimension 3"):
        index.add(np.zeros((1, 4)), labels=[0])
    with pytest.raises(ValueError, match="labels"):
        index.add(np.zeros((1, 3)))
    with pytest.raises(TypeError, match="kind"):
        index.add(np.zeros((1, 3)), labels=["a"])
    with pytest.raises(ValueError, match="one label per row"):
        index.add(np.zeros((2, 3)), labels=[0])
    with pytest.raises(ValueError, match="finite"):
        index.add(np.full((1, 3), np.nan), labels=[0])
    with pytest.raises(TypeError, match="JSON"):
        Index().add(np.zeros((1, 3)), metadata=[object()])
    with pytest.raises(ValueError, match="dimension 3"):
        index.search(np.zeros((1, 2)))
    with pytest.raises(ValueError, match="k"):
        index.search(np.zeros((1, 3)), k=0)
    with pytest.raises(ValueError, match="empty"):
        Index().search(np.zeros((1, 3)))
