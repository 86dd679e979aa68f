"""P x K batches for metric learning: P classes, K samples of each, in every batch.

Online mining (semi-hard, hard, batch-all triplets; multi-similarity...) can only
mine what the batch holds: with random batches and many classes most batches
have no positive pair. `PKSampler` builds every batch from P distinct classes
with K samples each ("Defense of the Triplet Loss", Hermans et al. 2017), as a
`keras.utils.PyDataset` that `model.fit` consumes on every backend.
"""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np

from deepmetric.datasets import class_labels

__all__ = ["PKSampler"]


def _positive_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an integer. Received: {name}={value!r}")
    if value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}. Received: {name}={value}")
    return int(value)


def _labels(y) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (labels given to the model, class of each sample, classes)."""
    array = class_labels(y, "y")
    classes, codes = np.unique(array, return_inverse=True)
    codes = codes.reshape(-1)
    if array.dtype.kind in "iu":
        return array, codes, classes
    return codes.astype(np.int64), codes, classes


class PKSampler(keras.utils.PyDataset):
    """Batches of P classes x K samples each, reshuffled every epoch.

    Each batch holds `classes_per_batch` (P) distinct classes and
    `samples_per_class` (K) samples of each: P * K samples, grouped by class,
    as `(x_batch, y_batch)` with integer labels. Pass it to
    `model.fit(sampler, epochs=...)` with a loss that mines the batch, such as
    `deepmetric.losses.TripletSemiHardLoss` (Hermans et al. 2017, "In Defense
    of the Triplet Loss for Person Re-Identification").

    Epochs. An epoch has `batches_per_epoch` batches, by default
    ceil(N / (P * K)), so that it shows about N samples. Within an epoch each
    class's samples are drawn without replacement, K at a time from a
    per-class permutation (taken again when used up), and the classes with
    the most unseen samples go first (ties broken at random), so that every
    sample appears once per epoch whenever the class sizes allow it (e.g.
    sizes that are multiples of K, and number of classes a multiple of P).
    Every epoch draws new permutations; the batches of epoch e depend only on
    `seed` and e, so a run is reproducible.

    Small classes. A class with fewer than K samples gives all of its samples
    and fills up the K slots by drawing among them with replacement. A class
    with a single sample cannot form a positive pair; the sampler warns and
    names them (it still uses them, as negatives).

    Several devices. The batch of P * K samples is the *global* batch: one
    batch of the whole step, whatever the number of devices.
    - JAX (`keras.distribution.DataParallel`) and TensorFlow (a
      `tf.distribute` strategy such as `MirroredStrategy`): Keras feeds the
      global batch and shards it, replica r taking rows
      [r * B / W, (r + 1) * B / W) of it (contiguous and in order, checked by
      the tests). Keep the defaults `num_replicas=1, rank=0`.
    - torch DDP (one process per device): each process builds the sampler with
      the same `seed` and `num_replicas=W, rank=r` and gets exactly that share:
      rows [r * B / W, (r + 1) * B / W) of the same global batch. The shares of
      one step are disjoint and together are the global batch, so the class
      balance (P classes x K samples) holds over the global batch.
    The batch is grouped by class, so when W divides P every share holds P / W
    whole classes of K samples (local mining then still has positive pairs).
    P * K must be a multiple of W.

    Labels. Integer labels reach the model as given. String labels are mapped
    to integers 0..C-1 in sorted order; `classes` holds the mapping
    (`classes[i]` is the name of label i). For integer labels, `classes` holds
    the sorted distinct labels.

    Args:
        x: array of samples (anything numpy indexes with an integer array),
            first dimension N.
        y: class labels, shape (N,) or (N, 1), integers or strings.
        classes_per_batch: P, at least 2 and at most the number of classes.
        samples_per_class: K, at least 1.
        batches_per_epoch: batches per epoch; default ceil(N / (P * K)).
        seed: seed of the shuffling; the same on every replica.
        num_replicas: W, the number of processes that share each global batch
            (torch DDP: the world size); 1 when Keras shards the batch itself.
        rank: this process's rank r in [0, W): its share of each batch.
        **kwargs: passed to `keras.utils.PyDataset` (`workers`,
            `use_multiprocessing`, `max_queue_size`).

    >>> import numpy as np
    >>> x = np.arange(12, dtype="float32").reshape(12, 1)
    >>> y = np.array(["a", "b", "c"] * 4)
    >>> sampler = PKSampler(x, y, classes_per_batch=2, samples_per_class=2, seed=1)
    >>> len(sampler), sampler.classes.tolist()
    (3, ['a', 'b', 'c'])
    >>> xb, yb = sampler[0]
    >>> xb.shape, sorted(np.bincount(yb, minlength=3).tolist())
    ((4, 1), [0, 2, 2])
    """

    def __init__(
        self,
        x,
        y,
        classes_per_batch,
        samples_per_class,
        *,
        batches_per_epoch=None,
        seed=0,
        num_replicas=1,
        rank=0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not hasattr(x, "shape") or not hasattr(x, "__getitem__"):
            x = np.asarray(x)
        self._y, codes, self.classes = _labels(y)
        if len(x) != len(self._y):
            raise ValueError(
                "`x` and `y` must have the same number of samples. "
                f"Received: len(x)={len(x)}, len(y)={len(self._y)}"
            )
        if len(self._y) == 0:
            raise ValueError("`x` and `y` must not be empty.")
        self.x = x
        self.classes_per_batch = _positive_int(classes_per_batch, "classes_per_batch", 2)
        self.samples_per_class = _positive_int(samples_per_class, "samples_per_class", 1)
        num_classes = len(self.classes)
        if self.classes_per_batch > num_classes:
            raise ValueError(
                f"`classes_per_batch` must be at most the number of classes in `y` "
                f"({num_classes}). Received: classes_per_batch={self.classes_per_batch}"
            )
        batch = self.classes_per_batch * self.samples_per_class
        if batches_per_epoch is None:
            batches_per_epoch = math.ceil(len(self._y) / batch)
        self.batches_per_epoch = _positive_int(batches_per_epoch, "batches_per_epoch", 1)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"`seed` must be an integer. Received: seed={seed!r}")
        self.seed = int(seed)
        self.num_replicas = _positive_int(num_replicas, "num_replicas", 1)
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
            raise TypeError(f"`rank` must be an integer. Received: rank={rank!r}")
        if not 0 <= rank < self.num_replicas:
            raise ValueError(
                f"`rank` must be in [0, num_replicas={self.num_replicas}). Received: rank={rank}"
            )
        self.rank = int(rank)
        if batch % self.num_replicas:
            raise ValueError(
                "The global batch `classes_per_batch * samples_per_class` "
                f"({self.classes_per_batch} * {self.samples_per_class} = {batch}) must be a "
                f"multiple of `num_replicas`. Received: num_replicas={self.num_replicas}"
            )
        order = np.argsort(codes, kind="stable")
        sizes = np.bincount(codes, minlength=num_classes)
        self._members = np.split(order, np.cumsum(sizes)[:-1])
        single = self.classes[sizes == 1]
        if len(single):
            shown = ", ".join(repr(c.item()) for c in single[:10])
            more = f" and {len(single) - 10} more" if len(single) > 10 else ""
            warnings.warn(
                f"{len(single)} classes have a single sample and cannot form a positive pair "
                f"(they are still used as negatives): {shown}{more}",
                stacklevel=2,
            )
        self.epoch = 0
        self._batches = self._epoch_batches(0)

    def __len__(self):
        return self.batches_per_epoch

    @property
    def num_batches(self):
        return self.batches_per_epoch

    def __getitem__(self, index):
        if index < 0:
            index += self.batches_per_epoch
        if not 0 <= index < self.batches_per_epoch:
            raise IndexError(f"batch index {index} out of range [0, {self.batches_per_epoch})")
        indices = self.batch_indices(index)
        return self.x[indices], self._y[indices]

    @property
    def global_batch_size(self) -> int:
        """P * K: the samples of one step over all replicas."""
        return self.classes_per_batch * self.samples_per_class

    @property
    def batch_size(self) -> int:
        """The samples this replica gets per step: P * K / num_replicas."""
        return self.global_batch_size // self.num_replicas

    def batch_indices(self, index):
        """The sample indices of this replica's share of batch `index` of the current epoch."""
        share = self.batch_size
        return self._batches[index, self.rank * share : (self.rank + 1) * share].copy()

    def global_batch_indices(self, index):
        """The sample indices of the whole global batch `index` (all replicas' shares)."""
        return self._batches[index].copy()

    def on_epoch_end(self):
        """Moves to the next epoch: new permutations, new batches."""
        self.epoch += 1
        self._batches = self._epoch_batches(self.epoch)

    def _epoch_batches(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        p, k = self.classes_per_batch, self.samples_per_class
        sizes = np.array([len(m) for m in self._members])
        chunks = np.maximum(np.ceil(sizes / k).astype(int), 1)
        remaining = chunks.copy()
        perms: list[np.ndarray | None] = [None] * len(sizes)
        cursor = np.zeros(len(sizes), dtype=int)
        batches = np.empty((self.batches_per_epoch, p * k), dtype=np.int64)
        for b in range(self.batches_per_epoch):
            # The P classes with the most unseen chunks, ties at random.
            keys = remaining + rng.random(len(remaining))
            chosen = np.argpartition(-keys, p - 1)[:p]
            chosen = chosen[np.argsort(-keys[chosen])]
            for slot, c in enumerate(chosen):
                if remaining[c] == 0:
                    remaining[c] = chunks[c]
                remaining[c] -= 1
                members = self._members[c]
                if len(members) < k:
                    # Every sample once, then K - n draws with replacement.
                    picks = np.concatenate(
                        [rng.permutation(members), rng.choice(members, k - len(members))]
                    )
                else:
                    perm = perms[c]
                    if perm is None:
                        perm = perms[c] = rng.permutation(members)
                    start = cursor[c]
                    picks = perm[start : start + k]
                    if len(picks) < k:  # wrap around into a fresh permutation
                        fresh = rng.permutation(members)
                        fresh = fresh[~np.isin(fresh, picks)]
                        perms[c] = fresh_perm = np.concatenate([picks, fresh])
                        cursor[c] = 0
                        start = 0
                        picks = fresh_perm[:k]
                    cursor[c] = start + k
                batches[b, slot * k : (slot + 1) * k] = picks
        return batches


class ClassIndexBatches(keras.utils.PyDataset):
    """The batches of a sampler with the labels as indices into `classes`, for a head.

    A head has one proxy per class: the batch `(x, y)` of `sampler` becomes
    `((x, i), i)` (or `((x, i),)` without `with_targets`, for a head that adds its own
    loss), `i` the index of each label in the sorted array `classes`, as int32.
    The epochs follow the sampler's (`on_epoch_end` is passed on).
    """

    def __init__(self, sampler, classes, *, with_targets: bool = True):
        super().__init__()
        self.sampler = sampler
        self.classes = np.asarray(classes)
        self.with_targets = with_targets

    def __len__(self):
        return len(self.sampler)

    def __getitem__(self, index):
        x, y = self.sampler[index]
        i = np.searchsorted(self.classes, y).astype("int32")
        return ((x, i), i) if self.with_targets else ((x, i),)

    def on_epoch_end(self):
        self.sampler.on_epoch_end()
