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

Part 3 (`--approximate`, instead of parts 1 and 2), the approximate engine: Q queries
in N x D embeddings of a trained model's kind, `Index(engine="faiss",
structure="hnsw" | "ivf")` with its default options (or those given), k = 10, against
the exact engines on the same data: recall@10 (the mean of |found ∩ exact| / 10, exact
= `Index(engine="exact")`), queries/s and the speed-up over each exact engine (search
only; the structure's build is timed apart). The data are a seeded Gaussian mixture on
the unit sphere, because the embeddings of a trained model are clustered: uniform random
vectors have no neighbourhood structure at all (every point is about equally far from
every other), which is the worst case of every approximate index and not what a search
engine is used on. `--classes` centres (default N / 100: 100 rows per class) are random
unit vectors; a row is its class centre plus a Gaussian offset of norm about `--spread`
(0.75 by default) in a random `--intrinsic-dim`-dimensional subspace of its class (16 by
default: the final-layer representations of trained networks have an intrinsic
dimension of about 10 to 20, Ansuini et al., NeurIPS 2019), plus isotropic noise of norm
`--noise` (0.1), scaled to unit length. Queries are new rows of the same classes (held-out
samples), drawn with another seed.

Each configuration runs in a fresh subprocess. "extra MB" is its peak resident
size minus the resident size just before the timed call (imports done, data in
memory): the memory the search needs beyond its inputs (faiss's flat index holds
a copy of the vectors, which is counted). "agree" is the fraction of queries
whose k neighbours are the floor's (as sets).

Usage:
    python benchmarks/search.py                          # 2,000 x 200,000, M = 20,000
    python benchmarks/search.py --queries 10000 --vectors 1000000 --metrics-size 100000
    python benchmarks/search.py --approximate --queries 10000 --vectors 1000000
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
APPROXIMATE = ("exact numpy", "exact faiss", "faiss ivf", "faiss hnsw")
STRUCTURE_OPTIONS = ("m", "ef_construction", "ef_search", "nlist", "nprobe")


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


def _sphere_data(args, n, seed):
    """`n` rows of the seeded mixture of part 3 (centres and subspaces from `args.seed`)."""
    import numpy as np

    dim, rank = args.dim, args.intrinsic_dim
    classes = args.classes or max(1, args.vectors // 100)
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    # E|B z|^2 = rank * dim * scale^2 = spread^2 for z ~ N(0, I_rank)
    bases = rng.standard_normal((classes, rank, dim), dtype=np.float32)
    bases *= args.spread / math.sqrt(rank * dim)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    x = np.empty((n, dim), np.float32)
    for s in range(0, n, 65536):
        y = labels[s : s + 65536]
        z = rng.standard_normal((len(y), rank), dtype=np.float32)
        part = centres[y] + np.einsum("nr,nrd->nd", z, bases[y])
        part += rng.standard_normal(part.shape, dtype=np.float32) * (args.noise / math.sqrt(dim))
        part /= np.linalg.norm(part, axis=1, keepdims=True)
        x[s : s + 65536] = part
    return x, labels


def _approximate_worker(name: str, args) -> dict:
    import numpy as np

    vectors, _ = _sphere_data(args, args.vectors, args.seed + 1)
    queries, _ = _sphere_data(args, args.queries, args.seed + 2)
    from deepmetric.index import Index

    options = {k: getattr(args, k) for k in STRUCTURE_OPTIONS if getattr(args, k) is not None}
    if name == "exact numpy":
        index = Index(engine="exact")
    elif name == "exact faiss":
        index = Index(engine="faiss")
    else:
        index = Index(engine="faiss", structure=name.split()[-1], **options)
    index.add(vectors)
    start = time.perf_counter()
    if index.structure != "flat":
        index._structure()  # the build: graph or cells, once
    build = time.perf_counter() - start
    start = time.perf_counter()
    nn = index.search(queries, args.k).indices
    seconds = time.perf_counter() - start
    np.save(os.path.join(args.scratch, name.replace(" ", "_") + ".npy"), nn)
    return {"seconds": seconds, "build": build, "options": index.options}


def _approximate(args, argv) -> None:
    import numpy as np

    with tempfile.TemporaryDirectory() as scratch:
        rows = {}
        for name in APPROXIMATE:
            command = [sys.executable, __file__, *(argv or sys.argv[1:]), "--worker", name,
                       "--scratch", scratch]  # fmt: skip
            proc = subprocess.run(command, capture_output=True, text=True)
            if proc.returncode:
                rows[name] = {"error": proc.stderr.strip().splitlines()[-1]}
            else:
                rows[name] = json.loads(proc.stdout.strip().splitlines()[-1])
                nn = np.load(os.path.join(scratch, name.replace(" ", "_") + ".npy"))
                exact = np.load(os.path.join(scratch, "exact_numpy.npy"))
                hits = sum(len(np.intersect1d(a, b)) for a, b in zip(nn, exact, strict=True))
                rows[name]["recall"] = hits / exact.size
            print(name, rows[name], file=sys.stderr, flush=True)
    classes = args.classes or max(1, args.vectors // 100)
    print(f"\nApproximate search, k={args.k}: {args.queries:,} queries in {args.vectors:,} x "
          f"{args.dim} unit vectors, {classes:,} classes (intrinsic dimension "
          f"{args.intrinsic_dim}, spread {args.spread}, noise {args.noise})\n")  # fmt: skip
    print("| engine | options | build (s) | search (s) | queries/s | recall@10 "
          "| x exact numpy | x exact faiss |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name in APPROXIMATE:
        r = rows[name]
        if "error" in r:
            print(f"| {name} | {r['error']} | | | | | | |")
            continue
        structure = name.split()[-1]
        keys = {"hnsw": ("m", "ef_construction", "ef_search"), "ivf": ("nlist", "nprobe")}
        options = ", ".join(f"{k}={r['options'][k]}" for k in keys.get(structure, ()))
        if structure == "ivf" and r["options"]["nlist"] is None:
            options = options.replace("nlist=None", f"nlist={round(4 * math.sqrt(args.vectors))}")
        ratios = [
            f"{rows[e]['seconds'] / r['seconds']:.1f}" if "seconds" in rows[e] else ""
            for e in ("exact numpy", "exact faiss")
        ]
        build = f"{r['build']:.1f}" if structure in keys else ""
        print(f"| {name} | {options} | {build} | {r['seconds']:.2f} | "
              f"{args.queries / r['seconds']:,.0f} | {r['recall']:.4f} | {ratios[0]} | "
              f"{ratios[1]} |")  # fmt: skip


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

    if name in APPROXIMATE:
        return _approximate_worker(name, args)

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
    p.add_argument("--approximate", action="store_true", help="part 3 only: the approximate engine")
    p.add_argument("--classes", type=int, help="part 3: classes (default vectors / 100)")
    p.add_argument("--intrinsic-dim", type=int, default=16)
    p.add_argument("--spread", type=float, default=0.75)
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    for option in STRUCTURE_OPTIONS:
        p.add_argument("--" + option.replace("_", "-"), type=int,
                       help=f"part 3: Index's {option} (default: Index's default)")  # fmt: skip
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    if args.approximate:
        _approximate(args, argv)
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
