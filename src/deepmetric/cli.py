"""The `deepmetric` command: train, evaluate, embed and export embedding models, offline.

    deepmetric train                      # the digits, default settings
    deepmetric train --data photos/ --loss multi_similarity --epochs 30
    deepmetric evaluate runs/<name>/model.keras --data digits --split test
    deepmetric embed runs/<name>/model.keras --data items.npz --output items.npy
    deepmetric export runs/<name>/model.keras --data digits --out projector/

`--loss` takes a loss of deepmetric.losses or a head of deepmetric.heads (`arcface`,
`cosface`, `sub_center_arcface`, `normalized_softmax`, `proxy_nca`, `proxy_anchor`): a head
trains on top of the embedding model (labels as a second input of a trainer model, one
proxy per training class), and the run saves the embedding model alone.

See docs/cli.md for the options, the outputs and the measured default run. Bad input
prints one line `deepmetric: error: ...` on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import inspect
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

PROG = "deepmetric"
BACKENDS = ("jax", "tensorflow", "torch")

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
    "test_size": 0.3,
    "map_method": "pca",
}

# The margin used when --margin is not given, for losses on L2-normalised embeddings
# whose TFA default (1.0, meant for unnormalised embeddings) trains worse: distances
# between unit vectors lie in [0, 2]. Tuned on the digits (docs/cli.md). Other losses
# keep their own defaults.
DEFAULT_MARGINS = {
    "triplet_semihard": 0.2,
    "triplet_hard": 0.2,
    "triplet_batch_all": 0.2,
    "triplet": 0.2,
}

# Losses of deepmetric.losses whose inputs are not (labels, embeddings).
_NOT_EMBEDDING_LOSSES = frozenset(
    {"ContrastiveLoss", "NpairsLoss", "NpairsMultilabelLoss", "TripletMarginLoss"}
)

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise CliError(message)


# ---------------------------------------------------------------------------
# Argument types


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


# ---------------------------------------------------------------------------
# The parser


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
        help="'digits' (default), an image folder, an .npz with x and y, or IDX files",
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `deepmetric` command."""
    parser = _Parser(prog=PROG, description="Deep metric learning for Keras 3, offline.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    t = sub.add_parser(
        "train",
        help="train, evaluate and export an embedding model",
        description="Train an embedding model with a metric-learning loss on P x K batches, "
        "evaluate retrieval on a held-out split before and after, and write the run "
        "directory <out>/<name>/.",
    )
    d = TRAIN_DEFAULTS
    # Defaults are None here and filled in later, so that --resume can tell the
    # options given on the command line from the saved ones.
    t.add_argument("--data", help=f"data set (default: {d['data']})")
    t.add_argument(
        "--loss",
        help="loss of deepmetric.losses or head of deepmetric.heads (arcface, cosface, "
        "sub_center_arcface, normalized_softmax, proxy_nca, proxy_anchor), by snake_case or "
        f"class name (default: {d['loss']})",
    )
    t.add_argument(
        "--margin",
        type=_nonnegative_float,
        help="margin of the loss, if it has one (default: 0.2 for the triplet losses, "
        "otherwise the loss's own default); for a head: arcface and sub_center_arcface in "
        "radians in [0, pi/2), cosface, proxy_anchor; normalized_softmax and proxy_nca have "
        "none and refuse it",
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
    t.add_argument("--optimizer", help="adam (default), adamw, sgd, rmsprop or adabelief")
    t.add_argument("--schedule", help="constant (default), cosine, cosine-restarts or exponential")
    t.add_argument(
        "--warmup-steps", type=_nonnegative_int, help="linear warm-up steps (default: 0)"
    )
    t.add_argument("--seed", type=int, help="seed of the split, the weights, the batches")
    t.add_argument(
        "--test-size", type=_fraction, help="held-out fraction of the data (default 0.3)"
    )
    t.add_argument(
        "--map-method",
        choices=("pca", "tsne", "umap"),
        help="2-D projection of the maps (default: pca)",
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

    e = sub.add_parser("evaluate", help="retrieval metrics of a saved model on data")
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
    _add_common(e)

    m = sub.add_parser("embed", help="embeddings of data by a saved model, as .npy or .tsv")
    m.add_argument("model", help="a saved .keras model")
    _add_data_split(m)
    m.add_argument(
        "--output", default="embeddings.npy", help=".npy (default: embeddings.npy) or .tsv"
    )
    m.add_argument("--batch-size", type=_positive_int, default=256)
    _add_common(m)

    x = sub.add_parser("export", help="Embedding Projector files and a 2-D map of data")
    x.add_argument("model", help="a saved .keras model")
    _add_data_split(x)
    x.add_argument("--out", default="projector", help="output folder (default: projector)")
    x.add_argument("--map-method", choices=("pca", "tsne", "umap"), default="pca")
    _add_common(x)
    return parser


# ---------------------------------------------------------------------------
# Backend selection


def _select_backend(backend: str | None, argv: list[str], from_console: bool) -> None:
    """Makes keras run on `backend`: sets KERAS_BACKEND, or re-executes the command.

    The package `deepmetric` imports keras, so when this runs as the console script
    keras is already loaded (with $KERAS_BACKEND or ~/.keras/keras.json). If that is
    not the backend asked for, the command runs again as `python -m deepmetric.cli`
    with KERAS_BACKEND set. Called in-process (`main([...])`), a different backend
    than the loaded one is an error.
    """
    wanted = backend or os.environ.get("KERAS_BACKEND") or "jax"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = wanted
        return
    import keras

    current = keras.backend.backend()
    if current == wanted:
        return
    if from_console and not os.environ.get("DEEPMETRIC_REEXEC"):
        env = dict(os.environ, KERAS_BACKEND=wanted, DEEPMETRIC_REEXEC="1")
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "deepmetric.cli", *argv], env)
    raise CliError(
        f"backend {wanted!r} requested but keras is already loaded with {current!r}; "
        f"set KERAS_BACKEND={wanted} before starting Python"
    )


# ---------------------------------------------------------------------------
# Losses


def _default_name(cls) -> str:
    try:
        default = inspect.signature(cls.__init__).parameters["name"].default
    except (KeyError, ValueError, TypeError):
        default = None
    if not isinstance(default, str) or not default:
        base = cls.__name__[:-4] if cls.__name__.endswith("Loss") else cls.__name__
        default = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", base).lower()
    return default[:-5] if default.endswith("_loss") else default


def available_losses() -> dict[str, type]:
    """The losses of `deepmetric.losses.__all__` that take labels and embeddings.

    Keys are the snake_case names (the loss's default `name` without `_loss`, e.g.
    `triplet_semihard`), values the classes. Losses added to `deepmetric.losses`
    later appear here without a change to the command line.
    """
    import keras

    import deepmetric.losses as losses_module

    found = {}
    for attr in getattr(losses_module, "__all__", ()):
        cls = getattr(losses_module, attr, None)
        if not (inspect.isclass(cls) and issubclass(cls, keras.losses.Loss)):
            continue
        if attr in _NOT_EMBEDDING_LOSSES or getattr(cls, "takes_embeddings", True) is False:
            continue
        found[_default_name(cls)] = cls
    return dict(sorted(found.items()))


def available_heads() -> dict[str, type]:
    """The proxy and margin-softmax heads of `deepmetric.heads`, by snake_case name.

    `arcface`, `cosface`, `sub_center_arcface`, `normalized_softmax`, `proxy_nca`,
    `proxy_anchor`. `deepmetric train --loss NAME` trains a head on top of the embedding
    model (labels as a second input of a trainer model) and saves the embedding model alone.
    """
    import deepmetric.heads as heads_module

    found = {}
    for attr in dir(heads_module):
        cls = getattr(heads_module, attr, None)
        if (
            not attr.startswith("_")
            and inspect.isclass(cls)
            and issubclass(cls, heads_module._ProxyHead)
        ):
            snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", attr).lower()
            found[snake.replace("arc_face", "arcface").replace("cos_face", "cosface")] = cls
    return dict(sorted(found.items()))


def _normalize_loss_name(text: str) -> str:
    key = text.strip().lower().replace("-", "_")
    for suffix in ("_loss", "loss"):
        if key.endswith(suffix) and len(key) > len(suffix):
            key = key[: -len(suffix)]
            break
    return key.replace("_", "")


def resolve_loss(name: str) -> tuple[str, type]:
    """The (snake_case name, class) of the loss or head called `name`; CliError if unknown."""
    losses, heads = available_losses(), available_heads()
    wanted = _normalize_loss_name(name)
    for snake, cls in {**losses, **heads}.items():
        if wanted in (snake.replace("_", ""), _normalize_loss_name(cls.__name__)):
            return snake, cls
    raise CliError(
        f"unknown loss {name!r}; valid names: {', '.join(losses)}; heads: {', '.join(heads)}"
    )


def _is_head(cls) -> bool:
    import deepmetric.heads as heads_module

    return issubclass(cls, heads_module._ProxyHead)


def _make_head(head_cls, num_classes: int, margin: float | None):
    """`head_cls(num_classes, margin=margin)`; CliError if the head has no margin or rejects it.

    Unlike a batch loss (where a margin it does not take is ignored with a note), a head
    without a margin (normalised softmax, Proxy-NCA) refuses --margin: its logits have no
    margin to set, and the scale or temperature that stands in for it is another quantity.
    """
    if margin is not None and "margin" not in inspect.signature(head_cls).parameters:
        heads = available_heads()
        name = next((n for n, cls in heads.items() if cls is head_cls), head_cls.__name__)
        with_margin = [
            n for n, cls in heads.items() if "margin" in inspect.signature(cls).parameters
        ]
        raise CliError(
            f"--margin: the {name} head has no margin (heads with one: {', '.join(with_margin)})"
        )
    try:
        return head_cls(num_classes=num_classes, **({} if margin is None else {"margin": margin}))
    except ValueError as e:
        raise CliError(f"--margin: {e}") from None


def _head_trainer(embedder, head_cls, num_classes: int, margin: float | None):
    """`keras.Model([images, labels], head([embedder(images), labels]))`, compiled later."""
    import keras

    head = _make_head(head_cls, num_classes, margin)
    images = keras.Input(tuple(embedder.inputs[0].shape[1:]), name="images")
    labels = keras.Input((), dtype="int32", name="labels")
    return keras.Model([images, labels], head([embedder(images), labels]), name="head_trainer")


def _head_batches(sampler, classes, with_targets: bool):
    """The PK batches as `((x, class index), class index)`, or `((x, class index),)`."""
    import keras
    import numpy as np

    class HeadBatches(keras.utils.PyDataset):
        def __len__(self):
            return len(sampler)

        def __getitem__(self, index):
            x, y = sampler[index]
            y = np.searchsorted(classes, y).astype("int32")
            return ((x, y), y) if with_targets else ((x, y),)

        def on_epoch_end(self):
            sampler.on_epoch_end()

    return HeadBatches()


def _margin_kwargs(cls, margin: float | None, given: float | None = None) -> dict:
    """`{"margin": margin}` if `cls` takes a margin, else `{}` (a note if --margin given)."""
    params = inspect.signature(cls.__init__).parameters
    if margin is not None and "margin" in params:
        return {"margin": margin}
    if given is not None:
        _note(f"--margin ignored: {cls.__name__} has no margin")
    return {}


def _make_loss(cls, margin: float | None, given: float | None = None):
    """`cls(margin=margin)` if the loss has a margin, else `cls()` (a note if --margin given)."""
    return cls(**_margin_kwargs(cls, margin, given))


# ---------------------------------------------------------------------------
# Small helpers


def _note(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def _load_data(spec: str):
    from deepmetric import datasets

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data = datasets.load(spec)
    except datasets.DataError as e:
        raise CliError(str(e)) from None
    for w in caught:
        if "skipping unreadable image" in str(w.message):
            _note(f"warning: {w.message}")
    return data


def _split(data, test_size: float, seed: int):
    """The stratified train/test split of `deepmetric train`."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    counts = np.bincount(data.y)
    present = counts[counts > 0]
    if len(present) < 2:
        raise CliError(f"the data has {len(present)} class; metric learning needs at least 2")
    if present.min() < 2:
        raise CliError(
            "every class needs at least 2 examples for the stratified split; "
            f"{int((present < 2).sum())} classes have 1"
        )
    try:
        return train_test_split(
            data.x, data.y, test_size=test_size, stratify=data.y, random_state=seed
        )
    except ValueError as e:
        raise CliError(f"cannot split the data with --test-size {test_size}: {e}") from None


def _select(data, split: str, test_size: float, seed: int):
    if split == "all":
        return data.x, data.y
    x_train, x_test, y_train, y_test = _split(data, test_size, seed)
    return (x_train, y_train) if split == "train" else (x_test, y_test)


def _load_model(path: str):
    import keras

    import deepmetric.layers  # noqa: F401  (registers L2Normalization)
    import deepmetric.losses  # noqa: F401  (registers the losses)

    if not os.path.exists(path):
        raise CliError(f"{path}: no such model file")
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as e:
        raise CliError(f"{path}: cannot load the model ({type(e).__name__}: {e})") from None


def _embed(model, x, batch_size: int = 256):
    import numpy as np

    expected = tuple(model.input_shape[1:])
    if len(expected) != x.ndim - 1 or any(
        e is not None and e != s for e, s in zip(expected, x.shape[1:], strict=True)
    ):
        raise CliError(
            f"the model takes inputs of shape {expected}, the data has shape {x.shape[1:]}"
        )
    return np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype="float32")


def _metrics(embeddings, labels, *, recall_at=(1, 2, 4, 8), clustering=True, seed=0):
    from deepmetric.evaluation import retrieval_metrics

    metrics = retrieval_metrics(
        embeddings, labels, recall_at=tuple(recall_at), clustering=clustering, seed=seed
    )
    return {k: float(v) for k, v in metrics.items()}


def format_table(columns: dict[str, dict[str, float]]) -> str:
    """A text table: one row per metric, one column per dict."""
    names = list(dict.fromkeys(k for col in columns.values() for k in col))
    width = max([len("metric"), *map(len, names)])
    lines = ["metric".ljust(width) + "".join(f"  {h:>8}" for h in columns)]
    for name in names:
        cells = "".join(
            f"  {col[name]:8.4f}" if name in col else f"  {'-':>8}" for col in columns.values()
        )
        lines.append(name.ljust(width) + cells)
    return "\n".join(lines)


def _write_text(path, text: str) -> None:
    Path(path).write_text(text, encoding="utf-8")


def _write_json(path: Path, obj) -> None:
    from deepmetric.export import atomic_write

    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda p: _write_text(p, text))


def _write_history_csv(path: Path, history: dict[str, list[float]]) -> None:
    from deepmetric.export import atomic_write

    keys = list(history)
    rows = max((len(v) for v in history.values()), default=0)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["epoch", *keys])
    for i in range(rows):
        writer.writerow(
            [i + 1, *(repr(history[k][i]) if i < len(history[k]) else "" for k in keys)]
        )
    text = buffer.getvalue()
    atomic_write(path, lambda p: _write_text(p, text))


# ---------------------------------------------------------------------------
# train


def _train_callbacks(
    state: dict, checkpoint_dir: Path, x_test, y_test, before_embeddings, embedder=None
) -> list:
    """Learning-rate logging, per-epoch retrieval metrics, and the checkpoint.

    The checkpoint saves the model being fitted (with a head, the trainer: proxies and
    optimizer state included); `embedder` is the model to evaluate when that is a trainer.
    """
    import keras
    import numpy as np

    from deepmetric.callbacks import RetrievalEvaluation
    from deepmetric.export import atomic_write

    class LearningRateLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if logs is not None:
                rate = self.model.optimizer.learning_rate
                logs["learning_rate"] = float(np.asarray(keras.ops.convert_to_numpy(rate)))

    class Checkpoint(keras.callbacks.Callback):
        """Saves model, epoch and history after each epoch; state.json commits it."""

        def on_train_begin(self, logs=None):
            self.base_seconds = state.get("train_seconds", 0.0)
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            state["train_seconds"] = self.base_seconds + time.perf_counter() - self.started
            for key, value in (logs or {}).items():
                state["history"].setdefault(key, []).append(float(value))
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            if (
                before_embeddings is not None
                and not (checkpoint_dir / "before_embeddings.npy").exists()
            ):
                atomic_write(
                    checkpoint_dir / "before_embeddings.npy",
                    lambda p: np.save(p, before_embeddings),
                )
            model_file = f"epoch-{epoch + 1:04d}.keras"
            atomic_write(checkpoint_dir / model_file, self.model.save)
            state["epoch"] = epoch + 1
            state["model_file"] = model_file
            _write_json(checkpoint_dir / "state.json", state)
            for old in checkpoint_dir.glob("epoch-*.keras"):
                if old.name != model_file:
                    old.unlink()

    return [
        LearningRateLogger(),
        RetrievalEvaluation(
            x_test,
            y_test,
            prefix="val_",
            recall_at=(1,),
            clustering=False,
            embedding_model=embedder,
        ),
        Checkpoint(),
    ]


def _resolve_train_config(args, saved: dict | None) -> dict:
    config = dict(TRAIN_DEFAULTS)
    if saved:
        config.update(saved)
    given = {k: v for k, v in vars(args).items() if k in TRAIN_DEFAULTS and v is not None}
    if saved:
        fixed = (
            "data",
            "loss",
            "margin",
            "classes_per_batch",
            "samples_per_class",
            "steps_per_epoch",
            "embedding_dim",
            "learning_rate",
            "optimizer",
            "schedule",
            "warmup_steps",
            "seed",
            "test_size",
        )
        changed = [k for k in fixed if k in given and given[k] != saved.get(k)]
        if changed:
            raise CliError(
                "--resume continues the saved run; these options differ from it: "
                + ", ".join("--" + k.replace("_", "-") for k in changed)
            )
    config.update(given)
    return config


def _find_partial(out: Path, name: str | None) -> Path:
    if name:
        partial = out / f"{name}.partial"
        if not (partial / "state.json").exists():
            raise CliError(f"nothing to resume: {partial} has no checkpoint")
        return partial
    candidates = sorted(out.glob("*.partial/state.json"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise CliError(f"nothing to resume: no *.partial run in {out}")
    return candidates[-1].parent


def train(args) -> int:
    """`deepmetric train`: see the module docstring and docs/cli.md."""
    import keras

    if keras.backend.backend() != "torch":
        return _train(args)
    import torch

    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        # Small models train several times faster on one thread than on all cores
        # (docs/cli.md); --threads or OMP_NUM_THREADS choose otherwise.
        torch.set_num_threads(1)
    try:
        return _train(args)
    finally:
        torch.set_num_threads(threads)


def _train(args) -> int:
    import numpy as np

    from deepmetric import optimizers, schedules

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} exists and is not a directory")

    saved_state = None
    if args.resume:
        partial = _find_partial(out, args.name)
        name = partial.name[: -len(".partial")]
        try:
            saved_state = json.loads((partial / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CliError(f"{partial}/state.json: unreadable checkpoint ({e})") from None
        config = _resolve_train_config(args, saved_state["config"])
        if config["epochs"] < saved_state["epoch"]:
            raise CliError(
                f"the checkpoint already has {saved_state['epoch']} epochs; "
                f"--epochs {config['epochs']} is fewer"
            )
    else:
        name = args.name or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        partial = out / f"{name}.partial"
        config = _resolve_train_config(args, None)
        if partial.exists():
            raise CliError(
                f"{partial} exists: continue it with --resume --name {name}, or delete it"
            )
    run_dir = out / name
    if run_dir.exists():
        raise CliError(f"{run_dir} exists; choose another --name")

    loss_name, loss_cls = resolve_loss(config["loss"])
    head = _is_head(loss_cls)
    head_adds_loss = bool(getattr(loss_cls, "adds_loss", False))
    if head and saved_state is None:
        _make_head(loss_cls, 2, config["margin"])  # a bad --margin fails before the data load
    try:
        optimizers.build(config["optimizer"], 1e-3)
    except ValueError as e:
        raise CliError(f"--optimizer: {e}") from None
    try:
        schedules.build(config["schedule"], 1e-3, 10)
    except ValueError as e:
        raise CliError(f"--schedule: {e}") from None

    data = _load_data(config["data"])
    num_classes = len(np.unique(data.y))
    x_train, x_test, y_train, y_test = _split(data, config["test_size"], config["seed"])
    train_classes = len(np.unique(y_train))
    p = config["classes_per_batch"] or min(10, train_classes)
    if p > train_classes:
        raise CliError(
            f"--classes-per-batch {p} is more than the {train_classes} classes of the "
            "training split"
        )
    if p < 2:
        raise CliError("--classes-per-batch must be at least 2 (negatives come from other classes)")
    config["classes_per_batch"] = p
    # A head has one proxy per training class: labels become indices into `classes`.
    classes = np.unique(y_train)
    k = config["samples_per_class"]

    import keras

    from deepmetric.models import build_embedding_model
    from deepmetric.samplers import PKSampler

    _seed_everything(config["seed"])
    sampler = PKSampler(
        x_train,
        y_train,
        p,
        k,
        batches_per_epoch=config["steps_per_epoch"],
        seed=config["seed"],
    )
    steps = len(sampler)
    total_steps = steps * config["epochs"]
    if config["warmup_steps"] >= total_steps and config["schedule"] != "constant":
        raise CliError(
            f"--warmup-steps {config['warmup_steps']} must be below the {total_steps} steps "
            "of the run"
        )

    verbose = not args.quiet
    if saved_state is None:
        model = build_embedding_model(
            x_train.shape[1:],
            config["embedding_dim"],
            pixel_scale=data.pixel_scale,
            standardize=None if data.is_image else _feature_stats(x_train),
        )
        try:
            rate = schedules.build(
                config["schedule"], config["learning_rate"], total_steps, config["warmup_steps"]
            )
            optimizer = optimizers.build(config["optimizer"], rate)
        except ValueError as e:
            raise CliError(str(e)) from None
        margin = config["margin"]
        if margin is None:
            margin = DEFAULT_MARGINS.get(loss_name)
        if head:
            trainer = _head_trainer(model, loss_cls, len(classes), config["margin"])
            trainer.compile(
                optimizer=optimizer,
                loss=None
                if head_adds_loss
                else keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
        else:
            model.compile(optimizer=optimizer, loss=_make_loss(loss_cls, margin, config["margin"]))
            trainer = model
        before_embeddings = _embed(model, x_test)
        before = _metrics(before_embeddings, y_test, seed=config["seed"])
        state: dict[str, Any] = {
            "config": config,
            "loss": loss_name,
            "backend": keras.backend.backend(),
            "epoch": 0,
            "model_file": None,
            "history": {},
            "before": before,
            "train_seconds": 0.0,
            "embedder": model.name if head else None,
        }
        initial_epoch = 0
    else:
        state = saved_state
        state["config"] = config
        before = state["before"]
        before_embeddings = None
        try:
            trainer = keras.saving.load_model(partial / state["model_file"], safe_mode=True)
            model = trainer.get_layer(state["embedder"]) if state.get("embedder") else trainer
        except Exception as e:
            raise CliError(
                f"{partial}: cannot load the checkpoint ({type(e).__name__}: {e})"
            ) from None
        initial_epoch = state["epoch"]
        for _ in range(initial_epoch):
            sampler.on_epoch_end()
        if verbose:
            print(f"resuming {partial} after epoch {initial_epoch}")

    if verbose:
        print(
            f"training on {len(x_train)} examples ({num_classes} classes), held out "
            f"{len(x_test)}; loss {loss_name}, {config['epochs']} epochs x {steps} batches "
            f"of {p} x {k}, backend {keras.backend.backend()}"
        )
    callbacks = _train_callbacks(
        state, partial, x_test, y_test, before_embeddings, model if head else None
    )
    batches = _head_batches(sampler, classes, not head_adds_loss) if head else sampler
    try:
        trainer.fit(
            batches,
            epochs=config["epochs"],
            initial_epoch=initial_epoch,
            callbacks=callbacks,
            verbose=1 if verbose else 0,
        )
    except KeyboardInterrupt:
        done = state["epoch"]
        where = f"{partial}" if done else "nothing (no epoch completed)"
        _note(
            f"interrupted; saved {done} completed epochs in {where}"
            + (f"; continue with: {PROG} train --resume --name {name} --out {out}" if done else "")
        )
        return EXIT_INTERRUPTED
    seconds = state["train_seconds"]

    embeddings = _embed(model, x_test)
    after = _metrics(embeddings, y_test, seed=config["seed"])
    if verbose:
        print(f"\nretrieval on the {len(x_test)} held-out examples")
        print(format_table({"before": before, "after": after}))
        print(f"training took {seconds:.1f} s")
    before_embeddings = np.load(partial / "before_embeddings.npy")
    _write_run(
        out,
        run_dir,
        model,
        state,
        before,
        after,
        embeddings,
        before_embeddings,
        x_test,
        y_test,
        data,
        config,
    )
    if partial.exists():
        shutil.rmtree(partial, ignore_errors=True)
    if verbose:
        print(f"wrote {run_dir}")
    return 0


def _seed_everything(seed: int) -> None:
    """Seeds Python, numpy and the backend, as `keras.utils.set_random_seed` does.

    `set_random_seed` imports TensorFlow whenever it is installed (5 s on this
    machine) to seed it; on the jax and torch backends that is not needed: Keras'
    initializers and dropout draw their default seeds from Python's `random`.
    """
    import random

    import keras
    import numpy as np

    if keras.backend.backend() == "tensorflow" or "tensorflow" in sys.modules:
        keras.utils.set_random_seed(seed)
        return
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if keras.backend.backend() == "torch":
        import torch

        torch.manual_seed(seed)


def _feature_stats(x):
    import numpy as np

    flat = x.reshape(len(x), -1).astype("float64")
    return flat.mean(axis=0).tolist(), np.maximum(flat.var(axis=0), 1e-12).tolist()


def _write_run(
    out,
    run_dir,
    model,
    state,
    before,
    after,
    embeddings,
    before_embeddings,
    x_test,
    y_test,
    data,
    config,
) -> None:
    """Writes every output into a temporary folder beside `run_dir`, then renames it."""
    from deepmetric.export import plot_embeddings, plot_history, write_projector

    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.tmp-", dir=out))
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)
        model.save(tmp / "model.keras")
        _write_json(tmp / "metrics.json", {"before": before, "after": after})
        _write_json(
            tmp / "config.json",
            {
                **config,
                "loss": state["loss"],
                "backend": state["backend"],
                "epochs_trained": state["epoch"],
                "train_seconds": round(state["train_seconds"], 2),
                "num_train": int(len(data.y) - len(y_test)),
                "num_test": int(len(y_test)),
                "class_names": list(data.class_names),
            },
        )
        _write_history_csv(tmp / "history.csv", state["history"])
        write_projector(
            tmp,
            embeddings,
            y_test,
            images=x_test if data.is_image else None,
            class_names=data.class_names,
        )
        method = config["map_method"]
        names = data.class_names
        plot_embeddings(
            tmp / "map_before.png",
            before_embeddings,
            y_test,
            method,
            title=f"{method.upper()} before training (precision@1 "
            f"{before['precision_at_1']:.3f}, MAP@R {before['map_at_r']:.3f})",
            class_names=names,
            seed=config["seed"],
        )
        plot_embeddings(
            tmp / "map_after.png",
            embeddings,
            y_test,
            method,
            title=f"{method.upper()} after training (precision@1 "
            f"{after['precision_at_1']:.3f}, MAP@R {after['map_at_r']:.3f})",
            class_names=names,
            seed=config["seed"],
        )
        plot_history(tmp / "training_curves.png", state["history"])
        os.rename(tmp, run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------
# evaluate, embed, export


def evaluate(args) -> int:
    model = _load_model(args.model)
    data = _load_data(args.data)
    x, y = _select(data, args.split, args.test_size, args.seed)
    metrics = _metrics(_embed(model, x), y, recall_at=args.recall_at, seed=args.seed)
    if args.json:
        _write_json(Path(args.json), metrics)
    if not args.quiet:
        print(format_table({"value": metrics}))
    return 0


def embed(args) -> int:
    import numpy as np

    from deepmetric.export import atomic_write

    output = Path(args.output)
    if output.suffix not in (".npy", ".tsv"):
        raise CliError(f"--output must end in .npy or .tsv, got {output.name!r}")
    model = _load_model(args.model)
    data = _load_data(args.data)
    x, _ = _select(data, args.split, args.test_size, args.seed)
    embeddings = _embed(model, x, args.batch_size)
    if output.suffix == ".npy":
        atomic_write(output, lambda p: np.save(p, embeddings))
    else:
        atomic_write(output, lambda p: np.savetxt(p, embeddings, fmt="%.7g", delimiter="\t"))
    if not args.quiet:
        print(f"wrote {embeddings.shape[0]} embeddings of size {embeddings.shape[1]} to {output}")
    return 0


def export(args) -> int:
    from deepmetric.export import plot_embeddings, write_projector

    model = _load_model(args.model)
    data = _load_data(args.data)
    x, y = _select(data, args.split, args.test_size, args.seed)
    embeddings = _embed(model, x)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} exists and is not a directory")
    write_projector(
        out, embeddings, y, images=x if data.is_image else None, class_names=data.class_names
    )
    plot_embeddings(out / "map.png", embeddings, y, args.map_method, class_names=data.class_names)
    if not args.quiet:
        print(f"wrote Embedding Projector files and map.png to {out}")
    return 0


_COMMANDS = {"train": train, "evaluate": evaluate, "embed": embed, "export": export}


def main(argv: list[str] | None = None) -> int:
    """Runs the `deepmetric` command line; returns the exit status.

    >>> main(["train", "--epochs", "0"])
    2
    """
    from_console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help
            return int(e.code or 0)
        _select_backend(args.backend, argv, from_console)
        return _COMMANDS[args.command](args)
    except CliError as e:
        message = " ".join(str(e).split())
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        _note("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
