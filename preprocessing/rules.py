"""The parsing rules of the data contract: one set for CSV, JSON Lines and Parquet.

Readers hand over raw values (CSV: strings; JSON: JSON types; Parquet: Arrow's Python
values); these functions turn them into clean values or raise :class:`Invalid` with a reason
and the field at fault, whatever format they came from.
"""

from __future__ import annotations

import dataclasses
import json
import math

from preprocessing.read_files import EpochSeconds
from seminar_tf import spec
from seminar_tf.text import normalize_query

SECONDS_PER_UNIT = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
UNIT_NAMES = {"ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds"}
MAX_INT64 = 2**63 - 1
DEFAULT_MIN_TIMESTAMP = 0
DEFAULT_MAX_TIMESTAMP = 4_102_444_800  # 2100-01-01T00:00:00Z, exclusive
DEFAULT_MAX_QUERY_CHARS = 1_000
_LABELS = {"0": 0, "1": 1, "false": 0, "true": 1, "0.0": 0, "1.0": 1}


@dataclasses.dataclass(frozen=True)
class ParseRules:
    """The configurable part of the rules (from ``PreprocessConfig``)."""

    timestamp_unit: str = "s"
    min_timestamp: int = DEFAULT_MIN_TIMESTAMP  # seconds, inclusive
    max_timestamp: int = DEFAULT_MAX_TIMESTAMP  # seconds, exclusive
    max_query_chars: int = DEFAULT_MAX_QUERY_CHARS
    list_separator: str | None = None  # None: list cells are JSON arrays


DEFAULT_RULES = ParseRules()


class Invalid(Exception):
    """A value that breaks the contract: ``reason`` (``name`` or ``name: detail``) and the
    field at fault (None: the whole record)."""

    def __init__(self, reason: str, field: str | None):
        super().__init__(reason)
        self.reason = reason
        self.field = field


def _text(value, field: str) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise Invalid("invalid_utf8", field) from None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise Invalid("not_a_string", field)
    return str(value)


def has_line_break(value: str) -> bool:
    """Whether ``value`` would span lines of a one-value-a-line vocabulary file."""
    return len(f"x{value}x".splitlines()) > 1


def required_str(record: dict, field: str) -> str:
    value = record.get(field)
    if value is None:
        raise Invalid("missing_field", field)
    value = _text(value, field).strip()
    if not value:
        raise Invalid("empty_field", field)
    return value


def _id(record: dict, field: str) -> str:
    value = required_str(record, field)
    if has_line_break(value):
        raise Invalid("contains_line_break", field)
    return value


def parse_integer(value, field: str) -> int:
    """An integer from an int, an integral finite float or a decimal string."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise Invalid("missing_field", field)
    if isinstance(value, bool):
        raise Invalid("not_an_integer", field)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise Invalid("not_an_integer", field)
        return int(value)
    text = _text(value, field).strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        raise Invalid("not_an_integer", field) from None
    if not math.isfinite(number) or not number.is_integer():
        raise Invalid("not_an_integer", field)
    return int(number)


def _utc(seconds: int) -> str:
    import datetime

    try:
        moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return "out of calendar range"
    return moment.strftime("%Y-%m-%d")


def parse_timestamp(value, rules: ParseRules) -> int:
    """Seconds since the epoch inside ``[min_timestamp, max_timestamp)``.

    Raw numbers are in ``rules.timestamp_unit`` (floored to seconds); typed Parquet
    timestamps/dates arrive as :class:`EpochSeconds`. Any size of integer is accepted here
    and judged by the window, so nothing overflows later.
    """
    if isinstance(value, EpochSeconds):
        raw, seconds, unit = int(value), int(value), "s"
    else:
        raw = parse_integer(value, "timestamp")
        unit = rules.timestamp_unit
        seconds = raw // SECONDS_PER_UNIT[unit]
    if rules.min_timestamp <= seconds < rules.max_timestamp:
        return seconds
    detail = (
        f"{raw} {unit} is {_utc(seconds) if abs(seconds) < 2**40 else 'far'} outside "
        f"[{_utc(rules.min_timestamp)}, {_utc(rules.max_timestamp)})"
    )
    per = SECONDS_PER_UNIT[unit]
    for finer in ("ms", "us", "ns"):
        factor = SECONDS_PER_UNIT[finer]
        if factor > per and rules.min_timestamp <= raw * per // factor < rules.max_timestamp:
            detail += f"; looks like {UNIT_NAMES[finer]}: see --timestamp-unit"
            break
    else:
        detail += "; see --timestamp-unit, --min-timestamp, --max-timestamp"
    raise Invalid(f"timestamp_out_of_range: {detail}", "timestamp")


def parse_label(value) -> int:
    """0 or 1 from 0/1, "0"/"1", true/false, "true"/"false", 0.0/1.0 (any format)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise Invalid("missing_field", "label")
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, (str, bytes)):
        label = _LABELS.get(_text(value, "label").strip().lower())
        if label is not None:
            return label
    raise Invalid("label_not_0_or_1", "label")


def parse_query(value, rules: ParseRules) -> str:
    if value is None:
        return ""
    query = _text(value, "query") if isinstance(value, bytes) else value
    if not isinstance(query, str):
        raise Invalid("not_a_string", "query")
    if len(query) > rules.max_query_chars:
        raise Invalid(f"query_too_long: {len(query)} > {rules.max_query_chars} chars", "query")
    return query


def parse_event(record: dict, rules: ParseRules = DEFAULT_RULES) -> tuple[str, int, str, str, int]:
    """``(user_id, timestamp, item_id, query, label)`` from a raw event, or raises Invalid."""
    if not isinstance(record, dict):
        raise Invalid("not_a_record", None)
    user_id = _id(record, "user_id")  # one line of vocab/users.txt
    timestamp = parse_timestamp(record.get("timestamp"), rules)
    item_id = _id(record, "item_id")
    query = parse_query(record.get("query"), rules)
    label = parse_label(record.get("label"))
    return user_id, timestamp, item_id, query, label


def parse_list(value, field: str, rules: ParseRules) -> list:
    """A list cell: a list (JSON/Parquet), a JSON-array string, or (``list_separator``) a
    separated string."""
    if value is None:
        return []
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (str, bytes)):
        text = _text(value, field)
        if not text.strip():
            return []
        if rules.list_separator is not None:
            return [v.strip() for v in text.split(rules.list_separator) if v.strip()]
        try:
            value = json.loads(text)
        except ValueError:
            hint = "; a JSON array is expected (see --list-separator for a|b|c cells)"
            raise Invalid(f"invalid_list_cell: {text[:40]!r}{hint}", field) from None
    if not isinstance(value, (list, tuple)):
        raise Invalid("not_a_list", field)
    return list(value)


def parse_vector(record: dict, field: str, rules: ParseRules) -> list[float]:
    values = parse_list(record.get(field), field, rules)
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError, OverflowError):
        raise Invalid("not_a_float_list", field) from None
    if any(isinstance(v, bool) for v in values):
        raise Invalid("not_a_float_list", field)
    # float32 is what the tables store: a finite float64 beyond its range is infinite there.
    if not all(math.isfinite(v) and abs(v) <= 3.4028234e38 for v in out):
        raise Invalid("non_finite_value", field)
    return out


def parse_item(record: dict, rules: ParseRules = DEFAULT_RULES) -> tuple[dict, list[Invalid]]:
    """A clean item and the per-field faults: a bad vector is dropped (``[]``, the item
    keeps its other modalities) and reported in the list; a bad id, text or attribute list
    rejects the item (raises Invalid)."""
    if not isinstance(record, dict):
        raise Invalid("not_a_record", None)
    item_id = _id(record, "item_id")
    text = record.get("text")
    text = "" if text is None else _text(text, "text")
    attributes = _string_list(record, "attributes", rules)
    item = {"item_id": item_id, "text": text, "attributes": attributes}
    dropped = []
    for field in ("text_embedding", "image_embedding"):
        try:
            item[field] = parse_vector(record, field, rules)
        except Invalid as e:
            item[field] = []
            dropped.append(e)
    return item, dropped


def _string_list(record: dict, field: str, rules: ParseRules) -> list[str]:
    """A list of strings (attributes): stripped, empty ones left out; a list of anything
    else, or a value with a line break (it could not be one line of a vocabulary), raises."""
    values = parse_list(record.get(field), field, rules)
    if not all(isinstance(v, str) for v in values):
        raise Invalid("not_a_string_list", field)
    values = [v.strip() for v in values if v.strip()]
    if any(has_line_break(v) for v in values):
        raise Invalid("contains_line_break", field)
    return values


def parse_user(record: dict, rules: ParseRules = DEFAULT_RULES) -> tuple[dict, list[Invalid]]:
    """A clean row of the users table (``spec.USER_FIELDS``) and its per-field faults, with
    the item rules: a bad ``embedding`` is dropped (``[]``, the user keeps its attributes)
    and reported in the list; a bad ``user_id`` or attribute list rejects the row (raises
    Invalid)."""
    if not isinstance(record, dict):
        raise Invalid("not_a_record", None)
    user = {
        "user_id": _id(record, "user_id"),
        "attributes": _string_list(record, "attributes", rules),
    }
    dropped = []
    for field in spec.USER_VECTOR_FIELDS:
        try:
            user[field] = parse_vector(record, field, rules)
        except Invalid as e:
            user[field] = []
            dropped.append(e)
    return user, dropped


def parse_query_vector(record: dict, rules: ParseRules = DEFAULT_RULES) -> dict:
    """A clean query-vector row (the vector is its only payload: a bad one rejects it)."""
    if not isinstance(record, dict):
        raise Invalid("not_a_record", None)
    query = normalize_query(parse_query(required_str(record, "query"), rules))
    vector = parse_vector(record, "text_embedding", rules)
    if not vector:
        raise Invalid("missing_field", "text_embedding")
    return {"query": query, "text_embedding": vector}
