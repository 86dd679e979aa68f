"""Time and peak memory of retrieval evaluation: deepmetric against pytorch-metric-learning.

Self-retrieval (leave-one-out) of N embeddings of dimension D in C classes
(Gaussian clusters), precision@1, R-precision and MAP@R, without clustering:

- `deepmetric numpy`: `retrieval_metrics(..., use_faiss=False)`, exact chunked
  numpy search.
- `deepmetric faiss`: `retrieval_metrics(..., use_faiss=True)`, faiss
  `IndexFlatL2` searched in chunks of queries.
- `floor`: what any exact evaluation must do, and nothing else: the distances of every
  query to all N references by matrix products (chunks of 2048 queries) and each row's
  k = R_max + 1 smallest by `np.argpartition`, then sorted (k = the largest class's size,
  the neighbours MAP@R needs), on one thread per core as deepmetric's search (BLAS on one
  thread in each); no metric.
  The issue's "own floor" of `retrieval_metrics`.
- `PML`: `AccuracyCalculator(include=("precision_at_1", "r_precision",
  "mean_average_precision_at_r"), k="max_bin_count")` on CPU; it searches
  all queries at once with faiss `IndexFlatL2`. (PML's default k=None asks for
  all N - 1 neighbours of every query: N^2 results, 80 GB at N = 100,000.)

Each configuration runs in a fresh subprocess; "peak RSS" is that process's
maximum resident set size, and "extra" is the peak minus the resident size
just before the call (after imports and with the data in memory).

Usage:
    python benchmarks/evaluation.py                 # N = 10,000 and 100,000
    python benchmarks/evaluation.py --sizes 10000   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

IMPLEMENTATIONS = ("deepmetric numpy", "deepmetric faiss", "floor", "PML")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _data(n, dim, classes, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x *= 1.5
    x += centres[labels]
    return x, labels


def _floor(x, labels) -> None:
    """Blocked matrix products and partial sorts of the self-retrieval's k nearest."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from threadpoolctl import threadpool_limits

    k = int(np.bincount(labels).max())  # R_max + 1 neighbours, the query itself among them
    norms = np.einsum("ij,ij->i", x, x)
    scaled = x * np.float32(-2.0)

    def part(rows):
        for start in range(rows.start, rows.stop, 2048):
            keys = scaled[start : min(start + 2048, rows.stop)] @ x.T
            keys += norms
            nearest = np.argpartition(keys, k, axis=1)[:, :k]
            values = np.take_along_axis(keys, nearest, axis=1)
            np.take_along_axis(nearest, np.argsort(values, axis=1), axis=1)

    threads = len(os.sched_getaffinity(0))
    bounds = np.linspace(0, len(x), threads + 1).astype(int)
    # One BLAS thread a product, as in deepmetric's search: the threads already fill the cores.
    with threadpool_limits(1), ThreadPoolExecutor(threads) as pool:
        list(pool.map(part, [range(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]))


def worker(impl: str, n: int, dim: int, classes: int) -> dict:
    """Runs one configuration in this process and returns its figures."""
    if impl == "PML":
        import torch
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    elif impl != "floor":
        from deepmetric.evaluation import retrieval_metrics
    x, y = _data(n, dim, classes)
    before = _rss_mb()
    start = time.perf_counter()
    if impl == "floor":
        _floor(x, y)
        metrics = {"precision_at_1": None, "r_precision": None, "map_at_r": None}
    elif impl == "PML":
        calc = AccuracyCalculator(
            include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
            k="max_bin_count",
            device=torch.device("cpu"),
        )
        out = calc.get_accuracy(x, y)
        metrics = {
            "precision_at_1": out["precision_at_1"],
            "r_precision": out["r_precision"],
            "map_at_r": out["mean_average_precision_at_r"],
        }
    else:
        out = retrieval_metrics(
            x, y, recall_at=(1,), clustering=False, use_faiss=impl == "deepmetric faiss"
        )
        metrics = {key: out[key] for key in ("precision_at_1", "r_precision", "map_at_r")}
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_mb": peak, "extra_mb": peak - before, **metrics}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS))
    parser.add_argument("--worker", nargs=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = worker(args.worker[0], args.sizes[0], args.dim, args.classes)
        print(json.dumps(result))
        return
    env = dict(os.environ, KERAS_BACKEND=os.environ.get("KERAS_BACKEND", "numpy"))
    print(f"Self-retrieval, D={args.dim}, {args.classes} classes, CPU, {os.cpu_count()} cores")
    print()
    print("| N | implementation | search | time (s) | peak RSS (MB) | extra (MB) "
          "| P@1 | R-precision | MAP@R |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    search = {
        "deepmetric numpy": "numpy, chunked",
        "deepmetric faiss": "faiss IndexFlatL2, chunked",
        "floor": "numpy products + argpartition",
        "PML": "faiss IndexFlatL2, k=max_bin_count",
    }
    for n in args.sizes:
        for impl in args.implementations:
            command = [sys.executable, __file__, "--worker", impl, "--sizes", str(n)]
            command += ["--dim", str(args.dim), "--classes", str(args.classes)]
            proc = subprocess.run(command, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                reason = (proc.stderr.strip().splitlines() or ["failed"])[-1]
                print(f"| {n:,} | {impl} | {search[impl]} | {reason} | | | | | |")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            figures = " | ".join(
                "" if r[key] is None else f"{r[key]:.4f}"
                for key in ("precision_at_1", "r_precision", "map_at_r")
            )
            print(
                f"| {n:,} | {impl} | {search[impl]} | {r['seconds']:.1f} | {r['peak_mb']:.0f} "
                f"| {r['extra_mb']:.0f} | {figures} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
