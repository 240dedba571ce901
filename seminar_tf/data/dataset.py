"""tf.data reader: per-user sequence records -> one example per target event.

Each target gets its history window cut at read time: the up-to-L most recent events strictly
earlier than the target (events sharing the target's timestamp are not history), oldest first
and left-padded with 0, so position L-1 is the most recent behaviour; with ``history="all"``
(``spec.DEFAULT_HISTORY``) clicks and non-clicks with their labels, with ``history="positive"``
(the long-sequence CTR literature's protocol) the L most recent clicked events instead.
Whatever the window holds, every target also gets ``user_counts``: the user's whole history
strictly before it (events, clicks, seconds since the latest), counted across chunks.
"""

from __future__ import annotations

import tensorflow as tf

from seminar_tf import spec
from seminar_tf.data.numpy_reader import (  # noqa: F401 (HISTORY_MODES, TARGET_MODES: API)
    HIST_FEATURES,
    HISTORY_MODES,
    TARGET_MODES,
    check_window_options,
    example_files,
)
from seminar_tf.data.numpy_reader import bucket_widths as _bucket_widths

_TARGET_BLOCK = 256
# Context written by later versions of `seminar preprocess`: older records read as 0 (the user
# unknown; whole-history counts then start at the record's first event).
_CONTEXT_DEFAULTS = (spec.USER.name, "events_before", "clicks_before")


def parse_spec() -> dict:
    """The ``tf.io.parse_single_example`` features of a stored sequence record."""
    features = {name: tf.io.FixedLenFeature([], tf.string) for name in spec.SEQ_CONTEXT_BYTES}
    for name in spec.SEQ_CONTEXT_INT:
        # Records written before the user vocabulary have no ``user``: padding (0) there, and
        # a model with user features refuses such an output (no ``num_users`` in its schema).
        default = spec.PAD_ID if name in _CONTEXT_DEFAULTS else None
        features[name] = tf.io.FixedLenFeature([], tf.int64, default_value=default)
    features[spec.SEQ_QUERY_TOKENS] = tf.io.RaggedFeature(tf.int64)
    for name in spec.SEQ_COLUMNS:
        features[name] = tf.io.RaggedFeature(tf.int64)
    return features


def cut_windows(record: dict, targets: tf.Tensor, max_len: int, q: int, history: str) -> dict:
    """History windows for the given target positions of one parsed record.

    ``record`` holds 1-D columns (item, query, timestamp, label, split, query_tokens of n*Q);
    returns a dict of model features and the label for ``targets`` ([T] int64 positions).
    """
    ts = record["timestamp"]
    first_tie = tf.searchsorted(
        ts[None, :], tf.gather(ts, targets)[None, :], side="left", out_type=tf.int64
    )[0]
    offsets = tf.range(max_len, dtype=tf.int64) - max_len
    if history == "positive":
        positives = tf.where(record["label"] > 0)[:, 0]
        n_before = tf.searchsorted(
            positives[None, :], first_tie[None, :], side="left", out_type=tf.int64
        )[0]
        slot = n_before[:, None] + offsets[None, :]
        valid = slot >= 0
        # A leading 0 lets invalid slots gather something even when there are no clicks.
        padded = tf.concat([tf.zeros([1], tf.int64), positives], axis=0)
        idx = tf.gather(padded, tf.where(valid, slot + 1, 0))
    else:
        slot = first_tie[:, None] + offsets[None, :]
        valid = slot >= 0
        idx = tf.maximum(slot, 0)
    valid64 = tf.cast(valid, tf.int64)
    tokens = tf.reshape(record[spec.SEQ_QUERY_TOKENS], [-1, q])

    def hist(column):
        return tf.gather(column, idx) * valid64

    # The whole earlier history, whatever the window holds: the chunk's earlier events plus
    # the record's events before the target's first tie.
    clicks_cum = tf.concat([[0], tf.cumsum(tf.cast(record["label"] > 0, tf.int64))], 0)
    last = tf.gather(ts, tf.maximum(first_tie - 1, 0))
    gap = tf.where(first_tie > 0, tf.gather(ts, targets) - last, 0)
    user_counts = tf.stack(
        [
            record["events_before"] + first_tie,
            record["clicks_before"] + tf.gather(clicks_cum, first_tie),
            gap,
        ],
        axis=1,
    )

    return {
        "target_item": tf.gather(record["item"], targets),
        "target_query": tf.gather(record["query"], targets),
        "target_query_tokens": tf.gather(tokens, targets),
        "hist_item": hist(record["item"]),
        "hist_query": hist(record["query"]),
        "hist_query_tokens": tf.gather(tokens, idx) * valid64[:, :, None],
        "hist_label": hist(record["label"]),
        "user": tf.fill(tf.shape(targets), record["user"]),
        "user_counts": user_counts,
        "label": tf.cast(tf.gather(record["label"], targets), tf.float32),
        "user_id": tf.fill(tf.shape(targets), record["user_id"]),
        "timestamp": tf.gather(ts, targets),
        "hist_timestamp": hist(ts),
    }


def make_dataset(
    data_dir: str,
    split: str = "train",
    batch_size: int = 256,
    max_len: int | None = None,
    history: str = spec.DEFAULT_HISTORY,
    targets: str = "all",
    shuffle: bool = False,
    shuffle_buffer: int = 20_000,
    seed: int = 0,
    repeat: bool = False,
    include_meta: bool = False,
    drop_remainder: bool = False,
    trim: bool = False,
    bucket_by_length: bool = False,
    compact: bool = False,
) -> tf.data.Dataset:
    """Batches of ``(features, label)``: features named as ``spec.MODEL_FEATURES``.

    ``trim`` cuts the all-padding columns on the left of a batch's history down to a power of
    two (at least 8) that holds every row's history, so the history length of a batch varies
    (the model's output is unchanged: padding is masked). ``bucket_by_length`` also groups
    examples of similar history length into batches (training only: it reorders examples).
    On real data, where most targets have far fewer than L earlier events, the two cut the
    work per epoch several times over.

    ``include_meta`` adds ``spec.META_FEATURES`` (user id for GAUC, timestamps) to the features.
    ``compact`` yields compact inputs (``spec.COMPACT_DROPPED`` left out, int64 model features
    as int32).
    """
    data_spec, max_len = check_window_options(data_dir, split, history, targets, max_len)
    split_id = spec.SPLIT_NAMES.index(split)
    q = data_spec.max_query_tokens
    record_spec = parse_spec()
    keep = list(spec.MODEL_FEATURE_NAMES) + (
        [f.name for f in spec.META_FEATURES] if include_meta else []
    )
    narrow = set()
    if compact:
        keep = [k for k in keep if k not in spec.COMPACT_DROPPED]
        narrow = spec.COMPACT_INT32

    def per_record(serialized):
        record = tf.io.parse_single_example(serialized, record_spec)
        n = tf.size(record["item"], out_type=tf.int64)
        positions = tf.range(record["num_prefix"], n)
        wanted = tf.gather(record["split"], positions) == split_id
        if targets == "positive":
            wanted &= tf.gather(record["label"], positions) > 0
        chosen = tf.boolean_mask(positions, wanted)
        blocks = tf.data.Dataset.from_tensor_slices(chosen).batch(_TARGET_BLOCK)
        return blocks.map(lambda t: cut_windows(record, t, max_len, q, history)).unbatch()

    files = example_files(data_dir)
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed)
    ds = ds.interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(4, len(files)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    ds = ds.flat_map(per_record)
    ds = ds.map(
        lambda ex: (
            {k: tf.cast(ex[k], tf.int32) if k in narrow else ex[k] for k in keep},
            ex["label"],
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed)
    if repeat:
        ds = ds.repeat()
    if bucket_by_length:
        bounds = tf.constant(_bucket_widths(max_len), tf.int64)

        def bucket(features, label):
            n = tf.math.count_nonzero(features["hist_item"], dtype=tf.int64)
            return tf.argmax(tf.cast(bounds >= n, tf.int64), output_type=tf.int64)

        ds = ds.group_by_window(
            bucket, lambda _, w: w.batch(batch_size, drop_remainder=drop_remainder), batch_size
        )
    else:
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if trim or bucket_by_length:
        ds = ds.map(lambda f, y: (trim_history(f, max_len), y))
    return ds.prefetch(tf.data.AUTOTUNE)


def trim_history(features: dict, max_len: int) -> dict:
    """Keeps the last ``w`` history columns of a batch, ``w`` the smallest bucket width
    holding every row's (left-padded) history."""
    n = tf.reduce_max(tf.math.count_nonzero(features["hist_item"], axis=1, dtype=tf.int64))
    widths = tf.constant(_bucket_widths(max_len), tf.int64)
    width = tf.gather(widths, tf.argmax(tf.cast(widths >= n, tf.int64)))
    out = dict(features)
    for name in HIST_FEATURES:
        if name in out:
            out[name] = out[name][:, max_len - width :]
    return out
