"""Time and peak memory of deepmetric's batch losses against B, on the current backend.

For every loss of `deepmetric.losses` that takes (labels, embeddings)
(`deepmetric.testing.metric_losses`), and for B in
{256, 1024, 4096, 16384}, D = 128, labels in groups of K = 4 (B / 4 classes) and
random normal L2-normalised embeddings, prints:

- the median time of one forward + backward step, compiled as `fit` compiles it
  (`jax.jit` of `jax.value_and_grad`; `tf.function` with an unknown batch
  dimension; torch eager: `deepmetric.testing.gradient_step`, the gradients of the
  tests), and its ratio to the floor: forward + backward of
  `sum(pairwise_distance(embeddings))`, the B x B matrix every loss builds;
- the peak memory of the step: every (loss, B) runs in a fresh subprocess, which
  reports its peak resident set size (the kernel's high-water mark, VmHWM, the
  figure `getrusage` reports as ru_maxrss, reset through /proc/self/clear_refs
  after the imports) minus its resident set size after the imports and the input
  creation. The first, compiling step is included;
- for the semi-hard, batch-hard, batch-all and lifted losses, the time of the naive
  O(B^3) form of the same rule (`benchmarks/_naive.py`: TFA's tiled semi-hard and
  lifted losses, Moindrot's B x B x B batch-all tensor) and the speed-up. A naive
  form runs only where its estimated peak is below `--naive-max-gb` (else
  "oom-skip"); the estimate is the peak measured at a smaller B scaled by B^3, or
  `_naive.BYTES_PER_B3` before any measurement.

With `--pml` (torch backend only), every listed loss that pytorch-metric-learning
also has (`NTXentLoss`, `SupConLoss`) gets a second row, "pml: <name>": PML's class
with its default arguments (the same defaults as deepmetric's: temperature 0.07 and
0.1), timed and measured as the library's loss is, in its own subprocess, on the same
inputs, against the same floor and under the same watchdog. Once a PML loss runs out
of memory (the watchdog's "mem-limit", or an allocation refused: "oom"), larger B are
not run: "oom-skip", with the peak of the last measured B scaled by B^3 for NT-Xent
(PML builds a (positive pairs x negative pairs) matrix, 3B x B(B - 4)) and by B^2 for
SupCon, where there is one. `--check` on torch also asserts, at B = 48, that PML's
value (rtol 1e-5) and gradient (rtol 1e-4) equal the library's, so both rows time one loss.

A name `Loss+Miner` in `--losses` measures the loss with `miner=Miner()` (both from
deepmetric, with their defaults): the step then includes the mining. `--losses miners`
stands for one such pair per miner of `deepmetric.miners` (`MINER_PAIRS`: each miner
with the loss PML's examples pair it with).

A configuration whose first step takes longer than `--step-limit` seconds is
reported as "slow-skip"; one whose subprocess runs past `--timeout` as "timeout".

    KERAS_BACKEND=jax python benchmarks/losses.py
    python benchmarks/losses.py --backends jax,tensorflow,torch   # then one table side by side
    python benchmarks/losses.py --render jax.json,tensorflow.json,torch.json
    python benchmarks/losses.py --backend torch --sizes 256,1024 --losses TripletSemiHardLoss
    python benchmarks/losses.py --backend torch --losses NTXentLoss,SupConLoss --pml --no-naive
    python benchmarks/losses.py --backend jax --sizes 4096,16384 --no-naive --losses miners
    python benchmarks/losses.py --check    # naive forms == library, small B; on torch also
                                           # PML's NTXentLoss and SupConLoss == library
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
FLOOR = "floor"
PML = "pml"  # kind of a pytorch-metric-learning loss; its rows read "pml: <name>"
# The losses with the same name and defaults in both libraries, each with the power of B its
# memory grows as in PML (for the "oom-skip" estimate): NT-Xent's (positive pairs x negative
# pairs) matrix, SupCon's B x B matrices.
PML_LOSSES = {"NTXentLoss": 3, "SupConLoss": 2}
# One loss per miner for `--losses miners`: multi-similarity with its miner, the contrastive
# loss with the pair miners, the triplet loss with the triplet miners.
MINER_PAIRS = (
    "MultiSimilarityLoss+MultiSimilarityMiner",
    "OnlineContrastiveLoss+PairMarginMiner",
    "OnlineContrastiveLoss+HDCMiner",
    "OnlineContrastiveLoss+UniformHistogramMiner",
    "TripletLoss+TripletMarginMiner",
    "TripletLoss+BatchHardMiner",
    "TripletLoss+BatchEasyHardMiner",
    "TripletLoss+AngularMiner",
    "TripletLoss+DistanceWeightedMiner",
)
DIM, GROUP = 128, 4
BACKENDS = ("jax", "tensorflow", "torch")


# ----------------------------------------------------------------------------- memory


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _watch_memory(limit_gb, baseline_kb):
    """Ends this process, reporting "mem-limit", once its RSS grows past `limit_gb`.

    The machine is shared: a configuration that would take more than the limit
    is stopped before it takes the memory of the other jobs.
    """
    import threading

    def watch():
        while True:
            rss = _status_kb("VmRSS")
            if rss - baseline_kb > limit_gb * 2**20:
                out = {"status": "mem-limit", "peak_mb": (rss - baseline_kb) / 1024.0}
                print("RESULT " + json.dumps(out), flush=True)
                os._exit(0)
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()


def _reset_peak():
    """Resets the kernel's peak-RSS mark (VmHWM) of this process to its current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# ----------------------------------------------------------------------------- inputs


def make_inputs(batch, dim=DIM, group=GROUP, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(batch // group, dtype="int32"), group)
    labels = labels[rng.permutation(batch)]
    x = rng.standard_normal((batch, dim)).astype("float32")
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return labels, x


def discover_losses():
    """Names of the `deepmetric.losses` classes that take (labels, embeddings), sorted
    (`deepmetric.testing.metric_losses`: the subclasses of `MetricLoss`, not `NpairsLoss`)."""
    from deepmetric import testing

    return sorted(cls.__name__ for cls in testing.metric_losses())


def _pml_loss(name):
    """(labels, embeddings) -> scalar: pytorch-metric-learning's `name`, default arguments."""
    from pytorch_metric_learning import losses as pml_losses

    loss = getattr(pml_losses, name)()
    return lambda labels, x: loss(x, labels)


def _loss_fn(kind, name):
    """(labels, embeddings) -> scalar, for a library loss, the floor, a naive or a PML form."""
    from keras import ops

    import deepmetric.losses as losses_module
    from deepmetric.distances import pairwise_distance

    if kind == FLOOR:
        return lambda labels, x: ops.sum(pairwise_distance(x))
    if kind == "naive":
        import _naive

        return _naive.NAIVE[name][1]
    if kind == PML:
        return _pml_loss(name)
    loss_name, _, miner_name = name.partition("+")
    options = {}
    if miner_name:  # "Loss+Miner": the loss with `miner=Miner()`, both with their defaults
        from deepmetric import miners

        options["miner"] = getattr(miners, miner_name)()
    loss = getattr(losses_module, loss_name)(**options)
    return lambda labels, x: loss(labels, x)


def _step(fn, labels, x):
    """A no-argument callable running one compiled forward + backward and waiting for it
    (`deepmetric.testing.gradient_step`, as the tests compute gradients)."""
    from deepmetric import testing

    return testing.gradient_step(lambda v, y: fn(y, v), x, labels, compiled=True)


def child(spec):
    """Runs one (kind, name, B) configuration in this (fresh) process; prints JSON.

    First the peak memory: the compiling step and up to three more, from a peak
    mark reset after the imports and the inputs. Then the time: steps of the
    configuration alternate with steps of the floor compiled in the same process,
    so that both medians see the same load on a shared machine and their ratio
    is meaningful.
    """
    import keras  # noqa: F401  (imports counted in the baseline)

    labels, x = make_inputs(spec["batch"], seed=spec["seed"])
    step = _step(_loss_fn(spec["kind"], spec["name"]), labels, x)
    baseline_kb = _status_kb("VmRSS")
    _watch_memory(spec.get("mem_limit_gb", 10.0), baseline_kb)
    _reset_peak()
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    out = {"first_s": first}
    if first > spec["step_limit"]:
        out.update(status="slow-skip", peak_mb=(_status_kb("VmHWM") - baseline_kb) / 1024.0)
        print("RESULT " + json.dumps(out), flush=True)
        return
    times, floor_times = [], []
    for _ in range(3):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        if sum(times) > spec["time_budget"] / 4:
            break
    out["peak_mb"] = (_status_kb("VmHWM") - baseline_kb) / 1024.0
    interleave = spec["kind"] != FLOOR and spec.get("interleave_floor", True)
    if interleave:
        floor_step = _step(_loss_fn(FLOOR, FLOOR), labels, x)
        floor_step()
        times = []
    while len(times) < spec["repeats"] and sum(times) + sum(floor_times) <= spec["time_budget"]:
        if interleave:
            start = time.perf_counter()
            floor_step()
            floor_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    out.update(status="ok", ms=1e3 * statistics.median(times), n=len(times))
    if floor_times:
        out["floor_ms"] = 1e3 * statistics.median(floor_times)
    print("RESULT " + json.dumps(out), flush=True)


def run_config(spec, backend, timeout):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    # torch's CPU allocator refuses a request larger than the machine: "DefaultCPUAllocator:
    # not enough memory: you tried to allocate N bytes" (older: "can't allocate memory").
    oom_marks = ("MemoryError", "RESOURCE_EXHAUSTED", "DefaultCPUAllocator")
    if proc.returncode < 0 or any(mark in proc.stderr for mark in oom_marks):
        out = {"status": "oom", "error": " | ".join(tail)}
        asked = re.search(r"tried to allocate (\d+) bytes", proc.stderr)
        if asked:
            out["asked_gb"] = int(asked.group(1)) / 2**30
        return out
    return {"status": "error", "error": " | ".join(tail)}


# ----------------------------------------------------------------------------- table


def _fmt(value, spec=".1f"):
    return "—" if value is None else format(value, spec)


def _cell(result):
    if result is None:
        return "—"
    if result["status"] == "ok":
        return _fmt(result["ms"])
    if result["status"] == "slow-skip":
        return f"slow-skip ({result['first_s']:.0f} s)"
    if result["status"] == "mem-limit":
        return f"mem-limit (>{result['peak_mb'] / 1024:.0f} GB)"
    if result["status"] == "oom" and "asked_gb" in result:
        return f"oom (asked {result['asked_gb']:.0f} GB)"
    if result["status"] == "oom-skip" and "estimate_gb" in result:
        return f"oom-skip (~{result['estimate_gb']:.0f} GB)"
    if result["status"] == "oom-skip" and "after" in result:
        return f"oom-skip ({result['after']})"
    return result["status"]


def _row(name, batch, result, floor, naive):
    ok = result["status"] == "ok"
    floor_ok = floor is not None and floor["status"] == "ok"
    naive_ok = naive is not None and naive.get("status") == "ok"
    if ok and "floor_ms" in result:  # the floor timed alongside, in the same process
        ratio = result["ms"] / result["floor_ms"]
    else:
        ratio = result["ms"] / floor["ms"] if ok and floor_ok else None
    speedup = _fmt(naive["ms"] / result["ms"] if ok and naive_ok else None, ".0f")
    naive_mb = naive["peak_mb"] if naive_ok else None
    if naive is not None and naive.get("status") == "oom-skip":
        naive_cell = f"oom-skip (~{naive['estimate_gb']:.0f} GB)"
        if "estimate_ms" in naive and 4 * naive.get("estimate_from", 0) >= batch:
            naive_cell += f"; ~{naive['estimate_ms']:.0f} est."
            if ok:
                speedup = f"~{naive['estimate_ms'] / result['ms']:.0f} est."
    else:
        naive_cell = _cell(naive)
    return [
        name,
        str(batch),
        _cell(result),
        _fmt(ratio, ".2f"),
        _fmt(result.get("peak_mb"), ".0f"),
        naive_cell,
        speedup,
        _fmt(naive_mb, ".0f"),
    ]


HEADER = ["loss", "B", "time ms", "x floor", "peak MB", "naive ms", "speed-up vs naive", "naive MB"]


def print_table(rows, out=sys.stdout, header=HEADER):
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    print(line(header), file=out)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=out)
    for r in rows:
        print(line(r), file=out)
    out.flush()


def _backend_rows(raw):
    """{(name, B): (time ms cell, x floor cell, peak MB cell)} of one backend's results."""
    floors = {r["batch"]: r for r in raw if r["name"] == FLOOR}
    cells = {}
    for r in raw:
        name = "floor: pairwise_distance" if r["name"] == FLOOR else r["name"]
        floor = r if r["name"] == FLOOR else floors.get(r["batch"])
        cells[(name, r["batch"])] = tuple(_row(name, r["batch"], r, floor, None)[2:5])
    return cells


def print_side_by_side(results, out=sys.stdout):
    """One table of several backends' results ({backend: raw results}): per (loss, B) the
    time, the ratio to the floor and the peak memory of each backend."""
    per_backend = {backend: _backend_rows(raw) for backend, raw in results.items()}
    keys = list(dict.fromkeys(key for cells in per_backend.values() for key in cells))
    header = ["loss", "B"] + [
        f"{backend} {column}" for backend in results for column in ("ms", "x floor", "peak MB")
    ]
    rows = [
        [name, str(batch)]
        + [cell for backend in results for cell in per_backend[backend].get(key, ("—",) * 3)]
        for key in keys
        for name, batch in [key]
    ]
    print_table(rows, out=out, header=header)


def render(paths):
    """Prints the table of a file written by `--json`; of several files (one per backend),
    or of a file of several backends, one table side by side."""
    data = []
    for path in paths.split(","):
        with open(path) as f:
            data.append(json.load(f))
    if len(data) == 1 and "results" in data[0]:
        raw = data[0]["results"]
        floors = {r["batch"]: r for r in raw if r["name"] == FLOOR}
        rows = []
        for r in raw:
            if r["name"] == FLOOR:
                rows.append(_row("floor: pairwise_distance", r["batch"], r, r, None))
            else:
                rows.append(_row(r["name"], r["batch"], r, floors.get(r["batch"]), r.get("naive")))
        print_table(rows)
        return
    results = {}
    for d in data:
        results.update(d["backends"] if "backends" in d else {d["backend"]: d["results"]})
    print_side_by_side(results)


# ----------------------------------------------------------------------------- check


def check(batch=48, seed=1):
    """Asserts that every naive form gives the library's value and gradient."""
    import _naive
    import numpy as np
    from keras import ops

    import deepmetric.losses as losses_module
    from deepmetric import testing

    labels, x = make_inputs(batch, seed=seed)
    x = (x * 1.5).astype("float32")  # spread the distances so that every rule has work to do
    for name, (short, naive_fn) in _naive.NAIVE.items():
        loss = getattr(losses_module, name)()
        lib_v, lib_g = testing.value_and_grad(lambda v, y, f=loss: f(y, v), x, labels)
        ref_v, ref_g = testing.value_and_grad(
            lambda v, y, f=naive_fn: f(ops.convert_to_tensor(y), v), x, labels
        )
        np.testing.assert_allclose(lib_v, ref_v, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(lib_g, ref_g, rtol=1e-4, atol=1e-6, err_msg=name)
        print(f"ok  {name:22s} == naive {short:10s} value {float(lib_v):.6f}")
    check_pml(batch=batch, seed=seed)


def check_pml(batch=48, seed=1):
    """Asserts that PML's NTXentLoss and SupConLoss give the library's value and gradient.

    On the inputs of the benchmark (groups of K = 4), torch backend only: the rows
    "pml: <name>" of `--pml` then time the same loss.
    """
    import keras
    import numpy as np

    import deepmetric.losses as losses_module
    from deepmetric import testing

    backend = keras.backend.backend()
    if backend != "torch":
        print(f"skip pml: pytorch-metric-learning needs the torch backend, not {backend}")
        return
    labels, x = make_inputs(batch, seed=seed)
    for name in PML_LOSSES:
        loss, pml = getattr(losses_module, name)(), _pml_loss(name)
        lib_v, lib_g = testing.value_and_grad(lambda v, y, f=loss: f(y, v), x, labels)
        ref_v, ref_g = testing.value_and_grad(lambda v, y, f=pml: f(y, v), x, labels)
        np.testing.assert_allclose(lib_v, ref_v, rtol=1e-5, atol=1e-6, err_msg=f"pml {name}")
        np.testing.assert_allclose(lib_g, ref_g, rtol=1e-4, atol=1e-6, err_msg=f"pml {name}")
        print(f"ok  {name:22s} == pml {name:12s} value {float(lib_v):.6f}")


# ----------------------------------------------------------------------------- main


def _run_pml(name, batch, base, memory, backend, timeout):
    """Runs PML's `name` at `batch`, unless it ran out of memory at a smaller B.

    `memory[name]` holds the last measured (B, peak MB) and the first memory failure
    (status, B). After a failure the result is "oom-skip", with the measured peak
    scaled by B^k (`PML_LOSSES`: PML's NT-Xent matrix has 3B x B(B - 4) entries, so
    k = 3) where there is one.
    """
    seen = memory.setdefault(name, {})
    if "failed" in seen:
        if "measured" in seen:
            b0, peak_mb = seen["measured"]
            estimate_gb = peak_mb * (batch / b0) ** PML_LOSSES[name] / 1024
            return {"status": "oom-skip", "estimate_gb": estimate_gb}
        status, b0 = seen["failed"]
        return {"status": "oom-skip", "after": f"{status} at B={b0}"}
    result = run_config({**base, "kind": PML, "name": name}, backend, timeout)
    if result["status"] == "ok":
        seen["measured"] = (batch, result["peak_mb"])
    elif result["status"] in ("mem-limit", "oom"):
        seen["failed"] = (result["status"], batch)
    return result


def run_backend(args, backend, names, pml_names):
    """Every (B, loss) of `args` on `backend`, each in its own subprocess; prints the table
    and returns the raw results."""
    import _naive

    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"# backend={backend} D={DIM} K={GROUP} losses={','.join(names)}", flush=True)
    rows, raw, naive_peaks, naive_times = [], [], {}, {}
    pml_memory = {}  # name -> last measured (B, peak MB), first memory failure (status, B)
    for batch in sizes:
        base = dict(
            batch=batch,
            seed=0,
            repeats=args.repeats,
            time_budget=args.time_budget,
            mem_limit_gb=args.mem_limit_gb,
            step_limit=args.step_limit,
        )
        floor = run_config({**base, "kind": FLOOR, "name": FLOOR}, backend, args.timeout)
        raw.append({"name": FLOOR, "batch": batch, **floor})
        rows.append(_row("floor: pairwise_distance", batch, floor, floor, None))
        print_table(rows[-1:], out=sys.stderr)
        for name in names:
            result = run_config({**base, "kind": "loss", "name": name}, backend, args.timeout)
            naive_spec = {**base, "kind": "naive", "name": name, "interleave_floor": False}
            naive = None
            if name in _naive.NAIVE and not args.no_naive:
                short = _naive.NAIVE[name][0]
                if short in naive_peaks:
                    b0, grows, fixed = naive_peaks[short]
                    estimate_gb = (grows * (batch / b0) ** 3 + fixed) / 1024
                else:
                    estimate_gb = _naive.BYTES_PER_B3[short] * batch**3 / 2**30
                if estimate_gb > args.naive_max_gb:
                    naive = {"status": "oom-skip", "estimate_gb": estimate_gb}
                    b0, ms0 = naive_times.get(short, (0, 0.0))
                    if 0 < b0 and batch <= 4 * b0:  # B^3 extrapolation of the last measured time
                        naive["estimate_ms"] = ms0 * (batch / b0) ** 3
                        naive["estimate_from"] = b0
                else:
                    naive = run_config(naive_spec, backend, args.timeout)
                    if naive["status"] == "ok":
                        # The floor's peak (runtime and compiler) does not grow as B^3.
                        grows = max(naive["peak_mb"] - floor.get("peak_mb", 0.0), 1.0)
                        naive_peaks[short] = (batch, grows, floor.get("peak_mb", 0.0))
                        naive_times[short] = (batch, naive["ms"])
                    elif naive["status"] in ("timeout", "slow-skip"):
                        naive_peaks[short] = (batch, 1e9, 0.0)  # never try a larger B
            raw.append({"name": name, "batch": batch, **result, "naive": naive})
            rows.append(_row(name, batch, result, floor, naive))
            print_table(rows[-1:], out=sys.stderr)
            if name in pml_names:
                pml = _run_pml(name, batch, base, pml_memory, backend, args.timeout)
                raw.append({"name": f"{PML}: {name}", "batch": batch, **pml, "naive": None})
                rows.append(_row(f"{PML}: {name}", batch, pml, floor, None))
                print_table(rows[-1:], out=sys.stderr)
    print(
        f"\nbackend: {backend}; D={DIM}, K={GROUP}; median of up to {args.repeats} steps "
        "after the compiling one; peak MB = peak RSS - RSS after imports and inputs\n"
    )
    print_table(rows)
    return raw


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS)
    parser.add_argument(
        "--backends",
        default=None,
        help="comma-separated backends, each run in turn, then one table with a column "
        "group per backend",
    )
    parser.add_argument("--sizes", default="256,1024,4096,16384")
    parser.add_argument("--losses", default=None, help="comma-separated class names")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps after the first")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=10.0,
        help="stop timing a configuration after this many seconds",
    )
    parser.add_argument("--step-limit", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--naive-max-gb", type=float, default=6.0)
    parser.add_argument(
        "--mem-limit-gb",
        type=float,
        default=10.0,
        help="stop a configuration whose memory grows past this (shared machine)",
    )
    parser.add_argument("--no-naive", action="store_true")
    parser.add_argument(
        "--pml",
        action="store_true",
        help="also time pytorch-metric-learning's " + " and ".join(PML_LOSSES) + " (torch only)",
    )
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--check", action="store_true")
    parser.add_argument(
        "--render",
        default=None,
        help="print the table of a --json file; of several (comma-separated), side by side",
    )
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    if args._child:
        child(json.loads(args._child))
        return
    if args.render:
        render(args.render)
        return
    if args.pml and args.backend not in (None, "torch"):  # fail before importing a backend
        parser.exit(2, f"{parser.prog}: error: --pml needs --backend torch, not {args.backend}\n")
    import keras

    backend = keras.backend.backend()
    if args.check:
        check()
        return
    names = args.losses.split(",") if args.losses else discover_losses()
    if "miners" in names:
        at = names.index("miners")
        names[at : at + 1] = MINER_PAIRS
    pml_names = [name for name in names if name in PML_LOSSES] if args.pml else []
    backends = args.backends.split(",") if args.backends else [backend]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        parser.exit(2, f"{parser.prog}: error: unknown --backends {unknown}; use {BACKENDS}\n")
    if args.pml and "torch" not in backends:
        parser.exit(
            2,
            f"{parser.prog}: error: --pml needs the torch backend (--backend torch), "
            f"not {backend}\n",
        )
    if args.pml and not pml_names:
        parser.exit(
            2, f"{parser.prog}: error: --pml needs one of {', '.join(PML_LOSSES)} in --losses\n"
        )
    results = {}
    for name in backends:
        results[name] = run_backend(args, name, names, pml_names if name == "torch" else [])
    if len(backends) > 1:
        print("\nside by side: time ms, ratio to the floor and peak MB per backend\n")
        print_side_by_side(results)
    if args.json:
        with open(args.json, "w") as f:
            if len(backends) == 1:
                json.dump({"backend": backends[0], "results": results[backends[0]]}, f, indent=1)
            else:
                json.dump({"backends": results}, f, indent=1)


if __name__ == "__main__":
    main()
