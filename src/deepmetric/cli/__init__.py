"""The `deepmetric` command: train, evaluate, embed and export embedding models, offline.

    deepmetric train                      # the digits, default settings
    deepmetric train --data photos/ --loss multi_similarity --epochs 30
    deepmetric evaluate runs/<name>/model.keras --data digits --split test
    deepmetric embed runs/<name>/model.keras --data items.npz --output items.npy
    deepmetric export runs/<name>/model.keras --data digits --out projector/
    deepmetric index runs/<name>/model.keras --data photos/ --out photos.index
    deepmetric search photos.index --model runs/<name>/model.keras new.jpg -k 5 --json

`--loss` takes a loss of deepmetric.losses or a head of deepmetric.heads (`names.py`); a
head trains on top of the embedding model and the run saves the embedding model alone. See
docs/cli.md for the options, the outputs and the measured default run. Bad input prints one
line `deepmetric: error: ...` on stderr and exits with status 2.

Modules: `parser` (the arguments and their checks), `names` (the names --loss, --optimizer
and --schedule accept), `rundir` (`RunDirectory`: checkpoint, resume, atomic outputs),
`objective` (`Objective`: how a loss or a head is built, compiled and fed), `devices`
(`Devices`: --devices and --grad-cache-chunk), `data` (data,
models and metrics for the commands), and one module per command: `train`, `evaluate`,
`embed`, `export`, `index`, `search`, each with `run(args)`.

Keras is imported only after the arguments are checked. `parser`, `names` and `rundir` do
not import it; `main` checks the arguments with them, sets `KERAS_BACKEND` from --backend,
and only then imports keras and the command's module (the one import inside a function,
in `main`, that keeps the parse path free of keras). `import deepmetric` itself imports
every module of the library, keras included, so that `keras.saving.load_model` finds every
deepmetric class after it. The console script therefore enters through the top-level module
`deepmetric_cli`, which imports this package with `DEEPMETRIC_LAZY_IMPORT=1`: with that
switch, `import deepmetric` imports its modules when they are first used, and `main` imports
all of them once the backend is set. Called in-process after `import deepmetric`, keras is
already loaded, and a --backend other than the loaded one is an error.
"""

from __future__ import annotations

import importlib
import os
import sys

from deepmetric.cli.parser import (
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    PROG,
    CliError,
    build_parser,
    check_paths,
    note,
    prepare_devices,
)
from deepmetric.cli.rundir import RunDirectory

__all__ = ["EXIT_DIVERGED", "EXIT_INTERRUPTED", "EXIT_USAGE", "CliError", "build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    """Runs the `deepmetric` command line; returns the exit status.

    >>> main(["train", "--epochs", "0"])
    2
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    run = None
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help
            return int(e.code or 0)
        if args.command == "train":
            run = args.run = RunDirectory.open(args.out, args.name, args.resume, vars(args))
        check_paths(args)
        prepare_devices(args)
        _start_backend(args.backend)
        command = importlib.import_module(f"deepmetric.cli.{args.command}")
        return command.run(args)
    except CliError as e:
        message = " ".join(str(e).split())
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        note("interrupted")
        return EXIT_INTERRUPTED
    finally:
        if run is not None:
            run.release()


def _start_backend(backend: str | None) -> None:
    """Imports keras on `backend` (else $KERAS_BACKEND, else jax), then the library's modules.

    CliError if keras is already loaded with another backend.
    """
    wanted = backend or os.environ.get("KERAS_BACKEND") or "jax"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = wanted
    import keras

    current = keras.backend.backend()
    if current != wanted:
        raise CliError(
            f"backend {wanted!r} requested but keras is already loaded with {current!r}; "
            f"set KERAS_BACKEND={wanted} before starting Python"
        )
    import deepmetric

    for module in deepmetric._MODULES:  # registers every class for keras.saving.load_model
        importlib.import_module(f"deepmetric.{module}")
