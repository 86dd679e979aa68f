"""The run directory of `deepmetric train`: resolution, checkpoint, resume, atomic outputs.

A run `<out>/<name>/` is built in three places: the checkpoint `<out>/<name>.partial/`
(updated after each epoch; `state.json`, written last, names the model file, so the
checkpoint is always a complete epoch), a hidden temporary folder `<out>/.<name>.tmp-*` with
the outputs (metrics.json with the verification figures, report.html: `run_report`), renamed
to `<out>/<name>/` when complete, after which the checkpoint goes.
Nothing here imports keras: a run directory is resolved and checked before a backend loads.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from deepmetric.cli import run_report
from deepmetric.cli.parser import TRAIN_DEFAULTS, CliError, check_train_config
from deepmetric.export import atomic_write, plot_embeddings, plot_history, write_projector

# The options --resume takes from the checkpoint; giving another value is an error.
FIXED_ON_RESUME = (
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
    "split",
)


class RunDirectory:
    """`<out>/<name>/` and its checkpoint `<out>/<name>.partial/`, with the run's settings.

    `config` is the resolved training configuration; `state` the checkpointed state (None
    until `start` for a new run): settings, epochs done, history, the metrics before training.
    """

    def __init__(self, out: Path, name: str, config: dict[str, Any], state: dict | None):
        self.out = out
        self.name = name
        self.path = out / name
        self.partial = out / f"{name}.partial"
        self.config = config
        self.state = state
        self._clock: tuple[float, float] | None = None

    @classmethod
    def open(cls, out: str, name: str | None, resume: bool, given: dict[str, Any]):
        """The run that `deepmetric train` writes or resumes; CliError for a bad one.

        `given` holds the training options given on the command line (None for the others).
        """
        root = Path(out)
        if root.exists() and not root.is_dir():
            raise CliError(f"--out {root} exists and is not a directory")
        state = None
        if resume:
            partial = _find_partial(root, name)
            name = partial.name[: -len(".partial")]
            try:
                state = json.loads((partial / "state.json").read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise CliError(f"{partial}/state.json: unreadable checkpoint ({e})") from None
            config = _resolve_config(given, state["config"])
            if config["epochs"] < state["epoch"]:
                raise CliError(
                    f"the checkpoint already has {state['epoch']} epochs; "
                    f"--epochs {config['epochs']} is fewer"
                )
        else:
            name = name or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            config = _resolve_config(given, None)
            if (root / f"{name}.partial").exists():
                raise CliError(
                    f"{root / name}.partial exists: continue it with --resume --name {name}, "
                    "or delete it"
                )
        if (root / name).exists():
            raise CliError(f"{root / name} exists; choose another --name")
        check_train_config(config)
        return cls(root, name, config, state)

    @property
    def resuming(self) -> bool:
        return self.state is not None

    @property
    def checkpoint_model(self) -> Path:
        """The model file of the last completed epoch (when resuming)."""
        assert self.state is not None
        return self.partial / self.state["model_file"]

    def start(self, **state: Any) -> None:
        """Begins the state of a new run: epoch 0, no history, `state` (loss, backend, ...)."""
        self.state = {
            "config": self.config,
            **state,
            "epoch": 0,
            "model_file": None,
            "history": {},
            "train_seconds": 0.0,
        }

    def begin_epochs(self) -> None:
        """Starts the training clock (training seconds add up over resumed sessions)."""
        assert self.state is not None
        self.state["config"] = self.config
        self._clock = (self.state.get("train_seconds", 0.0), time.perf_counter())

    def save_epoch(self, model, epoch: int, logs: dict | None, before_embeddings) -> None:
        """Checkpoints epoch `epoch` (0-based): the model, then `state.json`, which commits it.

        `before_embeddings` (the held-out embeddings of the untrained model) are saved once.
        """
        assert self.state is not None and self._clock is not None
        state, partial = self.state, self.partial
        state["train_seconds"] = self._clock[0] + time.perf_counter() - self._clock[1]
        for key, value in (logs or {}).items():
            state["history"].setdefault(key, []).append(float(value))
        partial.mkdir(parents=True, exist_ok=True)
        before_file = partial / "before_embeddings.npy"
        if before_embeddings is not None and not before_file.exists():
            atomic_write(before_file, lambda p: np.save(p, before_embeddings))
        model_file = f"epoch-{epoch + 1:04d}.keras"
        atomic_write(partial / model_file, model.save)
        state["epoch"] = epoch + 1
        state["model_file"] = model_file
        write_json(partial / "state.json", state)
        for old in partial.glob("epoch-*.keras"):
            if old.name != model_file:
                old.unlink()

    def commit(self, model, *, embeddings, after: dict, x_test, y_test, data, index=None) -> None:
        """Writes every output into a temporary folder beside the run, renames it, drops the
        checkpoint. `embeddings` and `after` are the trained model's on `x_test`; `index`
        (a `deepmetric.index.Index` of them, calibrated) goes to `index/`, its threshold and
        figures to the "calibration" of metrics.json."""
        assert self.state is not None
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.name}.tmp-", dir=self.out))
        try:
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o777 & ~mask)
            model.save(tmp / "model.keras")
            self._write_outputs(tmp, embeddings, after, x_test, y_test, data, index)
            if index is not None:
                index.save(tmp / "index")
            os.rename(tmp, self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(self.partial, ignore_errors=True)

    def _write_outputs(self, folder: Path, embeddings, after, x_test, y_test, data, index) -> None:
        assert self.state is not None
        state, config = self.state, self.config
        before = state["before"]
        metrics: dict[str, Any] = {"before": before, "after": after}
        if index is not None and index.calibration is not None:
            keys = ("threshold", "precision", "recall", "f1", "accuracy", "gallery", "queries")
            metrics["calibration"] = {k: index.calibration[k] for k in keys}
        before_embeddings = np.load(self.partial / "before_embeddings.npy")
        stages = {"before": before_embeddings, "after": embeddings}
        verification, pairs = run_report.verification(stages, y_test, config["seed"])
        if verification is not None:
            metrics["verification"] = verification
        write_json(folder / "metrics.json", metrics)
        write_json(
            folder / "config.json",
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
        write_history_csv(folder / "history.csv", state["history"])
        names = data.class_names
        write_projector(
            folder, embeddings, y_test, images=x_test if data.is_image else None, class_names=names
        )
        method = config["map_method"]
        for when, vectors, metrics in (
            ("before", before_embeddings, before),
            ("after", embeddings, after),
        ):
            plot_embeddings(
                folder / f"map_{when}.png",
                vectors,
                y_test,
                method,
                title=f"{method.upper()} {when} training (precision@1 "
                f"{metrics['precision_at_1']:.3f}, MAP@R {metrics['map_at_r']:.3f})",
                class_names=names,
                seed=config["seed"],
            )
        plot_history(folder / "training_curves.png", state["history"])
        run_report.write(
            folder,
            title=f"deepmetric run {self.name}: {state['loss']} on {config['data']}",
            metrics={"before": before, "after": after},
            pairs=pairs,
            embeddings=embeddings,
            x_test=x_test,
            y_test=y_test,
            data=data,
        )


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


def _resolve_config(given: dict[str, Any], saved: dict | None) -> dict[str, Any]:
    """The defaults, overridden by the saved settings, overridden by the options given."""
    given = {k: v for k, v in given.items() if k in TRAIN_DEFAULTS and v is not None}
    if saved:
        # A run saved before an option existed ran with its default.
        changed = [
            k
            for k in FIXED_ON_RESUME
            if k in given and given[k] != saved.get(k, TRAIN_DEFAULTS.get(k))
        ]
        if changed:
            raise CliError(
                "--resume continues the saved run; these options differ from it: "
                + ", ".join("--" + k.replace("_", "-") for k in changed)
            )
    return {**TRAIN_DEFAULTS, **(saved or {}), **given}


def write_json(path: Path, obj) -> None:
    """`obj` as indented JSON, written atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda p: _write_text(p, text))


def write_history_csv(path: Path, history: dict[str, list[float]]) -> None:
    """One row per epoch: `epoch` and each logged value, written atomically."""
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


def _write_text(path: str, text: str) -> None:
    Path(path).write_text(text, encoding="utf-8")
