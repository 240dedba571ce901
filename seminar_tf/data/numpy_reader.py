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
def cut_windows(
    record: dict, targets: np.ndarray, max_len: int, q: int, history: str, tokens: bool = True
) -> dict:
    """Numpy twin of ``dataset.cut_windows``: the features of ``targets`` (positions in
    ``record``), each ``[T, ...]``; ``tokens=False`` leaves ``hist_query_tokens`` out (the
    largest of them: compact inputs do not use it)."""
    ts = record["timestamp"]
    targets = np.asarray(targets, np.int64)
    first_tie = np.searchsorted(ts, ts[targets], side="left").astype(np.int64)
    offsets = np.arange(max_len, dtype=np.int64) - max_len
    if history == "positive":
        positives = np.flatnonzero(record["label"] > 0)
        n_before = np.searchsorted(positives, first_tie, side="left").astype(np.int64)
        slot = n_before[:, None] + offsets[None, :]
        valid = slot >= 0
        padded = np.concatenate([[0], positives]).astype(np.int64)
        idx = padded[np.where(valid, slot + 1, 0)]
    else:
        slot = first_tie[:, None] + offsets[None, :]
        valid = slot >= 0
        idx = np.maximum(slot, 0)
    valid64 = valid.astype(np.int64)
    with_tokens, tokens = tokens, record[spec.SEQ_QUERY_TOKENS].reshape(-1, q)

    def hist(column):
        return column[idx] * valid64

    clicks_cum = np.concatenate([[0], np.cumsum(record["label"] > 0)]).astype(np.int64)
    last = ts[np.maximum(first_tie - 1, 0)]
    gap = np.where(first_tie > 0, ts[targets] - last, 0)
    user_counts = np.stack(
        [
            record["events_before"] + first_tie,
            record["clicks_before"] + clicks_cum[first_tie],
            gap,
        ],
        axis=1,
    ).astype(np.int64)
    n = len(targets)
    out = {
        "target_item": record["item"][targets],
        "target_query": record["query"][targets],
        "target_query_tokens": tokens[targets],
        "hist_item": hist(record["item"]),
        "hist_query": hist(record["query"]),
        "hist_query_tokens": tokens[idx] * valid64[:, :, None] if with_tokens else None,
        "hist_label": hist(record["label"]),
        "user": np.full(n, record["user"], np.int64),
        "user_counts": user_counts,
        "label": record["label"][targets].astype(np.float32),
        "user_id": np.array([record["user_id"]] * n, dtype=object),
        "timestamp": ts[targets],
        "hist_timestamp": hist(ts),
    }
    if not with_tokens:
        del out["hist_query_tokens"]
    return out


def history_lengths(record: dict, targets: np.ndarray, max_len: int, history: str) -> np.ndarray:
    """How many real behaviours each target's window holds (for bucketing, without cutting)."""
    ts = record["timestamp"]
    first_tie = np.searchsorted(ts, ts[targets], side="left")
    if history == "positive":
        first_tie = np.searchsorted(np.flatnonzero(record["label"] > 0), first_tie, side="left")
    return np.minimum(first_tie, max_len)


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
class WindowDataset(keras.utils.PyDataset):
    """Batches ``(features, label)`` of one split, as ``dataset.make_dataset`` yields them,
    without TensorFlow: features named as ``spec.MODEL_FEATURES`` (plus
    ``spec.META_FEATURES`` with ``include_meta``), label float32 ``[B]``.

    ``shuffle`` reorders the targets every epoch (``seed`` + epoch); ``bucket_by_length``
    groups targets of similar history length into batches (the batches' order shuffled with
    ``shuffle``) and, like ``trim``, cuts each batch's history to the smallest bucket width
    (a power of two, at least 8, or ``max_len``) that holds its longest row. ``drop_remainder``
    drops the last partial batch (of each bucket). ``compact`` yields compact inputs
    (:func:`compact_features`). ``len()`` is the number of batches an epoch.
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
        records: list | None = None,
        compact: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.compact = bool(compact)
        data_spec, max_len = check_window_options(data_dir, split, history, targets, max_len)
        self.records = records if records is not None else load_records(data_dir)
        self.index = select_targets(self.records, split, targets)
        self.batch_size, self.max_len, self.history = batch_size, max_len, history
        self.q = data_spec.max_query_tokens
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.drop_remainder, self.bucket_by_length = drop_remainder, bucket_by_length
        self.trim = trim or bucket_by_length
        self.keep = list(spec.MODEL_FEATURE_NAMES) + (
            [f.name for f in spec.META_FEATURES] if include_meta else []
        )
        self.widths = np.asarray(bucket_widths(max_len))
        self._lengths = None
        if bucket_by_length:
            self._lengths = np.zeros(len(self.index), np.int64)
            # One pass over the targets grouped by record (not a scan of all per record).
            order = np.argsort(self.index[:, 0], kind="stable")
            starts = np.flatnonzero(np.diff(self.index[order, 0], prepend=-1))
            for rows in np.split(order, starts[1:]) if len(order) else []:
                r = self.index[rows[0], 0]
                self._lengths[rows] = history_lengths(
                    self.records[r], self.index[rows, 1], max_len, history
                )
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
        if self._lengths is not None:
            bucket = np.searchsorted(self.widths, self._lengths[order], side="left")
            batches = []
            for k in np.unique(bucket):
                rows = order[bucket == k]
                batches += [rows[i : i + b] for i in range(0, len(rows), b)]
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

    def examples(self, rows) -> dict:
        """The windows of ``self.index[rows]``, in that order, as one dict of arrays."""
        picked = self.index[rows]
        parts, where = [], []
        for r in np.unique(picked[:, 0]):
            at = np.flatnonzero(picked[:, 0] == r)
            parts.append(cut_windows(self.records[r], picked[at, 1], self.max_len, self.q,
                                     self.history, tokens=not self.compact))  # fmt: skip
            where.append(at)
        inverse = np.argsort(np.concatenate(where), kind="stable")
        return {k: np.concatenate([p[k] for p in parts])[inverse] for k in parts[0]}

    def __getitem__(self, i):
        if i >= len(self.batches):
            raise IndexError(i)
        ex = self.examples(self.batches[i])
        features = {k: ex[k] for k in self.keep if k in ex}
        if self.compact:
            features = compact_features(features)
        if self.trim:
            n = int(np.count_nonzero(features["hist_item"], axis=1).max(initial=0))
            width = int(self.widths[np.searchsorted(self.widths, n, side="left")])
            for name in features:
                if name in HIST_FEATURES:
                    features[name] = features[name][:, self.max_len - width :]
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
