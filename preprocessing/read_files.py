"""Per-file readers: CSV and JSON Lines line by line, Parquet row group by row group.

Why not Beam's ReadAllFromText / ReadAllFromParquet: they lose the line or row number (no
first-seen order, no location in dead letters), ReadAllFromText splits a CSV record with a
quoted newline into two and dies on one non-UTF-8 byte. These read through ``FileSystems``
(any Beam filesystem, compressed files included), so the graph still runs on every runner.

Text is decoded with ``surrogateescape``: a bad byte becomes a lone surrogate instead of an
exception, and the record holding one is dead-lettered with the field it sits in.
"""

from __future__ import annotations

import csv
import io
import json

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from preprocessing.io import (
    REJECTED,
    REQUIRED_COLUMNS,
    TALLY,
    WARNINGS,
    WHOLE_FILE,
    WHOLE_RECORD,
    make_loc,
    rejection,
)
from seminar_tf.data.readers import detect_format

_BATCH_ROWS = 8192
# Embedding cells of a few thousand floats exceed csv's default 128 KiB field limit.
_CSV_FIELD_LIMIT = 64 << 20


class EpochSeconds(int):
    """A timestamp already in seconds since the epoch (converted from a typed Parquet/Arrow
    timestamp or date column): ``--timestamp-unit`` does not apply to it."""

    def __reduce__(self):
        return (EpochSeconds, (int(self),))


def _has_surrogate(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _printable(text: str) -> str:
    """Text for a dead letter: undecodable bytes shown as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _bad_field(record: dict) -> str | None:
    """The first field of a JSON record whose value (or key) holds an undecodable byte."""
    for key, value in record.items():
        if _has_surrogate(key):
            return WHOLE_RECORD
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, str) and _has_surrogate(v) for v in values):
            return key
    return None


def _warn(stage: str, message: str):
    # Collected into stats.json and logged once by the launcher (a worker's log may be on
    # another machine).
    return beam.pvalue.TaggedOutput(WARNINGS, f"{stage}: {message}")


def _missing_columns(stage: str, path: str, names) -> list:
    missing = [c for c in REQUIRED_COLUMNS.get(stage, ()) if c not in names]
    if not missing:
        return []
    return [
        _warn(
            stage,
            f"{path}: no column(s) {', '.join(missing)} (columns: {', '.join(names)}); "
            "its records will be rejected as missing_field",
        )
    ]


class ReadTextFile(beam.DoFn):
    """``(file index, path)`` of a CSV or JSON Lines file -> ``(loc, dict)`` records."""

    def __init__(self, stage: str):
        self._stage = stage

    def setup(self):
        csv.field_size_limit(_CSV_FIELD_LIMIT)

    def process(self, element):
        index, path = element
        fmt = detect_format(path)
        try:
            raw = FileSystems.open(path)
        except Exception as e:  # noqa: BLE001 - any filesystem error: a dead letter, not a crash
            yield _warn(self._stage, f"{path}: cannot open ({e}); skipped")
            yield beam.pvalue.TaggedOutput(
                REJECTED,
                rejection(self._stage, f"read_unreadable_file: {e}", WHOLE_FILE, path, path),
            )
            yield beam.pvalue.TaggedOutput(TALLY, (("input", self._stage), 1))
            return
        with raw:
            # newline="" lets csv see quoted newlines; JSON Lines records end at "\n" only, so
            # a "\u2028" inside a JSON string stays inside its record.
            text = io.TextIOWrapper(
                raw,
                encoding="utf-8",
                errors="surrogateescape",
                newline="" if fmt == "csv" else "\n",
            )
            read = self._csv(index, path, text) if fmt == "csv" else self._jsonl(index, path, text)
            count = 0
            for out in read:
                if isinstance(out, int):
                    count = out
                else:
                    yield out
        if count == 0:
            yield _warn(self._stage, f"{path}: no records (empty or header only); skipped")
        yield beam.pvalue.TaggedOutput(TALLY, (("input", self._stage), count))

    def _reject(self, reason, field, record, path, number):
        return beam.pvalue.TaggedOutput(
            REJECTED, rejection(self._stage, reason, field, record, f"{path}:line {number}")
        )

    def _csv(self, index, path, text):
        reader = csv.reader(text)
        try:
            header = next(reader)
        except StopIteration:
            yield 0
            return
        except csv.Error as e:
            yield _warn(self._stage, f"{path}: unreadable CSV header ({e}); skipped")
            yield 0
            return
        header = [h.strip().lstrip("\ufeff") for h in header]
        if any(_has_surrogate(h) for h in header):
            yield _warn(self._stage, f"{path}: the header is not UTF-8; skipped")
            yield 0
            return
        yield from _missing_columns(self._stage, path, header)
        count, line_before = 0, reader.line_num
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                count += 1
                yield self._reject(
                    f"read_invalid_csv: {e}", WHOLE_RECORD, "", path, line_before + 1
                )
                line_before = reader.line_num
                continue
            start, line_before = line_before + 1, reader.line_num
            if not cells or (len(cells) == 1 and not cells[0].strip() and len(header) > 1):
                continue  # a blank line is not a record
            count += 1
            if len(cells) != len(header):
                reason = f"read_csv_column_count: {len(cells)} cells, header has {len(header)}"
                record = ",".join(_printable(c) for c in cells)
                yield self._reject(reason, WHOLE_RECORD, record, path, start)
                continue
            bad = next((n for n, c in zip(header, cells) if _has_surrogate(c)), None)
            if bad is not None:
                record = {n: _printable(c) for n, c in zip(header, cells)}
                yield self._reject("read_invalid_utf8", bad, record, path, start)
                continue
            yield make_loc(index, start), dict(zip(header, cells))
        yield count

    def _jsonl(self, index, path, text):
        count = 0
        for number, line in enumerate(text, 1):
            if not line.strip():
                continue
            count += 1
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                reason = f"read_invalid_json: {e.msg}"
                yield self._reject(
                    reason, WHOLE_RECORD, _printable(line.rstrip("\n")), path, number
                )
                continue
            if not isinstance(record, dict):
                reason = "read_json_not_an_object"
                yield self._reject(
                    reason, WHOLE_RECORD, _printable(line.rstrip("\n")), path, number
                )
                continue
            bad = _bad_field(record) if _has_surrogate(line) else None
            if bad is not None:
                yield self._reject(
                    "read_invalid_utf8", bad, _printable(line.rstrip("\n")), path, number
                )
                continue
            yield make_loc(index, number), record
        yield count


class ListRowGroups(beam.DoFn):
    """``(file index, path)`` of a Parquet file -> ``(index, path, row group, first row)``."""

    def __init__(self, stage: str):
        self._stage = stage

    def process(self, element):
        import pyarrow.parquet as pq

        index, path = element
        try:
            with FileSystems.open(path) as f:
                meta = pq.ParquetFile(f).metadata
                names = meta.schema.to_arrow_schema().names
        except Exception as e:  # noqa: BLE001 - a corrupt file is a dead letter, not a crash
            yield _warn(self._stage, f"{path}: not a readable Parquet file ({e}); skipped")
            yield beam.pvalue.TaggedOutput(
                REJECTED,
                rejection(self._stage, f"read_unreadable_file: {e}", WHOLE_FILE, path, path),
            )
            yield beam.pvalue.TaggedOutput(TALLY, (("input", self._stage), 1))
            return
        if meta.num_rows == 0:
            yield _warn(self._stage, f"{path}: no rows; skipped")
            return
        yield from _missing_columns(self._stage, path, names)
        first = 0
        for group in range(meta.num_row_groups):
            yield index, path, group, first
            first += meta.row_group(group).num_rows


def _temporal_to_seconds(column) -> list:
    """A timestamp/date Arrow column -> ``EpochSeconds`` (floor) or None, by rule: timestamps
    in their unit (time zone aware ones are UTC instants already), dates at UTC midnight."""
    import pyarrow as pa

    typ = column.type
    if pa.types.is_timestamp(typ):
        per_second = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[typ.unit]
        raw = column.cast(pa.int64()).to_pylist()
    elif pa.types.is_date32(typ):
        days = column.cast(pa.int32()).to_pylist()
        per_second, raw = None, [None if v is None else v * 86_400 for v in days]
    else:  # date64: milliseconds
        per_second, raw = 1_000, column.cast(pa.int64()).to_pylist()
    if per_second:
        raw = [None if v is None else v // per_second for v in raw]
    return [None if v is None else EpochSeconds(v) for v in raw]


class ReadRowGroup(beam.DoFn):
    """``(index, path, row group, first row)`` -> ``(loc, dict)`` rows of that row group."""

    def __init__(self, stage: str):
        self._stage = stage

    def process(self, element):
        import pyarrow as pa
        import pyarrow.parquet as pq

        index, path, group, first = element
        count = 0
        with FileSystems.open(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(_BATCH_ROWS, row_groups=[group]):
                temporal = {
                    name: _temporal_to_seconds(batch.column(i))
                    for i, name in enumerate(batch.schema.names)
                    if pa.types.is_timestamp(batch.schema.field(i).type)
                    or pa.types.is_date(batch.schema.field(i).type)
                }
                rest = batch.select([n for n in batch.schema.names if n not in temporal])
                rows = rest.to_pylist() if rest.num_columns else [{} for _ in range(len(batch))]
                for name, values in temporal.items():
                    for row, value in zip(rows, values):
                        row[name] = value
                for j, row in enumerate(rows):
                    yield make_loc(index, first + count + j), row
                count += len(rows)
        yield beam.pvalue.TaggedOutput(TALLY, (("input", self._stage), count))
