"""The preprocessing graph: raw events + item catalog (+ optional query vectors and users
table) -> per-user sequence examples.

    read -> validate -> join items -> group by user -> drop duplicates -> sort by
         (timestamp, item_id) -> tag each event with its split -> encode ids -> chunk -> write

plus vocabularies, the item/query (and user) side tables, ``schema.json``, ``stats.json`` and a
dead-letter folder of rejected records (JSON Lines with the reason, field and source). Every
step is a named, composable ``PTransform``; :class:`Preprocess` wires them and :func:`run`
runs the graph with any Beam runner (FnApiRunner here, Dataflow/Flink/Spark elsewhere) into a
temporary directory, finishes the stats, and moves the result into place only when the job
succeeded (``preprocessing.output``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.stats import ApproximateQuantiles

from preprocessing import output
from preprocessing.io import REJECTED, TALLY, WARNINGS, ReadRecords, Sources, rejection_key
from preprocessing.rules import (
    DEFAULT_MAX_QUERY_CHARS,
    DEFAULT_MAX_TIMESTAMP,
    MAX_INT64,
    SECONDS_PER_UNIT,
    ParseRules,
)
from preprocessing.sequences import USER_STATS, BuildUserSequences
from preprocessing.stats import Summarise, check_failure, finish_stats
from preprocessing.tables import WriteTables
from preprocessing.validate import (
    COUNTS,
    TIMESTAMP_BATCH,
    CheckVectorDims,
    JoinCatalog,
    KeepFirstPerKey,
    ValidateEvents,
    ValidateItems,
    ValidateQueryVectors,
    ValidateUsers,
    dims_from_counts,
    vector_lengths,
)
from preprocessing.vocab import BuildVocabularies, WriteVocabularies
from seminar_tf import spec
from seminar_tf.data.readers import DataError

log = logging.getLogger("seminar.preprocess")

FNAPI_RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"
_QUANTILES = 1001


class PreprocessFailed(DataError):
    """The job ran but its input was mostly rejected; the message is one line."""


@dataclasses.dataclass
class PreprocessConfig:
    """What to read, where to write, how to cut the data and how strict to be."""

    events: list[str]
    items: list[str]
    out_dir: str
    queries: list[str] = dataclasses.field(default_factory=list)
    # The optional users table (spec.USER_FIELDS): read, validated, de-duplicated and
    # dead-lettered like the items; its attributes and vectors become the user side tables.
    users: list[str] = dataclasses.field(default_factory=list)
    max_user_attributes: int = spec.DEFAULT_MAX_ATTRIBUTES  # attribute ids kept per user
    # > 0: user ids hashed to 2 + hash % N (seminar_tf.user_hash) instead of a vocabulary;
    # refused together with `users` (a table indexed by hash buckets would hand colliding
    # users each other's attributes) and with a minimum user count (no counts are kept).
    user_hash_buckets: int = 0
    max_len: int = spec.DEFAULT_MAX_LEN
    max_query_tokens: int = spec.DEFAULT_MAX_QUERY_TOKENS
    max_attributes: int = spec.DEFAULT_MAX_ATTRIBUTES
    chunk_size: int = spec.DEFAULT_CHUNK_SIZE
    split: str = "time"  # "time" or "last"
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    split_times: tuple = ()  # explicit (t_valid, t_test) for split="time"
    min_counts: dict = dataclasses.field(
        default_factory=lambda: {
            "item": 1,
            "attribute": 1,
            "query_token": 2,
            "query": 1,
            "user": 1,
        }  # fmt: skip
    )
    overwrite: bool = False  # replace an existing out_dir (only after success)
    timestamp_unit: str = "s"  # unit of raw numeric timestamps: s, ms, us, ns
    min_timestamp: int = 0  # plausibility window in seconds, [min, max)
    max_timestamp: int = DEFAULT_MAX_TIMESTAMP  # 2100-01-01
    max_query_chars: int = DEFAULT_MAX_QUERY_CHARS
    list_separator: str | None = None  # CSV list cells "a|b|c"; None: JSON arrays
    max_reject_fraction: float = 0.5  # fail the job above this share of rejected records
    num_shards: int = 0  # example files; 0: the runner decides
    run_id: str = ""  # set by run(); every file of the output carries it

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
        if self.timestamp_unit not in SECONDS_PER_UNIT:
            raise ValueError(
                f"timestamp_unit must be one of {', '.join(SECONDS_PER_UNIT)}, "
                f"got {self.timestamp_unit!r}"
            )
        if not -MAX_INT64 <= self.min_timestamp < self.max_timestamp <= MAX_INT64:
            raise ValueError(
                "min_timestamp must be < max_timestamp, both within int64 "
                f"(got {self.min_timestamp}, {self.max_timestamp})"
            )
        if not 0 <= self.max_reject_fraction <= 1:
            raise ValueError(
                f"max_reject_fraction must be in [0, 1], got {self.max_reject_fraction}"
            )
        if self.max_query_chars < 1 or self.num_shards < 0:
            raise ValueError("max_query_chars must be >= 1 and num_shards >= 0")
        if self.list_separator is not None and (
            not self.list_separator or self.list_separator.strip() in ('"', "[", "]")
        ):
            raise ValueError(f"list_separator cannot be {self.list_separator!r}")
        if self.max_user_attributes < 1:
            raise ValueError(f"max_user_attributes must be >= 1, got {self.max_user_attributes}")
        buckets = self.user_hash_buckets
        if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 0:
            raise ValueError(f"user_hash_buckets must be an integer >= 0, got {buckets!r}")
        if buckets and self.users:
            raise ValueError(
                "a users table (--users) cannot be combined with --user-hash-buckets: its "
                "attributes and vectors are indexed by the user vocabulary, and a table "
                "indexed by hash buckets would give colliding users each other's rows"
            )
        if buckets and self.min_counts.get("user", 1) > 1:
            raise ValueError(
                "--min-user-count does not apply with --user-hash-buckets (every user id is "
                "hashed; no user vocabulary is counted)"
            )

    @property
    def rules(self) -> ParseRules:
        return ParseRules(
            timestamp_unit=self.timestamp_unit,
            min_timestamp=self.min_timestamp,
            max_timestamp=self.max_timestamp,
            max_query_chars=self.max_query_chars,
            list_separator=self.list_separator,
        )


def cutoffs_from_quantiles(quantiles: list, valid_fraction: float, test_fraction: float):
    """``(t_valid, t_test)`` from evenly spaced quantiles of the event timestamps."""
    if not quantiles:
        return (0, 0)
    last = len(quantiles) - 1
    t_valid = quantiles[round(last * (1 - valid_fraction - test_fraction))]
    t_test = quantiles[round(last * (1 - test_fraction))]
    return (int(t_valid), int(t_test))


class CleanTable(beam.PTransform):
    """Raw rows of a keyed vector table (items, users, query vectors) -> clean ``(key, row)``.

    validate -> drop duplicate keys (the first seen is kept) -> check vector widths against
    the table's most common width (items, users: drop the vector; query vectors: reject the
    row).
    Returns ``{"valid", "rejected", "dims"}``, ``dims`` a single ``{field: width}`` element.
    """

    def __init__(
        self,
        validate: beam.DoFn,
        stage: str,
        key_field: str,
        vector_fields: tuple,
        sources: Sources,
        drop_field: bool,
    ):
        super().__init__()
        self._validate = validate
        self._stage = stage
        self._key_field = key_field
        self._vector_fields = tuple(vector_fields)
        self._sources = sources
        self._drop_field = drop_field

    def expand(self, rows):
        fields = self._vector_fields
        valid = rows | "Validate" >> beam.ParDo(self._validate).with_outputs(REJECTED, main="valid")
        unique = (
            valid.valid
            | "GroupByKey" >> beam.GroupByKey()
            | "DropDuplicates"
            >> beam.ParDo(
                KeepFirstPerKey(self._stage, self._key_field, self._sources)
            ).with_outputs(REJECTED, main="valid")
        )
        dims = (
            unique.valid
            | "VectorLengths" >> beam.FlatMap(vector_lengths(fields))
            | "CountLengths" >> beam.CombinePerKey(sum)
            | "CollectLengths" >> beam.combiners.ToList()
            | "Dims" >> beam.Map(dims_from_counts)
        )
        checked = unique.valid | "CheckDims" >> beam.ParDo(
            CheckVectorDims(self._stage, fields, self._sources, self._drop_field),
            beam.pvalue.AsSingleton(dims),
        ).with_outputs(REJECTED, main="valid")
        rejected = (valid[REJECTED], unique[REJECTED], checked[REJECTED]) | (
            "FlattenRejected" >> beam.Flatten()
        )
        stage = self._stage
        used = checked.valid | "CountUsed" >> beam.Map(lambda _: (("used", stage), 1))
        return {"valid": checked.valid, "rejected": rejected, "dims": dims, "used": used}


def _rejected_to_json(r: dict) -> str:
    return json.dumps(r, default=repr, sort_keys=True, ensure_ascii=False)


class Preprocess(beam.PTransform):
    """The whole graph from a pipeline's root; returns the main PCollections by name."""

    def __init__(self, config: PreprocessConfig):
        super().__init__()
        self._cfg = config

    def expand(self, pbegin):
        cfg = self._cfg
        out = cfg.out_dir
        rules = cfg.rules
        event_sources, item_sources = Sources(cfg.events), Sources(cfg.items)

        raw_events = pbegin | "ReadEvents" >> ReadRecords(cfg.events, "events")
        raw_items = pbegin | "ReadItems" >> ReadRecords(cfg.items, "items")
        reads = [raw_events, raw_items]

        # Items (and optional query vectors): validate, de-duplicate, check vector widths.
        items = raw_items["records"] | "CleanItems" >> CleanTable(
            ValidateItems(rules, item_sources), "items", "item_id", spec.ITEM_VECTOR_FIELDS,
            item_sources, drop_field=True,
        )  # fmt: skip
        rejected_parts = [items["rejected"]]
        counted = [items["used"]]
        dim_parts = [items["dims"]]
        if cfg.queries:
            query_sources = Sources(cfg.queries)
            raw_queries = pbegin | "ReadQueries" >> ReadRecords(cfg.queries, "queries")
            reads.append(raw_queries)
            clean_queries = raw_queries["records"] | "CleanQueries" >> CleanTable(
                ValidateQueryVectors(rules, query_sources), "queries", "query",
                ("text_embedding",), query_sources, drop_field=False,
            )  # fmt: skip
            queries = clean_queries["valid"]
            rejected_parts.append(clean_queries["rejected"])
            counted.append(clean_queries["used"])
            dim_parts.append(
                clean_queries["dims"]
                | "RenameQueryDims"
                >> beam.Map(lambda d: {"query_text_embedding": d.get("text_embedding", 0)})
            )
        else:
            queries = pbegin | "NoQueries" >> beam.Create([])
        users = None
        if cfg.users:
            # The users table: the item rules (a bad vector drops that vector only).
            user_sources = Sources(cfg.users)
            raw_users = pbegin | "ReadUsers" >> ReadRecords(cfg.users, "users")
            reads.append(raw_users)
            clean_users = raw_users["records"] | "CleanUsers" >> CleanTable(
                ValidateUsers(rules, user_sources), "users", "user_id", spec.USER_VECTOR_FIELDS,
                user_sources, drop_field=True,
            )  # fmt: skip
            users = clean_users["valid"]
            rejected_parts.append(clean_users["rejected"])
            counted.append(clean_users["used"])
            dim_parts.append(
                clean_users["dims"]
                | "RenameUserDims" >> beam.Map(lambda d: {"user_embedding": d.get("embedding", 0)})
            )
        if len(dim_parts) == 1:
            dims = dim_parts[0]
        else:
            dims = (
                dim_parts
                | "FlattenDims" >> beam.Flatten()
                | "CollectDims" >> beam.combiners.ToList()
                | "MergeDims" >> beam.Map(lambda ds: {k: v for d in ds for k, v in d.items()})
            )
        for read in reads:
            rejected_parts.append(read[REJECTED])
            counted.append(read[TALLY])
        warnings = [read[WARNINGS] for read in reads] | "FlattenWarnings" >> beam.Flatten()

        # Events: validate, join the catalog, count vocabularies and timestamps.
        events = raw_events["records"] | "ValidateEvents" >> beam.ParDo(
            ValidateEvents(rules, event_sources)
        ).with_outputs(REJECTED, main="valid")
        catalog = items["valid"] | "CatalogIds" >> beam.Map(lambda kv: kv[0])
        joined = events.valid | "JoinItems" >> beam.ParDo(
            JoinCatalog(cfg.max_query_tokens, event_sources), beam.pvalue.AsList(catalog)
        ).with_outputs(REJECTED, COUNTS, TIMESTAMP_BATCH, main="valid")
        rejected_parts += [events[REJECTED], joined[REJECTED]]

        attribute_counts = items["valid"] | "AttributeCounts" >> beam.FlatMap(
            lambda kv: [(("attribute", a), 1) for a in set(kv[1]["attributes"])]
        )
        event_counts = joined[COUNTS]
        if cfg.user_hash_buckets:  # hashed user ids: no user vocabulary (users.txt empty)
            event_counts = event_counts | "NoUserCounts" >> beam.Filter(
                lambda kv: kv[0][0] != "user"
            )
        count_parts = [event_counts, attribute_counts]
        if users is not None:
            count_parts.append(
                users
                | "UserAttributeCounts"
                >> beam.FlatMap(
                    lambda kv: [(("user_attribute", a), 1) for a in set(kv[1]["attributes"])]
                )
            )
        vocabs = (
            count_parts
            | "FlattenCounts" >> beam.Flatten()
            | "BuildVocabularies" >> BuildVocabularies(cfg.min_counts)
        )
        _ = vocabs | "WriteVocabularies" >> WriteVocabularies(out)
        sizes = vocabs | "WriteTables" >> WriteTables(
            out, cfg.max_attributes, items["valid"], queries, dims, users,
            cfg.max_user_attributes,
        )  # fmt: skip

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
            vocabs, split_times, cfg.max_len, cfg.chunk_size, cfg.max_query_tokens, cfg.split,
            event_sources, cfg.user_hash_buckets,
        )  # fmt: skip
        rejected_parts.append(seqs["rejected"])
        _ = seqs["examples"] | "WriteExamples" >> beam.io.WriteToTFRecord(
            FileSystems.join(out, spec.EXAMPLES_DIR, "part"),
            file_name_suffix=".tfrecord",
            num_shards=cfg.num_shards,
        )

        rejected = rejected_parts | "FlattenRejected" >> beam.Flatten()
        _ = (
            rejected
            | "RejectedToJson" >> beam.Map(_rejected_to_json)
            | "WriteRejected"
            >> beam.io.WriteToText(
                FileSystems.join(out, spec.REJECTED_DIR, "rejected"), file_name_suffix=".jsonl"
            )
        )
        rejection_counts = rejected | "RejectionKey" >> beam.Map(
            lambda r: (("rejected", *rejection_key(r)), 1)
        )
        counts = (
            [rejection_counts, *counted]
            | "FlattenTallies" >> beam.Flatten()
            | "SumTallies" >> beam.CombinePerKey(sum)
        )
        stats = sizes | "Summarise" >> beam.ParDo(
            Summarise(cfg),
            beam.pvalue.AsList(seqs[USER_STATS]),
            beam.pvalue.AsList(counts),
            beam.pvalue.AsSingleton(split_times),
            beam.pvalue.AsSingleton(vocabs),
            beam.pvalue.AsList(warnings),
        )
        return {"examples": seqs["examples"], "rejected": rejected, "stats": stats}


def run(
    config: PreprocessConfig,
    beam_args: list[str] | None = None,
    layout: output.OutputLayout | None = None,
) -> dict:
    """Runs the graph into a temporary directory, completes ``stats.json``, then moves the
    output into place; raises :class:`PreprocessFailed` (the run kept as
    ``OUT.failed-<run_id>``) when more than ``max_reject_fraction`` of the input is rejected.

    ``layout``: from :func:`preprocessing.output.prepare_output` when the caller writes into
    the run's directory first (the MovieLens adapter's converted raw tables); default: a new
    one for ``config.out_dir``.
    """
    beam_args = list(beam_args or [])
    if not any(a.startswith("--runner") for a in beam_args):
        beam_args += [f"--runner={FNAPI_RUNNER}"]
    if not any(a.startswith("--default_sdk_harness_log_level") for a in beam_args):
        beam_args += ["--default_sdk_harness_log_level=WARNING"]
    options = PipelineOptions(beam_args)
    layout = layout or output.prepare_output(config.out_dir, config.overwrite)
    run_cfg = dataclasses.replace(config, out_dir=layout.tmp, run_id=layout.run_id)
    t0 = time.time()
    log.info(
        "preprocess: run %s into %s (events=%s items=%s users=%s)",
        layout.run_id, layout.tmp, config.events, config.items, config.users or "-",
    )  # fmt: skip
    try:
        with beam.Pipeline(options=options) as p:
            _ = p | "Preprocess" >> Preprocess(run_cfg)
        stats = finish_stats(layout.tmp, time.time() - t0)
    except BaseException:
        output.discard(layout)
        raise
    for warning in stats.get("warnings", []):
        log.warning("preprocess: %s", warning)
    failure = check_failure(stats, config.max_reject_fraction)
    if not failure and not stats["accounting_ok"]:
        failure = f"record accounting failed: input != used + rejected ({stats['accounting']})"
    if failure:
        failed = output.keep_failed(layout)
        rejected = FileSystems.join(failed, spec.REJECTED_DIR)
        raise PreprocessFailed(f"{failure}; dead letters: {rejected}/, stats: {failed}/stats.json")
    output.commit(layout)
    return stats
