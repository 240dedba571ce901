"""The item and query vector tables (``tables.npz``), indexed by vocabulary id, and, with a
users table (``--users``), the user attribute and vector tables indexed by the encoded user.

Vectors live here once, never inside the examples: a 384-float vector copied into every
behaviour would cost 1.5 KB per event.
"""

from __future__ import annotations

import io

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

from preprocessing.vocab import lookup_table
from seminar_tf.spec import NUM_RESERVED_IDS, OOV_ID, TABLES_FILE


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


def build_user_tables(
    vocabs: dict, users: list, dims: dict, max_user_attributes: int
) -> dict[str, np.ndarray]:
    """Dense arrays of ``spec.USER_TABLE_ARRAYS`` from the clean ``(user_id, row)`` of the
    users table, indexed by the user vocabulary (``vocab/users.txt``): a row of the table
    whose user has no id there (no events, or rarer than ``--min-user-count``) is not used,
    a user of the events missing from the table keeps an empty row (no attributes, a zero
    vector, ``user_has_vector`` False), as do rows 0 (unknown) and 1 (OOV). The width of
    ``user_attributes`` is the longest attribute list of the table, at most
    ``max_user_attributes`` (0 when no user has any)."""
    user_ids = lookup_table(vocabs["user"])
    attr_ids = lookup_table(vocabs.get("user_attribute", []))
    n_users = len(user_ids) + NUM_RESERVED_IDS
    width = min(max_user_attributes, max((len(u["attributes"]) for _, u in users), default=0))
    dim = dims.get("user_embedding", 0)
    out = {
        "user_attributes": np.zeros((n_users, width), np.int64),
        "user_vectors": np.zeros((n_users, dim), np.float32),
        "user_has_vector": np.zeros((n_users,), bool),
    }
    for _, user in users:
        idx = user_ids.get(user["user_id"])
        if idx is None:
            continue
        attrs = [attr_ids.get(a, OOV_ID) for a in user["attributes"]][:width]
        out["user_attributes"][idx, : len(attrs)] = attrs
        if user["embedding"]:
            out["user_vectors"][idx] = user["embedding"]
            out["user_has_vector"][idx] = True
    return out


class _WriteTables(beam.DoFn):
    def __init__(
        self, out_dir: str, max_attributes: int, with_users: bool = False,
        max_user_attributes: int = 0,
    ):  # fmt: skip
        self._out_dir = out_dir
        self._max_attributes = max_attributes
        # with_users: a users table was given (its arrays are written, even when every row
        # was rejected); without, tables.npz is as before users tables existed.
        self._with_users = with_users
        self._max_user_attributes = max_user_attributes

    def process(self, vocabs, items, queries, dims, users=()):
        tables = build_tables(vocabs, items, queries, dims, self._max_attributes)
        user_sizes = {}
        if self._with_users:
            user_tables = build_user_tables(vocabs, users, dims, self._max_user_attributes)
            tables.update(user_tables)
            known = set(vocabs["user"])
            user_sizes = {
                "num_user_attributes": len(vocabs.get("user_attribute", [])) + NUM_RESERVED_IDS,
                "max_user_attributes": user_tables["user_attributes"].shape[1],
                "user_embedding_dim": user_tables["user_vectors"].shape[1],
                "users_with_attributes": int((user_tables["user_attributes"] != 0).any(1).sum()),
                "users_with_vector": int(user_tables["user_has_vector"].sum()),
                "table_users_without_id": sum(1 for u, _ in users if u not in known),
            }
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
            **user_sizes,
        }


class WriteTables(beam.PTransform):
    """Vocabularies + clean items (+ query vectors, + users) -> ``OUT/tables.npz``; emits the
    sizes. ``users``: the clean ``(user_id, row)`` of a users table, or None without one
    (then ``max_user_attributes`` is not used and no user arrays are written)."""

    def __init__(
        self, out_dir: str, max_attributes: int, items, queries, dims, users=None,
        max_user_attributes: int = 0,
    ):  # fmt: skip
        super().__init__()
        self._out_dir = out_dir
        self._max_attributes = max_attributes
        self._items = items
        self._queries = queries
        self._dims = dims
        self._users = users
        self._max_user_attributes = max_user_attributes

    def expand(self, vocabs):
        side = [
            beam.pvalue.AsList(self._items),
            beam.pvalue.AsList(self._queries),
            beam.pvalue.AsSingleton(self._dims),
        ]
        if self._users is not None:
            side.append(beam.pvalue.AsList(self._users))
        return vocabs | "Write" >> beam.ParDo(
            _WriteTables(
                self._out_dir, self._max_attributes, self._users is not None,
                self._max_user_attributes,
            ),
            *side,
        )  # fmt: skip
