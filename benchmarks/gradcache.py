"""Peak memory and time per step: the plain training step against gradient caching.

`deepmetric.gradcache.GradCacheModel(embedder, chunk_size)` trains on a batch of B samples
with the gradient of the whole batch while only `chunk_size` samples have their activations
in memory. This script shows what that buys and costs on a model whose activations dominate
its memory: a small conv net (Conv2D 16 x2, max-pool, Conv2D 32 x2, global average pool,
Dense 64, UnitNormalization; 18 k weights) on 28 x 28 x 1 inputs, SupCon loss, Adam,
labels in groups of K = 4.

Every configuration runs in a fresh subprocess, which builds the model, compiles it, creates
its batch, resets the kernel's high-water mark of its resident set (/proc/self/clear_refs)
and then runs `--steps` training steps (`train_on_batch`). It reports the peak resident set
size (VmHWM) minus the resident set size before the steps (so the imports, the weights and
the batch itself are not counted; the first, compiling step is) and the median time of the
steps after the first.

    KERAS_BACKEND=torch python benchmarks/gradcache.py
    python benchmarks/gradcache.py --backend jax --runs plain:32,plain:256,cache:256:32
    python benchmarks/gradcache.py --runs plain:64,cache:512:64 --steps 4

A run is `plain:B` (the embedder's own `fit` step on a batch of B) or `cache:B:C`
(`GradCacheModel` with chunks of C on a batch of B).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

DEFAULT_RUNS = "plain:32,plain:256,cache:256:32,cache:512:32"


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(run: str, steps: int) -> dict:
    import keras
    import numpy as np

    from deepmetric.gradcache import GradCacheModel
    from deepmetric.losses import SupConLoss

    keras.utils.set_random_seed(0)
    kind, batch, *rest = run.split(":")
    batch = int(batch)
    inputs = keras.Input((28, 28, 1))
    h = inputs
    for filters in (16, 16):
        h = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(h)
    h = keras.layers.MaxPooling2D(2)(h)
    for filters in (32, 32):
        h = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    embedder = keras.Model(inputs, keras.layers.UnitNormalization()(keras.layers.Dense(64)(h)))
    model = embedder if kind == "plain" else GradCacheModel(embedder, int(rest[0]))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=SupConLoss())
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, 28, 28, 1)).astype("float32")
    y = np.repeat(np.arange(batch // 4), 4).astype("int32")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    base = _rss_kb("VmRSS")
    times, cpu = [], []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    assert np.isfinite(loss)
    peak = _rss_kb("VmHWM") - base
    return {
        "peak_mb": peak / 1024,
        "seconds": statistics.median(times[1:] or times),
        "cpu_seconds": statistics.median(cpu[1:] or cpu),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default=os.environ.get("KERAS_BACKEND", "torch"))
    parser.add_argument("--runs", default=DEFAULT_RUNS)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return
    env = dict(os.environ, KERAS_BACKEND=args.backend, TF_CPP_MIN_LOG_LEVEL="3")
    env.setdefault("OMP_NUM_THREADS", "1")  # CPU time without threads spinning
    print(f"backend {args.backend}; conv net on 28x28x1, SupCon, Adam; {args.steps} steps")
    print(f"{'step':<22}{'batch':>7}{'peak MB':>10}{'s / step':>10}{'CPU s / step':>14}")
    for run in args.runs.split(","):
        done = subprocess.run(
            [sys.executable, __file__, "--child", run, "--steps", str(args.steps)],
            capture_output=True,
            text=True,
            env=env,
        )
        kind, batch, *rest = run.split(":")
        label = "plain" if kind == "plain" else f"grad cache, chunk {rest[0]}"
        if done.returncode:
            print(f"{label:<22}{batch:>7}  failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"{label:<22}{batch:>7}{r['peak_mb']:>10.0f}{r['seconds']:>10.2f}"
            f"{r['cpu_seconds']:>14.2f}"
        )


if __name__ == "__main__":
    main()
