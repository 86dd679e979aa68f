"""Held-out retrieval quality of `deepmetric train`, per setting.

Runs the command line once per loss (or per optimizer/schedule setting), each in a fresh
process with the same budget, and prints a markdown table of the held-out metrics and the
training time read back from each run's metrics.json and config.json.

    python benchmarks/quality.py losses        # every loss and head of `deepmetric train --loss`
    python benchmarks/quality.py losses --only arcface,proxy_anchor
    python benchmarks/quality.py optimizers    # Adam vs AdaBelief, with and without warm-up
    python benchmarks/quality.py reality-check # the glyphs, Musgrave et al.'s protocol

`losses` and `optimizers` train on the bundled digits with held-out samples of the ten
classes (a quick check). `reality-check` follows "A Metric Learning Reality Check"
(Musgrave, Belongie and Lim, ECCV 2020) at small scale on the 193 classes of
`deepmetric.datasets.load_glyphs` (`--data glyphs`):

1. Half of the classes (`--split classes --test-size 0.5 --split-seed 0`) are test classes,
   never used for anything but the final numbers.
2. The training classes alone are saved as an .npz, and a third of them are held out as
   validation classes (`--split classes --test-size 0.33`). Each loss trains once per value
   of its grid (`REALITY_CHECK_GRID`: its main hyper-parameter where the command line sets
   it, `--margin`, else the learning rate) on the other two thirds, and the value with the
   best validation MAP@R is chosen.
3. The chosen setting trains on all the training classes with `--seeds` seeds (the weights
   and batches; the split stays) and is evaluated on the test classes: the mean of each
   metric over the seeds and the half-width of its 95% Student t confidence interval.

Every run has the same network (the CLI's CNN), embedding size, batches and budget.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Settings recommended for each loss on L2-normalised 64-d embeddings (the CLI defaults
# otherwise): triplet margins in distance units on the unit sphere.
LOSS_SETTINGS: dict[str, list[str]] = {
    "triplet_semihard": ["--margin", "0.2"],
    "triplet_hard": ["--margin", "0.2"],
    "triplet_batch_all": ["--margin", "0.2"],
    "triplet": ["--margin", "0.2"],
    "lifted_struct": ["--margin", "1.0"],
    "multi_similarity": [],
    "circle": [],
    "sup_con": [],
    "nt_xent": [],
    "online_contrastive": [],
    # Heads (one proxy per class, trained on top of the embedder, one optimizer for both).
    # Their defaults, except ArcFace's angular margin: the face-recognition default 0.5 rad
    # (scale 64) is too strong for 10 classes in 64-d; 0.3 gave MAP@R 0.908-0.926 over seeds
    # 0-3 against 0.816-0.893 with 0.5 (0.4 collapsed once, to 0.54). Sub-centre ArcFace
    # (3 sub-centres) did as well with 0.5 as with 0.3; Proxy-Anchor's margin (0 to 0.2),
    # learning rates 1e-3 and 1e-2, and a 3-45x faster proxy update (a smaller proxy
    # initialisation under Adam) did not raise the MAP@R of Proxy-Anchor or normalised softmax.
    "arcface": ["--margin", "0.3"],
    "cosface": [],
    "sub_center_arcface": [],
    "normalized_softmax": [],
    "proxy_nca": [],
    "proxy_anchor": [],
}

OPTIMIZER_SETTINGS: dict[str, list[str]] = {
    "adam, constant": ["--optimizer", "adam"],
    "adam, warm-up 40 steps": ["--optimizer", "adam", "--warmup-steps", "40"],
    "adabelief, constant": ["--optimizer", "adabelief"],
    "adabelief, warm-up 40 steps": ["--optimizer", "adabelief", "--warmup-steps", "40"],
}


# The grid of each loss of `reality-check`: its main hyper-parameter where `deepmetric train`
# sets it (--margin), else the learning rate (multi-similarity, SupCon, the contrastive loss
# and the ranking losses have no --margin). One representative per family: triplet (semi-hard
# mining), pair weighting (multi-similarity, circle, contrastive), softmax over the batch
# (SupCon), proxies (ArcFace, Proxy-Anchor); and pytorch-metric-learning's: the margin loss,
# NCA, and the losses that score each anchor's ranking or distances as a whole (Smooth-AP,
# PNP, FastAP, the histogram loss).
REALITY_CHECK_GRID: dict[str, list[list[str]]] = {
    "triplet_semihard": [["--margin", "0.1"], ["--margin", "0.2"]],
    "online_contrastive": [["--learning-rate", "0.001"], ["--learning-rate", "0.003"]],
    "multi_similarity": [["--learning-rate", "0.001"], ["--learning-rate", "0.003"]],
    "circle": [["--margin", "0.25"], ["--margin", "0.4"]],
    "sup_con": [["--learning-rate", "0.001"], ["--learning-rate", "0.003"]],
    "arcface": [["--margin", "0.2"], ["--margin", "0.4"]],
    "proxy_anchor": [["--margin", "0.1"], ["--margin", "0.2"]],
    "margin": [["--margin", "0.1"], ["--margin", "0.2"]],
    "nca": [["--learning-rate", "0.001"], ["--learning-rate", "0.003"]],
    "smooth_ap": [["--learning-rate", "0.001"], ["--learning-rate", "0.003"]],
    "pnp": [["--learning-rate", "0.001"], ["--learning-rate", "0.003"]],
    "fast_ap": [["--learning-rate", "0.001"], ["--learning-rate", "0.003"]],
    "histogram": [["--learning-rate", "0.001"], ["--learning-rate", "0.003"]],
}
# The split of the test classes (every seed trains on the same training classes).
TEST_CLASSES = 0.5
VALIDATION_CLASSES = 0.33
SPLIT_SEED = 0


def run(name: str, extra: list[str], out: Path, common: list[str]) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "deepmetric.cli",
        "train",
        "--quiet",
        "--out",
        str(out),
        "--name",
        name.replace(",", "").replace(" ", "-"),
        *common,
        *extra,
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=os.environ.copy())
    run_dir = out / name.replace(",", "").replace(" ", "-")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    seconds = config.get("train_seconds")
    return {"after": metrics["after"], "seconds": seconds}


def t_interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the two-sided 95% Student t confidence interval of the mean)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def training_classes_npz(folder: Path) -> tuple[Path, int, int]:
    """The training classes of the glyphs' class split, saved as an .npz for the tuning
    runs; with the numbers of training and test classes."""
    import numpy as np

    lazy = os.environ.get("DEEPMETRIC_LAZY_IMPORT")
    os.environ["DEEPMETRIC_LAZY_IMPORT"] = "1"  # numpy only, no keras in this process
    try:
        from deepmetric import datasets
    finally:
        if lazy is None:
            del os.environ["DEEPMETRIC_LAZY_IMPORT"]

    glyphs = datasets.load_glyphs()
    train, test = datasets.split_indices(
        glyphs.y, by="classes", test_size=TEST_CLASSES, seed=SPLIT_SEED
    )
    path = folder / "glyphs-training-classes.npz"
    names = np.asarray(glyphs.class_names)
    np.savez(path, x=glyphs.x[train], y=names[glyphs.y[train]])
    return path, len(np.unique(glyphs.y[train])), len(np.unique(glyphs.y[test]))


def _only(table: dict, only: str | None, fail) -> dict:
    """The entries of `table` named in the comma-separated `--only` (all without it); an
    unknown name goes to `fail` with the valid ones."""
    if not only:
        return table
    wanted = [name.strip() for name in only.split(",")]
    unknown = [name for name in wanted if name not in table]
    if unknown:
        fail(f"--only: unknown {unknown}; valid: {', '.join(table)}")
    return {name: table[name] for name in wanted}


def reality_check(args) -> None:
    os.environ.setdefault("KERAS_BACKEND", "jax")  # the runs' backend, named in the table
    grid = _only(REALITY_CHECK_GRID, args.only, sys.exit)
    budget = ["--epochs", str(args.epochs), "--steps-per-epoch", str(args.steps)]
    budget += ["--embedding-dim", str(args.embedding_dim), "--split", "classes"]
    seeds = list(range(args.seeds))
    start = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        train_npz, num_train, num_test = training_classes_npz(out)
        tuning = [*budget, "--data", str(train_npz), "--test-size", str(VALIDATION_CLASSES)]
        tuning += ["--split-seed", str(SPLIT_SEED), "--seed", "0"]
        final = [*budget, "--data", "glyphs", "--test-size", str(TEST_CLASSES)]
        final += ["--split-seed", str(SPLIT_SEED)]
        for loss, values in grid.items():
            scores = []
            for i, value in enumerate(values):
                result = run(f"{loss}-tune{i}", ["--loss", loss, *value], out, tuning)
                scores.append(result["after"]["map_at_r"])
                print(
                    f"{loss} {' '.join(value)}: validation MAP@R {scores[-1]:.4f}", file=sys.stderr
                )
            best = values[max(range(len(values)), key=scores.__getitem__)]
            finals = [
                run(f"{loss}-seed{seed}", ["--loss", loss, *best, "--seed", str(seed)], out, final)
                for seed in seeds
            ]
            metrics = {
                key: t_interval([r["after"][key] for r in finals])
                for key in ("map_at_r", "r_precision", "precision_at_1")
            }
            seconds = sum(r["seconds"] for r in finals) / len(finals)
            tried = ", ".join(
                f"{' '.join(v)}: {s:.3f}" for v, s in zip(values, scores, strict=True)
            )
            rows.append((loss, " ".join(best), tried, metrics, seconds))
            print(f"done {loss} ({time.time() - start:.0f} s)", file=sys.stderr)
    backend = os.environ.get("KERAS_BACKEND", "jax")
    print(
        f"Reality Check protocol on the glyphs: {num_train} training classes ({num_test} test "
        f"classes held out), {args.epochs} epochs x {args.steps} batches of 10 x 16, "
        f"{args.embedding_dim}-d embeddings, {len(values)} grid values per loss chosen by "
        f"validation MAP@R, {len(seeds)} seeds; mean ± 95% t-interval half-width over the "
        f"seeds; KERAS_BACKEND={backend}; {time.time() - start:.0f} s in all\n"
    )
    print(
        "| loss | chosen | validation MAP@R of the grid | MAP@R | R-precision | "
        "precision@1 | training s/run |"
    )
    print("|---|---|---|---|---|---|---|")
    for loss, best, tried, metrics, seconds in rows:
        cells = " | ".join(f"{m:.3f} ± {h:.3f}" for m, h in metrics.values())
        print(f"| {loss} | `{best}` | {tried} | {cells} | {seconds:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["losses", "optimizers", "reality-check"])
    parser.add_argument("--epochs", type=int, help="default: 40 (reality-check: 2)")
    parser.add_argument("--only", help="comma-separated settings to run (default: all)")
    parser.add_argument(
        "--steps", type=int, default=25, help="reality-check: batches per epoch (default 25)"
    )
    parser.add_argument(
        "--seeds", type=int, default=3, help="reality-check: seeds of the final runs (default 3)"
    )
    parser.add_argument("--embedding-dim", type=int, default=64, help="reality-check: default 64")
    args = parser.parse_args()
    if args.what == "reality-check":
        args.epochs = args.epochs or 2
        reality_check(args)
        return
    args.epochs = args.epochs or 40
    settings = LOSS_SETTINGS if args.what == "losses" else OPTIMIZER_SETTINGS
    settings = _only(settings, args.only, parser.error)
    common = ["--epochs", str(args.epochs)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in settings.items():
            if args.what == "losses":
                extra = ["--loss", name, *extra]
            result = run(name, extra, Path(tmp), common)
            after = result["after"]
            rows.append(
                (
                    name,
                    " ".join(extra),
                    after["precision_at_1"],
                    after["map_at_r"],
                    after["r_precision"],
                    result["seconds"],
                )
            )
            print(f"done {name}", file=sys.stderr)
    backend = os.environ.get("KERAS_BACKEND", "jax")
    print(
        f"`deepmetric train --epochs {args.epochs}` on the held-out digits, "
        f"KERAS_BACKEND={backend}\n"
    )
    print("| setting | options | precision@1 | MAP@R | R-precision | training s |")
    print("|---|---|---|---|---|---|")
    for name, extra, p1, mapr, rp, secs in rows:
        secs_text = f"{secs:.1f}" if isinstance(secs, (int, float)) else "?"
        print(f"| {name} | `{extra}` | {p1:.4f} | {mapr:.4f} | {rp:.4f} | {secs_text} |")


if __name__ == "__main__":
    main()
