"""Each preprocessing transform alone, with Beam's TestPipeline and assert_that."""

from __future__ import annotations

import random

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from preprocessing.io import REJECTED, Sources, make_loc
from preprocessing.sequences import (
    EncodeUserSequence,
    chunk_bounds,
    sort_events,
    tag_splits,
)
from preprocessing.tables import build_tables
from preprocessing.validate import (
    COUNTS,
    TIMESTAMP_BATCH,
    CheckVectorDims,
    Invalid,
    JoinCatalog,
    KeepFirstPerKey,
    ValidateEvents,
    ValidateItems,
    dims_from_counts,
    parse_event,
    parse_item,
)
from preprocessing.vocab import BuildVocabularies, order_vocabulary
from seminar_tf import spec

GOOD = {"user_id": "u1", "timestamp": 10, "item_id": "i1", "query": "Red Shoes", "label": 1}


@pytest.mark.parametrize(
    "change, reason, field",
    [
        ({"user_id": None}, "missing_field", "user_id"),
        ({"user_id": "  "}, "empty_field", "user_id"),
        ({"timestamp": "yesterday"}, "not_an_integer", "timestamp"),
        ({"timestamp": 1.5}, "not_an_integer", "timestamp"),
        ({"timestamp": -1}, "timestamp_out_of_range", "timestamp"),
        ({"timestamp": "99999999999999999999"}, "timestamp_out_of_range", "timestamp"),
        ({"timestamp": float("inf")}, "not_an_integer", "timestamp"),
        ({"item_id": ""}, "empty_field", "item_id"),
        ({"label": 2}, "label_not_0_or_1", "label"),
        ({"label": "yes"}, "label_not_0_or_1", "label"),
        ({"label": 0.5}, "label_not_0_or_1", "label"),
        ({"query": "x" * 1001}, "query_too_long", "query"),
        ({"item_id": "a\u2028b"}, "contains_line_break", "item_id"),
        ({"label": None}, "missing_field", "label"),
        ({"query": 5}, "not_a_string", "query"),
    ],
)
def test_parse_event_names_reason_and_field(change, reason, field):
    with pytest.raises(Invalid) as err:
        parse_event({**GOOD, **change})
    assert (err.value.reason.split(":")[0], err.value.field) == (reason, field)


def test_parse_event_accepts_csv_strings_and_missing_query():
    raw = {"user_id": 7, "timestamp": "12", "item_id": 3, "label": "0"}
    assert parse_event(raw) == ("7", 12, "3", "", 0)
    assert parse_event(GOOD) == ("u1", 10, "i1", "Red Shoes", 1)


@pytest.mark.parametrize(
    "label, expected",
    [(0, 0), (1, 1), ("0", 0), ("1", 1), (True, 1), (False, 0), ("true", 1), ("False", 0),
     (0.0, 0), (1.0, 1), ("1.0", 1), ("0.0", 0)],
)  # fmt: skip
def test_labels_parse_the_same_from_every_format(label, expected):
    assert parse_event({**GOOD, "label": label})[4] == expected


def test_parse_item_drops_bad_vectors_and_rejects_bad_attributes():
    item, dropped = parse_item(
        {"item_id": "a", "text_embedding": [1.0, float("nan")], "image_embedding": [1.0, 2.0]}
    )
    assert item["text_embedding"] == [] and item["image_embedding"] == [1.0, 2.0]
    assert [(e.reason, e.field) for e in dropped] == [("non_finite_value", "text_embedding")]
    _, dropped = parse_item({"item_id": "a", "image_embedding": "[1e400]"})
    assert [(e.reason, e.field) for e in dropped] == [("non_finite_value", "image_embedding")]
    with pytest.raises(Invalid) as err:
        parse_item({"item_id": "a", "attributes": "Drama|Comedy"})
    assert err.value.field == "attributes" and err.value.reason.startswith("invalid_list_cell")
    clean, dropped = parse_item({"item_id": "a", "attributes": [" Drama ", ""]})
    assert clean["attributes"] == ["Drama"] and clean["image_embedding"] == [] and not dropped


def test_validate_events_routes_bad_records_and_counts_input():
    bad = {**GOOD, "label": 3}
    sources = Sources(["events.csv"])
    rows = [
        (make_loc(0, 2), GOOD),
        (make_loc(0, 3), bad),
        (make_loc(0, 4), {**GOOD, "user_id": "u2"}),
    ]
    with TestPipeline() as p:
        out = (
            p
            | beam.Create(rows)
            | beam.ParDo(ValidateEvents(sources=sources)).with_outputs(REJECTED, main="valid")
        )
        assert_that(
            out.valid,
            equal_to(
                [
                    ("u1", (10, "i1", "Red Shoes", 1, make_loc(0, 2))),
                    ("u2", (10, "i1", "Red Shoes", 1, make_loc(0, 4))),
                ]
            ),
            label="valid",
        )
        assert_that(
            out[REJECTED]
            | beam.Map(lambda r: (r["reason"], r["field"], r["record"]["label"], r["source"])),
            equal_to([("label_not_0_or_1", "label", 3, "events.csv:line 3")]),
            label="rejected",
        )


def test_join_catalog_rejects_unknown_items_and_counts_vocab():
    events = [("u1", (1, "a", "Red red", 1)), ("u1", (2, "zzz", "", 0)), ("u2", (3, "a", "", 1))]
    with TestPipeline() as p:
        catalog = p | "Catalog" >> beam.Create(["a", "b"])
        out = (
            p
            | "Events" >> beam.Create(events)
            | beam.ParDo(JoinCatalog(5), beam.pvalue.AsList(catalog)).with_outputs(
                REJECTED, COUNTS, TIMESTAMP_BATCH, main="valid"
            )
        )
        assert_that(out.valid, equal_to([events[0], events[2]]), label="valid")
        assert_that(
            out[REJECTED] | beam.Map(lambda r: (r["reason"], r["record"]["item_id"])),
            equal_to([("item_not_in_catalog", "zzz")]),
            label="rejected",
        )
        assert_that(
            out[COUNTS] | beam.CombinePerKey(sum),
            equal_to(
                [
                    (("item", "a"), 2),
                    (("user", "u1"), 1),  # the event of unknown item "zzz" is not counted
                    (("user", "u2"), 1),
                    (("query", "red red"), 1),
                    (("query_token", "red"), 2),
                ]
            ),
            label="counts",
        )
        assert_that(out[TIMESTAMP_BATCH] | beam.FlatMap(lambda b: b), equal_to([1, 3]), label="ts")


def test_items_dedup_keeps_first_seen_and_width_check_drops_the_vector():
    files = ["b.csv", "a.csv"]  # input order: b.csv first, whatever the names sort as
    rows = [
        (make_loc(1, 2), {"item_id": "a", "text": "x", "text_embedding": [1.0, 2.0]}),
        (make_loc(0, 9), {"item_id": "a", "text": "y", "text_embedding": [1.0, 2.0]}),
        (make_loc(1, 3), {"item_id": "a", "text": "y", "text_embedding": [1.0, 2.0]}),
        (make_loc(0, 2), {"item_id": "b", "text_embedding": [1.0], "image_embedding": [5.0]}),
        (make_loc(0, 3), {"item_id": "c", "text_embedding": [3.0, 4.0]}),
    ]
    sources = Sources(files)
    with TestPipeline() as p:
        items = (
            p
            | beam.Create(rows)
            | beam.ParDo(ValidateItems(sources=sources)).with_outputs(REJECTED, main="valid")
        )
        unique = (
            items.valid
            | beam.GroupByKey()
            | beam.ParDo(KeepFirstPerKey("items", "item_id", sources)).with_outputs(
                REJECTED, main="valid"
            )
        )
        dims = p | "Dims" >> beam.Create([{"text_embedding": 2, "image_embedding": 1}])
        checked = unique.valid | beam.ParDo(
            CheckVectorDims("items", spec.ITEM_VECTOR_FIELDS, sources),
            beam.pvalue.AsSingleton(dims),
        ).with_outputs(REJECTED, main="valid")
        assert_that(
            checked.valid
            | beam.Map(
                lambda kv: (kv[0], kv[1]["text"], kv[1]["text_embedding"], kv[1]["image_embedding"])
            ),
            equal_to([("a", "y", [1.0, 2.0], []), ("b", "", [], [5.0]), ("c", "", [3.0, 4.0], [])]),
            label="kept",
        )
        assert_that(
            unique[REJECTED]
            | beam.Map(lambda r: (r["reason"].split(":")[0], r["record"]["text"], r["source"])),
            equal_to(
                [
                    ("identical_duplicate", "y", "a.csv:line 3"),
                    ("conflicting_duplicate", "x", "a.csv:line 2"),
                ]
            ),
            label="dups",
        )
        assert_that(
            checked[REJECTED]
            | beam.Map(lambda r: (r["field"], r["record"]["item_id"], r["dropped"], r["source"])),
            equal_to([("text_embedding", "b", "field", "b.csv:line 2")]),
            label="width",
        )


def test_dims_from_counts_takes_the_most_common_width():
    counts = [
        (("text_embedding", 384), 90),
        (("text_embedding", 3), 2),
        (("image_embedding", 64), 5),
    ]
    assert dims_from_counts(counts) == {"text_embedding": 384, "image_embedding": 64}


def test_vocabulary_order_min_count_and_transform():
    counted = [
        (("item", "b"), 3),
        (("item", "a"), 3),
        (("item", "c"), 1),
        (("query_token", "x"), 1),
    ]
    vocab = order_vocabulary(counted, {"item": 2, "query_token": 2})
    assert vocab["item"] == ["a", "b"] and vocab["query_token"] == []
    with TestPipeline() as p:
        out = (
            p
            | beam.Create([(("item", "b"), 1), (("item", "b"), 2), (("item", "a"), 1)])
            | BuildVocabularies({"item": 1})
        )
        assert_that(out | beam.Map(lambda v: v["item"]), equal_to([["b", "a"]]), label="vocab")


def test_sort_is_independent_of_arrival_order():
    events = [(5, "b", "", 1), (5, "a", "q", 0), (1, "z", "", 1), (9, "a", "", 1)]
    ref = sort_events(events)
    for seed in range(5):
        shuffled = events[:]
        random.Random(seed).shuffle(shuffled)
        got = sort_events(shuffled)
        for k in ref:
            assert list(got[k]) == list(ref[k])
    assert list(ref["item_id"]) == ["z", "a", "b", "a"]


def test_tag_splits_time_is_monotone_and_ties_share_a_split():
    ts = np.array([1, 2, 5, 5, 7, 9])
    split = tag_splits(ts, "time", (5, 9))
    assert split.tolist() == [0, 0, 1, 1, 1, 2]
    # No train target later than any valid/test target, for random data too.
    rng = np.random.default_rng(0)
    ts = np.sort(rng.integers(0, 100, 500))
    split = tag_splits(ts, "time", (60, 80))
    assert (
        ts[split == 0].max() < ts[split == 1].min() <= ts[split == 1].max() < ts[split == 2].min()
    )
    assert tag_splits(np.array([1, 2, 3]), "last").tolist() == [0, 1, 2]
    assert tag_splits(np.array([4]), "last").tolist() == [2]
    with pytest.raises(ValueError, match="split mode"):
        tag_splits(ts, "random")


def test_chunk_prefix_covers_every_targets_window():
    rng = np.random.default_rng(1)
    ts = np.sort(rng.integers(0, 300, 1000))
    labels = (rng.random(1000) < 0.3).astype(np.int64)
    L = 20
    for p, s, e in chunk_bounds(ts, labels, chunk_size=97, max_len=L):
        for t in range(s, e):
            earlier = np.flatnonzero(ts < ts[t])
            assert len(earlier) == 0 or earlier[-min(L, len(earlier))] >= p
            pos = earlier[labels[earlier] > 0]
            assert len(pos) == 0 or pos[-min(L, len(pos))] >= p


def test_encode_user_sequence_writes_chunks_with_prefix():
    from tensorflow.core.example import example_pb2

    events = [(t, f"i{t % 3}", "red hat" if t % 4 == 0 else "", t % 2) for t in range(25)]
    vocabs = {"item": ["i0", "i1"], "attribute": [], "query_token": ["red"], "query": []}
    with TestPipeline() as p:
        vocab_pc = p | "V" >> beam.Create([vocabs])
        split_pc = p | "S" >> beam.Create([()])
        out = (
            p
            | beam.Create([("u", events)])
            | beam.ParDo(
                EncodeUserSequence(max_len=4, chunk_size=10, max_query_tokens=3, split_mode="last"),
                beam.pvalue.AsSingleton(vocab_pc),
                beam.pvalue.AsSingleton(split_pc),
            ).with_outputs("user_stats", main="examples")
        )

        def decode(b):
            ex = example_pb2.Example.FromString(b)
            f = ex.features.feature
            return (
                f["chunk"].int64_list.value[0],
                f["num_prefix"].int64_list.value[0],
                list(f["timestamp"].int64_list.value),
                list(f["item"].int64_list.value)[:3],
                list(f["query_tokens"].int64_list.value)[:3],
                list(f["query"].int64_list.value)[:1],
            )

        decoded = out.examples | "Decode" >> beam.Map(decode)
        assert_that(
            decoded | "Shape" >> beam.Map(lambda d: (d[0], d[1], d[2][0], len(d[2]))),
            # chunk 1 starts at t=10; 4 events of history (and 4 clicks: t=3,5,7,9 -> from t=3)
            equal_to([(0, 0, 0, 10), (1, 7, 3, 17), (2, 7, 13, 12)]),
            label="chunks",
        )
        assert_that(
            decoded
            | beam.Filter(lambda d: d[0] == 0)
            | "Ids" >> beam.Map(lambda d: (d[3], d[4], d[5])),
            # items i0,i1,i2 -> 2,3,OOV(1); t=0 query "red hat": red=2, hat=OOV, query OOV
            equal_to([([2, 3, 1], [2, 1, 0], [1])]),
            label="ids",
        )
        assert_that(
            out["user_stats"], equal_to([(25, [23, 1, 1], [11, 1, 0], 3, 14)]), label="stats"
        )


def test_build_tables_aligns_rows_with_vocabulary_ids():
    vocabs = {"item": ["b", "a"], "attribute": ["red"], "query_token": [], "query": ["hi"]}
    items = [
        (
            "a",
            {
                "item_id": "a",
                "attributes": ["red", "blue"],
                "text_embedding": [1.0, 2.0],
                "image_embedding": [],
            },
        ),
        ("zz", {"item_id": "zz", "attributes": [], "text_embedding": [], "image_embedding": []}),
    ]
    queries = [("hi", {"query": "hi", "text_embedding": [0.5]})]
    dims = {"text_embedding": 2, "query_text_embedding": 1}
    t = build_tables(vocabs, items, queries, dims, max_attributes=3)
    assert t["item_text_vectors"].shape == (4, 2) and t["item_image_vectors"].shape == (4, 0)
    assert t["item_text_vectors"][3].tolist() == [1.0, 2.0]  # "a" is vocab entry 1 -> id 3
    assert t["item_has_text"].tolist() == [False, False, False, True]
    assert t["item_attributes"][3].tolist() == [2, 1, 0]  # red -> 2, blue -> OOV
    assert t["query_has_text"].tolist() == [False, False, True]
    assert set(t) == set(spec.TABLE_ARRAYS)


def test_timestamp_units_window_and_hints():
    from preprocessing.read_files import EpochSeconds
    from preprocessing.rules import ParseRules, parse_timestamp

    ms = ParseRules(timestamp_unit="ms")
    assert parse_timestamp("1505313200123", ms) == 1505313200
    assert parse_timestamp(1505313200123456789, ParseRules(timestamp_unit="ns")) == 1505313200
    # Typed Parquet timestamps are already seconds: the unit option does not apply again.
    assert parse_timestamp(EpochSeconds(1505313200), ms) == 1505313200
    for raw, hint in [(1505313200123, "milliseconds"), (1505313200123456, "microseconds")]:
        with pytest.raises(Invalid, match=f"looks like {hint}"):
            parse_timestamp(raw, ParseRules())
    window = ParseRules(min_timestamp=1_000, max_timestamp=2_000)
    assert parse_timestamp(1_999, window) == 1_999
    for raw in (999, 2_000, 2**64, -(2**70)):
        with pytest.raises(Invalid, match="timestamp_out_of_range"):
            parse_timestamp(raw, window)


def test_list_separator_applies_to_every_list_field():
    from preprocessing.rules import ParseRules

    rules = ParseRules(list_separator="|")
    item, dropped = parse_item(
        {"item_id": "a", "attributes": "Drama| Comedy|", "text_embedding": "0.5|1.5"}, rules
    )
    assert item["attributes"] == ["Drama", "Comedy"] and item["text_embedding"] == [0.5, 1.5]
    assert not dropped


def test_config_validates_new_options():
    from preprocessing.pipeline import PreprocessConfig

    base = {"events": ["e.csv"], "items": ["i.csv"], "out_dir": "o"}
    for bad in (
        {"timestamp_unit": "days"},
        {"min_timestamp": 10, "max_timestamp": 10},
        {"max_timestamp": 2**64},
        {"max_reject_fraction": 1.5},
        {"list_separator": ""},
        {"max_query_chars": 0},
        {"num_shards": -1},
    ):
        with pytest.raises(ValueError):
            PreprocessConfig(**base, **bad)
