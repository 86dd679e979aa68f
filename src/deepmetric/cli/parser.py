"""The arguments of the `deepmetric` command: the parser, their types and the checks of a run.

Nothing here imports keras: `--help` and bad arguments are answered before a backend loads.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
from typing import Any

from deepmetric.cli import names

PROG = "deepmetric"
BACKENDS = ("jax", "tensorflow", "torch")
# The exit statuses of the command (docs/cli.md lists them): 0 done; EXIT_USAGE bad input,
# a run locked by another process, or a write that failed (no space, no permission);
# EXIT_DIVERGED a training loss that became NaN or inf; EXIT_INTERRUPTED Ctrl-C.
EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130

# The data sets that --data names instead of a path (deepmetric.datasets.load): they ship
# with the dependencies, nothing is downloaded.
BUNDLED_DATA = ("digits", "glyphs")

DATA_FORMATS = """\
--data formats:
  digits                 scikit-learn's 8x8 digits (1797 images, 10 classes; the default)
  glyphs                 characters drawn from matplotlib's fonts with seeded augmentation
                         (7720 32x32 images, 193 classes: deepmetric.datasets.load_glyphs)
  DIR/<class>/<image>    a folder with one sub-folder of images per class (PIL formats);
                         all images take the mode and size of the first readable one
  DIR with IDX files     MNIST format: *images-idx3-ubyte[.gz] beside *labels-idx1-ubyte[.gz]
  FILE-images-idx3-ubyte[.gz]  one IDX images file and its labels-idx1 partner
  FILE.npz               arrays x, (n, features) vectors or (n, H, W[, C]) images, and y,
                         integer labels or class names (numpy.savez; no pickled objects)
Features must be finite (no NaN or inf), and every class needs at least 2 examples.
"""
EXIT_CODES = f"""
exit status: 0 done; {EXIT_USAGE} bad input, a run locked by another process, or a failed
write (no space, no permission: the last checkpoint is kept); {EXIT_DIVERGED} the loss became
NaN or inf (the last good checkpoint is kept); {EXIT_INTERRUPTED} interrupted (Ctrl-C).
"""
# The free space an output folder needs before a command starts writing (train adds an
# estimate from the model's size); DEEPMETRIC_MIN_FREE_MB overrides it.
MIN_FREE_MB = 64

# Defaults of `deepmetric train`, tuned on the digits (see docs/cli.md).
TRAIN_DEFAULTS: dict[str, Any] = {
    "data": "digits",
    "loss": "triplet_semihard",
    "margin": None,  # the loss's own default
    "epochs": 40,
    "classes_per_batch": None,  # min(10, classes of the training split)
    "samples_per_class": 16,
    "steps_per_epoch": None,  # PKSampler's default: about one pass over the data
    "embedding_dim": 64,
    "learning_rate": 3e-3,
    "optimizer": "adam",
    "schedule": "constant",
    "warmup_steps": 0,
    "seed": 0,
    "split_seed": None,  # the held-out split is drawn with --seed
    "test_size": 0.3,
    "split": "samples",
    "map_method": "pca",
    "devices": 1,
    "grad_cache_chunk": None,  # no gradient caching
}

# What `deepmetric train --split` holds out (deepmetric.datasets.split_indices(by=...)).
TRAIN_SPLITS = ("samples", "classes")


class CliError(Exception):
    """Bad input: reported as one line on stderr, exit status `exit_code` (2)."""

    exit_code = EXIT_USAGE


class DivergedError(CliError):
    """The training loss became NaN or inf: one line on stderr, exit status 3."""

    exit_code = EXIT_DIVERGED


def note(message: str) -> None:
    """A line `deepmetric: message` on stderr."""
    print(f"{PROG}: {message}", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise CliError(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _float_in(low: float, *, low_open: bool, high: float = math.inf, high_open: bool = True):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value) and (value > low if low_open else value >= low)
        ok = ok and (value < high if high_open else value <= high)
        if not ok:
            lo = f"{'(' if low_open else '['}{low:g}"
            hi = f"{high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"expected a number in {lo}, {hi}, got {text!r}")
        return value

    return parse


_positive_float = _float_in(0.0, low_open=True)
_nonnegative_float = _float_in(0.0, low_open=False)
_fraction = _float_in(0.0, low_open=True, high=1.0)


def _run_name(text: str) -> str:
    if not text or text in (".", "..") or "/" in text or "\\" in text or text.startswith("."):
        raise argparse.ArgumentTypeError(
            f"expected a plain directory name (no '/', not starting with '.'), got {text!r}"
        )
    return text


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        help="Keras backend (default: $KERAS_BACKEND, else jax); set before keras is imported",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar, no tables")


def _add_data_split(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        default="digits",
        help="'digits' (default), 'glyphs', an image folder, an .npz with x and y, or IDX "
        "files (formats below)",
    )
    p.add_argument(
        "--split",
        choices=("all", "train", "test"),
        default="all",
        help="which part of the data: all (default), or the train/test part of the split "
        "that `deepmetric train` makes with the same --seed and --test-size",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    p.add_argument(
        "--test-size", type=_fraction, default=0.3, help="held-out fraction (default 0.3)"
    )


def _add_train(t: argparse.ArgumentParser) -> None:
    d = TRAIN_DEFAULTS
    # Defaults are None here and filled in by RunDirectory.open, so that --resume can tell
    # the options given on the command line from the saved ones.
    t.add_argument(
        "--data",
        help=f"data set: digits, glyphs, an image folder, an .npz or IDX files, see the formats "
        f"below (default: {d['data']})",
    )
    t.add_argument(
        "--loss",
        help=f"loss of deepmetric.losses or head of deepmetric.heads ({', '.join(names.HEADS)}), "
        f"by snake_case or class name (default: {d['loss']})",
    )
    t.add_argument(
        "--margin",
        type=_nonnegative_float,
        help="margin of the loss, if it has one (default: 0.2 for the triplet losses, "
        "otherwise the loss's own default); for a head: arcface and sub_center_arcface in "
        "radians in [0, pi/2), cosface, proxy_anchor, soft_triple; large_margin_softmax and "
        "sphereface an integer multiplier m >= 1; normalized_softmax, proxy_nca and p2sgrad "
        "have none and refuse it",
    )
    t.add_argument("--epochs", type=_positive_int, help=f"epochs (default: {d['epochs']})")
    t.add_argument(
        "--classes-per-batch",
        type=_positive_int,
        help="P, classes per batch (default: min(10, classes))",
    )
    t.add_argument(
        "--samples-per-class",
        type=_positive_int,
        help=f"K, samples per class and batch (default: {d['samples_per_class']})",
    )
    t.add_argument(
        "--steps-per-epoch",
        type=_positive_int,
        help="batches per epoch (default: ceil(training examples / (P * K)))",
    )
    t.add_argument("--embedding-dim", type=_positive_int, help=f"default: {d['embedding_dim']}")
    t.add_argument("--learning-rate", type=_positive_float, help=f"default: {d['learning_rate']}")
    t.add_argument("--optimizer", help=f"{', '.join(names.OPTIMIZERS)} (default: adam)")
    t.add_argument("--schedule", help=f"{', '.join(names.SCHEDULES)} (default: constant)")
    t.add_argument(
        "--warmup-steps", type=_nonnegative_int, help="linear warm-up steps (default: 0)"
    )
    t.add_argument("--seed", type=int, help="seed of the split, the weights, the batches")
    t.add_argument(
        "--split-seed",
        type=int,
        help="seed of the held-out split alone (default: --seed): several --seed values on "
        "one split",
    )
    t.add_argument(
        "--test-size", type=_fraction, help="held-out fraction of the data (default 0.3)"
    )
    t.add_argument(
        "--split",
        choices=TRAIN_SPLITS,
        help="what is held out: 'samples' (default; a stratified --test-size of every class's "
        "examples, the test classes are training classes) or 'classes' (a --test-size of the "
        "classes, whole: test classes are never seen in training, as in Musgrave et al. 2020)",
    )
    t.add_argument(
        "--map-method",
        choices=("pca", "tsne", "umap"),
        help="2-D projection of the maps (default: pca)",
    )
    t.add_argument(
        "--devices",
        type=_positive_int,
        help="train data-parallel on N local devices: jax and tensorflow (on CPU the host is "
        "split into N devices); torch: see docs/cli.md (torchrun) (default: 1)",
    )
    t.add_argument(
        "--grad-cache-chunk",
        type=_positive_int,
        help="gradient caching: embed each batch C samples at a time, for batches larger than "
        "memory, with the gradient of the whole batch (default: off)",
    )
    t.add_argument(
        "--threads",
        type=_positive_int,
        help="torch backend: intra-op threads (default: 1 unless OMP_NUM_THREADS is set)",
    )
    t.add_argument("--out", default="runs", help="parent directory of runs (default: runs)")
    t.add_argument("--name", type=_run_name, help="run directory name (default: a timestamp)")
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run <out>/<name>.partial (the newest one without --name)",
    )
    _add_common(t)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `deepmetric` command."""
    parser = _Parser(prog=PROG, description="Deep metric learning for Keras 3, offline.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    _add_train(
        sub.add_parser(
            "train",
            help="train, evaluate and export an embedding model",
            description="Train an embedding model with a metric-learning loss on P x K "
            "batches, evaluate retrieval on a held-out split before and after, and write the "
            "run directory <out>/<name>/.",
            epilog=DATA_FORMATS + EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )

    formats: dict[str, Any] = {
        "epilog": DATA_FORMATS,
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }
    e = sub.add_parser("evaluate", help="retrieval metrics of a saved model on data", **formats)
    e.add_argument("model", help="a saved .keras model")
    _add_data_split(e)
    e.add_argument(
        "--recall-at",
        type=_positive_int,
        nargs="+",
        default=[1, 2, 4, 8],
        help="k of recall@k (default: 1 2 4 8)",
    )
    e.add_argument("--json", help="also write the metrics to this JSON file")
    e.add_argument("--force", action="store_true", help="replace an existing --json file")
    _add_common(e)

    m = sub.add_parser(
        "embed", help="embeddings of data by a saved model, as .npy or .tsv", **formats
    )
    m.add_argument("model", help="a saved .keras model")
    _add_data_split(m)
    m.add_argument(
        "--output", default="embeddings.npy", help=".npy (default: embeddings.npy) or .tsv"
    )
    m.add_argument("--batch-size", type=_positive_int, default=256)
    m.add_argument("--force", action="store_true", help="replace an existing --output file")
    _add_common(m)

    x = sub.add_parser("export", help="Embedding Projector files and a 2-D map of data", **formats)
    x.add_argument("model", help="a saved .keras model")
    _add_data_split(x)
    x.add_argument("--out", default="projector", help="output folder (default: projector)")
    x.add_argument("--map-method", choices=("pca", "tsne", "umap"), default="pca")
    x.add_argument(
        "--force",
        action="store_true",
        help="replace an existing --out folder that holds export files (or nothing else)",
    )
    _add_common(x)
    _add_index_and_search(sub, formats)
    return parser


def _add_index_and_search(sub, formats) -> None:
    i = sub.add_parser(
        "index",
        help="a nearest-neighbour index of data embedded by a saved model",
        description="Embed a data set and write a deepmetric.index.Index folder (labels: the "
        "class names; metadata: the file paths for an image folder), read by Index.load.",
        **formats,
    )
    i.add_argument("model", help="a saved .keras model")
    _add_data_split(i)
    i.add_argument("--out", required=True, help="the index folder to write")
    i.add_argument("--engine", choices=("exact", "faiss"), default="exact")
    i.add_argument("--metric", choices=INDEX_METRICS, default="euclidean")
    i.add_argument("--force", action="store_true", help="replace an index saved at --out")
    i.add_argument("--batch-size", type=_positive_int, default=256)
    _add_common(i)

    s = sub.add_parser(
        "search",
        help="the nearest neighbours of query images in a saved index",
        description="Embed each query (an image file, or every row of an .npz's x) with "
        "MODEL and print its k nearest rows of the index DIR.",
    )
    s.add_argument("index", metavar="DIR", help="an index folder written by `deepmetric index`")
    s.add_argument("--model", required=True, help="the saved .keras model that built the index")
    s.add_argument("queries", metavar="QUERY", nargs="+", help="image files or .npz files")
    s.add_argument("-k", type=_positive_int, default=5, help="neighbours per query (default 5)")
    s.add_argument("--json", action="store_true", help="print the results as JSON")
    s.add_argument("--batch-size", type=_positive_int, default=256)
    _add_common(s)


INDEX_METRICS = ("euclidean", "squared_euclidean", "cosine", "inner_product")


EXPORT_FILES = ("vecs.tsv", "meta.tsv", "sprite.png", "projector_config.pbtxt", "map.png")


def check_paths(args: argparse.Namespace) -> None:
    """The checks of the paths of a command that need neither keras nor the model.

    The model file and --data exist; an output that exists is refused unless --force
    (`export` replaces only a folder of its own files); every output folder can be written
    and has `min_free_bytes()` free. `search`: the queries exist, and DIR holds an index,
    which is loaded into `args.loaded_index` (numpy only) so that a missing or damaged
    index is reported before a backend loads. `train` is checked by `RunDirectory.open`.
    """
    if args.command == "train":
        return
    if not os.path.isfile(args.model):
        raise CliError(f"{args.model}: no such model file")
    if args.command == "search":
        _check_search(args)
        return
    check_data_path(args.data)
    if args.command == "index":
        if os.path.exists(args.out) and not args.force:
            raise CliError(f"--out {args.out} exists; pass --force to replace the index there")
        check_output_location(args.out, "--out")
    elif args.command == "export":
        _check_export_out(args.out, args.force)
        check_output_location(args.out, "--out")
    elif args.command == "embed":
        if not args.output.endswith((".npy", ".tsv")):
            name = os.path.basename(args.output)
            raise CliError(f"--output must end in .npy or .tsv, got {name!r}")
        _check_output_file(args.output, "--output", args.force)
    elif args.command == "evaluate" and args.json:
        _check_output_file(args.json, "--json", args.force)


def _check_search(args: argparse.Namespace) -> None:
    for query in args.queries:
        if not os.path.isfile(query):
            raise CliError(f"{query}: no such query file")
    from deepmetric.index import Index, IndexFileError

    if not os.path.isdir(args.index):
        raise CliError(f"{args.index}: no such index folder")
    try:
        args.loaded_index = Index.load(args.index)
    except (IndexFileError, OSError, ValueError, ImportError) as e:
        raise CliError(str(e)) from None


def _check_export_out(out: str, force: bool) -> None:
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise CliError(f"--out {out} exists and is not a directory")
    if not force:
        raise CliError(f"--out {out} exists; pass --force to replace the export there")
    others = sorted(set(os.listdir(out)) - set(EXPORT_FILES))
    if others:
        raise CliError(
            f"--out {out} holds files that export does not write ({', '.join(others[:3])}); "
            "--force replaces only a folder of export files"
        )


def _check_output_file(path: str, option: str, force: bool) -> None:
    if os.path.isdir(path):
        raise CliError(f"{option} {path} is a directory")
    if os.path.exists(path) and not force:
        raise CliError(f"{option} {path} exists; pass --force to replace it")
    check_output_location(path, option)


def check_data_path(spec: str) -> None:
    """CliError unless --data names a bundled data set (`BUNDLED_DATA`) or an existing path
    (the loader checks the rest)."""
    if spec not in BUNDLED_DATA and not os.path.exists(os.path.expanduser(spec)):
        raise CliError(f"{os.path.expanduser(spec)}: no such file or folder")


def min_free_bytes() -> int:
    """The free space every output folder needs: MIN_FREE_MB, or $DEEPMETRIC_MIN_FREE_MB."""
    text = os.environ.get("DEEPMETRIC_MIN_FREE_MB", str(MIN_FREE_MB))
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise CliError(f"DEEPMETRIC_MIN_FREE_MB must be a number of MB >= 0, got {text!r}")
    return int(value * 2**20)


def check_output_location(path, option: str, *, need: int | None = None) -> None:
    """CliError unless `path` (a file or folder to write) can be created and its file system
    has `need` bytes free (default `min_free_bytes()`).

    The nearest existing folder at or above the path's parent must be a directory in which
    a file can really be created (a probe file, removed at once: permissions, a read-only
    file system, quota), and `shutil.disk_usage` of it must show `need` bytes free.
    """
    path = os.path.abspath(os.path.expanduser(str(path)))
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise CliError(f"{option} {path}: cannot create it, {folder} is a file, not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".deepmetric-probe-") as probe:
            probe.write(b"0")
            probe.flush()
    except OSError as e:
        raise CliError(f"{option} {path}: cannot write in {folder} ({e.strerror or e})") from None
    need = min_free_bytes() if need is None else need
    free = shutil.disk_usage(folder).free
    if free < need:
        raise CliError(
            f"{option} {path}: only {free / 2**20:.1f} MB free in {folder}, "
            f"{need / 2**20:.1f} MB needed (see DEEPMETRIC_MIN_FREE_MB)"
        )


def check_train_config(config: dict[str, Any]) -> None:
    """The checks of a training configuration that need neither keras nor the data."""
    try:
        name, _ = names.resolve(config["loss"])
        names.check_head_margin(name, config["margin"])
    except ValueError as e:
        raise CliError(str(e)) from None
    if config.get("grad_cache_chunk") and name in names.HEADS:
        raise CliError(
            f"--grad-cache-chunk works with the losses of labels and embeddings; the head "
            f"{name!r} adds its loss inside the model (train it without --grad-cache-chunk)"
        )
    optimizer = config["optimizer"]
    if optimizer.lower() not in names.OPTIMIZERS:
        allowed = ", ".join(repr(n) for n in names.OPTIMIZERS)
        raise CliError(
            f"--optimizer: Unknown optimizer name: {optimizer!r}. Allowed names: {allowed}."
        )
    if config["schedule"] not in names.SCHEDULES:
        allowed = ", ".join(repr(n) for n in names.SCHEDULES)
        raise CliError(
            f"--schedule: Unknown schedule name: {config['schedule']!r}. Allowed names: {allowed}."
        )


DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def prepare_devices(args: argparse.Namespace) -> None:
    """`train --devices N`, before keras loads: refuse torch, give jax N host CPUs.

    torch trains on several devices with one process per device (torchrun), which `fit`
    does not do: CliError pointing to docs/cli.md. jax: unless XLA_FLAGS already sets it, or
    jax is already imported, appends `--xla_force_host_platform_device_count=N` to XLA_FLAGS,
    so that a CPU-only machine shows N devices (accelerators are not affected). Whether N
    devices exist is checked once the backend has loaded (`deepmetric.cli.devices`).
    """
    if args.command != "train":
        return
    count = args.run.config.get("devices", 1)
    if count < 2:
        return
    backend = args.backend or os.environ.get("KERAS_BACKEND") or "jax"
    if backend == "torch":
        raise CliError(
            f"--devices {count}: on the torch backend, train with one process per device "
            "(torchrun); see docs/cli.md"
        )
    flags = os.environ.get("XLA_FLAGS", "")
    if backend == "jax" and "jax" not in sys.modules and DEVICE_COUNT_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT_FLAG}={count}".strip()
