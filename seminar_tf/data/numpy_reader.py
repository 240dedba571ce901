"""The preprocessing output read without TensorFlow: TFRecord files of ``tf.train.Example``
sequence records, parsed with numpy, cut into the windows that ``dataset.make_dataset`` cuts,
and batched by a ``keras.utils.PyDataset`` that any Keras backend trains on.

The JAX machine has no TensorFlow, so ``KERAS_BACKEND=jax seminar train`` reads through this
module there (``TrainConfig.reader``). Each window equals the tf.data reader's (tests compare
them example by example): the up-to-L most recent events strictly before the target
(``history="all"``) or its clicks (``"positive"``), left-padded, with ``user_counts`` over
the user's whole earlier history.

Records are kept in memory as their columns (a user's events once per chunk, about 50 bytes
per event); windows are cut per batch, so memory does not grow with L x targets.
"""

from __future__ import annotations

import glob
import os
import struct

import keras
import numpy as np

from seminar_tf import spec

HISTORY_MODES = spec.HISTORY_MODES
TARGET_MODES = ("all", "positive")
_CONTEXT_DEFAULTS = {spec.USER.name: spec.PAD_ID, "events_before": 0, "clicks_before": 0}


class RecordError(ValueError):
    """A TFRecord file or an Example in it that cannot be read; names the file and record."""


# ------------------------------------------------------------------------------ TFRecord / proto
def read_tfrecords(path: str):
    """The records (bytes) of one TFRecord file: a little-endian uint64 length, its CRC,
    the data, the data's CRC (the CRCs are not checked)."""
    with open(path, "rb") as f:
        data = f.read()
    pos, index = 0, 0
    while pos < len(data):
        if pos + 12 > len(data):
            raise RecordError(f"{path}: record {index} is truncated (no length header)")
        (length,) = struct.unpack_from("<Q", data, pos)
        start = pos + 12
        if start + length + 4 > len(data):
            raise RecordError(f"{path}: record {index} is truncated ({length} bytes announced)")
        yield data[start : start + length]
        pos, index = start + length + 4, index + 1


def _varint(buf, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _packed_varints(payload: bytes) -> np.ndarray:
    """The int64 values of a packed run of varints, decoded with numpy."""
    b = np.frombuffer(payload, np.uint8)
    if not len(b):
        return np.zeros(0, np.int64)
    ends = np.flatnonzero(b < 0x80)
    starts = np.concatenate([[0], ends[:-1] + 1])
    within = np.arange(len(b)) - np.repeat(starts, ends - starts + 1)
    parts = (b & 0x7F).astype(np.uint64) << (7 * within).astype(np.uint64)
    return np.add.reduceat(parts, starts).view(np.int64)


def _fields(buf, start: int = 0, end: int | None = None):
    """``(field number, wire type, value)`` of a protobuf message: an int for varints, the
    bytes for length-delimited fields."""
    pos, end = start, len(buf) if end is None else end
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _feature_value(feature: bytes):
    """A ``tf.train.Feature``: bytes list -> list of bytes, float list -> float32 array,
    int64 list -> int64 array."""
    for kind, _, body in _fields(feature):
        if kind == 1:  # BytesList
            return [v for _, _, v in _fields(body)]
        if kind == 2:  # FloatList: packed (wire 2) or one float per field (wire 5)
            chunks = [v for _, _, v in _fields(body)]
            return np.frombuffer(b"".join(chunks), "<f4").astype(np.float32)
        if kind == 3:  # Int64List: packed runs or single varints
            values = [
                _packed_varints(v) if w == 2 else np.array([v], np.uint64).view(np.int64)
                for _, w, v in _fields(body)
            ]
            return np.concatenate(values) if values else np.zeros(0, np.int64)
    return np.zeros(0, np.int64)  # an empty Feature


def parse_example(serialized: bytes) -> dict:
    """``{name: value}`` of a serialised ``tf.train.Example`` (see :func:`_feature_value`)."""
    out = {}
    for number, _, features in _fields(serialized):
        if number != 1:
            continue
        for entry_number, _, entry in _fields(features):
            if entry_number != 1:
                continue
            key, value = None, b""
            for n, _, v in _fields(entry):
                if n == 1:
                    key = bytes(v).decode()
                elif n == 2:
                    value = v
            out[key] = _feature_value(value)
    return out


def parse_record(serialized: bytes, where: str = "") -> dict:
    """A sequence record as ``dataset.parse_spec`` parses it: int64 context scalars (the
    newer ones default to 0), ``user_id`` bytes, the int64 columns."""
    raw = parse_example(serialized)
    record = {}
    try:
        record["user_id"] = raw["user_id"][0]
        for name in spec.SEQ_CONTEXT_INT:
            if name in raw:
                record[name] = int(raw[name][0])
            elif name in _CONTEXT_DEFAULTS:
                record[name] = _CONTEXT_DEFAULTS[name]
            else:
                raise KeyError(name)
        for name in spec.SEQ_COLUMNS + (spec.SEQ_QUERY_TOKENS,):
            record[name] = np.asarray(raw.get(name, np.zeros(0, np.int64)), np.int64)
    except (KeyError, IndexError) as e:
        raise RecordError(f"{where}: sequence record lacks field {e}") from None
    return record


# ------------------------------------------------------------------------------ windows
def _concat(parts, dtype=np.int64, width=None):
    if parts:
        return np.concatenate(parts).astype(dtype, copy=False)
    return np.zeros((0,) if width is None else (0, width), dtype)


class EventTable:
    """Every record's events in flat arrays, so that the windows of any batch of targets are
    cut by a few gathers, whatever records the targets come from.

    Per event it keeps the record-local index of the first event tied with its timestamp
    (a window holds only strictly earlier events) and the clicks before that tie; per record
    the user and the counts of the events that came before its chunk. A target is a
    ``(record, position)`` pair; ``windows`` gives the numpy twin of ``dataset.cut_windows``.
    """

    def __init__(self, records: list, q: int):
        self.records, self.q = records, q
        sizes = np.array([len(r["item"]) for r in records], np.int64)
        self.start = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        for name in ("item", "query", "label", "timestamp"):
            setattr(self, name, _concat([r[name] for r in records]))
        self.tokens = _concat([r[spec.SEQ_QUERY_TOKENS].reshape(-1, q) for r in records], width=q)
        self.user = np.array([r["user"] for r in records], np.int64)
        self.user_id = np.array([r["user_id"] for r in records], dtype=object)
        self.events_before = np.array([r["events_before"] for r in records], np.int64)
        self.clicks_before = np.array([r["clicks_before"] for r in records], np.int64)
        self.first_tie = _concat(
            [np.searchsorted(r["timestamp"], r["timestamp"], side="left") for r in records]
        )
        clicks = self.label > 0
        prior = _concat([np.concatenate([[0], np.cumsum(r["label"] > 0)[:-1]]) for r in records])
        self.clicks_at_tie = prior[
            self._at(np.repeat(np.arange(len(records)), sizes), self.first_tie)
        ]
        # Global indices of the clicks (record after record), and where each record's start.
        self.positives = np.concatenate([[0], np.flatnonzero(clicks)]).astype(np.int64)
        counts = np.array([int(np.count_nonzero(r["label"] > 0)) for r in records], np.int64)
        self.positive_start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)

    def _at(self, record, position):
        return self.start[record] + position

    def lengths(self, targets: np.ndarray, max_len: int, history: str) -> np.ndarray:
        """``[T]``: the real behaviours in each target's window (``targets``: ``[T, 2]``)."""
        g = self._at(targets[:, 0], targets[:, 1])
        before = self.clicks_at_tie[g] if history == "positive" else self.first_tie[g]
        return np.minimum(before, max_len)

    def windows(self, targets: np.ndarray, width: int, history: str, tokens: bool = True) -> dict:
        """The features of ``targets`` (``[T, 2]`` record, position), each ``[T, ...]``, with
        the ``width`` most recent history slots (the window's last ``width`` columns: pass
        ``max_len``, or a width that holds every target's history). ``tokens=False`` leaves
        ``hist_query_tokens`` out (the largest of them: compact inputs do not use it)."""
        r, g = targets[:, 0], self._at(targets[:, 0], targets[:, 1])
        ft = self.first_tie[g]
        offsets = np.arange(width, dtype=np.int64) - width
        if history == "positive":
            slot = self.clicks_at_tie[g][:, None] + offsets[None, :]
            valid = slot >= 0
            idx = self.positives[np.where(valid, self.positive_start[r][:, None] + slot + 1, 0)]
        else:
            slot = ft[:, None] + offsets[None, :]
            valid = slot >= 0
            idx = self.start[r][:, None] + np.maximum(slot, 0)
        valid64 = valid.astype(np.int64)

        def hist(column):
            return column[idx] * valid64

        ts = self.timestamp
        gap = np.where(ft > 0, ts[g] - ts[self._at(r, np.maximum(ft - 1, 0))], 0)
        user_counts = np.stack(
            [self.events_before[r] + ft, self.clicks_before[r] + self.clicks_at_tie[g], gap],
            axis=1,
        ).astype(np.int64)
        out = {
            "target_item": self.item[g],
            "target_query": self.query[g],
            "target_query_tokens": self.tokens[g],
            "hist_item": hist(self.item),
            "hist_query": hist(self.query),
            "hist_label": hist(self.label),
            "user": self.user[r],
            "user_counts": user_counts,
            "label": self.label[g].astype(np.float32),
            "user_id": self.user_id[r],
            "timestamp": ts[g],
            "hist_timestamp": hist(ts),
        }
        if tokens:
            out["hist_query_tokens"] = self.tokens[idx] * valid64[:, :, None]
        return out


def example_files(data_dir: str) -> list[str]:
    """The preprocessing output's TFRecord files, sorted."""
    files = sorted(glob.glob(os.path.join(data_dir, spec.EXAMPLES_DIR, "*.tfrecord")))
    if not files:
        raise FileNotFoundError(
            f"{data_dir}: no {spec.EXAMPLES_DIR}/*.tfrecord files; run `seminar preprocess` first"
        )
    return files


def load_records(data_dir: str) -> list[dict]:
    """Every sequence record of ``data_dir``'s examples, parsed."""
    records = []
    for path in example_files(data_dir):
        for i, serialized in enumerate(read_tfrecords(path)):
            records.append(parse_record(serialized, f"{path} record {i}"))
    return records


def check_window_options(data_dir: str, split: str, history: str, targets: str, max_len):
    """``(DataSpec, max_len)`` after checking the options both readers take: a known split,
    history mode and target mode, and a ``max_len`` within the preprocessing's (None: its)."""
    data_spec = spec.DataSpec.load(data_dir)
    if split not in spec.SPLIT_NAMES:
        raise ValueError(f"split must be one of {spec.SPLIT_NAMES}, got {split!r}")
    if history not in HISTORY_MODES:
        raise ValueError(f"history must be one of {HISTORY_MODES}, got {history!r}")
    if targets not in TARGET_MODES:
        raise ValueError(f"targets must be one of {TARGET_MODES}, got {targets!r}")
    max_len = max_len or data_spec.max_len
    if max_len > data_spec.max_len:
        raise ValueError(
            f"max_len={max_len} exceeds the preprocessing max_len={data_spec.max_len}: chunk "
            "prefixes only hold that much history; re-run `seminar preprocess --max-len`"
        )
    return data_spec, max_len


def select_targets(records, split: str, targets: str = "all") -> np.ndarray:
    """``[N, 2]`` (record index, position) of the split's targets, in reading order."""
    if split not in spec.SPLIT_NAMES:
        raise ValueError(f"split must be one of {spec.SPLIT_NAMES}, got {split!r}")
    if targets not in TARGET_MODES:
        raise ValueError(f"targets must be one of {TARGET_MODES}, got {targets!r}")
    split_id = spec.SPLIT_NAMES.index(split)
    chosen = []
    for r, record in enumerate(records):
        positions = np.arange(record["num_prefix"], len(record["item"]))
        wanted = record["split"][positions] == split_id
        if targets == "positive":
            wanted &= record["label"][positions] > 0
        picked = positions[wanted]
        chosen.append(np.stack([np.full(len(picked), r), picked], axis=1))
    return np.concatenate(chosen).astype(np.int64) if chosen else np.zeros((0, 2), np.int64)


def bucket_widths(max_len: int) -> list[int]:
    """History widths batches are trimmed to: powers of two from 8, then ``max_len``."""
    widths, w = [], 8
    while w < max_len:
        widths.append(w)
        w *= 2
    return widths + [max_len]


# ------------------------------------------------------------------------------ batches
def bucket_batches(rows: np.ndarray, bucket: np.ndarray, batch_size: int) -> list:
    """``rows`` (in their order) cut into batches of one length bucket each, except that the
    buckets' remainders are pooled (in bucket order) into shared batches.

    Every batch but the last then holds ``batch_size`` rows, so an epoch has at most one
    batch shape per bucket width plus one partial batch: a compiled step (XLA under JAX) is
    built once per shape, and a remainder per bucket doubled the shapes. A pooled batch is
    trimmed to its longest member like any other, so no row loses history.
    """
    batches, left = [], []
    for k in np.unique(bucket):
        members = rows[bucket == k]
        full = len(members) - len(members) % batch_size
        batches += [members[i : i + batch_size] for i in range(0, full, batch_size)]
        left.append(members[full:])
    pooled = np.concatenate(left) if left else rows[:0]
    return batches + [pooled[i : i + batch_size] for i in range(0, len(pooled), batch_size)]


class WindowDataset(keras.utils.PyDataset):
    """Batches ``(features, label)`` of one split, as ``dataset.make_dataset`` yields them,
    without TensorFlow: features named as ``spec.MODEL_FEATURES`` (plus
    ``spec.META_FEATURES`` with ``include_meta``), label float32 ``[B]``.

    ``shuffle`` reorders the targets every epoch (``seed`` + epoch); ``bucket_by_length``
    groups targets of similar history length into batches (the batches' order shuffled with
    ``shuffle``; the buckets' remainders pooled, see :func:`bucket_batches`) and, like
    ``trim``, cuts each batch's history to the smallest bucket width (a power of two, at
    least 8, or ``max_len``) that holds its longest row. ``drop_remainder`` drops the last
    partial batch. ``compact`` yields compact inputs (:func:`compact_features`).
    ``records``: the output's parsed records (:func:`load_records`), or an
    :class:`EventTable` of them to share between splits. ``len()`` is the number of batches
    an epoch.
    """

    def __init__(
        self,
        data_dir: str,
        split: str = "train",
        batch_size: int = 256,
        max_len: int | None = None,
        history: str = spec.DEFAULT_HISTORY,
        targets: str = "all",
        shuffle: bool = False,
        seed: int = 0,
        include_meta: bool = False,
        drop_remainder: bool = False,
        trim: bool = False,
        bucket_by_length: bool = False,
        records: list | EventTable | None = None,
        compact: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.compact = bool(compact)
        data_spec, max_len = check_window_options(data_dir, split, history, targets, max_len)
        if isinstance(records, EventTable) and records.q != data_spec.max_query_tokens:
            raise ValueError("records: an EventTable of another preprocessing output")
        if not isinstance(records, EventTable):
            records = EventTable(
                load_records(data_dir) if records is None else records,
                data_spec.max_query_tokens,
            )
        self.events, self.records = records, records.records
        self.index = select_targets(self.records, split, targets)
        self.batch_size, self.max_len, self.history = batch_size, max_len, history
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.drop_remainder, self.bucket_by_length = drop_remainder, bucket_by_length
        self.trim = trim or bucket_by_length
        self.keep = list(spec.MODEL_FEATURE_NAMES) + (
            [f.name for f in spec.META_FEATURES] if include_meta else []
        )
        self.widths = np.asarray(bucket_widths(max_len))
        self._lengths = self.events.lengths(self.index, max_len, history)
        self._plan()

    @property
    def num_targets(self) -> int:
        return len(self.index)

    def _plan(self):
        """The epoch's batches: lists of rows of ``self.index``."""
        order = np.arange(len(self.index))
        rng = np.random.default_rng(self.seed + self.epoch)
        if self.shuffle:
            order = rng.permutation(order)
        b = self.batch_size
        if self.bucket_by_length:
            bucket = np.searchsorted(self.widths, self._lengths[order], side="left")
            batches = bucket_batches(order, bucket, b)
            if self.shuffle:
                batches = [batches[i] for i in rng.permutation(len(batches))]
        else:
            batches = [order[i : i + b] for i in range(0, len(order), b)]
        if self.drop_remainder:
            batches = [x for x in batches if len(x) == b]
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def on_epoch_end(self):
        self.epoch += 1
        self._plan()

    def width(self, rows) -> int:
        """History width of a batch of ``rows``: ``max_len``, or trimmed to the smallest bucket
        width that holds its longest window."""
        if not self.trim:
            return self.max_len
        longest = int(self._lengths[rows].max(initial=0))
        return int(self.widths[np.searchsorted(self.widths, longest, side="left")])

    def examples(self, rows, width: int | None = None) -> dict:
        """The windows of ``self.index[rows]``, in that order, as one dict of arrays, with
        ``width`` history slots (default ``max_len``)."""
        return self.events.windows(
            self.index[rows], width or self.max_len, self.history, tokens=not self.compact
        )

    def __getitem__(self, i):
        if i >= len(self.batches):
            raise IndexError(i)
        rows = self.batches[i]
        ex = self.examples(rows, self.width(rows))
        features = {k: ex[k] for k in self.keep if k in ex}
        if self.compact:
            features = compact_features(features)
        return features, ex["label"]


def compact_features(features: dict) -> dict:
    """Compact model inputs (``spec.COMPACT_DROPPED`` left out, int64 model features as
    int32); meta features stay as they are."""
    return {
        k: v.astype(np.int32) if k in spec.COMPACT_INT32 else v
        for k, v in features.items()
        if k not in spec.COMPACT_DROPPED
    }


HIST_FEATURES = tuple(f.name for f in spec.MODEL_FEATURES + spec.META_FEATURES if "L" in f.shape)
