"""The preprocessing graph: raw events + item catalog -> per-user sequence examples.

    read -> validate -> join items -> group by user -> sort by (timestamp, item_id)
         -> tag each event with its split -> encode ids -> chunk -> write

plus vocabularies, the item/query vector tables, ``schema.json``, ``stats.json`` and a
dead-letter folder of rejected records (JSON Lines with the reason). Every step is a named,
composable ``PTransform``; :class:`Preprocess` wires them and :func:`run` runs the graph with
any Beam runner (FnApiRunner here, Dataflow/Flink/Spark elsewhere) and finishes the stats.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.stats import ApproximateQuantiles

from preprocessing.io import REJECTED, ReadRecords
from preprocessing.sequences import USER_STATS, BuildUserSequences
from preprocessing.tables import WriteTables
from preprocessing.validate import (
    COUNTS,
    TALLY,
    TIMESTAMP_BATCH,
    CheckVectorDims,
    JoinCatalog,
    KeepFirstPerKey,
    ValidateEvents,
    ValidateItems,
    ValidateQueryVectors,
    dims_from_counts,
    vector_lengths,
)
from preprocessing.vocab import BuildVocabularies, WriteVocabularies
from seminar_tf import spec

log = logging.getLogger("seminar.preprocess")

FNAPI_RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"
_QUANTILES = 1001


@dataclasses.dataclass
class PreprocessConfig:
    """What to read, where to write, and how to cut the data."""

    events: list[str]
    items: list[str]
    out_dir: str
    queries: list[str] = dataclasses.field(default_factory=list)
    max_len: int = spec.DEFAULT_MAX_LEN
    max_query_tokens: int = spec.DEFAULT_MAX_QUERY_TOKENS
    max_attributes: int = spec.DEFAULT_MAX_ATTRIBUTES
    chunk_size: int = spec.DEFAULT_CHUNK_SIZE
    split: str = "time"  # "time" or "last"
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    split_times: tuple = ()  # explicit (t_valid, t_test) for split="time"
    min_counts: dict = dataclasses.field(
        default_factory=lambda: {"item": 1, "attribute": 1, "query_token": 2, "query": 1}
    )

    def __post_init__(self):
        if self.split not in ("time", "last"):
            raise ValueError(f"split must be 'time' or 'last', got {self.split!r}")
        if self.max_len < 1 or self.chunk_size < 1 or self.max_query_tokens < 1:
            raise ValueError("max_len, chunk_size and max_query_tokens must be >= 1")
        if not 0 <= self.valid_fraction < 1 or not 0 <= self.test_fraction < 1:
            raise ValueError("valid_fraction and test_fraction must be in [0, 1)")
        if self.valid_fraction + self.test_fraction >= 1:
            raise ValueError("valid_fraction + test_fraction must be < 1")
        if self.split_times and len(self.split_times) != 2:
            raise ValueError("split_times must be (t_valid, t_test)")


def cutoffs_from_quantiles(quantiles: list, valid_fraction: float, test_fraction: float):
    """``(t_valid, t_test)`` from evenly spaced quantiles of the event timestamps."""
    if not quantiles:
        return (0, 0)
    last = len(quantiles) - 1
    t_valid = quantiles[round(last * (1 - valid_fraction - test_fraction))]
    t_test = quantiles[round(last * (1 - test_fraction))]
    return (int(t_valid), int(t_test))


def _percentiles(values: list[int]) -> dict:
    if not values:
        return {}
    arr = np.asarray(values)
    return {f"p{q}": float(np.percentile(arr, q)) for q in (0, 50, 90, 99, 100)}


class _Summarise(beam.DoFn):
    """Writes ``schema.json`` and the pipeline's part of ``stats.json``."""

    def __init__(self, config: PreprocessConfig):
        self._config = config

    def process(self, sizes, user_stats, tallies, rejected, split_times, vocabs):
        cfg = self._config
        data_spec = spec.DataSpec(
            num_items=sizes["num_items"],
            num_attributes=sizes["num_attributes"],
            num_query_tokens=sizes["num_query_tokens"],
            num_queries=sizes["num_queries"],
            max_attributes=cfg.max_attributes,
            max_query_tokens=cfg.max_query_tokens,
            text_dim=sizes["text_dim"],
            image_dim=sizes["image_dim"],
            query_text_dim=sizes["query_text_dim"],
            max_len=cfg.max_len,
            chunk_size=cfg.chunk_size,
            split_mode=cfg.split,
            split_times=tuple(split_times or ()),
        )
        _write_json(FileSystems.join(cfg.out_dir, spec.SCHEMA_FILE), data_spec.to_json())
        lengths = [u[0] for u in user_stats]
        targets = np.sum([u[1] for u in user_stats], axis=0) if user_stats else np.zeros(3)
        clicks = np.sum([u[2] for u in user_stats], axis=0) if user_stats else np.zeros(3)
        tally = dict(tallies)
        rejected_by = {}
        for (stage, reason), n in rejected:
            rejected_by.setdefault(stage, {})[reason] = n
        rejected_events = sum(rejected_by.get("events", {}).values())
        used = int(sum(lengths))
        unreadable = sum(
            n for (stage, reason), n in rejected if stage == "events" and reason.startswith("read_")
        )
        parsed = tally.get("events_parsed", 0) + unreadable
        stats = {
            "input_events": int(parsed),
            "used_events": used,
            "rejected_events": int(rejected_events),
            "accounting_ok": int(parsed) == used + int(rejected_events),
            "users": len(lengths),
            "events_per_user": _percentiles(lengths),
            "targets_per_split": {name: int(targets[i]) for i, name in enumerate(spec.SPLIT_NAMES)},
            "clicks_per_split": {name: int(clicks[i]) for i, name in enumerate(spec.SPLIT_NAMES)},
            "chunks": int(sum(u[3] for u in user_stats)),
            "prefix_events": int(sum(u[4] for u in user_stats)),
            "rejected": rejected_by,
            "vocab_sizes": {k: len(v) for k, v in vocabs.items()},
            "tables": sizes,
            "split": {"mode": cfg.split, "split_times": list(split_times or ())},
        }
        _write_json(FileSystems.join(cfg.out_dir, "_pipeline_stats.json"), stats)
        yield stats


def _write_json(path: str, obj) -> None:
    with FileSystems.create(path) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True).encode("utf-8"))


def _rejection_key(r: dict):
    return (r["stage"], r["reason"].split(":")[0])


class CleanTable(beam.PTransform):
    """Raw rows of a keyed vector table (items, query vectors) -> clean ``(key, row)``.

    validate -> drop duplicate keys (one kept, deterministically) -> reject rows whose
    vectors do not have the table's most common width. Returns ``{"valid", "rejected",
    "dims"}``, ``dims`` a single ``{field: width}`` element.
    """

    def __init__(self, validate: beam.DoFn, stage: str, key_field: str, vector_fields: tuple):
        super().__init__()
        self._validate = validate
        self._stage = stage
        self._key_field = key_field
        self._vector_fields = tuple(vector_fields)

    def expand(self, rows):
        fields = self._vector_fields
        valid = rows | "Validate" >> beam.ParDo(self._validate).with_outputs(REJECTED, main="valid")
        unique = (
            valid.valid
            | "GroupByKey" >> beam.GroupByKey()
            | "DropDuplicates"
            >> beam.ParDo(KeepFirstPerKey(self._stage, self._key_field)).with_outputs(
                REJECTED, main="valid"
            )
        )
        dims = (
            unique.valid
            | "VectorLengths" >> beam.FlatMap(vector_lengths(fields))
            | "CountLengths" >> beam.CombinePerKey(sum)
            | "CollectLengths" >> beam.combiners.ToList()
            | "Dims" >> beam.Map(dims_from_counts)
        )
        checked = unique.valid | "CheckDims" >> beam.ParDo(
            CheckVectorDims(self._stage, fields), beam.pvalue.AsSingleton(dims)
        ).with_outputs(REJECTED, main="valid")
        rejected = (valid[REJECTED], unique[REJECTED], checked[REJECTED]) | (
            "FlattenRejected" >> beam.Flatten()
        )
        return {"valid": checked.valid, "rejected": rejected, "dims": dims}


class Preprocess(beam.PTransform):
    """The whole graph from a pipeline's root; returns the main PCollections by name."""

    def __init__(self, config: PreprocessConfig):
        super().__init__()
        self._cfg = config

    def expand(self, pbegin):
        cfg = self._cfg
        out = cfg.out_dir

        raw_events = pbegin | "ReadEvents" >> ReadRecords(cfg.events, "events")
        raw_items = pbegin | "ReadItems" >> ReadRecords(cfg.items, "items")

        # Items (and optional query vectors): validate, de-duplicate, check vector widths.
        items = raw_items["records"] | "CleanItems" >> CleanTable(
            ValidateItems(), "items", "item_id", spec.ITEM_VECTOR_FIELDS
        )
        rejected_parts = [raw_events[REJECTED], raw_items[REJECTED], items["rejected"]]
        if cfg.queries:
            raw_queries = pbegin | "ReadQueries" >> ReadRecords(cfg.queries, "queries")
            clean_queries = raw_queries["records"] | "CleanQueries" >> CleanTable(
                ValidateQueryVectors(), "queries", "query", ("text_embedding",)
            )
            queries = clean_queries["valid"]
            rejected_parts += [raw_queries[REJECTED], clean_queries["rejected"]]
            query_dims = clean_queries["dims"] | "RenameQueryDims" >> beam.Map(
                lambda d: {"query_text_embedding": d.get("text_embedding", 0)}
            )
            dims = (
                (items["dims"], query_dims)
                | "FlattenDims" >> beam.Flatten()
                | "CollectDims" >> beam.combiners.ToList()
                | "MergeDims" >> beam.Map(lambda ds: {k: v for d in ds for k, v in d.items()})
            )
        else:
            queries = pbegin | "NoQueries" >> beam.Create([])
            dims = items["dims"]

        # Events: validate, join the catalog, count vocabularies and timestamps.
        events = raw_events["records"] | "ValidateEvents" >> beam.ParDo(
            ValidateEvents()
        ).with_outputs(REJECTED, TALLY, main="valid")
        catalog = items["valid"] | "CatalogIds" >> beam.Map(lambda kv: kv[0])
        joined = events.valid | "JoinItems" >> beam.ParDo(
            JoinCatalog(cfg.max_query_tokens), beam.pvalue.AsList(catalog)
        ).with_outputs(REJECTED, COUNTS, TIMESTAMP_BATCH, main="valid")
        rejected_parts += [events[REJECTED], joined[REJECTED]]

        attribute_counts = items["valid"] | "AttributeCounts" >> beam.FlatMap(
            lambda kv: [(("attribute", a), 1) for a in set(kv[1]["attributes"])]
        )
        vocabs = (
            (joined[COUNTS], attribute_counts)
            | "FlattenCounts" >> beam.Flatten()
            | "BuildVocabularies" >> BuildVocabularies(cfg.min_counts)
        )
        _ = vocabs | "WriteVocabularies" >> WriteVocabularies(out)
        sizes = vocabs | "WriteTables" >> WriteTables(
            out, cfg.max_attributes, items["valid"], queries, dims
        )

        if cfg.split == "time" and cfg.split_times:
            split_times = pbegin | "GivenSplitTimes" >> beam.Create([tuple(cfg.split_times)])
        elif cfg.split == "time":
            vf, tf_ = cfg.valid_fraction, cfg.test_fraction
            split_times = (
                joined[TIMESTAMP_BATCH]
                | "TimestampQuantiles"
                >> ApproximateQuantiles.Globally(_QUANTILES, input_batched=True)
                | "SplitCutoffs" >> beam.Map(cutoffs_from_quantiles, vf, tf_)
            )
        else:
            split_times = pbegin | "NoSplitTimes" >> beam.Create([()])

        seqs = joined.valid | "BuildUserSequences" >> BuildUserSequences(
            vocabs, split_times, cfg.max_len, cfg.chunk_size, cfg.max_query_tokens, cfg.split
        )
        _ = seqs["examples"] | "WriteExamples" >> beam.io.WriteToTFRecord(
            FileSystems.join(out, spec.EXAMPLES_DIR, "part"), file_name_suffix=".tfrecord"
        )

        rejected = rejected_parts | "FlattenRejected" >> beam.Flatten()
        _ = (
            rejected
            | "RejectedToJson" >> beam.Map(lambda r: json.dumps(r, default=repr, sort_keys=True))
            | "WriteRejected"
            >> beam.io.WriteToText(
                FileSystems.join(out, spec.REJECTED_DIR, "rejected"), file_name_suffix=".jsonl"
            )
        )
        rejected_counts = (
            rejected
            | "RejectionKey" >> beam.Map(lambda r: (_rejection_key(r), 1))
            | "CountRejections" >> beam.CombinePerKey(sum)
        )
        tallies = events[TALLY] | "SumTallies" >> beam.CombinePerKey(sum)
        stats = sizes | "Summarise" >> beam.ParDo(
            _Summarise(cfg),
            beam.pvalue.AsList(seqs[USER_STATS]),
            beam.pvalue.AsList(tallies),
            beam.pvalue.AsList(rejected_counts),
            beam.pvalue.AsSingleton(split_times),
            beam.pvalue.AsSingleton(vocabs),
        )
        return {"examples": seqs["examples"], "rejected": rejected, "stats": stats}


def run(config: PreprocessConfig, beam_args: list[str] | None = None) -> dict:
    """Runs the graph and completes ``stats.json`` (output bytes per event, timings)."""
    beam_args = list(beam_args or [])
    if not any(a.startswith("--runner") for a in beam_args):
        beam_args += [f"--runner={FNAPI_RUNNER}"]
    if not any(a.startswith("--default_sdk_harness_log_level") for a in beam_args):
        beam_args += ["--default_sdk_harness_log_level=WARNING"]
    options = PipelineOptions(beam_args)
    t0 = time.time()
    log.info("preprocess: building graph (events=%s items=%s)", config.events, config.items)
    with beam.Pipeline(options=options) as p:
        _ = p | "Preprocess" >> Preprocess(config)
    elapsed = time.time() - t0
    return finish_stats(config.out_dir, elapsed)


def finish_stats(out_dir: str, elapsed: float) -> dict:
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
    _write_json(FileSystems.join(out_dir, spec.STATS_FILE), stats)
    FileSystems.delete([part])
    return stats
