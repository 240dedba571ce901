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

# ---------------------------------------------------------------------------------------------
# Stored sequence records: one tf.train.Example per user chunk, columns of equal length n
# (query_tokens has n * max_query_tokens entries). The first ``num_prefix`` events of a chunk
# are history only (copied from the previous chunk so windows can be cut without it).
# ---------------------------------------------------------------------------------------------
SEQ_CONTEXT_BYTES = ("user_id",)
SEQ_CONTEXT_INT = ("chunk", "num_prefix")
SEQ_COLUMNS = ("item", "query", "timestamp", "label", "split")
SEQ_QUERY_TOKENS = "query_tokens"


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """One model input: name, dtype, per-example shape and padding value.

    ``shape`` uses the symbols ``"L"`` (history length) and ``"Q"`` (query tokens per query);
    resolve it with :func:`resolve_shape`.
    """

    name: str
    dtype: str
    shape: tuple
    padding: object
    description: str


MODEL_FEATURES = (
    FeatureSpec("target_item", "int64", (), PAD_ID, "item id of the target"),
    FeatureSpec("target_query", "int64", (), PAD_ID, "query id of the target (0: no query)"),
    FeatureSpec("target_query_tokens", "int64", ("Q",), PAD_ID, "query token ids"),
    FeatureSpec("hist_item", "int64", ("L",), PAD_ID, "item ids of the history, most recent last"),
    FeatureSpec("hist_query", "int64", ("L",), PAD_ID, "query ids of the history"),
    FeatureSpec("hist_query_tokens", "int64", ("L", "Q"), PAD_ID, "history query token ids"),
    FeatureSpec("hist_label", "int64", ("L",), PAD_ID, "history click labels (0/1)"),
)
MODEL_FEATURE_NAMES = tuple(f.name for f in MODEL_FEATURES)
LABEL = FeatureSpec("label", "float32", (), 0.0, "click label of the target")
# Carried beside the features for evaluation (GAUC groups by user), not fed to the model.
META_FEATURES = (
    FeatureSpec("user_id", "string", (), b"", "raw user id"),
    FeatureSpec("timestamp", "int64", (), 0, "target timestamp"),
    FeatureSpec("hist_timestamp", "int64", ("L",), 0, "history timestamps"),
)

DEFAULT_MAX_LEN = 100
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
    max_attributes: int = DEFAULT_MAX_ATTRIBUTES
    max_query_tokens: int = DEFAULT_MAX_QUERY_TOKENS
    text_dim: int = 0
    image_dim: int = 0
    query_text_dim: int = 0
    max_len: int = DEFAULT_MAX_LEN
    chunk_size: int = DEFAULT_CHUNK_SIZE
    split_mode: str = "time"
    split_times: tuple = ()

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
