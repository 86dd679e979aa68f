"""Time and memory of exact k-nearest-neighbour search against its floor and faiss.

Part 1, search: Q queries in N x D float32 vectors (Gaussian clusters), k = 10.

- `deepmetric exact_search numpy`: `deepmetric.index.exact_search(queries, vectors, k)`,
  sorted neighbours, ties broken by index, chunks of bounded memory.
- `deepmetric exact_search faiss`: the same with `engine="faiss"`.
- `floor`: the matrix product of the same shapes (`-2 q.x + |x|^2`) and
  `np.argpartition` for the k smallest of each row, unsorted: the plain numpy
  search. Twice: with one GEMM for all queries (or blocks of queries as large as
  `--floor-gb` allows, 4 GB by default, when the whole matrix is larger), and
  with blocks of queries whose distances take 256 MB, the budget of
  `exact_search`. "x floor" is relative to the faster of the two. `exact_search`
  replaces the argpartition by a threshold taken from a sample of the columns,
  which is cheaper, so it can beat this floor.
- `faiss IndexFlatL2`: `index.add(vectors)` then `index.search(queries, k)`.

Part 2, `retrieval_metrics` on self-retrieval of M x D embeddings in 100 classes
without faiss (`use_faiss=False`, no clustering) against its floor: the same
blocked matrix products (2048 queries a block) plus the partial sort it needs,
`np.argpartition` for the k = max(R) + 1 smallest and a sort of those k.

Each configuration runs in a fresh subprocess. "extra MB" is its peak resident
size minus the resident size just before the timed call (imports done, data in
memory): the memory the search needs beyond its inputs (faiss's flat index holds
a copy of the vectors, which is counted). "agree" is the fraction of queries
whose k neighbours are the floor's (as sets).

Usage:
    python benchmarks/search.py                          # 2,000 x 200,000, M = 20,000
    python benchmarks/search.py --queries 10000 --vectors 1000000 --metrics-size 100000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

SEARCHES = ("deepmetric exact_search numpy", "deepmetric exact_search faiss", "floor big",
            "floor 256MB", "faiss IndexFlatL2")  # fmt: skip
METRICS = ("retrieval_metrics numpy", "retrieval_metrics floor")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _data(n, dim, classes, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x *= 1.5
    x += centres[labels]
    return x, labels


def _floor_search(queries, vectors, k, max_bytes):
    import numpy as np

    sq = np.einsum("ij,ij->i", vectors, vectors)
    block = max(1, min(len(queries), int(max_bytes // (4 * len(vectors)))))
    out = np.empty((len(queries), k), np.int64)
    for s in range(0, len(queries), block):
        d = queries[s : s + block] @ vectors.T
        d *= -2.0
        d += sq
        out[s : s + block] = np.argpartition(d, k - 1, axis=1)[:, :k]
    return out


def _floor_metrics(x, labels, block=2048):
    """The products and partial sorts that self-retrieval needs, nothing else."""
    import numpy as np

    k = int(np.bincount(labels).max())  # R_max + 1: itself and its class
    sq = np.einsum("ij,ij->i", x, x)
    for s in range(0, len(x), block):
        d = x[s : s + block] @ x.T
        d *= -2.0
        d += sq
        part = np.argpartition(d, k - 1, axis=1)[:, :k]
        np.sort(np.take_along_axis(d, part, axis=1), axis=1)


def worker(name: str, args) -> dict:
    import numpy as np

    if name.startswith("retrieval_metrics"):
        x, labels = _data(args.metrics_size, args.dim, 100, 2)
        from deepmetric.evaluation import retrieval_metrics

        before = _rss_mb()
        start = time.perf_counter()
        result = {}
        if name.endswith("floor"):
            _floor_metrics(x, labels)
        else:
            m = retrieval_metrics(x, labels, clustering=False, use_faiss=False)
            result["map_at_r"] = m["map_at_r"]
    else:
        vectors, _ = _data(args.vectors, args.dim, 1000, 0)
        queries, _ = _data(args.queries, args.dim, 1000, 1)
        from deepmetric.index import exact_search

        if name.startswith("faiss"):
            import faiss
        before = _rss_mb()
        start = time.perf_counter()
        if name.startswith("floor"):
            budget = args.floor_gb * 2**30 if name == "floor big" else 256 * 2**20
            nn = _floor_search(queries, vectors, args.k, budget)
        elif name.startswith("faiss"):
            index = faiss.IndexFlatL2(args.dim)
            index.add(vectors)
            _, nn = index.search(queries, args.k)
        else:
            _, nn = exact_search(queries, vectors, args.k, engine=name.split()[-1])
        result = {}
        np.save(os.path.join(args.scratch, name.replace(" ", "_") + ".npy"), nn)
    result["seconds"] = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result.update(peak_mb=peak, extra_mb=peak - before)
    return result


def _agree(scratch, name) -> float:
    import numpy as np

    nn = np.sort(np.load(os.path.join(scratch, name.replace(" ", "_") + ".npy")), axis=1)
    floor = np.sort(np.load(os.path.join(scratch, "floor_256MB.npy")), axis=1)
    return float(np.mean(np.all(nn == floor, axis=1)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--vectors", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--floor-gb", type=float, default=4.0,
                   help="largest distance block of the floor, GB (default 4)")  # fmt: skip
    p.add_argument("--metrics-size", type=int, default=20_000)
    p.add_argument("--skip-metrics", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        rows = {}
        names = SEARCHES + (() if args.skip_metrics else METRICS)
        for name in names:
            if name == "floor big" and args.queries * args.vectors * 4 > 64 * 2**30:
                rows[name] = {"error": "skipped: over 64 GB of distances"}
                continue
            command = [sys.executable, __file__, *(argv or sys.argv[1:]), "--worker", name,
                       "--scratch", scratch]  # fmt: skip
            proc = subprocess.run(command, capture_output=True, text=True)
            if proc.returncode:
                rows[name] = {"error": proc.stderr.strip().splitlines()[-1]}
            else:
                rows[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(name, rows[name], file=sys.stderr, flush=True)
        agree = {n: _agree(scratch, n) for n in SEARCHES if "error" not in rows[n]}
    floor_s = min(rows[n].get("seconds", math.inf) for n in ("floor big", "floor 256MB"))
    big = min(args.queries, max(1, int(args.floor_gb * 2**30 // (4 * args.vectors))))
    labels = {
        "floor big": "floor: one GEMM + argpartition"
        if big == args.queries
        else f"floor: GEMM blocks of {big} queries + argpartition",
        "floor 256MB": "floor: GEMM blocks of 256 MB + argpartition",
    }
    print(f"\nExact search, k={args.k}: {args.queries:,} queries in {args.vectors:,} x "
          f"{args.dim} float32\n")  # fmt: skip
    print("| implementation | time (s) | x floor | queries/s | extra MB | agree |")
    print("|---|---|---|---|---|---|")
    for name in SEARCHES:
        r = rows[name]
        if "error" in r:
            print(f"| {labels.get(name, name)} | {r['error']} | | | | |")
            continue
        print(f"| {labels.get(name, name)} | {r['seconds']:.2f} | {r['seconds'] / floor_s:.2f} | "
              f"{args.queries / r['seconds']:,.0f} | {r['extra_mb']:,.0f} | "
              f"{agree[name]:.4f} |")  # fmt: skip
    if args.skip_metrics:
        return
    floor_m = rows["retrieval_metrics floor"].get("seconds")
    print(f"\nSelf-retrieval metrics: {args.metrics_size:,} x {args.dim}, 100 classes, "
          "no faiss\n")  # fmt: skip
    print("| implementation | time (s) | x floor | extra MB | MAP@R |")
    print("|---|---|---|---|---|")
    for name in METRICS:
        r = rows[name]
        name = (
            "floor: GEMM blocks of 2048 queries + argpartition + sort" if "floor" in name else name
        )
        if "error" in r:
            print(f"| {name} | {r['error']} | | | |")
            continue
        m = f"{r['map_at_r']:.4f}" if "map_at_r" in r else ""
        print(f"| {name} | {r['seconds']:.2f} | {r['seconds'] / floor_m:.2f} | "
              f"{r['extra_mb']:,.0f} | {m} |")  # fmt: skip


if __name__ == "__main__":
    main()
