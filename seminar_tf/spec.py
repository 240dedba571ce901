"""The one feature specification of seminar-tf.

Every stage imports its names, dtypes, shapes and padding from here: the raw data contract
(what users bring), the stored per-user sequence records (what preprocessing writes), the
per-target model inputs (what the tf.data reader yields and the Keras model takes), and, later,
the export signatures and the serving client. Nothing else re-declares them.

Id conventions, shared by every vocabulary: 0 is padding (or "absent", e.g. no query), 1 is the
out-of-vocabulary bucket, and vocabulary entry ``i`` of a ``vocab/*.txt`` file has id ``i + 2``.
This is exactly ``keras.layers.StringLookup(mask_token="", num_oov_indices=1)``.
"""

from __future__ import annotations

import dataclasses
import json
import os

PAD_ID = 0
OOV_ID = 1
NUM_RESERVED_IDS = 2

SPLIT_TRAIN, SPLIT_VALID, SPLIT_TEST = 0, 1, 2
SPLIT_NAMES = ("train", "valid", "test")

# ---------------------------------------------------------------------------------------------
# Raw data contract (what users bring). Types are pyarrow-style names.
# ---------------------------------------------------------------------------------------------
EVENT_FIELDS = {
    "user_id": "string",
    "timestamp": "int64",  # seconds
    "item_id": "string",
    "query": "string",  # "" for a recommendation (no-query) event
    "label": "int64",  # 0/1
}
ITEM_FIELDS = {
    "item_id": "string",
    "text": "string",
    "attributes": "list<string>",
    "text_embedding": "list<float32>",  # optional, fixed length when present
    "image_embedding": "list<float32>",  # optional, fixed length when present
}
ITEM_REQUIRED_FIELDS = ("item_id",)
ITEM_VECTOR_FIELDS = ("text_embedding", "image_embedding")
QUERY_VECTOR_FIELDS = {"query": "string", "text_embedding": "list<float32>"}
# The optional users table (``seminar preprocess --users``): one row per user, keyed by the
# events' ``user_id``. Users of the table without events are accepted (and unused); users of
# the events missing from it get no attributes and no vector.
USER_FIELDS = {
    "user_id": "string",
    "attributes": "list<string>",  # optional: segments, demographics, ...
    "embedding": "list<float32>",  # optional, fixed length when present
}
USER_REQUIRED_FIELDS = ("user_id",)
USER_VECTOR_FIELDS = ("embedding",)

# ---------------------------------------------------------------------------------------------
# Stored sequence records: one tf.train.Example per user chunk, columns of equal length n
# (query_tokens has n * max_query_tokens entries). The first ``num_prefix`` events of a chunk
# are history only (copied from the previous chunk so windows can be cut without it).
# ---------------------------------------------------------------------------------------------
SEQ_CONTEXT_BYTES = ("user_id",)
# ``user``: the encoded user id (``vocab/users.txt``; 1 = OOV for users below the
# preprocessing's --min-user-count), beside the raw ``user_id``.
# ``events_before`` / ``clicks_before``: the user's events (and clicks among them) before the
# chunk's first stored event, so the reader counts a target's whole earlier history
# (``user_counts``) from one chunk.
SEQ_CONTEXT_INT = ("chunk", "num_prefix", "user", "events_before", "clicks_before")
SEQ_COLUMNS = ("item", "query", "timestamp", "label", "split")
SEQ_QUERY_TOKENS = "query_tokens"


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """One model input: name, dtype, per-example shape and padding value.

    ``shape`` uses the symbols ``"L"`` (history length) and ``"Q"`` (query tokens per query);
    resolve it with :func:`resolve_shape`. ``optional``: a serving input that a request may
    leave all padding (the signature still takes it: TF Serving signatures have fixed inputs,
    so clients fill it with ``padding`` when the caller gives none).
    """

    name: str
    dtype: str
    shape: tuple
    padding: object
    description: str
    optional: bool = False


MODEL_FEATURES = (
    FeatureSpec("target_item", "int64", (), PAD_ID, "item id of the target"),
    FeatureSpec("target_query", "int64", (), PAD_ID, "query id of the target (0: no query)"),
    FeatureSpec("target_query_tokens", "int64", ("Q",), PAD_ID, "query token ids"),
    FeatureSpec("hist_item", "int64", ("L",), PAD_ID, "item ids of the history, most recent last"),
    FeatureSpec("hist_query", "int64", ("L",), PAD_ID, "query ids of the history"),
    FeatureSpec("hist_query_tokens", "int64", ("L", "Q"), PAD_ID, "history query token ids"),
    FeatureSpec("hist_label", "int64", ("L",), PAD_ID, "history click labels (0/1)"),
    FeatureSpec(
        "user", "int64", (), PAD_ID,
        "user id (vocab/users.txt; 0 = unknown user / padding, 1 = OOV: a rare user)",
        optional=True,
    ),
    FeatureSpec(
        "user_counts", "int64", (3,), 0,
        "the user's whole history strictly before the target (not only the window): [events, "
        "clicks among them, seconds since the latest of them (0 when none)]",
        optional=True,
    ),
)  # fmt: skip
USER = next(f for f in MODEL_FEATURES if f.name == "user")
USER_COUNTS = next(f for f in MODEL_FEATURES if f.name == "user_counts")
MODEL_FEATURE_NAMES = tuple(f.name for f in MODEL_FEATURES)
LABEL = FeatureSpec("label", "float32", (), 0.0, "click label of the target")
# Carried beside the features for evaluation (GAUC groups by user), not fed to the model.
META_FEATURES = (
    FeatureSpec("user_id", "string", (), b"", "raw user id"),
    FeatureSpec("timestamp", "int64", (), 0, "target timestamp"),
    FeatureSpec("hist_timestamp", "int64", ("L",), 0, "history timestamps"),
)

DEFAULT_MAX_LEN = 100
# Which earlier events form a target's history window: "all" (clicks and non-clicks, with
# their labels in hist_label) or "positive" (the most recent clicks only, as the long-sequence
# CTR literature's protocol). "all" is the default: on MovieLens (SEMINAR from scratch, 3 seeds,
# benchmarks/quality.py --history all|positive) it lifted validation AUC from 0.683 to 0.758
# and test AUC from 0.664 to 0.855, and the shown-not-clicked
# events are exactly what a CTR model must learn to separate.
HISTORY_MODES = ("all", "positive")
DEFAULT_HISTORY = "all"
DEFAULT_MAX_QUERY_TOKENS = 5
DEFAULT_MAX_ATTRIBUTES = 8
DEFAULT_CHUNK_SIZE = 10_000

# Files inside a preprocessing output directory.
SCHEMA_FILE = "schema.json"
STATS_FILE = "stats.json"
TABLES_FILE = "tables.npz"
EXAMPLES_DIR = "examples"
VOCAB_DIR = "vocab"
REJECTED_DIR = "rejected"
VOCAB_FILES = {
    "item": "items.txt",
    "attribute": "attributes.txt",
    "query_token": "query_tokens.txt",
    "query": "queries.txt",
    "user": "users.txt",
    "user_attribute": "user_attributes.txt",  # attributes of the users table
}
# Arrays in tables.npz, all indexed by id (row 0 padding, row 1 OOV).
TABLE_ARRAYS = (
    "item_attributes",  # int64 [num_items, max_attributes] attribute ids, 0-padded
    "item_text_vectors",  # float32 [num_items, text_dim] (text_dim 0 when absent)
    "item_has_text",  # bool [num_items]
    "item_image_vectors",  # float32 [num_items, image_dim]
    "item_has_image",  # bool [num_items]
    "query_text_vectors",  # float32 [num_queries, query_text_dim]
    "query_has_text",  # bool [num_queries]
)
# Tables derived from the vocabulary files when loaded (``training.load_tables``), so
# preprocessing outputs of any age have them.
DERIVED_TABLE_ARRAYS = (
    # int64 [num_queries, max_query_tokens]: each query's token ids (``text.query_token_table``),
    # exactly an event's ``query_tokens`` for an in-vocabulary query: the history can then
    # carry query ids alone (``compact`` inputs).
    "query_tokens",
)
# Arrays in tables.npz from the optional users table, present only when ``--users`` was given,
# indexed by the encoded user id (``vocab/users.txt``; row 0, the unknown user, and row 1, the
# OOV user, are empty, as are users of the events missing from the table).
USER_TABLE_ARRAYS = (
    "user_attributes",  # int64 [num_users, max_user_attributes] ids of user_attributes.txt
    "user_vectors",  # float32 [num_users, user_embedding_dim] the users table's embedding
    "user_has_vector",  # bool [num_users]
)
# ``--user-hash-buckets N``: ``user = 2 + farmhash Fingerprint64(utf-8 user_id) % N`` (the
# hash of ``tf.strings.to_hash_bucket_fast``; "" stays 0), computed by
# ``seminar_tf.user_hash.hash_user_ids`` in preprocessing and inside the exported graph.
USER_HASH = "farmhash_fingerprint64"


# Compact model inputs (``TrainConfig.compact_inputs``): the history without these features
# (the model's ``query_tokens`` table gives them from ``hist_query``) and every id as int32:
# 12 bytes a behaviour (item, query, label as int32) instead of 56 (item, query, 4 tokens and
# label as int64, Q = 4).
COMPACT_DROPPED = ("hist_query_tokens",)
# The model features that compact inputs narrow from int64 to int32.
COMPACT_INT32 = frozenset(f.name for f in MODEL_FEATURES if f.dtype == "int64")


def compact_inputs_exact(data_spec: DataSpec) -> bool:
    """Whether compact inputs lose nothing on this output: every query of its events has an
    id (``min_query_count`` 1), whose ``query_tokens`` row is then that event's tokens."""
    return data_spec.min_query_count == 1


def resolve_shape(shape: tuple, max_len: int, max_query_tokens: int) -> tuple:
    sizes = {"L": max_len, "Q": max_query_tokens}
    return tuple(sizes.get(d, d) for d in shape)


def model_input_shapes(max_len: int, max_query_tokens: int) -> dict:
    """``{name: (shape, dtype)}`` of the model inputs for one example (no batch dim)."""
    return {
        f.name: (resolve_shape(f.shape, max_len, max_query_tokens), f.dtype) for f in MODEL_FEATURES
    }


@dataclasses.dataclass
class DataSpec:
    """Sizes of one preprocessing output, as written to ``schema.json``.

    Vocabulary sizes include the two reserved ids (padding and OOV). A dimension of 0 means
    the modality is absent from this data set.
    """

    num_items: int
    num_attributes: int
    num_query_tokens: int
    num_queries: int
    # user vocabulary size (2 reserved ids included); 0: an output written before the user
    # vocabulary existed (a model with user features refuses it).
    num_users: int = 0
    max_attributes: int = DEFAULT_MAX_ATTRIBUTES
    max_query_tokens: int = DEFAULT_MAX_QUERY_TOKENS
    text_dim: int = 0
    image_dim: int = 0
    query_text_dim: int = 0
    max_len: int = DEFAULT_MAX_LEN
    chunk_size: int = DEFAULT_CHUNK_SIZE
    split_mode: str = "time"
    split_times: tuple = ()
    # The optional users table (``--users``, ``USER_TABLE_ARRAYS``): user attribute vocabulary
    # size (2 reserved ids included), attribute ids kept per user (the longest list, at most
    # ``--max-user-attributes``) and the width of the user vectors. 0 without a users table
    # (and in outputs written before it existed): the model then has no such inputs.
    num_user_attributes: int = 0
    max_user_attributes: int = 0
    user_embedding_dim: int = 0
    # ``--user-hash-buckets``: N > 0 maps a user id to ``2 + hash % N`` (``USER_HASH``;
    # ``num_users`` is then N + 2 and ``vocab/users.txt`` is empty); 0: the user vocabulary.
    user_hash_buckets: int = 0
    # The query vocabulary's minimum count: 1 means every query of the events has its own id,
    # so the ``query_tokens`` table gives each event's tokens exactly (``compact_inputs_exact``);
    # 0: not recorded (an output written before it was).
    min_query_count: int = 0

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["split_times"] = list(self.split_times)
        out["model_features"] = [
            {
                "name": f.name,
                "dtype": f.dtype,
                "shape": list(resolve_shape(f.shape, self.max_len, self.max_query_tokens)),
                "padding": f.padding,
                "description": f.description,
            }
            for f in MODEL_FEATURES
        ]
        out["vocab_files"] = {k: f"{VOCAB_DIR}/{v}" for k, v in VOCAB_FILES.items()}
        out["id_convention"] = {"padding": PAD_ID, "oov": OOV_ID, "first_vocab_id": 2}
        return out

    @classmethod
    def from_json(cls, data: dict) -> DataSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["split_times"] = tuple(kwargs.get("split_times", ()))
        return cls(**kwargs)

    @classmethod
    def load(cls, data_dir: str) -> DataSpec:
        with open(os.path.join(data_dir, SCHEMA_FILE)) as f:
            return cls.from_json(json.load(f))


# ---------------------------------------------------------------------------------------------
# Serving: the signatures of the exported SavedModels (``export/``) and of the client
# (``serving/``). Two models: ``retrieval`` (the GSU: top-K search over the lifelong history)
# and ``ranking`` (ESU + MLP over the K kept behaviours). Each has a raw signature (identifiers
# as the logs have them: string item ids, raw query text, attribute strings; the vocabulary
# lookups and the query tokenisation run inside the SavedModel) and an encoded one (the int64
# ids above).
#
# The retrieval outputs named ``kept_*`` are exactly the ranking inputs of the same names, so a
# client pipes one stage into the other. Shape symbols: "L" history length (any, per request),
# "K" the model's top_k, "Q" query tokens per query, "D" the embedding size, "A" the model's
# max_attributes. A history is padded with "" (strings) / 0 (ids), most recent LAST, as the
# tf.data reader yields it.
# ---------------------------------------------------------------------------------------------
RETRIEVAL_MODEL = "retrieval"
RANKING_MODEL = "ranking"
SERVING_MODELS = (RETRIEVAL_MODEL, RANKING_MODEL)

TARGET_FEATURES = tuple(f for f in MODEL_FEATURES if f.name.startswith("target_"))
# The target's attributes as the request gives them (e.g. a brand-new item, unknown to the
# item vocabulary, still has its attributes). A serving input only: training reads an item's
# attributes from the ``item_attributes`` table by its id and never feeds this.
ATTRIBUTE_SEMANTICS = (
    "at most A (the model's max_attributes) per target, the rest padding. A row of padding "
    "only takes target_item's attributes from the item table (as without this input); a row "
    "with any attribute replaces the table's attributes for that target"
)
TARGET_ATTRIBUTES = FeatureSpec(
    "target_attributes", "int64", ("A",), PAD_ID,
    f"attribute ids of the target (0 = padding, 1 = OOV), {ATTRIBUTE_SEMANTICS}",
    optional=True,
)  # fmt: skip
SERVING_TARGET_FEATURES = TARGET_FEATURES + (TARGET_ATTRIBUTES,)
HISTORY_FEATURES = tuple(f for f in MODEL_FEATURES if f.name.startswith("hist_"))
KEPT_FEATURES = (
    FeatureSpec(
        "kept_item", "int64", ("K",), PAD_ID, "item ids of the kept behaviours, best first"
    ),
    FeatureSpec("kept_query", "int64", ("K",), PAD_ID, "query ids of the kept behaviours"),
    FeatureSpec("kept_query_tokens", "int64", ("K", "Q"), PAD_ID, "kept behaviours' query tokens"),
    FeatureSpec("kept_label", "int64", ("K",), PAD_ID, "click labels of the kept behaviours"),
    FeatureSpec("kept_score", "float32", ("K",), 0.0, "first-stage score (0 where none kept)"),
)
KEPT_POSITION = FeatureSpec(
    "kept_position", "int64", ("K",), -1,
    "position of each kept behaviour in the request's history; -1 where fewer than K are real",
)  # fmt: skip
SHORT_TERM = FeatureSpec(
    "short_term", "float32", ("D",), 0.0,
    "mean pair vector of the last short_term_len behaviours (models with short_term_len > 0)",
)  # fmt: skip
# Models with user features: the retrieval summarises the whole (max_len-cut) history it
# searched for the ranking, which sees only the K kept behaviours; both models take the user
# (``user_id`` raw, ``user`` encoded; the ranking embeds it).
HISTORY_STATS = FeatureSpec(
    "history_stats", "float32", (5,), 0.0,
    "[log1p(real behaviours of the history), their click rate, log1p(user_counts events), "
    "their click rate, log1p(hours since the latest)] (0 where there are none)",
)  # fmt: skip
PROBABILITY = FeatureSpec("probability", "float32", (), 0.0, "click probability of the target")
# Stored product-quantization codes of the history (models whose GSU scorer is ``"pq"``): per
# behaviour, per GSU modality ``M``, per sub-vector ``S`` the index of its nearest centroid;
# -1 where the behaviour lacks the modality (and everywhere in padding).
PQ_CODES = FeatureSpec(
    "hist_pq_codes", "int32", ("L", "M", "S"), -1,
    "product-quantization codes of the history's GSU vectors (-1: modality absent)",
)  # fmt: skip

# A model feature's vocabulary, by the suffix of its name (``None``: not an id).
_VOCAB_SUFFIXES = (
    ("_query_tokens", "query_token"), ("_item", "item"), ("_query", "query"),
    ("_attributes", "attribute"), ("user", "user"), ("user_id", "user"),
)  # fmt: skip


def vocab_kind(name: str) -> str | None:
    """The ``VOCAB_FILES`` kind a feature's ids come from (``"item"``, ``"query"``,
    ``"query_token"``, ``"attribute"``, ``"user"``), or None for a feature that is not an id
    (labels, scores)."""
    for suffix, kind in _VOCAB_SUFFIXES:
        if name.endswith(suffix):
            return kind
    return None


def raw_feature(feature: FeatureSpec) -> FeatureSpec | None:
    """The raw-signature form of an encoded feature: item ids and attribute ids become
    strings as in the logs, query ids become the raw query text (whose tokens are computed
    inside the SavedModel, so ``*_query_tokens`` has no raw form: None); other features are
    unchanged."""
    kind = vocab_kind(feature.name)
    if kind == "query_token":
        return None
    if kind == "user":
        desc = "user id as in the logs ('' = unknown user: padding; unseen = OOV)"
        return dataclasses.replace(
            feature, name="user_id", dtype="string", padding="", description=desc
        )
    if kind == "item":
        desc = f"{feature.description} as in the logs ('' = padding, unknown = OOV)"
        return dataclasses.replace(feature, dtype="string", padding="", description=desc)
    if kind == "attribute":
        desc = (
            "attribute strings of the target as in the logs ('' = padding, unknown = OOV), "
            + ATTRIBUTE_SEMANTICS
        )
        return dataclasses.replace(feature, dtype="string", padding="", description=desc)
    if kind == "query":
        desc = "raw query text ('' = no query), normalised and tokenised in the SavedModel"
        return dataclasses.replace(feature, dtype="string", padding="", description=desc)
    return feature


def _raw(features: tuple) -> tuple:
    return tuple(r for r in (raw_feature(f) for f in features) if r is not None)


@dataclasses.dataclass(frozen=True)
class SignatureSpec:
    """One serving signature: the SavedModel it belongs to, its key, and its flat named
    inputs and outputs (each with a leading batch dimension added at export)."""

    model: str
    name: str
    encoded: bool
    inputs: tuple
    outputs: tuple


SERVING_SIGNATURES = {
    s.name: s
    for s in (
        SignatureSpec(
            RETRIEVAL_MODEL, "retrieve", False,
            _raw(SERVING_TARGET_FEATURES + HISTORY_FEATURES),
            (KEPT_POSITION,) + _raw(KEPT_FEATURES),
        ),
        SignatureSpec(
            RETRIEVAL_MODEL, "retrieve_encoded", True,
            SERVING_TARGET_FEATURES + HISTORY_FEATURES, (KEPT_POSITION,) + KEPT_FEATURES,
        ),
        SignatureSpec(
            RANKING_MODEL, "rank", False, _raw(SERVING_TARGET_FEATURES + KEPT_FEATURES),
            (PROBABILITY,),
        ),
        SignatureSpec(
            RANKING_MODEL, "rank_encoded", True, SERVING_TARGET_FEATURES + KEPT_FEATURES,
            (PROBABILITY,),
        ),
    )
}  # fmt: skip
# Extra signatures of the retrieval model of a ``"pq"`` model: a history -> its stored codes
# (what an event store keeps per behaviour, computed once per new event).
_CODE_INPUTS = tuple(f for f in HISTORY_FEATURES if f.name != "hist_label")
PQ_SIGNATURES = {
    s.name: s
    for s in (
        SignatureSpec(RETRIEVAL_MODEL, "pq_codes", False, _raw(_CODE_INPUTS), (PQ_CODES,)),
        SignatureSpec(RETRIEVAL_MODEL, "pq_codes_encoded", True, _CODE_INPUTS, (PQ_CODES,)),
    )
}
# ``serving_default`` of each model is its raw signature.
DEFAULT_SIGNATURES = {RETRIEVAL_MODEL: "retrieve", RANKING_MODEL: "rank"}
SERVING_RAW_FEATURES = {n: s.inputs for n, s in SERVING_SIGNATURES.items() if not s.encoded}
SERVING_ENCODED_FEATURES = {n: s.inputs for n, s in SERVING_SIGNATURES.items() if s.encoded}


def serving_signature(
    name: str, short_term: bool = False, extra_inputs: tuple = (), user_features: bool = False
) -> SignatureSpec:
    """The :class:`SignatureSpec` ``name`` with the optional features of one model: the
    ``short_term`` vector (retrieval output and ranking input of a model with
    ``short_term_len > 0``), ``extra_inputs`` of the retrieval (features a GSU scorer
    declares, e.g. stored product-quantization codes) and, for a model with
    ``user_features``, the user (``user_id`` raw, ``user`` encoded; an input of both models,
    optional, so one request's features fit either stage: the retrieval only checks it), the
    retrieval's optional ``user_counts`` and ``history_stats`` (retrieval output, ranking
    input). The ``PQ_SIGNATURES`` have no
    optional features."""
    known = {**SERVING_SIGNATURES, **PQ_SIGNATURES}
    if name not in known:
        raise ValueError(f"Unknown serving signature {name!r}; known: {sorted(known)}")
    sig = known[name]
    if name in PQ_SIGNATURES:
        return sig
    inputs, outputs = sig.inputs, sig.outputs
    user = USER if sig.encoded else raw_feature(USER)
    if sig.model == RETRIEVAL_MODEL:
        inputs = inputs + ((user, USER_COUNTS) if user_features else ()) + tuple(extra_inputs)
        outputs = outputs + ((SHORT_TERM,) if short_term else ())
        outputs = outputs + ((HISTORY_STATS,) if user_features else ())
    else:
        if short_term:
            inputs = inputs + (SHORT_TERM,)
        if user_features:
            inputs = inputs + (user, HISTORY_STATS)
    return dataclasses.replace(sig, inputs=inputs, outputs=outputs)


def resolve_serving_shape(shape: tuple, sizes: dict) -> tuple:
    """``shape`` with its symbols replaced from ``sizes`` (e.g. ``{"L": None, "K": 50}``)."""
    return tuple(sizes.get(d, d) if isinstance(d, str) else d for d in shape)
