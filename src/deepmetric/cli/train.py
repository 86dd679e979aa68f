"""`deepmetric train`: train an embedding model, evaluate it before and after, write the run.

The steps: the objective (loss or head) of --loss, the data and its --split (held-out samples
or held-out classes), P x K batches, the model (new, or the checkpoint of an interrupted run;
on the devices of --devices and wrapped for --grad-cache-chunk by
`deepmetric.cli.devices.Devices`), `fit` with a checkpoint
after every epoch, the metrics after training, the index of the held-out split with its
calibrated threshold (`deepmetric.cli.index.held_out_index`), and the atomic commit of the
run directory (with the verification figures and report.html, `deepmetric.cli.run_report`).
See docs/cli.md.
"""

from __future__ import annotations

import contextlib
import signal
import threading

import keras
import numpy as np

from deepmetric import _backend, optimizers, schedules
from deepmetric.callbacks import RetrievalEvaluation
from deepmetric.cli import data
from deepmetric.cli.devices import Devices
from deepmetric.cli.index import held_out_index
from deepmetric.cli.objective import Objective
from deepmetric.cli.parser import EXIT_INTERRUPTED, PROG, CliError, DivergedError, note
from deepmetric.cli.rundir import RunDirectory
from deepmetric.models import build_embedding_model
from deepmetric.samplers import PKSampler


def run(args) -> int:
    """Trains the run `args.run` (a RunDirectory checked before keras was imported)."""
    devices = Devices(args.run.config)  # N devices exist, before the data loads
    with _backend.torch_threads(args.threads), _backend.deterministic(), devices.scope():
        return train(args.run, verbose=not args.quiet, devices=devices)


def train(run: RunDirectory, *, verbose: bool = True, devices: Devices | None = None) -> int:
    config = run.config
    devices = devices or Devices(config)
    objective = Objective(config["loss"], config["margin"])
    if objective.is_head and not run.resuming:
        objective.head(2)  # a bad --margin fails before the data load
    dataset, paths = data.load_data_and_paths(config["data"])
    split_seed = config["seed"] if config.get("split_seed") is None else config["split_seed"]
    train_rows, test_rows = data.split_indices(
        dataset, config["test_size"], split_seed, config["split"]
    )
    x_train, x_test = dataset.x[train_rows], dataset.x[test_rows]
    y_train, y_test = dataset.y[train_rows], dataset.y[test_rows]
    classes = np.unique(y_train)  # a head has one proxy per training class
    _backend.seed_everything(config["seed"])
    sampler = _sampler(config, x_train, y_train, len(classes))

    if run.resuming:
        trainer, model = _load_checkpoint(run, sampler, verbose)
        before_embeddings = None
    else:
        model = build_embedding_model(
            x_train.shape[1:],
            config["embedding_dim"],
            pixel_scale=dataset.pixel_scale,
            standardize=None if dataset.is_image else _feature_stats(x_train),
        )
        trainer = devices.trainer(objective.trainer(model, len(classes)))
        objective.compile(trainer, _optimizer(config, len(sampler) * config["epochs"]))
        before_embeddings = data.embed(model, x_test)
        run.start(
            loss=objective.name,
            backend=keras.backend.backend(),
            before=data.metrics(before_embeddings, y_test, seed=config["seed"]),
            embedder=model.name if trainer is not model else None,
        )
    assert run.state is not None
    if verbose:
        print(
            f"training on {len(x_train)} examples ({len(np.unique(dataset.y))} classes), held "
            f"out {len(x_test)}; loss {objective.name}, {config['epochs']} epochs x "
            f"{len(sampler)} batches of {config['classes_per_batch']} x "
            f"{config['samples_per_class']}, backend {keras.backend.backend()}"
        )
    embedder = model if objective.is_head else None
    guard = InterruptGuard()
    try:
        with (
            guard.installed(),
            devices.fit(trainer, config["classes_per_batch"] * config["samples_per_class"]),
        ):
            trainer.fit(
                objective.batches(sampler, classes),
                epochs=config["epochs"],
                initial_epoch=run.state["epoch"],
                shuffle=False,  # the sampler orders the batches from (seed, epoch)
                callbacks=devices.callbacks(
                    [guard, *callbacks(run, x_test, y_test, before_embeddings, embedder)]
                ),
                verbose=1 if verbose else 0,
            )
            guard.check()  # a Ctrl-C swallowed in the last batches
    except KeyboardInterrupt:
        _note_interrupted(run)
        return EXIT_INTERRUPTED

    embeddings = data.embed(model, x_test)
    after = data.metrics(embeddings, y_test, seed=config["seed"])
    index = held_out_index(embeddings, dataset, test_rows, paths, config["seed"])
    if verbose:
        print(f"\nretrieval on the {len(x_test)} held-out examples")
        print(data.format_table({"before": run.state["before"], "after": after}))
        print(f"training took {run.state['train_seconds']:.1f} s")
        c = index.calibration or {}
        print(
            f"match threshold {index.threshold:.4f} (on held-out halves: precision "
            f"{c['precision']:.4f}, recall {c['recall']:.4f}, F1 {c['f1']:.4f}, "
            f"accuracy {c['accuracy']:.4f})"
        )
    run.commit(
        model,
        embeddings=embeddings,
        after=after,
        x_test=x_test,
        y_test=y_test,
        data=dataset,
        index=index,
    )
    if verbose:
        print(f"wrote {run.path}")
    return 0


def _sampler(config: dict, x_train, y_train, train_classes: int) -> PKSampler:
    """The P x K batches of the run (P filled in `config`); CliError for a bad P or warm-up."""
    p = config["classes_per_batch"] or min(10, train_classes)
    if p > train_classes:
        raise CliError(
            f"--classes-per-batch {p} is more than the {train_classes} classes of the "
            "training split"
        )
    if p < 2:
        raise CliError("--classes-per-batch must be at least 2 (negatives come from other classes)")
    config["classes_per_batch"] = p
    sampler = PKSampler(
        x_train,
        y_train,
        p,
        config["samples_per_class"],
        batches_per_epoch=config["steps_per_epoch"],
        seed=config["seed"],
    )
    total_steps = len(sampler) * config["epochs"]
    if config["warmup_steps"] >= total_steps and config["schedule"] != "constant":
        raise CliError(
            f"--warmup-steps {config['warmup_steps']} must be below the {total_steps} steps "
            "of the run"
        )
    return sampler


def _optimizer(config: dict, total_steps: int) -> keras.optimizers.Optimizer:
    try:
        rate = schedules.build(
            config["schedule"], config["learning_rate"], total_steps, config["warmup_steps"]
        )
        return optimizers.build(config["optimizer"], rate)
    except ValueError as e:
        raise CliError(str(e)) from None


def _load_checkpoint(run: RunDirectory, sampler: PKSampler, verbose: bool):
    """(trainer, embedding model) of the last completed epoch; the sampler moves past it."""
    assert run.state is not None
    try:
        trainer = keras.saving.load_model(run.checkpoint_model, safe_mode=True)
        embedder = run.state.get("embedder")
        model = trainer.get_layer(embedder) if embedder else trainer
    except Exception as e:
        raise CliError(
            f"{run.partial}: cannot load the checkpoint ({type(e).__name__}: {e})"
        ) from None
    for _ in range(run.state["epoch"]):
        sampler.on_epoch_end()
    if verbose:
        print(f"resuming {run.partial} after epoch {run.state['epoch']}")
    return trainer, model


def _feature_stats(x):
    flat = x.reshape(len(x), -1).astype("float64")
    return flat.mean(axis=0).tolist(), np.maximum(flat.var(axis=0), 1e-12).tolist()


class InterruptGuard(keras.callbacks.Callback):
    """Ctrl-C that reaches the run, even where native code swallows the KeyboardInterrupt.

    Python raises KeyboardInterrupt wherever the main thread is when SIGINT arrives; on JAX
    that can be a Python function called from native code that drops the exception, and the
    run went on to its end (exit 0). While installed, SIGINT also sets a flag, which this
    callback turns into a KeyboardInterrupt at the next batch or epoch boundary, and
    `check()` after `fit`. Not installed outside the main thread, or where SIGINT is ignored.
    """

    def __init__(self):
        super().__init__()
        self.interrupted = False

    @contextlib.contextmanager
    def installed(self):
        previous = signal.getsignal(signal.SIGINT)
        if threading.current_thread() is not threading.main_thread() or previous in (
            signal.SIG_IGN,
            None,
        ):
            yield self
            return

        def handler(signum, frame):
            self.interrupted = True
            if callable(previous):
                previous(signum, frame)
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)

    def check(self, *args, **kwargs) -> None:
        if self.interrupted:
            raise KeyboardInterrupt

    on_train_batch_begin = on_train_batch_end = on_epoch_end = check


def _note_interrupted(run: RunDirectory) -> None:
    assert run.state is not None
    done = run.state["epoch"]
    if not done:
        note("interrupted; saved 0 completed epochs in nothing (no epoch completed)")
        return
    note(
        f"interrupted; saved {done} completed epochs in {run.partial}; continue with: "
        f"{PROG} train --resume --name {run.name} --out {run.out}"
    )


class EpochSeeds(keras.callbacks.Callback):
    """Seeds each epoch's random draws (dropout) from the run's seed and the epoch number.

    `_backend.seed_epoch` at the start of every epoch: an epoch resumed from a checkpoint
    draws the same dropout masks as in an uninterrupted run.
    """

    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed

    def on_epoch_begin(self, epoch, logs=None):
        _backend.seed_epoch(self.model, self.seed, epoch)


class LearningRateLogger(keras.callbacks.Callback):
    """Logs the optimizer's learning rate of each epoch as `learning_rate`."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            rate = self.model.optimizer.learning_rate
            logs["learning_rate"] = float(np.asarray(keras.ops.convert_to_numpy(rate)))


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops `fit` at the first batch whose loss is NaN or inf, with a DivergedError (exit 3)
    naming the epoch and the step. It is raised at the batch's end, before the epoch's end,
    so the checkpoint keeps the last completed epoch (Keras' TerminateOnNaN would let the
    epoch end, and the diverged weights would be checkpointed)."""

    def __init__(self, run: RunDirectory):
        super().__init__()
        self.run = run
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            raise DivergedError(
                f"the training loss became {float(loss)} at epoch {self.epoch + 1}, step "
                f"{batch + 1}; training stopped; {self.run.kept_note()}"
            )


class HeldOutEvaluation(RetrievalEvaluation):
    """`RetrievalEvaluation` of the held-out split that stops with a DivergedError (exit 3)
    when the model's embeddings hold NaN or inf: the weights diverged in the epoch's last
    step, after its (finite) loss. It runs before the checkpoint, which keeps the last
    good epoch."""

    def __init__(self, run: RunDirectory, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.run = run
        self.epoch = 0

    def on_epoch_end(self, epoch, logs=None):
        self.epoch = epoch
        super().on_epoch_end(epoch, logs)

    def _embed(self, x):
        embeddings = np.asarray(super()._embed(x))
        bad = ~np.isfinite(embeddings.reshape(len(embeddings), -1)).all(axis=1)
        if bad.any():
            raise DivergedError(
                f"after epoch {self.epoch + 1} the model embeds {int(bad.sum())} of the "
                f"{len(bad)} held-out examples as NaN or inf (its weights diverged); training "
                f"stopped; {self.run.kept_note()}"
            )
        return embeddings


class Checkpoint(keras.callbacks.Callback):
    """Checkpoints the model being fitted into the run after each epoch.

    With a head that is the trainer (proxies and optimizer state included).
    """

    def __init__(self, run: RunDirectory, before_embeddings=None):
        super().__init__()
        self.run = run
        self.before_embeddings = before_embeddings

    def on_train_begin(self, logs=None):
        self.run.begin_epochs(self.model)

    def on_epoch_end(self, epoch, logs=None):
        self.run.save_epoch(self.model, epoch, logs, self.before_embeddings)


def callbacks(run: RunDirectory, x_test, y_test, before_embeddings, embedder=None) -> list:
    """Per-epoch seeding, learning-rate logging, per-epoch retrieval metrics, the checkpoint.

    `embedder` is the model to evaluate when the fitted model is a head's trainer.
    """
    return [
        EpochSeeds(run.config["seed"]),
        StopOnNonFiniteLoss(run),
        LearningRateLogger(),
        HeldOutEvaluation(
            run,
            x_test,
            y_test,
            prefix="val_",
            recall_at=(1,),
            clustering=False,
            embedding_model=embedder,
        ),
        Checkpoint(run, before_embeddings),
    ]
