"""Tests of the synthetic data generator (seminar_tf.data.synth)."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
import pytest

from seminar_tf import spec
from seminar_tf.data.synth import SynthConfig, generate, write
from seminar_tf.text import normalize_query, tokenize_query

SPEC_TYPES = {
    "string": pa.string(),
    "int64": pa.int64(),
    "list<string>": pa.list_(pa.string()),
    "list<float32>": pa.list_(pa.float32()),
}
SMALL = SynthConfig(num_users=60, num_items=800, max_events=600, seed=3)


@pytest.fixture(scope="module")
def small():
    return generate(SMALL)


@pytest.fixture(scope="module")
def medium():
    """Enough events for the statistical checks (~60k events, a fraction of a second)."""
    return generate(SynthConfig(num_users=150, num_items=2000, seed=11))


def _user_codes(events: pa.Table) -> np.ndarray:
    return pa.compute.dictionary_encode(events["user_id"]).combine_chunks().indices.to_numpy()


def _positions(user: np.ndarray) -> np.ndarray:
    """Index of each event within its user (events are sorted by user)."""
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    lengths = np.diff(np.r_[starts, len(user)])
    return np.arange(len(user)) - np.repeat(starts, lengths)


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney U with average ranks for ties)."""
    order = np.argsort(score, kind="stable")
    s = score[order]
    ranks = np.empty(len(s))
    _, first, counts = np.unique(s, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    n_pos = y.sum()
    n_neg = len(y) - n_pos
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_schema_matches_spec(small):
    for name, fields in (
        ("events", spec.EVENT_FIELDS),
        ("items", spec.ITEM_FIELDS),
        ("queries", spec.QUERY_VECTOR_FIELDS),
    ):
        table = small[name]
        assert table.column_names == list(fields)
        for col, typ in fields.items():
            assert table.schema.field(col).type == SPEC_TYPES[typ], (name, col)
            assert table[col].null_count == 0, (name, col)


def test_ids_and_events_basics(small):
    ev = small["events"]
    users = ev["user_id"].to_pylist()
    items = set(small["items"]["item_id"].to_pylist())
    assert all(re.fullmatch(r"u\d{6}", u) for u in set(users))
    assert all(re.fullmatch(r"i\d{6}", i) for i in items)
    assert set(ev["item_id"].to_pylist()) <= items
    labels = ev["label"].to_numpy()
    assert set(np.unique(labels)) <= {0, 1}
    assert 0.3 <= labels.mean() <= 0.5
    # sorted by user, timestamps strictly increasing within a user, spanning years
    user = _user_codes(ev)
    ts = ev["timestamp"].to_numpy()
    assert np.all(np.diff(user) >= 0)
    same = user[1:] == user[:-1]
    assert np.all(np.diff(ts)[same] > 0)
    assert ts.max() - ts.min() > 2 * 365 * 86400
    # a share of events carry a query, the rest an empty string
    has_query = np.array([q != "" for q in ev["query"].to_pylist()])
    assert abs(has_query.mean() - SMALL.query_fraction) < 0.03


def test_determinism_and_seed(small):
    again = generate(SMALL)
    for name in small:
        assert small[name].equals(again[name]), name
    other = generate(SynthConfig(**{**SMALL.__dict__, "seed": SMALL.seed + 1}))
    assert not small["events"].equals(other["events"])
    assert not small["items"].equals(other["items"])


def test_lengths_between_min_and_max(small):
    counts = np.bincount(_user_codes(small["events"]))
    assert len(counts) == SMALL.num_users
    assert counts.min() >= SMALL.min_events
    assert counts.max() <= SMALL.max_events
    assert counts.max() == SMALL.max_events  # force_max_user
    assert np.median(counts) < counts.mean()  # heavy right tail


def test_very_long_users():
    cfg = SynthConfig(num_users=40, num_items=1000, max_events=15_000, seed=1)
    counts = np.bincount(_user_codes(generate(cfg)["events"]))
    assert counts.max() >= 10_000
    cfg = SynthConfig(
        num_users=100, num_items=1000, max_events=20_000, force_max_user=False, seed=2
    )
    counts = np.bincount(_user_codes(generate(cfg)["events"]))
    assert (counts >= 10_000).sum() >= 2  # log-uniform: ~10% of users above max / 2


def test_item_modalities(small):
    items = small["items"]
    text = items["text_embedding"].to_pylist()
    image = items["image_embedding"].to_pylist()
    assert all(len(v) == SMALL.text_dim for v in text)
    present = [v for v in image if len(v)]
    assert all(len(v) == SMALL.image_dim for v in present)
    missing = 1 - len(present) / len(image)
    assert abs(missing - SMALL.missing_image_fraction) < 0.05
    ratio = np.median(np.linalg.norm(present, axis=1)) / np.median(np.linalg.norm(text, axis=1))
    assert ratio > 10  # the image modality dominates by norm
    attrs = items["attributes"].to_pylist()
    assert all(1 <= len(a) <= 5 for a in attrs)
    assert all(a[0].startswith("genre_") for a in attrs)
    for i, (t, a) in enumerate(zip(items["text"].to_pylist(), attrs, strict=True)):
        assert t.startswith(f"item {i} ")
        assert a[0] in t.split()


def test_queries_related_to_attributes(small):
    ev = small["events"].to_pydict()
    items = small["items"].to_pydict()
    attr_words = {
        i: set(re.findall(r"\w+", " ".join(a)))
        for i, a in zip(items["item_id"], items["attributes"], strict=True)
    }
    table = dict(
        zip(small["queries"]["query"].to_pylist(), small["queries"]["text_embedding"].to_pylist())
    )
    assert len(table) == small["queries"].num_rows  # one row per distinct normalised query
    assert all(normalize_query(q) == q and q for q in table)
    raw = [q for q in ev["query"] if q]
    normalised = [normalize_query(q) for q in raw]
    assert set(normalised) == set(table)
    assert len(set(normalised)) < len(normalised) / 3  # queries repeat: a vocabulary
    assert any(q != n for q, n in zip(raw, normalised, strict=True))  # raw variants exist
    for q, item in zip(ev["query"], ev["item_id"], strict=True):
        if q:
            assert set(tokenize_query(q, 5)) & attr_words[item], (q, item)
    assert all(len(v) == SMALL.text_dim for v in table.values())


def test_query_vectors_are_views_of_topics(medium):
    """A one-word genre query's vector is nearest to the mean text vector of that genre."""
    items = medium["items"].to_pydict()
    genre = np.array([a[0] for a in items["attributes"]])
    text = np.asarray(items["text_embedding"], dtype=np.float64)
    names = np.unique(genre)
    centres = np.stack([text[genre == g].mean(0) for g in names])
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    queries = medium["queries"].to_pydict()
    hits = []
    for q, v in zip(queries["query"], queries["text_embedding"], strict=True):
        if re.fullmatch(r"genre_\d+", q):
            hits.append(names[np.argmax(centres @ np.asarray(v))] == q)
    assert len(hits) >= 10
    assert np.mean(hits) > 0.8


def test_lifelong_signal(medium):
    """The target genre's share in the full history predicts clicks clearly better than its
    share in the last 20 events, which beats no history (AUC 0.5)."""
    ev, items = medium["events"], medium["items"]
    genre_of = {
        i: int(a[0].split("_")[1])
        for i, a in zip(items["item_id"].to_pylist(), items["attributes"].to_pylist(), strict=True)
    }
    g = np.array([genre_of[i] for i in ev["item_id"].to_pylist()], dtype=np.int64)
    user = _user_codes(ev).astype(np.int64)
    pos = _positions(user)
    y = ev["label"].to_numpy()
    span, n_genres = int(pos.max()) + 2, int(g.max()) + 1
    key = (user * n_genres + g) * span
    sorted_keys = np.sort(key + pos)

    def count_before(p):  # earlier events of the user with the target's genre, at index >= p
        return np.searchsorted(sorted_keys, key + pos) - np.searchsorted(sorted_keys, key + p)

    full = count_before(0) / np.maximum(pos, 1)
    lo = np.maximum(pos - 20, 0)
    short = count_before(lo) / np.maximum(pos - lo, 1)
    auc_full, auc_short = _auc(y, full), _auc(y, short)
    assert auc_short > 0.6
    assert auc_full > auc_short + 0.05, (auc_full, auc_short)


def test_lifelong_signal_with_clicks(medium):
    """Same check for logistic regressions that also see the clicked share of the genre."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    ev, items = medium["events"], medium["items"]
    genre_of = {
        i: int(a[0].split("_")[1])
        for i, a in zip(items["item_id"].to_pylist(), items["attributes"].to_pylist(), strict=True)
    }
    g = np.array([genre_of[i] for i in ev["item_id"].to_pylist()], dtype=np.int64)
    user = _user_codes(ev).astype(np.int64)
    pos = _positions(user)
    y = ev["label"].to_numpy()
    span, n_genres = int(pos.max()) + 2, int(g.max()) + 1
    key = (user * n_genres + g) * span
    all_keys = np.sort(key + pos)
    clicked_keys = np.sort((key + pos)[y == 1])

    def share(keys, window):
        lo = np.zeros_like(pos) if window is None else np.maximum(pos - window, 0)
        n = np.searchsorted(keys, key + pos) - np.searchsorted(keys, key + lo)
        return np.sqrt(n / np.maximum(pos - lo, 1))

    feats = {
        "full": np.c_[share(all_keys, None), share(clicked_keys, None)],
        "short": np.c_[share(all_keys, 20), share(clicked_keys, 20)],
    }
    auc = {}
    for name, x in feats.items():
        model = sklearn.LogisticRegression().fit(x, y)
        auc[name] = _auc(y, model.decision_function(x))
    assert auc["full"] > auc["short"] + 0.015, auc


def _check_events(table, back):
    for col in table.column_names:
        assert back[col].to_pylist() == table[col].to_pylist(), col


def _check_lists(table, rows):
    for col in table.column_names:
        expect = table[col].to_pylist()
        got = rows[col]
        if pa.types.is_list(table.schema.field(col).type) and pa.types.is_floating(
            table.schema.field(col).type.value_type
        ):
            for e, g in zip(expect, got, strict=True):
                np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(e, np.float32))
        else:
            assert got == expect, col


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_write_round_trip(small, fmt, tmp_path):
    paths = write(small, str(tmp_path), fmt)
    assert set(paths) == {"events", "items", "queries"}
    for name, path in paths.items():
        assert path == str(tmp_path / f"{name}.{fmt}")
        table = small[name]
        if fmt == "parquet":
            assert pq.read_table(path).equals(table)
        elif fmt == "csv":
            types = {
                c: pa.int64() if t == "int64" else pa.string()
                for c, t in {
                    **spec.EVENT_FIELDS,
                    **spec.ITEM_FIELDS,
                    **spec.QUERY_VECTOR_FIELDS,
                }.items()
            }
            back = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=types))
            assert back.column_names == table.column_names
            rows = {
                c: [json.loads(v) for v in back[c].to_pylist()]
                if pa.types.is_list(table.schema.field(c).type)
                else back[c].to_pylist()
                for c in back.column_names
            }
            _check_lists(table, rows)
        else:
            back = pajson.read_json(path)
            assert back.column_names == table.column_names
            _check_lists(table, back.to_pydict())
            with open(path) as f:
                first = json.loads(f.readline())
            assert list(first) == table.column_names


def test_csv_readable_by_pandas(small, tmp_path):
    pd = pytest.importorskip("pandas")
    paths = write(small, str(tmp_path), "csv")
    ev = pd.read_csv(paths["events"], keep_default_na=False, dtype={"query": str})
    _check_events(small["events"], pa.Table.from_pandas(ev, preserve_index=False))
    items = pd.read_csv(paths["items"], keep_default_na=False)
    assert items["attributes"].map(json.loads).tolist() == small["items"]["attributes"].to_pylist()


def test_config_validation():
    with pytest.raises(ValueError):
        generate(SynthConfig(min_events=50, max_events=10))
    with pytest.raises(ValueError):
        write({}, "/tmp/unused", fmt="xml")


def test_no_queries():
    tables = generate(SynthConfig(num_users=10, num_items=200, query_fraction=0.0))
    assert set(tables["events"]["query"].to_pylist()) == {""}
    assert tables["queries"].num_rows == 0
