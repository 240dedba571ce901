"""Reading raw tables (Parquet, CSV, JSON Lines) into dicts, with Beam's own IO."""

from __future__ import annotations

import csv
import io
import json

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from seminar_tf.data.readers import detect_format, parse_cell

REJECTED = "rejected"


def rejection(stage: str, reason: str, field: str | None, record) -> dict:
    """A dead-letter entry: which stage refused which record, why, and the field at fault."""
    if not isinstance(record, (dict, str)):
        record = repr(record)
    return {"stage": stage, "reason": reason, "field": field, "record": record}


class _ParseJsonLine(beam.DoFn):
    def __init__(self, stage: str):
        self._stage = stage

    def process(self, element):
        filename, line = element
        if not line.strip():
            return
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            yield beam.pvalue.TaggedOutput(
                REJECTED,
                rejection(self._stage, f"read_invalid_json: {e.msg} ({filename})", None, line),
            )
            return
        if not isinstance(record, dict):
            yield beam.pvalue.TaggedOutput(
                REJECTED, rejection(self._stage, "read_json_not_an_object", None, line)
            )
            return
        yield record


class _ParseCsvLine(beam.DoFn):
    def __init__(self, stage: str, headers: dict[str, list[str]]):
        self._stage = stage
        self._headers = headers

    def process(self, element):
        filename, line = element
        if not line.strip():
            return
        header = self._headers[filename]
        try:
            cells = next(csv.reader(io.StringIO(line)))
        except csv.Error as e:
            yield beam.pvalue.TaggedOutput(
                REJECTED, rejection(self._stage, f"read_invalid_csv: {e}", None, line)
            )
            return
        if len(cells) != len(header):
            yield beam.pvalue.TaggedOutput(
                REJECTED,
                rejection(
                    self._stage,
                    f"read_csv_column_count: {len(cells)} cells, header has {len(header)}",
                    None,
                    line,
                ),
            )
            return
        record = {}
        for name, cell in zip(header, cells):
            try:
                record[name] = parse_cell(name, cell)
            except json.JSONDecodeError:
                yield beam.pvalue.TaggedOutput(
                    REJECTED, rejection(self._stage, "read_invalid_list_cell", name, line)
                )
                return
        yield record


def _read_csv_header(path: str) -> list[str]:
    with FileSystems.open(path) as f:
        first = io.TextIOWrapper(f, encoding="utf-8").readline()
    return next(csv.reader(io.StringIO(first)))


class ReadRecords(beam.PTransform):
    """Reads data files into dicts; unparseable lines leave through the ``rejected`` output.

    Returns a ``DoOutputsTuple`` with ``.records`` (dicts) and ``.rejected`` (dead letters).
    CSV rows must be one line each (list cells are JSON arrays, which have no newlines).
    """

    def __init__(self, files: list[str], stage: str):
        super().__init__()
        if not files:
            raise ValueError(f"{stage}: no input files")
        self._files = list(files)
        self._stage = stage
        self._format = detect_format(self._files[0])

    def expand(self, pbegin):
        files = pbegin | "ListFiles" >> beam.Create(self._files)
        if self._format == "parquet":
            records = files | "ReadParquet" >> beam.io.ReadAllFromParquet()
            empty = pbegin | "NoParseErrors" >> beam.Create([])
            return {"records": records, REJECTED: empty}
        lines = files | "ReadLines" >> beam.io.ReadAllFromText(
            with_filename=True, skip_header_lines=1 if self._format == "csv" else 0
        )
        if self._format == "csv":
            headers = {f: _read_csv_header(f) for f in self._files}
            parser = _ParseCsvLine(self._stage, headers)
        else:
            parser = _ParseJsonLine(self._stage)
        parsed = lines | "Parse" >> beam.ParDo(parser).with_outputs(REJECTED, main="records")
        return {"records": parsed.records, REJECTED: parsed[REJECTED]}
