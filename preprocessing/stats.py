"""``schema.json`` and ``stats.json``: sizes, counts, the record accounting, and the rule that
fails a job whose input was mostly rejected.

Accounting, per stage (events, items, queries, users): ``input`` = records read (unreadable
ones included) = ``used`` + ``rejected``. A dead letter with ``dropped: "field"`` (a bad item
or user vector dropped from a row that is still used) is counted in ``dropped_fields``, not in
``rejected``.
"""

from __future__ import annotations

import json

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

from seminar_tf import spec

STAGES = ("events", "items", "queries", "users")
# Where a failure message can point the user for a frequent cause.
HINTS = {
    "invalid_list_cell": "list cells are JSON arrays unless --list-separator is given",
    "timestamp_out_of_range": "see --timestamp-unit, --min-timestamp, --max-timestamp",
    "missing_field": "check the column names in the CSV header or Parquet schema",
    "item_not_in_catalog": "their item is not among the accepted items",
}


def write_json(path: str, obj) -> None:
    with FileSystems.create(path) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True).encode("utf-8"))


def _percentiles(values: list[int]) -> dict:
    if not values:
        return {}
    arr = np.asarray(values)
    return {f"p{q}": float(np.percentile(arr, q)) for q in (0, 50, 90, 99, 100)}


def accounting(counts: dict, used_events: int) -> dict:
    """``{stage: {input, used, rejected, ok}}`` from the summed ``counts``."""
    out = {}
    for stage in STAGES:
        n_in = counts.get(("input", stage), 0)
        used = used_events if stage == "events" else counts.get(("used", stage), 0)
        rejected = sum(
            n
            for key, n in counts.items()
            if key[0] == "rejected" and key[1] == stage and key[4] == "record"
        )
        out[stage] = {
            "input": n_in,
            "used": used,
            "rejected": rejected,
            "ok": n_in == used + rejected,
        }
    return out


class Summarise(beam.DoFn):
    """Writes ``schema.json`` and the pipeline's part of ``stats.json`` (``_pipeline_stats``)."""

    def __init__(self, config):
        self._config = config

    def process(self, sizes, user_stats, counts, split_times, vocabs, warnings):
        cfg = self._config
        data_spec = spec.DataSpec(
            num_items=sizes["num_items"],
            num_attributes=sizes["num_attributes"],
            num_query_tokens=sizes["num_query_tokens"],
            num_queries=sizes["num_queries"],
            num_users=(cfg.user_hash_buckets or len(vocabs.get("user", ())))
            + spec.NUM_RESERVED_IDS,
            max_attributes=cfg.max_attributes,
            max_query_tokens=cfg.max_query_tokens,
            text_dim=sizes["text_dim"],
            image_dim=sizes["image_dim"],
            query_text_dim=sizes["query_text_dim"],
            max_len=cfg.max_len,
            chunk_size=cfg.chunk_size,
            split_mode=cfg.split,
            split_times=tuple(split_times or ()),
            num_user_attributes=sizes.get("num_user_attributes", 0),
            max_user_attributes=sizes.get("max_user_attributes", 0),
            user_embedding_dim=sizes.get("user_embedding_dim", 0),
            user_hash_buckets=cfg.user_hash_buckets,
            min_query_count=max(1, int(cfg.min_counts.get("query", 1))),
        )
        schema = {**data_spec.to_json(), "run_id": cfg.run_id}
        write_json(FileSystems.join(cfg.out_dir, spec.SCHEMA_FILE), schema)
        counts = dict(counts)
        lengths = [u[0] for u in user_stats]
        targets = np.sum([u[1] for u in user_stats], axis=0) if user_stats else np.zeros(3)
        clicks = np.sum([u[2] for u in user_stats], axis=0) if user_stats else np.zeros(3)
        used = int(sum(lengths))
        books = accounting(counts, used)
        rejected_by, dropped_by, detail = {}, {}, []
        for key, n in counts.items():
            if key[0] != "rejected":
                continue
            _, stage, reason, field, dropped = key
            by = rejected_by if dropped == "record" else dropped_by
            by.setdefault(stage, {})
            by[stage][reason] = by[stage].get(reason, 0) + n
            detail.append(
                {"stage": stage, "reason": reason, "field": field, "dropped": dropped, "count": n}
            )
        detail.sort(key=lambda d: (-d["count"], d["stage"], d["reason"], d["field"]))
        stats = {
            "run_id": cfg.run_id,
            "input_events": books["events"]["input"],
            "used_events": used,
            "rejected_events": books["events"]["rejected"],
            "accounting": books,
            "accounting_ok": all(b["ok"] for b in books.values()),
            "users": len(lengths),
            "events_per_user": _percentiles(lengths),
            "targets_per_split": {name: int(targets[i]) for i, name in enumerate(spec.SPLIT_NAMES)},
            "clicks_per_split": {name: int(clicks[i]) for i, name in enumerate(spec.SPLIT_NAMES)},
            "chunks": int(sum(u[3] for u in user_stats)),
            "prefix_events": int(sum(u[4] for u in user_stats)),
            "rejected": rejected_by,
            "dropped_fields": dropped_by,
            "rejections": detail,
            "warnings": sorted(warnings),
            "vocab_sizes": {k: len(v) for k, v in vocabs.items()},
            "tables": sizes,
            "split": {"mode": cfg.split, "split_times": list(split_times or ())},
        }
        write_json(FileSystems.join(cfg.out_dir, "_pipeline_stats.json"), stats)
        yield stats


def finish_stats(out_dir: str, elapsed: float) -> dict:
    """Adds output sizes and timings to the pipeline's stats; writes ``stats.json``."""
    part = FileSystems.join(out_dir, "_pipeline_stats.json")
    with FileSystems.open(part) as f:
        stats = json.loads(f.read().decode("utf-8"))
    matches = FileSystems.match([FileSystems.join(out_dir, spec.EXAMPLES_DIR, "*.tfrecord")])
    example_bytes = sum(m.size_in_bytes for m in matches[0].metadata_list)
    stats["output_files"] = len(matches[0].metadata_list)
    stats["output_bytes"] = example_bytes
    stats["output_bytes_per_event"] = example_bytes / max(1, stats["used_events"])
    stats["seconds"] = round(elapsed, 2)
    stats["events_per_second"] = round(stats["input_events"] / max(elapsed, 1e-9), 1)
    write_json(FileSystems.join(out_dir, spec.STATS_FILE), stats)
    FileSystems.delete([part])
    return stats


def _main_reason(stats: dict, stage: str, dropped: str = "record") -> str:
    for d in stats.get("rejections", []):
        if d["stage"] == stage and d["dropped"] == dropped:
            hint = HINTS.get(d["reason"])
            return f"main reason {stage}/{d['reason']}/{d['field']}: {d['count']}" + (
                f" ({hint})" if hint else ""
            )
    return "no dead letters"


def check_failure(stats: dict, max_fraction: float) -> str | None:
    """One line saying why the job must fail, or None.

    Fails when no event is used, when more than ``max_fraction`` of any stage's records are
    rejected, or when more than ``max_fraction`` of the items (or users) lost the same vector
    field.
    """
    books = stats["accounting"]
    problems = []
    for stage in STAGES:
        b = books[stage]
        if not b["input"]:
            continue
        frac = b["rejected"] / b["input"]
        if frac > max_fraction or (stage == "events" and b["used"] == 0):
            problems.append(
                f"{b['rejected']} of {b['input']} {stage} rejected ({frac:.0%}); "
                + _main_reason(stats, stage)
            )
    for d in stats.get("rejections", []):
        n_rows = books.get(d["stage"], {}).get("input", 0)
        if d["dropped"] == "field" and n_rows and d["count"] / n_rows > max_fraction:
            problems.append(
                f"{d['field']} dropped from {d['count']} of {n_rows} {d['stage']} "
                f"({d['stage']}/{d['reason']})"
            )
    if not books["events"]["input"]:
        problems.insert(0, "no events read")
    if not problems:
        return None
    return "; ".join(problems) + f" (--max-reject-fraction {max_fraction})"
