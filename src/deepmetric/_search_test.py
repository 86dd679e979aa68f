"""Tests of `deepmetric._search`: the exact k-nearest-neighbour search."""

from __future__ import annotations

import numpy as np
import pytest

from deepmetric import _search as index
from deepmetric._search import ExactSearch, exact_search

ENGINES = ["numpy", pytest.param("faiss", marks=pytest.mark.skipif(
    not index.faiss_installed(), reason="faiss is not installed"))]  # fmt: skip


def brute_force(queries, reference, k, exclude_self=False):
    """Every distance in float64, ranked by (distance, index)."""
    q = np.asarray(queries, np.float64)
    r = np.asarray(reference, np.float64)
    d = np.sqrt(((q[:, None, :] - r[None, :, :]) ** 2).sum(-1))
    if exclude_self:
        d[np.arange(len(q)), np.arange(len(q))] = np.inf
    cols = np.broadcast_to(np.arange(len(r)), d.shape)
    order = np.lexsort((cols, d), axis=-1)[:, :k]
    return np.take_along_axis(d, order, axis=1), order


def grid_points(n, seed, dim=3, high=12):
    """Integer coordinates: exact float32 distances with many exact ties."""
    return np.random.default_rng(seed).integers(0, high, size=(n, dim)).astype(np.float32)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("exclude_self", [False, True])
def test_against_brute_force_with_ties(engine, exclude_self):
    x = grid_points(300, seed=0)
    queries = x if exclude_self else grid_points(40, seed=1)
    d, i = exact_search(queries, x, 10, exclude_self=exclude_self, engine=engine)
    want_d, want_i = brute_force(queries, x, 10, exclude_self)
    np.testing.assert_array_equal(i, want_i)
    np.testing.assert_allclose(d, want_d, rtol=1e-6)
    assert d.dtype == np.float32 and i.dtype == np.int64
    assert np.all(np.diff(d, axis=1) >= 0)


def test_hand_computed_line():
    """Points 0, 1, 3 on a line: the nearest other point of each is 1, 0 (tie 0/2
    for point 1 goes to index 0), 1."""
    x = np.array([[0.0], [1.0], [3.0]])
    d, i = exact_search(x, x, 2, exclude_self=True)
    assert i.tolist() == [[1, 2], [0, 2], [1, 0]]
    assert d.tolist() == [[1.0, 3.0], [1.0, 2.0], [2.0, 3.0]]


@pytest.mark.parametrize("margin", [1.3, 0.2])
@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize("threads", [1, 3])
def test_large_reference_set_uses_sampled_threshold(monkeypatch, margin, exclude, threads):
    """40,000 references take the sampled-threshold path of the numpy search, by
    blocks of columns (3,000 a block here, so that the last block is partial), on
    one thread or on `threads` slices of the queries (two queries a thread at least).

    Integer coordinates make float32 distances exact, with many exact ties, so
    the neighbours must equal the float64 brute force exactly, ties broken by
    index. A margin of 0.2 makes the sampled threshold too low for every row,
    which exercises the exact fallback. With `exclude`, the queries are rows of
    the reference set that leave themselves out.
    """
    monkeypatch.setattr(index, "_MARGIN", margin)
    monkeypatch.setattr(index, "_BLOCK", 3000)
    monkeypatch.setattr(index, "_MIN_ROWS", 2)
    monkeypatch.setattr(index, "_threads", lambda: threads)
    reference = grid_points(40_000, seed=7)
    rows = np.array([0, 5, 2999, 3000, 20_000, 39_999])
    queries = reference[rows] if exclude else grid_points(12, seed=8)
    search = ExactSearch(reference)
    assert search._blocked(25)
    slices = []
    blocked = search._search_blocked
    monkeypatch.setattr(
        search, "_search_blocked", lambda q, *a: slices.append(len(q)) or blocked(q, *a)
    )
    found = search.search(queries, 25, exclude=rows if exclude else None)
    assert len(slices) == threads and sum(slices) == len(queries)
    want_d, want_i = brute_force(queries, reference, 25)
    if exclude:
        d = np.sqrt(((queries[:, None, :] - reference[None]) ** 2).sum(-1, dtype=np.float64))
        d[np.arange(len(rows)), rows] = np.inf
        order = np.lexsort((np.broadcast_to(np.arange(len(reference)), d.shape), d), axis=-1)
        want_i = order[:, :25]
        want_d = np.take_along_axis(d, want_i, axis=1)
    np.testing.assert_array_equal(found.indices, want_i)
    np.testing.assert_allclose(found.distances, want_d, rtol=1e-6)


@pytest.mark.skipif(not index.faiss_installed(), reason="faiss is not installed")
def test_faiss_equals_numpy_on_random_data():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 16)).astype(np.float32)
    q = rng.normal(size=(60, 16)).astype(np.float32)
    for args, kwargs in [((q, x), {}), ((x, x), {"exclude_self": True})]:
        d_np, i_np = exact_search(*args, 7, engine="numpy", **kwargs)
        d_f, i_f = exact_search(*args, 7, engine="faiss", **kwargs)
        np.testing.assert_array_equal(i_np, i_f)
        np.testing.assert_allclose(d_np, d_f, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("engine", ENGINES)
def test_exclude_an_item_that_is_not_among_the_neighbours(engine):
    """Excluding a far item leaves the k nearest unchanged."""
    x = np.array([[0.0], [1.0], [2.0], [10.0]], np.float32)
    search = ExactSearch(x, engine=engine)
    result = search.search(np.array([[0.0], [0.0]], np.float32), 2, exclude=[3, 0])
    assert result.indices.tolist() == [[0, 1], [1, 2]]
    assert result.first_match is None


@pytest.mark.parametrize("engine", ENGINES)
def test_first_match_beyond_the_neighbours(engine):
    """References at 1, 2, 3, 4 with labels 1, 1, 1, 0: a query at 0 of label 0
    finds its first match 4th; label 1 finds it 1st; label 5 never (0).
    Excluding reference 0 moves label 1's first match to rank 1 (reference 1)."""
    ref = np.array([[1.0], [2.0], [3.0], [4.0]], np.float32)
    search = ExactSearch(ref, np.array([1, 1, 1, 0]), engine=engine)
    q = np.zeros((3, 1), np.float32)
    result = search.search(q, 1, query_labels=np.array([0, 1, 5]))
    assert result.first_match.tolist() == [4, 1, 0]
    result = search.search(q[:1], 2, exclude=[0], query_labels=np.array([0]))
    assert result.first_match.tolist() == [3] and result.indices.tolist() == [[1, 2]]


def test_chunked_search_equals_one_chunk(monkeypatch):
    x = grid_points(200, seed=4)
    whole = exact_search(x, x, 5, exclude_self=True)
    monkeypatch.setattr(index, "CHUNK_BYTES", 4000)  # a few queries per chunk
    assert ExactSearch(x).chunk_size(5) < 10
    chunked = exact_search(x, x, 5, exclude_self=True)
    np.testing.assert_array_equal(whole[1], chunked[1])
    np.testing.assert_array_equal(whole[0], chunked[0])


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((np.zeros(4), np.zeros((3, 1)), 1), {}, "queries"),
        ((np.zeros((2, 2)), np.zeros((3, 1)), 1), {}, "same dimension"),
        ((np.zeros((2, 1)), np.zeros((3, 1)), 4), {}, r"k.*\[1, 3\]"),
        ((np.zeros((3, 1)), np.zeros((3, 1)), 3), {"exclude_self": True}, r"\[1, 2\]"),
        ((np.zeros((2, 1)), np.zeros((3, 1)), 1), {"exclude_self": True}, "query i"),
        ((np.zeros((2, 1)), np.zeros((3, 1)), 1), {"engine": "annoy"}, "engine"),
    ],
)
def test_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        exact_search(*args, **kwargs)


def test_search_checks_k():
    search = ExactSearch(np.zeros((3, 1)))
    with pytest.raises(ValueError, match=r"\[1, 2\]"):
        search.search(np.zeros((1, 1)), 3, exclude=[0])
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        search.search(np.zeros((1, 1)), 0)


def test_first_match_needs_labels():
    with pytest.raises(ValueError, match="labels"):
        ExactSearch(np.zeros((3, 1))).search(np.zeros((1, 1)), 1, query_labels=[0])


@pytest.mark.parametrize("k", [1, 5, 40])
def test_stable_argsort_rows_equals_numpy_stable_sort(k):
    """The quicksort-then-resort-tied-rows argsort keeps equal values in column order,
    in rows with ties among the first k + 1 places, ties just past them, and none."""
    rng = np.random.default_rng(3)
    values = rng.standard_normal((60, 40)).astype(np.float32)
    values[:20] = rng.integers(0, 6, size=(20, 40))  # many ties
    values[20:40, 1::2] = values[20:40, ::2]  # every value twice
    values[50, :] = np.inf  # a row of padding only
    want = np.argsort(values, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(index._stable_argsort_rows(values, k), want)
