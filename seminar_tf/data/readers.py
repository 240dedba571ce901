"""Readers for the raw data contract: Parquet, CSV and JSON Lines, a file or a folder.

These in-memory readers return ``pyarrow.Table``s and serve small data (tests, the MovieLens
adapter, notebooks). The Beam pipeline reads the same formats with its own per-file DoFns
(``preprocessing.io.ReadRecords``: line and row numbers, dead letters for unreadable records)
and shares :func:`resolve_files`, :func:`detect_format` and :func:`parse_cell`.

CSV cells holding list columns (``attributes``, ``text_embedding``, ``image_embedding``) are
JSON arrays (``["Drama","Comedy"]``, ``[0.1, 0.2]``); in JSON Lines they are plain arrays.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

# pyarrow is imported where a table is read or written: this module's DataError, file listing
# and format rules are used by pure-Python checks (seminar_tf.data.manifest) on machines
# without it.

FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}
LIST_FIELDS = ("attributes", "text_embedding", "image_embedding")

log = logging.getLogger("seminar.data")


class DataError(ValueError):
    """Bad input that the user must fix; the CLI prints it as one line."""


def detect_format(path: str) -> str:
    for ext, fmt in FORMATS.items():
        if path.endswith(ext) or path.endswith(ext + ".gz"):
            return fmt
    raise DataError(f"{path}: unknown format (expected one of {', '.join(FORMATS)})")


def resolve_files(path: str, stem: str | None = None) -> list[str]:
    """The data files at ``path``: the file itself, or the supported files in a folder.

    In a folder holding several tables (``events.parquet``, ``items.parquet``), ``stem`` picks
    the files whose name starts with it.
    """
    if os.path.isdir(path):
        entries = sorted(f for f in glob.glob(os.path.join(path, "*")) if os.path.isfile(f))
        files = [f for f in entries if _has_known_ext(f)]
        skipped = [os.path.basename(f) for f in entries if not _has_known_ext(f)]
        if skipped:
            # Never silently: a misnamed data file (events.txt) would otherwise just vanish.
            log.warning(
                "%s: skipping %d file(s) without a data extension (%s): %s",
                path,
                len(skipped),
                ", ".join(FORMATS),
                ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""),
            )
        if stem is not None:
            named = [f for f in files if os.path.basename(f).startswith(stem)]
            files = named or files
        if not files:
            raise DataError(f"{path}: no .parquet, .csv or .jsonl files in this folder")
        formats = {detect_format(f) for f in files}
        if len(formats) > 1:
            raise DataError(f"{path}: mixed formats {sorted(formats)}; keep one per folder")
        return files
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder")
    detect_format(path)
    return [path]


def _has_known_ext(path: str) -> bool:
    try:
        detect_format(path)
        return True
    except DataError:
        return False


def parse_cell(field: str, value, separator: str | None = None):
    """Decodes a text cell of a list field; other values pass through.

    Without ``separator`` the cell is a JSON array (``["Drama","Comedy"]``); with one it is
    the values joined by it (``Drama|Comedy``, MovieLens style). An empty cell is ``[]``.
    Raises ``ValueError`` (``json.JSONDecodeError`` is one) when the cell does not parse.
    """
    if field in LIST_FIELDS and isinstance(value, str):
        if value.strip() == "":
            return []
        if separator is not None:
            return [v.strip() for v in value.split(separator) if v.strip()]
        return json.loads(value)
    return value


def read_table(path: str, stem: str | None = None) -> pa.Table:
    """Reads every file at ``path`` (see :func:`resolve_files`) into one table."""
    import pyarrow as pa

    files = resolve_files(path, stem)
    fmt = detect_format(files[0])
    tables = [_read_one(f, fmt) for f in files]
    return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]


def _read_one(path: str, fmt: str) -> pa.Table:
    import pyarrow as pa

    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path)
    if fmt == "csv":
        import pyarrow.csv as pcsv

        table = pcsv.read_csv(
            path,
            convert_options=pcsv.ConvertOptions(
                column_types={"query": pa.string(), "user_id": pa.string(), "item_id": pa.string()},
                strings_can_be_null=False,
            ),
        )
        for field in LIST_FIELDS:
            if field in table.column_names:
                values = [parse_cell(field, v) for v in table.column(field).to_pylist()]
                idx = table.column_names.index(field)
                table = table.set_column(idx, field, pa.array(values))
        return table
    rows = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
    return pa.Table.from_pylist(rows)


def _json_cells(col) -> list[str]:
    """One JSON text per row of a column (floats in their shortest float32 form, so they
    read back exactly as float32)."""
    import numpy as np
    import pyarrow as pa

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    typ = arr.type
    if pa.types.is_list(typ) and pa.types.is_floating(typ.value_type):
        offsets = arr.offsets.to_numpy()
        flat = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32).astype(str)
        return ["[" + ",".join(flat[a:b]) + "]" for a, b in zip(offsets[:-1], offsets[1:])]
    if pa.types.is_integer(typ):
        return arr.to_numpy(zero_copy_only=False).astype(str).tolist()
    return [json.dumps(v, ensure_ascii=False, separators=(",", ":")) for v in arr.to_pylist()]


def write_table(table: pa.Table, path: str) -> str:
    """Writes ``table`` in the format named by ``path``'s extension.

    CSV has a header row and list columns as JSON arrays in the cell; an empty string is
    written as ``""`` (read it back as a string, not a null). JSON Lines has one object a
    row, list columns as plain arrays.
    """
    import pyarrow as pa

    fmt = detect_format(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    elif fmt == "csv":
        import pyarrow.csv as pcsv

        cols = [
            pa.array(_json_cells(table[c]), type=pa.string())
            if pa.types.is_list(table.schema.field(c).type)
            else table[c]
            for c in table.column_names
        ]
        pcsv.write_csv(pa.table(cols, names=table.column_names), path)
    else:
        keys = [json.dumps(c) + ":" for c in table.column_names]
        with open(path, "w", encoding="utf-8") as f:
            for start in range(0, max(table.num_rows, 1), 200_000):
                part = table.slice(start, 200_000)
                cells = [_json_cells(part[c]) for c in table.column_names]
                f.writelines(
                    "{" + ",".join(k + v for k, v in zip(keys, row)) + "}\n" for row in zip(*cells)
                )
    return path


def write_tables(tables: dict, out_dir: str, fmt: str = "parquet") -> dict[str, str]:
    """Writes ``{name: table}`` to ``out_dir/<name>.<fmt>``; returns ``{name: path}``."""
    if fmt not in FORMATS.values():
        raise DataError(f"format must be one of {sorted(set(FORMATS.values()))}, got {fmt!r}")
    return {
        name: write_table(table, os.path.join(out_dir, f"{name}.{fmt}"))
        for name, table in tables.items()
    }
