"""The run directory of `deepmetric train`: resolution, checkpoint, resume, atomic outputs.

A run `<out>/<name>/` is built in three places: the checkpoint `<out>/<name>.partial/`
(updated after each epoch; `state.json`, written last, names the model file, so the
checkpoint is always a complete epoch), a hidden temporary folder `<out>/.<name>.tmp-*` with
the outputs (metrics.json with the verification figures, report.html: `run_report`), renamed
to `<out>/<name>/` when complete, after which the checkpoint goes.
The lock file `<out>/<name>.lock` (`RunLock`) keeps a second process off the run while the
command runs. A write that fails (no space, no permission) is a CliError that names the
last complete checkpoint, which it leaves as it was.
Nothing here imports keras: a run directory is resolved and checked before a backend loads.
"""

from __future__ import annotations

import csv
import datetime
import errno
import io
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from deepmetric.cli import run_report
from deepmetric.cli.parser import (
    TRAIN_DEFAULTS,
    CliError,
    check_data_path,
    check_output_location,
    check_train_config,
    min_free_bytes,
    note,
)
from deepmetric.export import atomic_write, plot_embeddings, plot_history, write_projector

try:
    import fcntl
except ImportError:  # Windows: no flock; the PID in the lock file decides
    fcntl = None  # type: ignore[assignment]

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
    "split_seed",
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
        self.lock: RunLock | None = None
        self._made_out = False

    @classmethod
    def open(cls, out: str, name: str | None, resume: bool, given: dict[str, Any]):
        """The run that `deepmetric train` writes or resumes, locked; CliError for a bad one.

        `given` holds the training options given on the command line (None for the others).
        The options and --data are checked before anything is written; then --out is
        checked for writing and free space (`parser.check_output_location`), created, and
        the run locked. Call `release` when the command ends.
        """
        root = Path(out)
        if root.exists() and not root.is_dir():
            raise CliError(f"--out {root} exists and is not a directory")
        if resume:
            if not name:  # the newest checkpoint; it is looked at again under the lock
                name = _find_partial(root, name).name[: -len(".partial")]
            run = cls._locked(root, name, {})
            try:
                _find_partial(root, name)
                run._read_checkpoint(given)
            except BaseException:
                run.release()
                raise
        else:
            name = name or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            config = _resolve_config(given, None)
            check_train_config(config)
            check_data_path(config["data"])
            run = cls._locked(root, name, config)
        try:
            if not resume and run.partial.exists():
                raise CliError(
                    f"{root / name}.partial exists: continue it with --resume --name {name}, "
                    "or delete it"
                )
            if run.path.exists():
                raise CliError(f"{root / name} exists; choose another --name")
        except BaseException:
            run.release()
            raise
        return run

    @classmethod
    def _locked(cls, root: Path, name: str, config: dict[str, Any]) -> RunDirectory:
        check_output_location(root, "--out")
        run = cls(root, name, config, None)
        try:
            run._made_out = not root.exists()
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CliError(f"--out {root}: cannot create it ({e.strerror or e})") from None
        try:
            run.lock = RunLock.acquire(root / f"{name}.lock", run.path)
        except BaseException:
            run.release()
            raise
        return run

    def _read_checkpoint(self, given: dict[str, Any]) -> None:
        try:
            state = json.loads((self.partial / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CliError(f"{self.partial}/state.json: unreadable checkpoint ({e})") from None
        config = _resolve_config(given, state["config"])
        if config["epochs"] < state["epoch"]:
            raise CliError(
                f"the checkpoint already has {state['epoch']} epochs; "
                f"--epochs {config['epochs']} is fewer"
            )
        check_train_config(config)
        check_data_path(config["data"])
        self.config, self.state = config, state

    def release(self) -> None:
        """Releases the lock; removes --out if this run created it and left it empty."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self._made_out:
            try:
                self.out.rmdir()  # only when empty
            except OSError:
                pass
            self._made_out = False

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

    def begin_epochs(self, model=None) -> None:
        """Starts the training clock (training seconds add up over resumed sessions).

        With `model`, first checks that --out has room for its checkpoints and outputs:
        `min_free_bytes()` plus 8 times the size of its float32 parameters (weights and two
        optimizer slots, a new checkpoint beside the previous one, the saved model).
        """
        assert self.state is not None
        if model is not None:
            need = min_free_bytes() + 8 * 4 * int(model.count_params())
            check_output_location(self.out, "--out", need=need)
        self.state["config"] = self.config
        self._clock = (self.state.get("train_seconds", 0.0), time.perf_counter())

    def kept_note(self) -> str:
        assert self.state is not None
        done = self.state["epoch"]
        if not done:
            return "no epoch had completed, so there is no checkpoint"
        return (
            f"the checkpoint of epoch {done} in {self.partial} is intact: continue with "
            f"deepmetric train --resume --name {self.name} --out {self.out}"
        )

    def save_epoch(self, model, epoch: int, logs: dict | None, before_embeddings) -> None:
        """Checkpoints epoch `epoch` (0-based): the model, then `state.json`, which commits it.

        `before_embeddings` (the held-out embeddings of the untrained model) are saved once.
        A failed write (OSError) is a CliError; the previous checkpoint stays as it was.
        """
        assert self.state is not None and self._clock is not None
        partial = self.partial
        history = {k: list(v) for k, v in self.state["history"].items()}
        for key, value in (logs or {}).items():
            history.setdefault(key, []).append(float(value))
        model_file = f"epoch-{epoch + 1:04d}.keras"
        state = {
            **self.state,
            "history": history,
            "train_seconds": self._clock[0] + time.perf_counter() - self._clock[1],
            "epoch": epoch + 1,
            "model_file": model_file,
        }
        try:
            partial.mkdir(parents=True, exist_ok=True)
            before_file = partial / "before_embeddings.npy"
            if before_embeddings is not None and not before_file.exists():
                atomic_write(before_file, lambda p: np.save(p, before_embeddings))
            atomic_write(partial / model_file, model.save)
            write_json(partial / "state.json", state)
        except OSError as e:
            raise CliError(
                f"cannot write the checkpoint of epoch {epoch + 1} in {partial} "
                f"({e.strerror or e}); {self.kept_note()}"
            ) from None
        self.state = state
        for old in partial.glob("epoch-*.keras"):
            if old.name != model_file:
                old.unlink(missing_ok=True)

    def commit(self, model, *, embeddings, after: dict, x_test, y_test, data, index=None) -> None:
        """Writes every output into a temporary folder beside the run, renames it, drops the
        checkpoint. `embeddings` and `after` are the trained model's on `x_test`; `index`
        (a `deepmetric.index.Index` of them, calibrated) goes to `index/`, its threshold and
        figures to the "calibration" of metrics.json. A failed write (OSError) is a CliError;
        the checkpoint stays, so `--resume` writes the outputs again."""
        assert self.state is not None
        tmp = None
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{self.name}.tmp-", dir=self.out))
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o777 & ~mask)
            model.save(tmp / "model.keras")
            self._write_outputs(tmp, embeddings, after, x_test, y_test, data, index)
            if index is not None:
                index.save(tmp / "index")
            os.rename(tmp, self.path)
        except OSError as e:
            raise CliError(
                f"cannot write the run {self.path} ({e.strerror or e}); {self.kept_note()}"
            ) from None
        finally:
            if tmp is not None and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
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


class RunLock:
    """The lock file `<out>/<name>.lock` of a run: one process at a time trains a run.

    The file holds the PID, host and start time of its process as JSON, and that process
    holds an exclusive `fcntl.flock` on it while the command runs. It is created under a
    temporary name, locked and filled, then linked to its name (`os.link` fails if the
    name exists), so no process sees it empty or unlocked. A second process finds it locked
    and stops with a CliError naming the holder. A lock file that nobody holds locked was
    left by a process that died (the kernel drops a dead process's flock, kill -9
    included): it is taken over with a note. Where the file system refuses flock, the PID
    decides: a lock of this host whose PID is not running is taken over.
    """

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, path: Path, run: Path) -> RunLock:
        for _ in range(5):
            fd = cls._create(path)
            if fd is not None:
                return cls(path, fd)
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:  # released meanwhile: try to create it again
                continue
            except OSError as e:
                raise CliError(f"cannot open the lock {path} ({e.strerror or e})") from None
            holder = _read_holder(fd)
            locked = _flock(fd)
            if locked is False or (locked is None and _alive(holder)):
                os.close(fd)
                raise CliError(
                    f"the run {run} is in use by process {holder.get('pid', '?')} on "
                    f"{holder.get('host', '?')} (since {holder.get('started', '?')}; lock file "
                    f"{path}); wait for it to end or choose another --name"
                )
            if not _same_file(fd, path):  # replaced meanwhile
                os.close(fd)
                continue
            note(
                f"taking over the lock {path} left by process {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, which no longer runs"
            )
            _write_holder(fd)
            return cls(path, fd)
        raise CliError(f"cannot take the lock {path}: it keeps changing; is another run starting?")

    @staticmethod
    def _create(path: Path) -> int | None:
        """A new lock file at `path`, locked and filled; None if `path` exists."""
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        except OSError as e:
            raise CliError(f"cannot create the lock {path} ({e.strerror or e})") from None
        try:
            _flock(fd)
            _write_holder(fd)
            os.chmod(tmp, 0o644)
            try:
                os.link(tmp, path)
            except FileExistsError:
                os.close(fd)
                return None
            except OSError:  # no hard links here: create the name itself, then fill it
                os.close(fd)
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return None
                _flock(fd)
                _write_holder(fd)
            return fd
        except OSError as e:
            os.close(fd)
            raise CliError(f"cannot create the lock {path} ({e.strerror or e})") from None
        finally:
            os.unlink(tmp)

    def release(self) -> None:
        """Removes the lock file, then drops the lock."""
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                self.path.unlink()
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


def _flock(fd: int) -> bool | None:
    """True if this process now holds the exclusive lock of `fd`, False if another process
    does, None if the file system does not support flock."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return None


def _write_holder(fd: int) -> None:
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    os.fsync(fd)


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the holder may still run: True unless it is of this host and its PID is gone."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
