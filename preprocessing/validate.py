"""Validation of raw records against the data contract (``seminar_tf.spec``).

Each validator returns either the clean value or a ``(reason, field)`` pair; the DoFns route
refusals to the ``rejected`` output with the record, so nothing is ever dropped silently.
"""

from __future__ import annotations

import math
from collections import Counter

import apache_beam as beam
from apache_beam.metrics import Metrics

from preprocessing.io import REJECTED, rejection
from seminar_tf.text import normalize_query

TIMESTAMP_BATCH = "timestamps"
TALLY = "tally"
COUNTS = "counts"


class Invalid(Exception):
    def __init__(self, reason: str, field: str | None):
        super().__init__(reason)
        self.reason = reason
        self.field = field


def _required_str(record: dict, field: str) -> str:
    value = record.get(field)
    if value is None:
        raise Invalid("missing_field", field)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise Invalid("not_a_string", field)
    value = str(value).strip()
    if not value:
        raise Invalid("empty_field", field)
    return value


def _int(record: dict, field: str) -> int:
    value = record.get(field)
    if value is None or value == "":
        raise Invalid("missing_field", field)
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise Invalid("not_an_integer", field)
        return int(value)
    try:
        return int(str(value).strip())
    except ValueError:
        raise Invalid("not_an_integer", field) from None


def parse_event(record: dict) -> tuple[str, int, str, str, int]:
    """``(user_id, timestamp, item_id, query, label)`` from a raw event, or raises Invalid."""
    if not isinstance(record, dict):
        raise Invalid("not_a_record", None)
    user_id = _required_str(record, "user_id")
    timestamp = _int(record, "timestamp")
    if timestamp < 0:
        raise Invalid("negative_timestamp", "timestamp")
    item_id = _required_str(record, "item_id")
    query = record.get("query")
    if query is None:
        query = ""
    if isinstance(query, bytes):
        query = query.decode("utf-8", "replace")
    if not isinstance(query, str):
        raise Invalid("not_a_string", "query")
    label = _int(record, "label")
    if label not in (0, 1):
        raise Invalid("label_not_0_or_1", "label")
    return user_id, timestamp, item_id, query, label


def _vector(record: dict, field: str) -> list[float]:
    value = record.get(field)
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        if hasattr(value, "tolist"):
            value = value.tolist()
        else:
            raise Invalid("not_a_list", field)
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        raise Invalid("not_a_float_list", field) from None
    if not all(math.isfinite(v) for v in out):
        raise Invalid("non_finite_value", field)
    return out


def parse_item(record: dict) -> dict:
    """A clean item dict (item_id, text, attributes, text_embedding, image_embedding)."""
    if not isinstance(record, dict):
        raise Invalid("not_a_record", None)
    item_id = _required_str(record, "item_id")
    text = record.get("text") or ""
    if not isinstance(text, str):
        raise Invalid("not_a_string", "text")
    attributes = record.get("attributes")
    if attributes is None:
        attributes = []
    if hasattr(attributes, "tolist"):
        attributes = attributes.tolist()
    if not isinstance(attributes, (list, tuple)) or not all(isinstance(a, str) for a in attributes):
        raise Invalid("not_a_string_list", "attributes")
    return {
        "item_id": item_id,
        "text": text,
        "attributes": [a.strip() for a in attributes if a.strip()],
        "text_embedding": _vector(record, "text_embedding"),
        "image_embedding": _vector(record, "image_embedding"),
    }


def parse_query_vector(record: dict) -> dict:
    if not isinstance(record, dict):
        raise Invalid("not_a_record", None)
    query = normalize_query(_required_str(record, "query"))
    vector = _vector(record, "text_embedding")
    if not vector:
        raise Invalid("missing_field", "text_embedding")
    return {"query": query, "text_embedding": vector}


def _global(value):
    """Wraps a value emitted from ``finish_bundle`` (which has no input element to inherit
    a window from) in the global window."""
    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.windowed_value import WindowedValue

    return WindowedValue(value, GlobalWindow().max_timestamp(), [GlobalWindow()])


class ValidateEvents(beam.DoFn):
    """Raw event dicts -> ``(user_id, (timestamp, item_id, query, label))``.

    Emits the number of records it saw once per bundle (``tally`` output) for the
    input = used + rejected accounting.
    """

    def __init__(self):
        self._rejected = Metrics.counter("seminar", "events_rejected")
        self._valid = Metrics.counter("seminar", "events_valid")

    def start_bundle(self):
        self._seen = 0

    def process(self, record):
        self._seen += 1
        try:
            user_id, ts, item_id, query, label = parse_event(record)
        except Invalid as e:
            self._rejected.inc()
            yield beam.pvalue.TaggedOutput(REJECTED, rejection("events", e.reason, e.field, record))
            return
        self._valid.inc()
        yield user_id, (ts, item_id, query, label)

    def finish_bundle(self):
        if self._seen:
            yield beam.pvalue.TaggedOutput(TALLY, _global(("events_parsed", self._seen)))
        self._seen = 0


class JoinCatalog(beam.DoFn):
    """Keeps events whose item is in the catalog (a side-input set); rejects the others.

    Also emits the bundle's timestamps (``timestamps`` output) for the global split cutoffs,
    and counts item ids, query strings and query tokens per bundle (emitted in
    ``finish_bundle`` as ``((kind, value), count)``): a hand-lifted combiner that keeps the
    vocabulary counts off the per-event path.
    """

    def __init__(self, max_query_tokens: int):
        self._max_query_tokens = max_query_tokens
        self._rejected = Metrics.counter("seminar", "events_item_not_in_catalog")
        self._catalog = None

    def start_bundle(self):
        self._counts = Counter()
        self._timestamps = []

    def process(self, element, catalog):
        from seminar_tf.text import tokenize_query

        if self._catalog is None:
            self._catalog = frozenset(catalog)
        user_id, (ts, item_id, query, label) = element
        if item_id not in self._catalog:
            self._rejected.inc()
            record = {
                "user_id": user_id,
                "timestamp": ts,
                "item_id": item_id,
                "query": query,
                "label": label,
            }
            yield beam.pvalue.TaggedOutput(
                REJECTED, rejection("events", "item_not_in_catalog", "item_id", record)
            )
            return
        self._timestamps.append(ts)
        self._counts[("item", item_id)] += 1
        if query.strip():
            self._counts[("query", normalize_query(query))] += 1
            for token in tokenize_query(query, self._max_query_tokens):
                self._counts[("query_token", token)] += 1
        yield element

    def finish_bundle(self):
        for key, count in self._counts.items():
            yield beam.pvalue.TaggedOutput(COUNTS, _global((key, count)))
        if self._timestamps:
            yield beam.pvalue.TaggedOutput(TIMESTAMP_BATCH, _global(self._timestamps))
        self._counts = Counter()
        self._timestamps = []


class ValidateItems(beam.DoFn):
    """Raw item dicts -> ``(item_id, clean item)``; bad ones go to ``rejected``."""

    def process(self, record):
        try:
            item = parse_item(record)
        except Invalid as e:
            yield beam.pvalue.TaggedOutput(REJECTED, rejection("items", e.reason, e.field, record))
            return
        yield item["item_id"], item


class ValidateQueryVectors(beam.DoFn):
    def process(self, record):
        try:
            row = parse_query_vector(record)
        except Invalid as e:
            yield beam.pvalue.TaggedOutput(
                REJECTED, rejection("queries", e.reason, e.field, record)
            )
            return
        yield row["query"], row


class CheckVectorDims(beam.DoFn):
    """Rejects rows whose vectors do not have the data set's dimension (the side input).

    The expected dimension of each vector field is the most common non-zero length, so a few
    corrupt rows never redefine the table's width.
    """

    def __init__(self, stage: str, fields: tuple[str, ...]):
        self._stage = stage
        self._fields = fields

    def process(self, element, dims):
        key, row = element
        for field in self._fields:
            n = len(row[field])
            if n and n != dims.get(field, 0):
                yield beam.pvalue.TaggedOutput(
                    REJECTED,
                    rejection(
                        self._stage,
                        f"wrong_vector_length: {n}, expected {dims.get(field, 0)}",
                        field,
                        row,
                    ),
                )
                return
        yield key, row


class KeepFirstPerKey(beam.DoFn):
    """After a GroupByKey: keeps one row per key (the smallest by repr, so it is deterministic
    whatever the shuffle order) and rejects the duplicates."""

    def __init__(self, stage: str, field: str):
        self._stage = stage
        self._field = field

    def process(self, element):
        key, rows = element
        rows = sorted(rows, key=repr)
        for dup in rows[1:]:
            yield beam.pvalue.TaggedOutput(
                REJECTED, rejection(self._stage, "duplicate_key", self._field, dup)
            )
        yield key, rows[0]


def vector_lengths(fields: tuple[str, ...]):
    """``(key, row)`` -> ``((field, length), 1)`` for each present vector, to be summed."""

    def lengths(element):
        _, row = element
        return [((f, len(row[f])), 1) for f in fields if row[f]]

    return lengths


def dims_from_counts(counts: list) -> dict[str, int]:
    """``[((field, length), count)]`` -> ``{field: most common length}`` (ties: the longer)."""
    best: dict[str, tuple[int, int]] = {}
    for (field, length), count in counts:
        if (count, length) > best.get(field, (0, 0)):
            best[field] = (count, length)
    return {field: length for field, (_, length) in best.items()}
