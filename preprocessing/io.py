"""Reading raw tables (Parquet, CSV, JSON Lines) into ``(location, dict)`` records.

Each file is read by a DoFn of ours (``preprocessing.read_files``) over ``FileSystems.open``,
so every record keeps where it came from: a packed location (file index, line or row) that
gives first-seen order to the de-duplication and ``"file:line N"`` / ``"file:row N"`` to the
dead letters. A record that cannot be read (bad bytes, broken JSON, wrong cell count) becomes
a dead letter; nothing a file holds can stop the job.
"""

from __future__ import annotations

import apache_beam as beam

from seminar_tf.data.readers import detect_format

REJECTED = "rejected"
TALLY = "tally"
WARNINGS = "warnings"
# The ``field`` of a dead letter whose whole record (or file) is at fault.
WHOLE_RECORD = "_record"
WHOLE_FILE = "_file"

_LOC_BITS = 40
_LOC_MASK = (1 << _LOC_BITS) - 1

# Columns a stage cannot do without; a header or schema lacking one earns a warning (its
# records are then rejected one by one as missing_field, which the job's failure rule sees).
REQUIRED_COLUMNS = {
    "events": ("user_id", "timestamp", "item_id", "label"),
    "items": ("item_id",),
    "queries": ("query", "text_embedding"),
    "users": ("user_id",),
}


def make_loc(file_index: int, number: int) -> int:
    """Packs (file index, line or row number) into one int: cheap to carry with each event,
    and its order is the input order (files as listed, then line/row)."""
    return (file_index << _LOC_BITS) | number


class Sources:
    """The input files of one stage; turns a packed location back into ``file:line N``
    (text files, 1-based physical line where the record starts) or ``file:row N`` (Parquet,
    0-based row index)."""

    def __init__(self, files: list[str]):
        self.files = list(files)
        self._unit = ["row" if detect_format(f) == "parquet" else "line" for f in self.files]

    def describe(self, loc: int | None) -> str:
        if loc is None:
            return "unknown"
        index, number = loc >> _LOC_BITS, loc & _LOC_MASK
        if index >= len(self.files):
            return f"file #{index}:{number}"
        return f"{self.files[index]}:{self._unit[index]} {number}"


def rejection(
    stage: str,
    reason: str,
    field: str | None,
    record,
    source: str = "unknown",
    dropped: str = "record",
) -> dict:
    """A dead letter: which stage refused what, why, the field at fault and where it was.

    ``dropped`` is ``"record"`` (the record is not used; it counts as rejected) or
    ``"field"`` (only ``field`` was dropped; the record is used and is not counted as
    rejected, see ``stats.json`` ``dropped_fields``).
    """
    if not isinstance(record, (dict, str)):
        record = repr(record)
    return {
        "stage": stage,
        "reason": reason,
        "field": field or WHOLE_RECORD,
        "record": record,
        "source": source,
        "dropped": dropped,
    }


def rejection_key(r: dict) -> tuple:
    """The counting key of a dead letter: reason details after ``:`` are dropped."""
    return (r["stage"], r["reason"].split(":")[0], r["field"], r.get("dropped", "record"))


class ReadRecords(beam.PTransform):
    """Reads data files into ``(loc, dict)`` records.

    Returns ``{"records", "rejected", "tally", "warnings"}``: the records, the dead letters
    of unreadable ones, ``(("input", stage), n)`` record counts (read + unreadable, for the
    input = used + rejected accounting) and warning lines (empty or header-only files,
    missing columns). Files may mix formats; each is read by its extension.
    """

    def __init__(self, files: list[str], stage: str):
        super().__init__()
        if not files:
            raise ValueError(f"{stage}: no input files")
        self._files = list(files)
        self._stage = stage

    def expand(self, pbegin):
        from preprocessing.read_files import ListRowGroups, ReadRowGroup, ReadTextFile

        indexed = list(enumerate(self._files))
        parquet = [(i, f) for i, f in indexed if detect_format(f) == "parquet"]
        text = [(i, f) for i, f in indexed if detect_format(f) != "parquet"]
        outputs = (REJECTED, TALLY, WARNINGS)
        collected = {tag: [] for tag in ("records", *outputs)}

        def collect(result, with_records=True):
            if with_records:
                collected["records"].append(result.records)
            for tag in outputs:
                collected[tag].append(result[tag])

        if text:
            collect(
                pbegin
                | "ListTextFiles" >> beam.Create(text)
                | "SpreadTextFiles" >> beam.Reshuffle()
                | "ReadTextFiles"
                >> beam.ParDo(ReadTextFile(self._stage)).with_outputs(*outputs, main="records")
            )
        if parquet:
            listed = (
                pbegin
                | "ListParquetFiles" >> beam.Create(parquet)
                | "ListRowGroups"
                >> beam.ParDo(ListRowGroups(self._stage)).with_outputs(*outputs, main="groups")
            )
            collect(listed, with_records=False)
            collect(
                listed.groups
                | "SpreadRowGroups" >> beam.Reshuffle()
                | "ReadRowGroups"
                >> beam.ParDo(ReadRowGroup(self._stage)).with_outputs(*outputs, main="records")
            )
        return {
            tag: pcolls | f"Flatten_{tag}" >> beam.Flatten(pipeline=pbegin.pipeline)
            for tag, pcolls in collected.items()
        }
