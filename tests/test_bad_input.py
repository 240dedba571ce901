"""Bad input through the whole preprocessing graph: every fault is a dead letter with its
reason, field and source, the accounting (input = used + rejected) holds for every stage,
mostly rejected jobs fail with one line, and outputs are atomic."""

from __future__ import annotations

import csv
import glob
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from preprocessing.pipeline import PreprocessConfig, run
from seminar_tf import spec
from seminar_tf.data import synth
from seminar_tf.data.manifest import verify_output
from seminar_tf.data.readers import DataError, resolve_files, write_table


def _tables(seed=1, users=10, items=40):
    cfg = synth.SynthConfig(
        num_users=users, num_items=items, min_events=5, max_events=30, seed=seed
    )
    return synth.generate(cfg)


def _dead_letters(out_dir: str) -> list[dict]:
    rows = []
    for path in glob.glob(os.path.join(out_dir, spec.REJECTED_DIR, "*.jsonl")):
        rows += [json.loads(line) for line in open(path, encoding="utf-8")]
    return rows


def _check_accounting(stats: dict, out_dir: str) -> None:
    assert stats["accounting_ok"]
    for stage, books in stats["accounting"].items():
        assert books["input"] == books["used"] + books["rejected"], stage
    letters = _dead_letters(out_dir)
    for stage, books in stats["accounting"].items():
        records = [r for r in letters if r["stage"] == stage and r["dropped"] == "record"]
        assert len(records) == books["rejected"], stage
    assert all(r["field"] and r["source"] and r["source"] != "unknown" for r in letters)


def _csv_cell(value) -> str:
    return json.dumps(value) if isinstance(value, list) else str(value)


def _write_csv(path: str, rows: list[dict], extra: bytes = b"") -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(list(rows[0]))
        for r in rows:
            w.writerow([_csv_cell(v) for v in r.values()])
    with open(path, "ab") as f:
        f.write(extra)
    return path


# ------------------------------------------------------------------------------------------
# One CSV/JSON Lines run with a fault of each kind
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faulty")
    tables = _tables()
    events = tables["events"].to_pylist()
    items = tables["items"].to_pylist()
    queries = tables["queries"].to_pylist()
    raw = tmp / "raw"
    raw.mkdir()
    item = events[0]["item_id"]
    long_query = "x" * 1001
    extra_events = (
        f"u000000,1505313200000,{item},,1\n"  # milliseconds
        f"u000000,99999999999999999999,{item},,1\n"  # beyond int64
        f"u000000,9223372036854775808,{item},,0\n"  # int64 max + 1
        f"u000001,1505313201,{item},caf\xe9,1\n"  # not UTF-8 (written as latin-1 below)
        f'u000001,1505313202,{item},"red\nshoes",1\n'  # a quoted newline: one record
        f'u000001,1505313203,{item},"blue\u2028shoes",true\n'
        f'u000001,1505313204,{item},"green\rshoes\x85x",1.0\n'
        f"u000002,1505313205,{item},{long_query},0\n"
    )
    # The one non-UTF-8 byte (0xE9) goes in as raw bytes.
    encoded = extra_events.replace("caf\xe9", "CAFE").encode("utf-8").replace(b"CAFE", b"caf\xe9")
    dup = events[3]
    dup_line = (
        f"{dup['user_id']},{dup['timestamp']},{dup['item_id']},{dup['query']},{dup['label']}\n"
    )
    events_dir = raw / "events"
    events_dir.mkdir()
    _write_csv(str(events_dir / "events.csv"), events, encoded + dup_line.encode())
    (events_dir / "events_empty.csv").write_bytes(b"")
    (events_dir / "events_header.csv").write_text("user_id,timestamp,item_id,query,label\n")
    (events_dir / "events_notes.txt").write_text("not data\n")

    ids = [r["item_id"] for r in items[:5]]
    text_dim = len(items[0]["text_embedding"])
    items[0]["text_embedding"] = items[0]["text_embedding"][:-1]  # wrong length
    items[1]["image_embedding"] = [float("nan")] * len(items[1]["image_embedding"] or [0.0])
    rows = [dict(r) for r in items]
    rows.append(dict(items[3]))  # identical duplicate
    rows.append({**items[4], "text": "a conflicting copy"})  # conflicting: first seen kept
    item_csv = _write_csv(str(raw / "items.csv"), rows)
    # 1e400 (infinite once parsed) in the third item's text vector, by editing the text.
    text = open(item_csv, encoding="utf-8").read()
    first = json.dumps(items[2]["text_embedding"][0])
    text = text.replace(f"[{first},", "[1e400,", 1)
    open(item_csv, "w", encoding="utf-8").write(text)

    qpath = raw / "queries.jsonl"
    with open(qpath, "wb") as f:
        for q in queries:
            f.write(json.dumps(q).encode() + b"\n")
        f.write(
            json.dumps(
                {**queries[0], "text_embedding": [0.0] * len(queries[0]["text_embedding"])}
            ).encode()
            + b"\n"
        )
        f.write(b'{"query": "caf\xe9", "text_embedding": [1.0]}\n')
        f.write(b"{broken json\n")
    cfg = PreprocessConfig(
        events=resolve_files(str(events_dir), "events"),
        items=[item_csv],
        queries=[str(qpath)],
        out_dir=str(tmp / "out"),
        max_len=8,
    )
    stats = run(cfg)
    return {
        "out": cfg.out_dir, "stats": stats, "n_events": len(events), "n_items": len(items),
        "n_queries": len(queries), "ids": ids, "items": items, "text_dim": text_dim,
        "events_file": str(events_dir / "events.csv"), "events_dir": str(events_dir),
    }  # fmt: skip


def test_faulty_run_accounts_for_every_record(faulty_run):
    stats, out = faulty_run["stats"], faulty_run["out"]
    _check_accounting(stats, out)
    books = stats["accounting"]
    # 8 extra lines + 1 duplicate; a quoted newline is one record, empty files hold none.
    assert books["events"]["input"] == faulty_run["n_events"] + 9
    assert books["events"]["used"] == faulty_run["n_events"] + 3
    assert stats["rejected"]["events"] == {
        "timestamp_out_of_range": 3, "read_invalid_utf8": 1, "query_too_long": 1,
        "duplicate_event": 1,
    }  # fmt: skip
    assert books["items"] == {
        "input": faulty_run["n_items"] + 2, "used": faulty_run["n_items"], "rejected": 2,
        "ok": True,
    }  # fmt: skip
    assert books["queries"]["rejected"] == 3
    assert books["queries"]["used"] == faulty_run["n_queries"]
    assert len(stats["warnings"]) == 2
    assert any("events_empty.csv" in w for w in stats["warnings"])
    assert any("events_header.csv" in w for w in stats["warnings"])


def test_bad_vector_drops_only_that_vector(faulty_run):
    stats, out = faulty_run["stats"], faulty_run["out"]
    assert stats["dropped_fields"]["items"] == {"wrong_vector_length": 1, "non_finite_value": 2}
    assert "item_not_in_catalog" not in stats["rejected"].get("events", {})
    letters = [r for r in _dead_letters(out) if r["dropped"] == "field"]
    got = sorted((r["record"]["item_id"], r["field"], r["reason"].split(":")[0]) for r in letters)
    ids = faulty_run["ids"]
    assert got == sorted(
        [
            (ids[0], "text_embedding", "wrong_vector_length"),
            (ids[1], "image_embedding", "non_finite_value"),
            (ids[2], "text_embedding", "non_finite_value"),
        ]
    )
    assert all(r["stage"] == "items" and ":line " in r["source"] for r in letters)
    vocab = open(os.path.join(out, spec.VOCAB_DIR, "items.txt")).read().splitlines()
    tables = np.load(os.path.join(out, spec.TABLES_FILE))
    row = {v: i + spec.NUM_RESERVED_IDS for i, v in enumerate(vocab)}
    if ids[0] in row:  # the item keeps its image vector, loses only the text one
        assert not tables["item_has_text"][row[ids[0]]]
    assert tables["item_text_vectors"].shape[1] == faulty_run["text_dim"]


def test_timestamps_outside_the_window_are_dead_letters(faulty_run):
    letters = [r for r in _dead_letters(faulty_run["out"]) if r["reason"].startswith("timestamp")]
    assert len(letters) == 3 and all(r["field"] == "timestamp" for r in letters)
    ms = [r for r in letters if str(r["record"]["timestamp"]) == "1505313200000"]
    assert "looks like milliseconds" in ms[0]["reason"] and "--timestamp-unit" in ms[0]["reason"]


def test_duplicates_keep_the_first_seen(faulty_run):
    out, ids, items = faulty_run["out"], faulty_run["ids"], faulty_run["items"]
    letters = _dead_letters(out)
    dups = {r["reason"].split(":")[0]: r for r in letters if "duplicate" in r["reason"]}
    assert set(dups) == {"identical_duplicate", "conflicting_duplicate", "duplicate_event"}
    conflict = [
        r for r in letters if r["reason"].startswith("conflicting") and r["stage"] == "items"
    ]
    assert conflict[0]["record"]["text"] == "a conflicting copy"
    assert "items.csv:line 2" not in conflict[0]["source"]  # the later copy is the one refused
    assert any(r["stage"] == "queries" and r["reason"].startswith("conflicting") for r in letters)
    assert dups["duplicate_event"]["field"] == "_record"
    assert ids[4] == items[4]["item_id"]


def test_read_errors_name_file_line_and_field(faulty_run):
    letters = _dead_letters(faulty_run["out"])
    utf8 = sorted((r["stage"], r["field"]) for r in letters if r["reason"] == "read_invalid_utf8")
    assert utf8 == [("events", "query"), ("queries", "query")]
    event = next(
        r for r in letters if r["reason"] == "read_invalid_utf8" and r["stage"] == "events"
    )
    # header + events + 3 lines before it
    assert event["source"] == f"{faulty_run['events_file']}:line {faulty_run['n_events'] + 5}"
    broken = next(r for r in letters if r["reason"].startswith("read_invalid_json"))
    assert broken["field"] == "_record" and broken["source"].endswith(
        f"queries.jsonl:line {faulty_run['n_queries'] + 3}"
    )


def test_line_breaks_never_reach_a_vocabulary(faulty_run):
    out, stats = faulty_run["out"], faulty_run["stats"]
    for kind, name in spec.VOCAB_FILES.items():
        text = open(os.path.join(out, spec.VOCAB_DIR, name), encoding="utf-8").read()
        assert text.count("\n") == stats["vocab_sizes"][kind]
        assert len(text.splitlines()) == stats["vocab_sizes"][kind]
    queries = open(os.path.join(out, spec.VOCAB_DIR, "queries.txt"), encoding="utf-8").read()
    assert {"red shoes", "blue shoes", "green shoes x"} <= set(queries.split("\n"))


def test_folder_files_with_other_extensions_are_skipped_with_a_warning(faulty_run, caplog):
    with caplog.at_level("WARNING"):
        files = resolve_files(faulty_run["events_dir"], "events")
    assert not any(f.endswith(".txt") for f in files)
    assert "events_notes.txt" in caplog.text


# ------------------------------------------------------------------------------------------
# Parquet: typed timestamps, row locations
# ------------------------------------------------------------------------------------------
def test_parquet_typed_timestamps_and_row_locations(tmp_path):
    tables = _tables(seed=2, users=8)
    events = tables["events"]
    events = events.set_column(
        events.schema.get_field_index("timestamp"), "timestamp",
        events["timestamp"].cast(pa.timestamp("s")),
    )  # fmt: skip
    events = events.set_column(
        events.schema.get_field_index("label"), "label", events["label"].cast(pa.bool_())
    )
    events = pa.concat_tables([events, events.slice(2, 1)])  # a duplicate at the end
    items = tables["items"]
    conflicting = items.slice(5, 1).to_pylist()[0] | {"text": "other"}
    items = pa.concat_tables([items, pa.Table.from_pylist([conflicting], schema=items.schema)])
    e = str(tmp_path / "events.parquet")
    i = str(tmp_path / "items.parquet")
    pq.write_table(events, e, row_group_size=50)
    pq.write_table(items, i, row_group_size=7)
    cfg = PreprocessConfig(events=[e], items=[i], out_dir=str(tmp_path / "out"), max_len=8)
    stats = run(cfg)
    _check_accounting(stats, cfg.out_dir)
    assert stats["used_events"] == events.num_rows - 1
    assert stats["rejected"] == {
        "events": {"duplicate_event": 1}, "items": {"conflicting_duplicate": 1}
    }  # fmt: skip
    letters = {r["reason"].split(":")[0]: r for r in _dead_letters(cfg.out_dir)}
    assert letters["duplicate_event"]["source"] == f"{e}:row {events.num_rows - 1}"
    assert letters["conflicting_duplicate"]["source"] == f"{i}:row {items.num_rows - 1}"
    assert letters["conflicting_duplicate"]["record"]["text"] == "other"
    assert min(stats["split"]["split_times"]) > 1_000_000_000  # seconds, not nanoseconds


# ------------------------------------------------------------------------------------------
# Jobs that must fail
# ------------------------------------------------------------------------------------------
def _cli(args, capsys):
    from seminar_tf.cli import main

    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.err.strip().splitlines()


def _pipe_items(tmp_path) -> tuple[str, str]:
    tables = _tables(seed=3, users=6)
    raw = tmp_path / "raw"
    e = write_table(tables["events"], str(raw / "events.csv"))
    rows = tables["items"].select(["item_id", "text", "attributes"]).to_pylist()
    rows = [r | {"attributes": "|".join(r["attributes"])} for r in rows]
    i = _write_csv(str(raw / "items.csv"), rows)
    return e, i


def test_all_items_rejected_fails_with_one_line_and_no_output(tmp_path, capsys):
    e, i = _pipe_items(tmp_path)
    out = tmp_path / "out"
    rc, err = _cli(["preprocess", "--events", e, "--items", i, "--out", str(out)], capsys)
    assert rc != 0 and err[-1].startswith("seminar preprocess: error:")
    line = err[-1]
    assert "items/invalid_list_cell/attributes" in line and "--list-separator" in line
    assert "events/item_not_in_catalog/item_id" in line
    assert not out.exists()
    (failed,) = glob.glob(str(tmp_path / "out.failed-*"))
    assert failed in line
    stats = json.load(open(os.path.join(failed, spec.STATS_FILE)))
    _check_accounting(stats, failed)
    assert stats["accounting"]["items"]["used"] == 0
    with pytest.raises(DataError, match="failed"):
        verify_output(failed)
    # The same files with --list-separator "|" are fine.
    rc, _ = _cli(
        ["preprocess", "--events", e, "--items", i, "--out", str(out), "--list-separator", "|"],
        capsys,
    )
    assert rc == 0 and verify_output(str(out))
    stats = json.load(open(out / spec.STATS_FILE))
    _check_accounting(stats, str(out))
    assert stats["vocab_sizes"]["attribute"] > 0 and stats["rejected_events"] == 0


def test_missing_label_column_fails_naming_the_field(tmp_path, capsys):
    tables = _tables(seed=4, users=5)
    raw = tmp_path / "raw"
    events = tables["events"].rename_columns(
        ["clicked" if c == "label" else c for c in tables["events"].column_names]
    )
    e = write_table(events, str(raw / "events.csv"))
    i = write_table(tables["items"], str(raw / "items.csv"))
    rc, err = _cli(
        ["preprocess", "--events", e, "--items", i, "--out", str(tmp_path / "o")], capsys
    )
    assert rc != 0
    assert f"{events.num_rows} of {events.num_rows} events rejected" in err[-1]
    assert "events/missing_field/label" in err[-1]
    assert any("no column(s) label" in line for line in err)  # the reader's warning
    assert not (tmp_path / "o").exists()
