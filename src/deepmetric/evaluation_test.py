"""Tests of `deepmetric.evaluation.retrieval_metrics`."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deepmetric import _search as index
from deepmetric.evaluation import retrieval_metrics

RANKING_KEYS = ("precision_at_1", "r_precision", "map_at_r", "mrr")


def brute_force(query, q_labels, reference=None, r_labels=None, recall_at=(1, 2, 4, 8)):
    """The definitions of Musgrave et al. (2020), one query at a time, full ranking."""
    self_search = reference is None
    if self_search:
        reference, r_labels = query, q_labels
    query = np.asarray(query, np.float64)
    reference = np.asarray(reference, np.float64)
    per_query: dict[str, list[float]] = {}
    for i in range(len(query)):
        d = np.sqrt(((reference - query[i]) ** 2).sum(axis=1))
        idx = np.arange(len(reference))
        if self_search:
            d, idx = np.delete(d, i), np.delete(idx, i)
        ranking = idx[np.lexsort((idx, d))]
        rel = np.asarray([r_labels[j] == q_labels[i] for j in ranking])
        big_r = int(rel.sum())
        if big_r == 0:
            continue
        precision = np.cumsum(rel) / np.arange(1, len(rel) + 1)
        values = {
            "precision_at_1": float(rel[0]),
            "r_precision": rel[:big_r].sum() / big_r,
            "map_at_r": (precision[:big_r] * rel[:big_r]).sum() / big_r,
            "mrr": 1.0 / (np.argmax(rel) + 1),
        }
        for k in recall_at:
            values[f"recall_at_{k}"] = float(rel[:k].any())
        for key, value in values.items():
            per_query.setdefault(key, []).append(value)
    return {key: float(np.mean(v)) for key, v in per_query.items()}


def clustered_data(n=120, dim=8, classes=6, noise=1.5, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    centres = rng.normal(size=(classes, dim)) * 2
    x = centres[labels] + noise * rng.normal(size=(n, dim))
    return x.astype(np.float32), labels


def assert_close(actual, expected, keys=None):
    keys = keys or expected.keys()
    for key in keys:
        assert actual[key] == pytest.approx(expected[key], abs=1e-9), key


def test_hand_computed_case():
    """Line x = 0, 1, 2, 3 with classes 0, 0, 1, 1 searched leave-one-out.

    Query 0: ranking 1 (rel), 2, 3 -> P@1 = RP = AP@R = RR = 1 (R = 1).
    Query 1: 0 and 2 at distance 1; the tie goes to index 0 (rel) -> all 1.
    Query 2: 1 and 3 at distance 1; index 1 (class 0) first -> P@1 = RP = AP@R = 0,
             first relevant at rank 2 -> RR = 1/2.
    Query 3: ranking 2 (rel), 1, 0 -> all 1.
    Means: 3/4 for P@1, RP, AP@R, recall@1; MRR = 3.5 / 4; recall@2 = 1.
    """
    x = np.array([[0.0], [1.0], [2.0], [3.0]])
    for use_faiss in (False, "auto"):
        m = retrieval_metrics(x, [0, 0, 1, 1], recall_at=(1, 2), clustering=False,
                              use_faiss=use_faiss)  # fmt: skip
        assert m == {
            "precision_at_1": 0.75,
            "r_precision": 0.75,
            "map_at_r": 0.75,
            "mrr": 0.875,
            "recall_at_1": 0.75,
            "recall_at_2": 1.0,
        }
        assert all(type(v) is float for v in m.values())


def test_hand_computed_map_at_r():
    """One query of class A; references in distance order: A, B, A, A, B (R = 3).

    rel = 1, 0, 1 in the first R: P(1) = 1, P(3) = 2/3 -> AP@R = (1 + 2/3) / 3 = 5/9.
    R-precision = 2/3, P@1 = 1, RR = 1, recall@2 = 1.
    """
    q = np.array([[0.0, 0.0]])
    ref = np.array([[1.0, 0], [2, 0], [3, 0], [4, 0], [5, 0]])
    m = retrieval_metrics(q, ["A"], ref, ["A", "B", "A", "A", "B"], recall_at=(2,),
                          clustering=False)  # fmt: skip
    assert m["map_at_r"] == pytest.approx(5 / 9)
    assert m["r_precision"] == pytest.approx(2 / 3)
    assert m["precision_at_1"] == 1.0 and m["mrr"] == 1.0 and m["recall_at_2"] == 1.0


def test_mrr_beyond_the_searched_neighbours():
    """Query of class 0: R = 1, its one relevant item ranks 4th -> RR = 1/4."""
    q = np.array([[0.0]])
    ref = np.array([[1.0], [2.0], [3.0], [4.0]])
    for use_faiss in (False, "auto"):
        m = retrieval_metrics(q, [0], ref, [1, 1, 1, 0], recall_at=(1,), clustering=False,
                              use_faiss=use_faiss)  # fmt: skip
        assert m["mrr"] == 0.25 and m["precision_at_1"] == 0.0 and m["map_at_r"] == 0.0


@pytest.mark.parametrize("use_faiss", [False, "auto"])
def test_against_brute_force_self_retrieval(use_faiss):
    x, y = clustered_data()
    m = retrieval_metrics(x, y, clustering=False, use_faiss=use_faiss)
    assert_close(m, brute_force(x, y))


@pytest.mark.parametrize("use_faiss", [False, "auto"])
def test_against_brute_force_with_reference_set(use_faiss):
    x, y = clustered_data(n=150, classes=7, seed=1)
    # Query class 6 has no reference: those queries are excluded.
    q, q_y = x[:50], y[:50]
    keep = y[50:] != 6
    ref, ref_y = x[50:][keep], y[50:][keep]
    m = retrieval_metrics(q, q_y, ref, ref_y, recall_at=(1, 3, 500), clustering=False,
                          use_faiss=use_faiss)  # fmt: skip
    assert_close(m, brute_force(q, q_y, ref, ref_y, recall_at=(1, 3, 500)))


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_chunked_equals_unchunked(chunk_size):
    x, y = clustered_data(seed=2)
    whole = retrieval_metrics(x, y, clustering=False, use_faiss=False)
    for use_faiss in (False, "auto"):
        m = retrieval_metrics(x, y, clustering=False, chunk_size=chunk_size, use_faiss=use_faiss)
        assert_close(m, whole)


def test_faiss_equals_numpy():
    pytest.importorskip("faiss")
    x, y = clustered_data(n=300, dim=16, classes=10, seed=3)
    ref, ref_y = clustered_data(n=200, dim=16, classes=10, seed=3)
    for args in [(x, y), (x, y, ref, ref_y)]:
        with_faiss = retrieval_metrics(*args, clustering=False, use_faiss=True)
        without = retrieval_metrics(*args, clustering=False, use_faiss=False)
        assert_close(with_faiss, without)


def test_label_renaming_invariance():
    x, y = clustered_data(seed=4)
    m = retrieval_metrics(x, y, seed=0)
    names = np.array(["cat", "dog", "emu", "fox", "gnu", "hen"])
    renamed = retrieval_metrics(x, names[y], seed=0)
    shifted = retrieval_metrics(x, (y * 7 + 16777216).reshape(-1, 1), seed=0)
    assert_close(renamed, m)
    assert_close(shifted, m)
    assert set(m) == {*RANKING_KEYS, "recall_at_1", "recall_at_2", "recall_at_4",
                      "recall_at_8", "nmi", "ami"}  # fmt: skip


def test_large_integer_labels_are_not_merged():
    """16777216 and 16777217 are one float32 value; they must stay two classes."""
    x = np.array([[0.0], [0.1], [1.0], [1.1]])
    m = retrieval_metrics(x, [16777216, 16777216, 16777217, 16777217], clustering=False)
    assert m["precision_at_1"] == 1.0 and m["map_at_r"] == 1.0


def test_clustering_metrics_separated_clusters():
    x, y = clustered_data(noise=0.01, seed=5)
    m = retrieval_metrics(x, y, clustering=True, seed=0)
    assert m["nmi"] == pytest.approx(1.0) and m["ami"] == pytest.approx(1.0)
    assert m == retrieval_metrics(x, y, clustering=True, seed=0)


def test_no_relevant_reference_gives_nan():
    with pytest.warns(UserWarning, match="No query has a relevant reference"):
        m = retrieval_metrics([[0.0], [1.0]], [0, 1], clustering=False)
    assert all(math.isnan(m[key]) for key in RANKING_KEYS)


def test_against_pytorch_metric_learning():
    pml = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    pytest.importorskip("faiss")
    x, y = clustered_data(n=200, classes=8, seed=6)
    include = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
    calc = pml.AccuracyCalculator(include=include, k="max_bin_count")
    for args in [(x, y), (x[:80], y[:80], x[80:], y[80:])]:
        expected = calc.get_accuracy(*args)
        m = retrieval_metrics(*args, clustering=False)
        assert m["precision_at_1"] == pytest.approx(expected["precision_at_1"], abs=1e-9)
        assert m["r_precision"] == pytest.approx(expected["r_precision"], abs=1e-9)
        assert m["map_at_r"] == pytest.approx(expected["mean_average_precision_at_r"], abs=1e-9)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"query_embeddings": np.zeros(4)}, "query_embeddings"),
        ({"query_labels": np.zeros((4, 2), int)}, "query_labels"),
        ({"query_labels": [0, 1, 0]}, "expected 4 labels"),
        ({"reference_embeddings": np.zeros((3, 2))}, "reference_labels"),
        ({"reference_embeddings": np.zeros((3, 2)), "reference_labels": [0, 1]}, "expected 3"),
        ({"reference_embeddings": np.zeros((3, 5)), "reference_labels": [0, 1, 1]}, "dimension"),
        ({"reference_labels": [0, 1, 1, 0]}, "reference_embeddings"),
        ({"recall_at": (0, 1)}, "recall_at"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"use_faiss": "yes"}, "use_faiss"),
        ({"query_labels": [0.5, 1, 0, 1]}, "integer-valued"),
        ({"query_embeddings": [[np.nan, 0.0]] * 4}, "finite"),
    ],
)
def test_bad_input(kwargs, match):
    args = {"query_embeddings": np.zeros((4, 2)), "query_labels": [0, 1, 0, 1]}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(**args, clustering=False)


def test_mixed_label_types():
    with pytest.raises(TypeError, match="both hold integers or both hold strings"):
        retrieval_metrics(np.zeros((2, 2)), [0, 1], np.zeros((2, 2)), ["a", "b"],
                          clustering=False)  # fmt: skip


@pytest.mark.parametrize("margin", [1.3, 0.2])
def test_large_reference_set_uses_sampled_threshold(monkeypatch, margin):
    """40,000 references take the sampled-threshold path of the numpy search.

    Integer coordinates make float32 distances exact, with many exact ties, so
    the search must match the float64 brute force exactly, ties broken by index.
    A margin of 0.2 makes the sampled threshold too low for every row, which
    exercises the exact fallback.
    """
    monkeypatch.setattr(index, "_MARGIN", margin)
    rng = np.random.default_rng(7)
    ref_y = rng.integers(0, 20, size=40_000)
    ref = (ref_y[:, None] // 4 + rng.integers(0, 12, size=(40_000, 3))).astype(np.float32)
    q_y = rng.integers(0, 20, size=12)
    q = (q_y[:, None] // 4 + rng.integers(0, 12, size=(12, 3))).astype(np.float32)
    m = retrieval_metrics(q, q_y, ref, ref_y, recall_at=(1, 10), clustering=False,
                          use_faiss=False)  # fmt: skip
    assert_close(m, brute_force(q, q_y, ref, ref_y, recall_at=(1, 10)))
