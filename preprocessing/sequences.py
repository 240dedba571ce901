"""Per-user sequences: sort, tag splits, encode ids, chunk, serialise.

A user's events are stored once (as columns of one ``tf.train.Example`` per chunk of at most
``chunk_size`` events); the tf.data reader cuts each target's history window at read time. So
the output grows with the number of events, not events x L.

Memory per worker for one user of n events: the grouped events (n small tuples), their
numpy columns (about 40 bytes an event plus ``max_query_tokens`` ids), and one chunk's
Example at a time (chunk_size + prefix events). It does not grow with L beyond the prefix,
and serialised examples are yielded chunk by chunk, never all held at once.

A chunk's first ``num_prefix`` events are copies of the previous events, history only, so
every target in the chunk finds its whole window (up to L events, and up to L clicked events)
in its own record. The prefix starts before any earlier event that shares the first target's
timestamp, so the reader sees those ties and leaves them out of the history.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from preprocessing.vocab import lookup_table
from seminar_tf.spec import OOV_ID, SPLIT_TEST, SPLIT_TRAIN, SPLIT_VALID
from seminar_tf.text import normalize_query, tokenize_query

USER_STATS = "user_stats"


def drop_duplicate_events(events) -> tuple[list, list]:
    """``(kept, duplicates)``: events equal in (timestamp, item_id, query, label) to an
    earlier one are duplicates; the first seen (smallest location, when events carry one as
    their 5th element) is kept, so the result does not depend on the shuffle order."""
    ordered = sorted(events, key=lambda e: (e[:4], e[4] if len(e) > 4 and e[4] is not None else -1))
    kept, duplicates = [], []
    for event in ordered:
        if kept and kept[-1][:4] == event[:4]:
            duplicates.append(event)
        else:
            kept.append(event)
    return kept, duplicates


def sort_events(events) -> dict[str, np.ndarray]:
    """Events ``[(ts, item_id, query, label)]`` -> columns sorted by (timestamp, item_id).

    The item id tie-break makes the order (and so every window) independent of the order in
    which the shuffle delivered the events.
    """
    events = list(events)
    ts = np.fromiter((e[0] for e in events), np.int64, len(events))
    items = np.array([e[1] for e in events], dtype=object)
    order = np.lexsort((items.astype(str), ts))
    return {
        "timestamp": ts[order],
        "item_id": items[order],
        "query": np.array([events[i][2] for i in order], dtype=object),
        "label": np.fromiter((events[i][3] for i in order), np.int64, len(events)),
    }


def tag_splits(timestamps: np.ndarray, mode: str, split_times: tuple = ()) -> np.ndarray:
    """The split of each (sorted) event.

    ``time``: global cutoffs ``(t_valid, t_test)``; train ``ts < t_valid``, valid
    ``t_valid <= ts < t_test``, test ``ts >= t_test``. Equal timestamps share a split, so no
    train target is later than any valid or test target.
    ``last``: leave-last-out per user: the last event is test, the one before valid.
    """
    n = len(timestamps)
    if mode == "time":
        t_valid, t_test = split_times
        split = np.full(n, SPLIT_TRAIN, np.int64)
        split[timestamps >= t_valid] = SPLIT_VALID
        split[timestamps >= t_test] = SPLIT_TEST
        return split
    if mode == "last":
        split = np.full(n, SPLIT_TRAIN, np.int64)
        if n >= 1:
            split[-1] = SPLIT_TEST
        if n >= 2:
            split[-2] = SPLIT_VALID
        return split
    raise ValueError(f"split mode must be 'time' or 'last', got {mode!r}")


def chunk_bounds(
    timestamps: np.ndarray, labels: np.ndarray, chunk_size: int, max_len: int
) -> list[tuple[int, int, int]]:
    """``[(prefix_start, start, end)]``: chunk ``[start, end)`` of targets, with history-only
    events ``[prefix_start, start)`` enough for the L most recent events and the L most recent
    clicks strictly earlier than any target of the chunk."""
    n = len(timestamps)
    positives = np.flatnonzero(labels > 0)
    bounds = []
    for start in range(0, n, chunk_size):
        end = min(n, start + chunk_size)
        first_tie = int(np.searchsorted(timestamps, timestamps[start], side="left"))
        prefix_all = max(0, first_tie - max_len)
        n_pos_before = int(np.searchsorted(positives, first_tie, side="left"))
        prefix_pos = int(positives[n_pos_before - max_len]) if n_pos_before >= max_len else 0
        bounds.append((min(prefix_all, prefix_pos), start, end))
    return bounds


class EncodeUserSequence(beam.DoFn):
    """``(user_id, events)`` -> serialised ``tf.train.Example`` chunks (main output) and one
    ``(n_events, targets per split, clicks per split, n_chunks, n_prefix)`` per user
    (``user_stats`` output); exact duplicate events leave as dead letters (``rejected``).

    The stored ``user`` is the user's id in the user vocabulary (OOV when rarer than the
    minimum count) or, with ``user_hash_buckets`` N > 0, ``2 + hash % N``
    (``seminar_tf.user_hash``, the function the export graph computes too)."""

    def __init__(
        self,
        max_len: int,
        chunk_size: int,
        max_query_tokens: int,
        split_mode: str,
        sources=None,
        user_hash_buckets: int = 0,
    ):
        if chunk_size < 1 or max_len < 1:
            raise ValueError("chunk_size and max_len must be >= 1")
        self._max_len = max_len
        self._chunk_size = chunk_size
        self._q = max_query_tokens
        self._split_mode = split_mode
        self._sources = sources
        self._user_hash_buckets = int(user_hash_buckets)
        self._lookups = None
        self._chunks = Metrics.counter("seminar", "sequence_chunks")

    def setup(self):
        # Only the proto classes are needed; importing them pulls TensorFlow once per worker.
        from tensorflow.core.example import example_pb2

        self._example_pb2 = example_pb2

    def _lookup(self, vocabs):
        if self._lookups is None:
            self._lookups = {k: lookup_table(v) for k, v in vocabs.items()}
        return self._lookups

    def _encode_queries(self, queries, lookups):
        n = len(queries)
        query_ids = np.zeros(n, np.int64)
        tokens = np.zeros((n, self._q), np.int64)
        cache: dict[str, tuple[int, list[int]]] = {}
        for i, q in enumerate(queries):
            if not q or not q.strip():
                continue
            hit = cache.get(q)
            if hit is None:
                qid = lookups["query"].get(normalize_query(q), OOV_ID)
                toks = [lookups["query_token"].get(t, OOV_ID) for t in tokenize_query(q, self._q)]
                hit = cache[q] = (qid, toks)
            query_ids[i] = hit[0]
            tokens[i, : len(hit[1])] = hit[1]
        return query_ids, tokens

    def process(self, element, vocabs, split_times):
        from preprocessing.io import REJECTED, rejection
        from preprocessing.validate import event_record

        user_id, events = element
        lookups = self._lookup(vocabs)
        if self._user_hash_buckets:
            from seminar_tf.user_hash import hash_user_ids

            user = int(hash_user_ids([user_id], self._user_hash_buckets)[0])
        else:
            user = lookups.get("user", {}).get(user_id, OOV_ID)
        events, duplicates = drop_duplicate_events(events)
        for dup in duplicates:
            loc = dup[4] if len(dup) > 4 else None
            where = self._sources.describe(loc) if self._sources is not None else "unknown"
            record = event_record(user_id, dup)
            yield beam.pvalue.TaggedOutput(
                REJECTED, rejection("events", "duplicate_event", None, record, where)
            )
        cols = sort_events(events)
        n = len(cols["timestamp"])
        split = tag_splits(cols["timestamp"], self._split_mode, tuple(split_times or ()))
        items = np.fromiter((lookups["item"].get(i, OOV_ID) for i in cols["item_id"]), np.int64, n)
        query_ids, tokens = self._encode_queries(cols["query"], lookups)
        # clicks_before[i]: clicks among the user's first i events (the chunks' context)
        clicks_before = np.concatenate([[0], np.cumsum(cols["label"] > 0)])
        n_prefix_total = 0
        bounds = chunk_bounds(cols["timestamp"], cols["label"], self._chunk_size, self._max_len)
        for chunk, (p, s, e) in enumerate(bounds):
            n_prefix_total += s - p
            ex = self._example_pb2.Example()
            feat = ex.features.feature
            feat["user_id"].bytes_list.value.append(user_id.encode("utf-8"))
            feat["chunk"].int64_list.value.append(chunk)
            feat["num_prefix"].int64_list.value.append(s - p)
            feat["user"].int64_list.value.append(user)
            feat["events_before"].int64_list.value.append(p)
            feat["clicks_before"].int64_list.value.append(int(clicks_before[p]))
            feat["item"].int64_list.value.extend(items[p:e].tolist())
            feat["query"].int64_list.value.extend(query_ids[p:e].tolist())
            feat["query_tokens"].int64_list.value.extend(tokens[p:e].ravel().tolist())
            feat["timestamp"].int64_list.value.extend(cols["timestamp"][p:e].tolist())
            feat["label"].int64_list.value.extend(cols["label"][p:e].tolist())
            feat["split"].int64_list.value.extend(split[p:e].tolist())
            self._chunks.inc()
            yield ex.SerializeToString()
        per_split = np.bincount(split, minlength=3).tolist()
        clicks = np.bincount(split, weights=cols["label"], minlength=3).astype(int).tolist()
        yield beam.pvalue.TaggedOutput(
            USER_STATS, (n, per_split, clicks, len(bounds), n_prefix_total)
        )


class BuildUserSequences(beam.PTransform):
    """Keyed events -> group by user -> drop exact duplicates -> sort -> tag splits -> encode
    -> chunked Examples.

    Returns ``{"examples": bytes, "user_stats": tuples, "rejected": duplicate events}``.
    Duplicates are found here, where a user's events are together anyway (no extra
    shuffle); the vocabulary counts and split quantiles, taken before, count their copies.
    """

    def __init__(
        self,
        vocabs,
        split_times,
        max_len: int,
        chunk_size: int,
        max_query_tokens: int,
        split_mode: str,
        sources=None,
        user_hash_buckets: int = 0,
    ):
        super().__init__()
        self._vocabs = vocabs
        self._split_times = split_times
        self._fn = EncodeUserSequence(
            max_len, chunk_size, max_query_tokens, split_mode, sources, user_hash_buckets
        )

    def expand(self, keyed_events):
        out = (
            keyed_events
            | "GroupByUser" >> beam.GroupByKey()
            | "SortSplitEncode"
            >> beam.ParDo(
                self._fn,
                beam.pvalue.AsSingleton(self._vocabs),
                beam.pvalue.AsSingleton(self._split_times),
            ).with_outputs(USER_STATS, "rejected", main="examples")
        )
        return {"examples": out.examples, USER_STATS: out[USER_STATS], "rejected": out.rejected}
