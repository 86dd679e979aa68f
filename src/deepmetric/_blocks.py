"""Per-anchor terms of a batch loss computed over blocks of anchor rows.

Every batch loss of deepmetric is a sum over anchors of terms that need only the anchor's row
of the (B, R) distance or similarity matrix (and the labels), then a normalisation by counts.
`map_rows` computes the per-anchor terms block by block: a block of b anchors builds only its
(b, R) slice of the matrix, and under `keras.remat` (`jax.checkpoint`, `tf.recompute_grad`,
`torch.utils.checkpoint`) the block's temporaries are freed after the forward pass and
recomputed in the backward pass. The peak memory of a loss is then that of one block's
temporaries plus a few (B,) vectors, instead of several (B, R) matrices.

The price is one more forward pass of each block in the backward pass, so blocks are used only
where the matrix is large: when B * R > `BLOCK_ENTRIES` (2^24, that is B > 4096 when the batch
is compared with itself). Smaller batches run as one block, exactly as before. A batch size
that is unknown while tracing (a `tf.function` traced with a None batch dimension) also runs
as one block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
from keras import ops

from deepmetric import _backend, mining

# Entries of the (b, R) block of one step: 2^24 floats are 64 MB.
BLOCK_ENTRIES = 1 << 24
# Entries of a block of the passes of a miner that needs the whole batch (`mining_rows`):
# they have no gradient, so smaller blocks cost no recomputation, and they hold a few more
# arrays per pair (keys, bytes, segment ids).
MINING_ENTRIES = 1 << 22
_UNLIMITED = 1 << 62


def block_size(num_rows, num_references, max_entries=None):
    """Anchor rows per block, or None for a single block (small or unknown sizes)."""
    max_entries = BLOCK_ENTRIES if max_entries is None else max_entries
    if num_rows is None or num_references is None or num_rows * num_references <= max_entries:
        return None
    return max(1, max_entries // num_references)


def map_rows(
    fn: Callable,
    rows: Sequence,
    shared: Sequence = (),
    *,
    max_entries: int | None = None,
    num_references: int | None = None,
):
    """`fn(index, *rows, *shared)` over blocks of rows, its per-row outputs concatenated.

    Args:
      fn: returns a tuple of tensors whose first axis is the block's rows. `index` is the
        int32 (b,) position of the block's rows in the batch (to exclude each example's pair
        with itself); `rows` arrive sliced to the block, `shared` whole.
      rows: tensors whose first axis is the B anchors.
      shared: tensors used whole by every block (the reference set: R rows).
      max_entries: the largest b * R of one block (default `BLOCK_ENTRIES`).
      num_references: R, where it is not the length of `shared[0]` (default: that length,
        or B without `shared`).

    Returns:
      The tuple of `fn`'s outputs for all B rows.
    """
    num_rows = rows[0].shape[0]
    if num_references is None:
        num_references = shared[0].shape[0] if shared else num_rows
    block = block_size(num_rows, num_references, max_entries)
    if block is None:
        return tuple(fn(ops.arange(ops.shape(rows[0])[0], dtype="int32"), *rows, *shared))
    step_fn = keras.remat(fn)
    if _backend.sequential_blocks():
        outputs = []
        for start in range(0, num_rows, block):
            stop = min(start + block, num_rows)
            index = ops.arange(start, stop, dtype="int32")
            outputs.append(tuple(step_fn(index, *(r[start:stop] for r in rows), *shared)))
        return tuple(ops.concatenate(parts, axis=0) for parts in zip(*outputs, strict=True))
    # A scan, not a Python loop: its steps run one after the other, so the compiler cannot
    # schedule the blocks side by side (XLA does, for unrolled independent blocks, and the
    # peak memory is then that of the whole batch again). The last block is padded with
    # repeated rows whose outputs are dropped.
    num_blocks = -(-num_rows // block)
    positions = ops.reshape(ops.arange(num_blocks * block, dtype="int32"), (num_blocks, block))

    def step(carry, index):
        source = ops.mod(index, num_rows)
        block_rows = [ops.take(r, source, axis=0) for r in rows]
        return carry, tuple(step_fn(index, *block_rows, *shared))

    _, outputs = ops.scan(step, ops.zeros((), "int32"), positions)
    return tuple(
        ops.reshape(out, (num_blocks * block, *out.shape[2:]))[:num_rows] for out in outputs
    )


def anchor_rows(
    row_terms,
    distance,
    labels,
    embeddings,
    reference_labels=None,
    reference=None,
    mask=None,
    *,
    farther_is_larger=False,
    with_order=False,
    miner=None,
    miner_inputs=None,
    whole=False,
):
    """The row driver of the batch losses: `row_terms(m, positives, negatives)` per anchor.

    `m` is a (b, R) block of rows of `distance.matrix` (a `deepmetric.distances.Distance`)
    between the block's anchors and the reference set, or the batch itself when `reference` is
    None; with `farther_is_larger`, a similarity is negated so that larger is farther.
    `positives` / `negatives` are the block's label masks: an example with itself is in neither,
    and where `mask` ((R,) per reference row or (B, R) per pair, boolean) is False a pair is in
    neither. Inputs are already checked. `row_terms` returns a tuple of per-row float tensors;
    they come back for all B anchors. A distance that is not `blockable` (a callable) runs as
    one block. With `with_order`, `row_terms` gets a fourth argument, the block's
    `mining.PositiveOrder` (the ranks of the positives from the labels).

    With a `miner` (a `deepmetric.miners.Miner`), the block's masks are the pairs it keeps,
    mined on its own distance from `miner_inputs` (the unnormalised (embeddings, reference),
    default: `embeddings` and `reference`), and `row_terms` also gets the block's
    `deepmetric.miners.Mined` as the keyword `mined`. With `whole`, the rows run as one block
    (a loss that reads other rows of the matrix).
    """
    same = reference is None
    negate = farther_is_larger and distance.larger_is_closer
    rows = [embeddings, labels]
    shared = [embeddings, labels] if same else [reference, reference_labels]
    per_pair_mask = mask is not None and len(mask.shape) == 2
    if mask is not None:
        (rows if per_pair_mask else shared).append(mask)
    if miner is not None:
        raw, raw_reference = miner_inputs if miner_inputs is not None else (embeddings, reference)
        rows.append(raw)
        shared.append(raw if same else raw_reference)
    use_order = with_order or miner is not None
    if use_order:
        shared.append(mining.column_ranks(shared[1]))
    state = None
    if miner is not None:  # batch-wide figures, or a random miner's seed: once, before the blocks
        raw, raw_reference = miner_inputs if miner_inputs is not None else (embeddings, reference)
        state = miner.batch_state(
            mining_rows(
                miner,
                labels,
                raw,
                labels if same else reference_labels,
                raw if same else raw_reference,
                mask,
                same,
            )
        )

    def block(index, query, query_labels, *rest):
        rest = list(rest)
        pair_mask = rest.pop(0) if per_pair_mask else None
        raw_query = rest.pop(0) if miner is not None else None
        ref, ref_labels = rest.pop(0), rest.pop(0)
        if mask is not None and not per_pair_mask:
            pair_mask = ops.expand_dims(rest.pop(0), 0)
        raw_ref = rest.pop(0) if miner is not None else None
        order = None
        if use_order:
            ranks = rest.pop(0)
            # `mod`: the padding rows of a last block have positions past the batch.
            anchor_rank = ops.take(ranks, ops.mod(index, ops.shape(ranks)[0])) if same else None
            order = mining.PositiveOrder(ranks, anchor_rank)
        self_index = index if same else None
        positives, negatives = mining.label_masks(query_labels, ref_labels, anchor_index=self_index)
        if pair_mask is not None:
            positives = ops.logical_and(positives, pair_mask)
            negatives = ops.logical_and(negatives, pair_mask)
        extra = {}
        if miner is not None:
            mined = miner.mine_rows(
                raw_query, raw_ref, self_index, positives, negatives, order, state, index
            )
            positives, negatives = mined.positives, mined.negatives
            extra["mined"] = mined
        m = distance.matrix(query, ref, self_index=self_index)
        if negate:
            m = -m
        if with_order:
            return tuple(row_terms(m, positives, negatives, order, **extra))
        return tuple(row_terms(m, positives, negatives, **extra))

    one_block = whole or not distance.blockable
    return map_rows(block, rows, shared, max_entries=_UNLIMITED if one_block else None)


def two_pass_rows(matrix: Callable, row_stats: Callable, row_terms: Callable, rows: Sequence):
    """Per-anchor terms that also read a statistic of every other row (the lifted losses).

    `matrix(index, *block_rows, *rows)` gives a block's (b, B) matrix and masks, as a tuple
    `m`; `row_stats(*m)` a tuple of per-row statistics; `row_terms(*m, own, every)` the
    per-row outputs, `own` the block's statistics and `every` all B rows' (a batch compared
    with itself). Below `BLOCK_ENTRIES` the matrix is built once for both; above, a first
    pass of blocks gives the statistics and a second reads them whole (the gradient flows
    through both, each block recomputed in the backward pass).

    Returns:
      (the statistics, the outputs of `row_terms`), each a tuple over all B rows.
    """
    if block_size(rows[0].shape[0], rows[0].shape[0]) is None:
        m = tuple(matrix(ops.arange(ops.shape(rows[0])[0], dtype="int32"), *rows, *rows))
        stats = tuple(row_stats(*m))
        return stats, tuple(row_terms(*m, stats, stats))
    count = len(rows)

    def first_pass(index, *inputs):
        return tuple(row_stats(*matrix(index, *inputs)))

    stats = map_rows(first_pass, rows, rows)
    num_stats = len(stats)

    def second_pass(index, *inputs):
        split = (count, count + num_stats, 2 * count + num_stats)
        query, own = inputs[: split[0]], inputs[split[0] : split[1]]
        ref, every = inputs[split[1] : split[2]], inputs[split[2] :]
        return tuple(row_terms(*matrix(index, *query, *ref), own, every))

    return stats, map_rows(second_pass, (*rows, *stats), (*rows, *stats))


def mining_rows(miner, labels, query, reference_labels, reference, mask=None, same=True):
    """The `deepmetric.miners.BatchRows` of a batch: the miner's gaps and the label masks
    (`mask` applied, (R,) or (B, R) booleans) over blocks of the given rows (`map_rows`), for
    a miner that needs figures of the whole batch (`Miner.batch_state`)."""
    from deepmetric.miners import BatchRows

    num_rows, num_references = query.shape[0], reference.shape[0]
    if (
        not miner.row_local
        and num_rows is not None
        and num_references is not None
        and num_rows * num_references >= 2**31
    ):
        raise ValueError(
            f"{type(miner).__name__} counts the pairs of the whole batch in int32: at most "
            f"2^31 - 1 pairs (B x R, R = B without a reference set). Received: "
            f"B={num_rows}, R={num_references}"
        )
    per_pair = mask is not None and len(mask.shape) == 2

    def map_positions(fn, positions, per_row):
        count = len(per_row)

        def block(index, where, *rest):
            extras, (ref, ref_labels, all_query, all_labels) = rest[:count], rest[count : count + 4]
            query_rows = ops.take(all_query, where, axis=0)
            query_labels = ops.take(all_labels, where, axis=0)
            self_index = where if same else None
            positives, negatives = mining.label_masks(
                query_labels, ref_labels, anchor_index=self_index
            )
            if mask is not None:
                pair_mask = (
                    ops.take(rest[count + 4], where, axis=0)
                    if per_pair
                    else ops.expand_dims(rest[count + 4], 0)
                )
                positives = ops.logical_and(positives, pair_mask)
                negatives = ops.logical_and(negatives, pair_mask)
            gaps = miner.gaps(query_rows, ref, self_index)
            return tuple(fn(gaps, positives, negatives, *extras))

        shared = [reference, reference_labels, query, labels]
        if mask is not None:
            shared.append(mask)
        return map_rows(
            block, [positions, *per_row], shared, max_entries=min(MINING_ENTRIES, BLOCK_ENTRIES)
        )

    return BatchRows(map_positions, ops.shape(query)[0])
