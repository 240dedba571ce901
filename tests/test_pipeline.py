"""The whole preprocessing graph on small data, the tf.data windows, and the MovieLens run."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pyarrow as pa
import pytest

from preprocessing.pipeline import PreprocessConfig, run
from seminar_tf import spec
from seminar_tf.data.readers import read_table, write_table


def _raw_tables(seed: int = 0, users: int = 12, items: int = 30):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        n = int(rng.integers(3, 60))
        # Coarse timestamps on purpose: many ties inside a user's sequence.
        ts = np.sort(rng.integers(0, 400, n))
        for t in ts:
            rows.append(
                {
                    "user_id": f"u{u}",
                    "timestamp": int(t),
                    "item_id": f"i{int(rng.integers(0, items))}",
                    "query": "red shoes" if rng.random() < 0.3 else "",
                    "label": int(rng.random() < 0.5),
                }
            )
    events = pa.Table.from_pylist(rows)
    item_rows = [
        {
            "item_id": f"i{i}",
            "text": f"item {i}",
            "attributes": [f"genre{i % 4}", f"brand{i % 7}"],
            "text_embedding": rng.normal(size=4).astype(np.float32).tolist(),
            "image_embedding": rng.normal(size=3).astype(np.float32).tolist() if i % 2 else [],
        }
        for i in range(items)
    ]
    return events, pa.Table.from_pylist(item_rows)


def _preprocess(tmp, events, items, fmt="parquet", **kw):
    raw = os.path.join(tmp, "raw")
    e = write_table(events, os.path.join(raw, f"events.{fmt}"))
    i = write_table(items, os.path.join(raw, f"items.{fmt}"))
    cfg = PreprocessConfig(events=[e], items=[i], out_dir=os.path.join(tmp, "out"), **kw)
    return cfg.out_dir, run(cfg)


def _windows(out_dir, split, history="all", max_len=None):
    from seminar_tf.data.dataset import make_dataset

    rows = []
    ds = make_dataset(
        out_dir, split, batch_size=64, history=history, max_len=max_len, include_meta=True
    )
    for feats, label in ds:
        f = {k: v.numpy() for k, v in feats.items()}
        for b in range(len(label)):
            rows.append({k: v[b] for k, v in f.items()} | {"label": float(label[b])})
    return rows


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("small"))
    events, items = _raw_tables()
    out, stats = _preprocess(tmp, events, items, max_len=8, chunk_size=10)
    return out, stats, events


def test_outputs_exist_and_stats_account_for_every_event(small_run):
    out, stats, events = small_run
    for name in (spec.SCHEMA_FILE, spec.STATS_FILE, spec.TABLES_FILE):
        assert os.path.exists(os.path.join(out, name))
    for f in spec.VOCAB_FILES.values():
        assert os.path.exists(os.path.join(out, spec.VOCAB_DIR, f))
    assert stats["input_events"] == events.num_rows
    assert stats["used_events"] + stats["rejected_events"] == stats["input_events"]
    assert stats["accounting_ok"]
    assert sum(stats["targets_per_split"].values()) == stats["used_events"]
    assert stats["users"] == 12 and stats["output_bytes_per_event"] > 0
    data_spec = spec.DataSpec.load(out)
    assert (data_spec.text_dim, data_spec.image_dim, data_spec.max_len) == (4, 3, 8)


def test_time_split_has_no_leakage(small_run):
    out, _, _ = small_run
    by_split = {s: _windows(out, s) for s in spec.SPLIT_NAMES}
    assert all(by_split.values())
    train_max = max(r["timestamp"] for r in by_split["train"])
    valid_ts = [r["timestamp"] for r in by_split["valid"]]
    test_min = min(r["timestamp"] for r in by_split["test"])
    assert train_max < min(valid_ts) and max(valid_ts) < test_min
    total = sum(len(v) for v in by_split.values())
    assert total == json.load(open(os.path.join(out, spec.STATS_FILE)))["used_events"]


@pytest.mark.parametrize("history", ["all", "positive"])
def test_windows_hold_only_strictly_earlier_events(small_run, history):
    out, _, events = small_run
    # An independent reference from the raw table: sort each user's events by (ts, item).
    per_user = {}
    for r in events.to_pylist():
        per_user.setdefault(r["user_id"], []).append((r["timestamp"], r["item_id"], r["label"]))
    item_vocab = open(os.path.join(out, spec.VOCAB_DIR, "items.txt")).read().split("\n")[:-1]
    item_id = {v: i + spec.NUM_RESERVED_IDS for i, v in enumerate(item_vocab)}
    checked = 0
    for split in spec.SPLIT_NAMES:
        for r in _windows(out, split, history=history):
            seq = sorted(per_user[r["user_id"].decode()])
            earlier = [e for e in seq if e[0] < r["timestamp"]]
            if history == "positive":
                earlier = [e for e in earlier if e[2] == 1]
            expected = [item_id[e[1]] for e in earlier[-8:]]
            mask = r["hist_item"] != 0
            assert r["hist_item"][mask].tolist() == expected
            assert (r["hist_timestamp"][mask] < r["timestamp"]).all()
            assert not mask[: 8 - len(expected)].any()  # left-padded, most recent last
            if history == "positive":
                assert (r["hist_label"][mask] == 1).all()
            checked += 1
    assert checked > 100


def test_chunking_does_not_change_any_window(tmp_path):
    events, items = _raw_tables(seed=3, users=4)
    out_small, _ = _preprocess(str(tmp_path / "a"), events, items, max_len=6, chunk_size=7)
    out_big, _ = _preprocess(str(tmp_path / "b"), events, items, max_len=6, chunk_size=10_000)

    def key(rows):
        return sorted(
            (r["user_id"], int(r["timestamp"]), int(r["target_item"]), r["hist_item"].tolist())
            for r in rows
        )

    for split in spec.SPLIT_NAMES:
        for history in ("all", "positive"):
            assert key(_windows(out_small, split, history)) == key(
                _windows(out_big, split, history)
            )


def test_leave_last_out_tests_each_users_last_event(tmp_path):
    events, items = _raw_tables(seed=5, users=6)
    out, stats = _preprocess(str(tmp_path), events, items, max_len=5, split="last")
    assert stats["targets_per_split"]["test"] == 6
    last = {}
    for r in events.to_pylist():
        last[r["user_id"]] = max(last.get(r["user_id"], (-1, "")), (r["timestamp"], r["item_id"]))
    test_rows = _windows(out, "test")
    assert {r["user_id"].decode(): int(r["timestamp"]) for r in test_rows} == {
        u: t for u, (t, _) in last.items()
    }
    train_rows = _windows(out, "train")
    for r in train_rows:
        assert r["timestamp"] <= last[r["user_id"].decode()][0]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_bad_records_go_to_dead_letters_and_nothing_is_lost(tmp_path, fmt):
    events, items = _raw_tables(seed=1, users=3)
    raw = tmp_path / "raw"
    e = write_table(events, str(raw / f"events.{fmt}"))
    i = write_table(items, str(raw / f"items.{fmt}"))
    with open(e, "a") as f:
        if fmt == "csv":
            f.write("u9,notatime,i1,,1\n")  # bad timestamp
            f.write("u9,5,i1\n")  # wrong column count
            f.write("u9,5,unknown_item,,1\n")  # not in catalog
        else:
            f.write('{"user_id": "u9", "timestamp": "notatime", "item_id": "i1", "label": 1}\n')
            f.write("{broken json\n")
            f.write('{"user_id": "u9", "timestamp": 5, "item_id": "unknown_item", "label": 1}\n')
    cfg = PreprocessConfig(events=[e], items=[i], out_dir=str(tmp_path / "out"), max_len=4)
    stats = run(cfg)
    assert stats["input_events"] == events.num_rows + 3
    assert stats["used_events"] == events.num_rows and stats["rejected_events"] == 3
    assert stats["accounting_ok"]
    lines = []
    for path in glob.glob(str(tmp_path / "out" / spec.REJECTED_DIR / "*.jsonl")):
        lines += [json.loads(x) for x in open(path)]
    assert len(lines) == 3
    reasons = sorted(r["reason"].split(":")[0] for r in lines)
    assert "item_not_in_catalog" in reasons and "not_an_integer" in reasons
    assert all("record" in r and "stage" in r for r in lines)
    not_int = next(r for r in lines if r["reason"] == "not_an_integer")
    assert not_int["field"] == "timestamp"


def test_catalog_without_vectors_works(tmp_path):
    events, items = _raw_tables(seed=2, users=3)
    items = items.select(["item_id", "text", "attributes"])
    out, stats = _preprocess(str(tmp_path), events, items, max_len=4)
    data_spec = spec.DataSpec.load(out)
    assert (data_spec.text_dim, data_spec.image_dim, data_spec.query_text_dim) == (0, 0, 0)
    assert stats["accounting_ok"] and _windows(out, "train")


def test_readers_round_trip_every_format(tmp_path):
    _, items = _raw_tables(seed=4, users=1, items=5)
    for fmt in ("parquet", "csv", "jsonl"):
        path = write_table(items, str(tmp_path / f"items.{fmt}"))
        back = read_table(path)
        assert back.column("item_id").to_pylist() == items.column("item_id").to_pylist()
        assert back.column("attributes").to_pylist() == items.column("attributes").to_pylist()
        np.testing.assert_allclose(
            back.column("text_embedding").to_pylist(),
            items.column("text_embedding").to_pylist(),
            rtol=1e-6,
        )
    # A folder: pick by stem.
    folder = tmp_path / "folder"
    write_table(items, str(folder / "items.parquet"))
    assert read_table(str(folder), stem="items").num_rows == 5


def test_cli_errors_are_one_line(tmp_path, capsys):
    from seminar_tf.cli import main

    rc = main(
        [
            "preprocess",
            "--events",
            str(tmp_path / "missing.parquet"),
            "--items",
            str(tmp_path / "x.parquet"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "missing.parquet" in err[0]


def test_movielens_end_to_end(movielens_dir, tmp_path):
    from seminar_tf.cli import main

    out = tmp_path / "ml"
    rc = main(
        [
            "preprocess",
            "--format",
            "movielens",
            "--events",
            movielens_dir,
            "--out",
            str(out),
            "--max-len",
            "50",
        ]
    )
    assert rc == 0
    stats = json.load(open(out / spec.STATS_FILE))
    assert stats["input_events"] == 100_836 and stats["users"] == 610
    assert stats["accounting_ok"] and stats["rejected_events"] == 0
    data_spec = spec.DataSpec.load(str(out))
    assert (data_spec.text_dim, data_spec.image_dim, data_spec.query_text_dim) == (384, 64, 384)
    tables = np.load(out / spec.TABLES_FILE)
    assert 2900 <= tables["item_has_image"].sum() <= 2947
    assert stats["targets_per_split"]["train"] > 0.75 * stats["used_events"]


def test_cli_passes_beam_options_and_runs_multi_process(tmp_path):
    from seminar_tf.cli import main

    events, items = _raw_tables(seed=6, users=5)
    raw = tmp_path / "raw"
    write_table(events, str(raw / "events.parquet"))
    write_table(items, str(raw / "items.parquet"))
    rc = main(
        ["preprocess", "--events", str(raw), "--items", str(raw), "--out", str(tmp_path / "o"),
         "--max-len", "4", "--direct_num_workers=2", "--direct_running_mode=multi_processing"]
    )  # fmt: skip
    assert rc == 0
    stats = json.load(open(tmp_path / "o" / spec.STATS_FILE))
    assert stats["used_events"] == events.num_rows and stats["accounting_ok"]


def test_trim_and_buckets_keep_every_example_and_its_window(small_run):
    from seminar_tf.data.dataset import make_dataset

    out, _, _ = small_run

    def rows(**kw):
        got = []
        for f, y in make_dataset(out, "train", 16, history="all", include_meta=True, **kw):
            width = f["hist_item"].shape[1]
            assert width in (8,) or width >= (f["hist_item"].numpy() != 0).sum(1).max()
            for b in range(len(y)):
                h = f["hist_item"][b].numpy()
                got.append((f["user_id"][b].numpy(), int(f["timestamp"][b]),
                            int(f["target_item"][b]), tuple(h[h != 0])))  # fmt: skip
        return sorted(got)

    full = rows()
    assert rows(trim=True) == full
    assert rows(bucket_by_length=True) == full


# ------------------------------------------------------------------ the reader without TensorFlow
def _canonical(rows):
    """Examples as sortable tuples of every feature (an order-free comparison)."""
    out = []
    for row in rows:
        out.append(tuple(
            (k, np.asarray(v).tobytes() if not isinstance(v, bytes) else v)
            for k, v in sorted(row.items())
        ))  # fmt: skip
    return sorted(out)


def test_numpy_parser_reads_every_record_as_tensorflow_does(small_run):
    import tensorflow as tf

    from seminar_tf.data import numpy_reader
    from seminar_tf.data.dataset import parse_spec

    out, _, _ = small_run
    files = numpy_reader.example_files(out)
    count = 0
    for path in files:
        for serialized in numpy_reader.read_tfrecords(path):
            ours = numpy_reader.parse_record(serialized, path)
            theirs = tf.io.parse_single_example(serialized, parse_spec())
            assert set(ours) == set(theirs)
            for name, value in theirs.items():
                np.testing.assert_array_equal(np.asarray(ours[name]), value.numpy(), name)
            count += 1
    tf_count = sum(1 for _ in tf.data.TFRecordDataset(files))
    assert count == tf_count > 0


@pytest.mark.parametrize("history", ["all", "positive"])
@pytest.mark.parametrize("targets", ["all", "positive"])
def test_numpy_windows_equal_the_tf_data_windows(small_run, history, targets):
    from seminar_tf.data.dataset import make_dataset
    from seminar_tf.data.numpy_reader import WindowDataset

    out, _, _ = small_run
    for split in spec.SPLIT_NAMES:
        ours = WindowDataset(out, split, batch_size=7, history=history, targets=targets,
                             include_meta=True)  # fmt: skip
        rows = []
        for i in range(len(ours)):
            feats, label = ours[i]
            assert feats["hist_item"].shape == (len(label), 8)
            rows += [{k: v[b] for k, v in feats.items()} | {"label": float(label[b])}
                     for b in range(len(label))]  # fmt: skip
        ds = make_dataset(out, split, 64, history=history, targets=targets, include_meta=True)
        theirs = []
        for feats, label in ds:
            f = {k: v.numpy() for k, v in feats.items()}
            theirs += [{k: v[b] for k, v in f.items()} | {"label": float(label[b])}
                       for b in range(len(label))]  # fmt: skip
        assert len(rows) == len(theirs) == ours.num_targets
        for a, b in zip(rows[:1], theirs[:1]):
            assert {k: np.asarray(v).dtype for k, v in a.items() if k != "user_id"} == {
                k: np.asarray(v).dtype for k, v in b.items() if k != "user_id"
            }
        assert _canonical(rows) == _canonical(theirs), split


def test_numpy_batches_bucket_trim_shuffle_and_keep_every_example(small_run):
    from seminar_tf.data.numpy_reader import WindowDataset

    out, _, _ = small_run
    plain = WindowDataset(out, "train", batch_size=5)
    every = []
    for i in range(len(plain)):
        every += [tuple(r) for r in plain[i][0]["hist_item"]]
    ds = WindowDataset(out, "train", batch_size=5, bucket_by_length=True, shuffle=True, seed=1)
    seen, orders = [], []
    for _ in range(2):
        rows = []
        for i in range(len(ds)):
            feats, label = ds[i]
            width = feats["hist_item"].shape[1]
            longest = int(np.count_nonzero(feats["hist_item"], axis=1).max())
            assert width in (8,) and longest <= width  # max_len 8: one width
            rows += [tuple(np.pad(r, (8 - width, 0))) for r in feats["hist_item"]]
            assert len(label) == len(feats["target_item"]) <= 5
        seen.append(sorted(rows))
        orders.append(rows)
        ds.on_epoch_end()
    assert seen[0] == seen[1] == sorted(every)
    assert orders[0] != orders[1]  # reshuffled each epoch
    dropped = WindowDataset(out, "train", batch_size=5, drop_remainder=True)
    assert all(len(dropped[i][1]) == 5 for i in range(len(dropped)))
    assert len(dropped) == plain.num_targets // 5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bucket_batches_pool_remainders_into_full_batches(seed):
    from seminar_tf.data.numpy_reader import bucket_batches

    rng = np.random.default_rng(seed)
    rows = rng.permutation(1000)
    bucket = rng.choice(6, size=1000, p=[0.3, 0.25, 0.2, 0.1, 0.1, 0.05])
    batches = bucket_batches(rows, bucket, 64)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))  # each row once
    assert [len(b) for b in batches[:-1]] == [64] * (len(batches) - 1)
    assert len(batches) == -(-1000 // 64)
    by_row = dict(zip(rows.tolist(), bucket.tolist()))
    mixed = [b for b in batches if len({by_row[r] for r in b.tolist()}) > 1]
    # Only pooled remainders mix buckets: fewer than one remainder per bucket.
    assert sum(len(b) for b in mixed) < 6 * 64
    # Within a bucket, rows keep their given (shuffled) order.
    for k in range(6):
        seen = [r for b in batches for r in b.tolist() if by_row[r] == k]
        assert seen == [r for r in rows.tolist() if by_row[r] == k]
