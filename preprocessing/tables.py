"""The item and query vector tables (``tables.npz``), indexed by vocabulary id.

Vectors live here once, never inside the examples: a 384-float vector copied into every
behaviour would cost 1.5 KB per event.
"""

from __future__ import annotations

import io

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

from preprocessing.vocab import lookup_table
from seminar_tf.spec import NUM_RESERVED_IDS, TABLES_FILE


def build_tables(
    vocabs: dict, items: list, queries: list, dims: dict, max_attributes: int
) -> dict[str, np.ndarray]:
    """Dense arrays of ``spec.TABLE_ARRAYS`` from the clean items and query vectors."""
    item_ids = lookup_table(vocabs["item"])
    attr_ids = lookup_table(vocabs["attribute"])
    query_ids = lookup_table(vocabs["query"])
    n_items = len(item_ids) + NUM_RESERVED_IDS
    n_queries = len(query_ids) + NUM_RESERVED_IDS
    text_dim = dims.get("text_embedding", 0)
    image_dim = dims.get("image_embedding", 0)
    query_dim = dims.get("query_text_embedding", 0)
    out = {
        "item_attributes": np.zeros((n_items, max_attributes), np.int64),
        "item_text_vectors": np.zeros((n_items, text_dim), np.float32),
        "item_has_text": np.zeros((n_items,), bool),
        "item_image_vectors": np.zeros((n_items, image_dim), np.float32),
        "item_has_image": np.zeros((n_items,), bool),
        "query_text_vectors": np.zeros((n_queries, query_dim), np.float32),
        "query_has_text": np.zeros((n_queries,), bool),
    }
    for _, item in items:
        idx = item_ids.get(item["item_id"])
        if idx is None:
            continue
        attrs = [attr_ids.get(a, 1) for a in item["attributes"]][:max_attributes]
        out["item_attributes"][idx, : len(attrs)] = attrs
        if item["text_embedding"]:
            out["item_text_vectors"][idx] = item["text_embedding"]
            out["item_has_text"][idx] = True
        if item["image_embedding"]:
            out["item_image_vectors"][idx] = item["image_embedding"]
            out["item_has_image"][idx] = True
    for _, row in queries:
        idx = query_ids.get(row["query"])
        if idx is not None:
            out["query_text_vectors"][idx] = row["text_embedding"]
            out["query_has_text"][idx] = True
    return out


class _WriteTables(beam.DoFn):
    def __init__(self, out_dir: str, max_attributes: int):
        self._out_dir = out_dir
        self._max_attributes = max_attributes

    def process(self, vocabs, items, queries, dims):
        tables = build_tables(vocabs, items, queries, dims, self._max_attributes)
        buf = io.BytesIO()
        np.savez(buf, **tables)
        with FileSystems.create(FileSystems.join(self._out_dir, TABLES_FILE)) as f:
            f.write(buf.getvalue())
        yield {
            "num_items": tables["item_text_vectors"].shape[0],
            "num_attributes": len(vocabs["attribute"]) + NUM_RESERVED_IDS,
            "num_query_tokens": len(vocabs["query_token"]) + NUM_RESERVED_IDS,
            "num_queries": tables["query_text_vectors"].shape[0],
            "text_dim": tables["item_text_vectors"].shape[1],
            "image_dim": tables["item_image_vectors"].shape[1],
            "query_text_dim": tables["query_text_vectors"].shape[1],
            "items_with_text": int(tables["item_has_text"].sum()),
            "items_with_image": int(tables["item_has_image"].sum()),
            "queries_with_vector": int(tables["query_has_text"].sum()),
        }


class WriteTables(beam.PTransform):
    """Vocabularies + clean items (+ query vectors) -> ``OUT/tables.npz``; emits the sizes."""

    def __init__(self, out_dir: str, max_attributes: int, items, queries, dims):
        super().__init__()
        self._out_dir = out_dir
        self._max_attributes = max_attributes
        self._items = items
        self._queries = queries
        self._dims = dims

    def expand(self, vocabs):
        return vocabs | "Write" >> beam.ParDo(
            _WriteTables(self._out_dir, self._max_attributes),
            beam.pvalue.AsList(self._items),
            beam.pvalue.AsList(self._queries),
            beam.pvalue.AsSingleton(self._dims),
        )
