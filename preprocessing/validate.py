"""Validation DoFns: raw records against the data contract (rules in ``preprocessing.rules``).

Refusals go to the ``rejected`` output as dead letters with the reason, the field at fault and
the record's source location, so nothing is ever dropped silently. A record is rejected only
for its own faults; a bad item vector drops that vector, not the item (a dead letter with
``dropped: "field"``).

Elements: readers give ``(loc, record)``; events leave as ``(user_id, (timestamp, item_id,
query, label, loc))``, items, users and query vectors as ``(key, (loc, row))`` until the width
check, which emits ``(key, row)``.
"""

from __future__ import annotations

import typing
from collections import Counter

import apache_beam as beam
from apache_beam.metrics import Metrics

from preprocessing.io import REJECTED, Sources, rejection
from preprocessing.rules import (  # noqa: F401  (parse_* re-exported for callers and tests)
    DEFAULT_RULES,
    Invalid,
    ParseRules,
    parse_event,
    parse_item,
    parse_query_vector,
    parse_user,
)
from seminar_tf.text import normalize_query

TIMESTAMP_BATCH = "timestamps"
COUNTS = "counts"
# Main outputs are (key, value) pairs; declared, because Beam's inference from a generator
# that also yields TaggedOutputs gives a Union that GroupByKey refuses.
_KEYED = tuple[str, typing.Any]


def _split(element):
    """``(loc, record)`` from a reader, or a bare record (then the location is unknown)."""
    if isinstance(element, tuple) and len(element) == 2 and isinstance(element[1], dict):
        return element
    return None, element


def _describe(sources: Sources | None, loc) -> str:
    return sources.describe(loc) if sources is not None else "unknown"


def _global(value):
    """Wraps a value emitted from ``finish_bundle`` (which has no input element to inherit
    a window from) in the global window."""
    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.windowed_value import WindowedValue

    return WindowedValue(value, GlobalWindow().max_timestamp(), [GlobalWindow()])


def event_record(user_id: str, event: tuple) -> dict:
    """A validated event back as a record, for its dead letter."""
    ts, item_id, query, label = event[:4]
    return {"user_id": user_id, "timestamp": ts, "item_id": item_id, "query": query, "label": label}


@beam.typehints.with_output_types(_KEYED)
class ValidateEvents(beam.DoFn):
    """Raw events -> ``(user_id, (timestamp, item_id, query, label, loc))``."""

    def __init__(self, rules: ParseRules = DEFAULT_RULES, sources: Sources | None = None):
        self._rules = rules
        self._sources = sources
        self._rejected = Metrics.counter("seminar", "events_rejected")

    def process(self, element):
        loc, record = _split(element)
        try:
            user_id, ts, item_id, query, label = parse_event(record, self._rules)
        except Invalid as e:
            self._rejected.inc()
            where = _describe(self._sources, loc)
            yield beam.pvalue.TaggedOutput(
                REJECTED, rejection("events", e.reason, e.field, record, where)
            )
            return
        yield user_id, (ts, item_id, query, label, loc)


class JoinCatalog(beam.DoFn):
    """Keeps events whose item is in the catalog (a side-input set); rejects the others.

    Also emits the bundle's timestamps (``timestamps`` output) for the global split cutoffs,
    and counts user ids, item ids, query strings and query tokens per bundle (emitted in
    ``finish_bundle`` as ``((kind, value), count)``): a hand-lifted combiner that keeps the
    vocabulary counts off the per-event path.
    """

    def __init__(self, max_query_tokens: int, sources: Sources | None = None):
        self._max_query_tokens = max_query_tokens
        self._sources = sources
        self._rejected = Metrics.counter("seminar", "events_item_not_in_catalog")
        self._catalog = None

    def start_bundle(self):
        self._counts = Counter()
        self._timestamps = []

    def process(self, element, catalog):
        from seminar_tf.text import tokenize_query

        if self._catalog is None:
            self._catalog = frozenset(catalog)
        user_id, event = element
        ts, item_id, query = event[:3]
        if item_id not in self._catalog:
            self._rejected.inc()
            where = _describe(self._sources, event[4] if len(event) > 4 else None)
            yield beam.pvalue.TaggedOutput(
                REJECTED,
                rejection(
                    "events", "item_not_in_catalog", "item_id", event_record(user_id, event), where
                ),
            )
            return
        self._timestamps.append(ts)
        self._counts[("item", item_id)] += 1
        self._counts[("user", user_id)] += 1
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


class _ValidateTableRows(beam.DoFn):
    """Raw table rows -> ``(key, (loc, clean row))`` by ``parse`` (which returns the row and
    its dropped fields); a bad record goes to ``rejected`` under ``stage``, a dropped field is
    reported (``dropped: "field"``) and the row kept without it."""

    stage, key = "", ""

    def __init__(self, rules: ParseRules = DEFAULT_RULES, sources: Sources | None = None):
        self._rules = rules
        self._sources = sources

    def parse(self, record, rules):
        raise NotImplementedError

    def process(self, element):
        loc, record = _split(element)
        where = _describe(self._sources, loc)
        try:
            row, dropped = self.parse(record, self._rules)
        except Invalid as e:
            yield beam.pvalue.TaggedOutput(
                REJECTED, rejection(self.stage, e.reason, e.field, record, where)
            )
            return
        for e in dropped:
            yield beam.pvalue.TaggedOutput(
                REJECTED,
                rejection(self.stage, e.reason, e.field, record, where, dropped="field"),
            )
        yield row[self.key], (loc, row)


@beam.typehints.with_output_types(_KEYED)
class ValidateItems(_ValidateTableRows):
    """Raw items -> ``(item_id, (loc, clean item))``; a bad record goes to ``rejected``, a
    bad vector is dropped from the item and reported (``dropped: "field"``)."""

    stage, key = "items", "item_id"

    def parse(self, record, rules):
        return parse_item(record, rules)


@beam.typehints.with_output_types(_KEYED)
class ValidateUsers(_ValidateTableRows):
    """Raw rows of the users table -> ``(user_id, (loc, clean user))``, with the item rules:
    a bad record goes to ``rejected``, a bad ``embedding`` is dropped from the user and
    reported (``dropped: "field"``)."""

    stage, key = "users", "user_id"

    def parse(self, record, rules):
        return parse_user(record, rules)


@beam.typehints.with_output_types(_KEYED)
class ValidateQueryVectors(beam.DoFn):
    """Raw query-vector rows -> ``(normalised query, (loc, row))``."""

    def __init__(self, rules: ParseRules = DEFAULT_RULES, sources: Sources | None = None):
        self._rules = rules
        self._sources = sources

    def process(self, element):
        loc, record = _split(element)
        try:
            row = parse_query_vector(record, self._rules)
        except Invalid as e:
            where = _describe(self._sources, loc)
            yield beam.pvalue.TaggedOutput(
                REJECTED, rejection("queries", e.reason, e.field, record, where)
            )
            return
        yield row["query"], (loc, row)


def _order(entry) -> tuple:
    loc = entry[0]
    return (loc is None, loc if loc is not None else 0, repr(entry[1]))


@beam.typehints.with_output_types(_KEYED)
class KeepFirstPerKey(beam.DoFn):
    """After a GroupByKey: keeps the first-seen row per key (input order: files as listed,
    then line or row; the shuffle order does not matter). Later copies equal to it are
    rejected as ``identical_duplicate``, different ones as ``conflicting_duplicate`` naming
    the differing fields and the kept row's location."""

    def __init__(self, stage: str, field: str, sources: Sources | None = None):
        self._stage = stage
        self._field = field
        self._sources = sources

    def process(self, element):
        key, entries = element
        entries = sorted(entries, key=_order)
        kept_loc, kept = entries[0]
        for loc, row in entries[1:]:
            where = _describe(self._sources, loc)
            if row == kept:
                reason = "identical_duplicate"
            else:
                diff = ", ".join(sorted(f for f in kept if kept.get(f) != row.get(f)))
                kept_at = _describe(self._sources, kept_loc)
                reason = f"conflicting_duplicate: differs in {diff} from the row kept at {kept_at}"
            yield beam.pvalue.TaggedOutput(
                REJECTED, rejection(self._stage, reason, self._field, row, where)
            )
        yield key, (kept_loc, kept)


@beam.typehints.with_output_types(_KEYED)
class CheckVectorDims(beam.DoFn):
    """Vectors whose length is not the data set's dimension (the side input): the vector is
    dropped (``drop_field``, items: the item keeps its other modalities) or the row rejected
    (query vectors, whose vector is the whole payload). Emits ``(key, row)``.

    The expected dimension of each vector field is the most common non-zero length, so a few
    corrupt rows never redefine the table's width.
    """

    def __init__(
        self,
        stage: str,
        fields: tuple[str, ...],
        sources: Sources | None = None,
        drop_field: bool = True,
    ):
        self._stage = stage
        self._fields = fields
        self._sources = sources
        self._drop_field = drop_field

    def process(self, element, dims):
        key, (loc, row) = element
        for field in self._fields:
            n = len(row[field])
            if not n or n == dims.get(field, 0):
                continue
            reason = f"wrong_vector_length: {n}, expected {dims.get(field, 0)}"
            where = _describe(self._sources, loc)
            dropped = "field" if self._drop_field else "record"
            yield beam.pvalue.TaggedOutput(
                REJECTED, rejection(self._stage, reason, field, row, where, dropped=dropped)
            )
            if not self._drop_field:
                return
            row = {**row, field: []}
        yield key, row


def vector_lengths(fields: tuple[str, ...]):
    """``(key, (loc, row))`` -> ``((field, length), 1)`` for each present vector."""

    def lengths(element):
        _, (_, row) = element
        return [((f, len(row[f])), 1) for f in fields if row[f]]

    return lengths


def dims_from_counts(counts: list) -> dict[str, int]:
    """``[((field, length), count)]`` -> ``{field: most common length}`` (ties: the longer)."""
    best: dict[str, tuple[int, int]] = {}
    for (field, length), count in counts:
        if (count, length) > best.get(field, (0, 0)):
            best[field] = (count, length)
    return {field: length for field, (_, length) in best.items()}
