"""Query normalisation and tokenisation, shared by preprocessing, the export and the readers.

A query is normalised by collapsing every whitespace run (``str.split()`` semantics, which
includes line breaks such as ``\r``, ``\x85``, ``\u2028``) into one space, stripping and
lower-casing (the key of the query vector table, one line of ``vocab/queries.txt``); its
tokens are the maximal runs of letters, digits and underscores, at most ``max_tokens`` of them
(the first ones), as the paper's "mean of up to 5 keyword embeddings".
"""

from __future__ import annotations

import os
import re

import numpy as np

from seminar_tf.spec import NUM_RESERVED_IDS, OOV_ID, VOCAB_DIR, VOCAB_FILES

# Python's \w on str is Unicode-aware; TF's RE2 equivalent is [\pL\pN_].
TOKEN_PATTERN = r"\w+"
TF_SPLIT_PATTERN = r"[^\pL\pN_]+"

_TOKEN_RE = re.compile(TOKEN_PATTERN)


def normalize_query(query: str) -> str:
    # Collapsing (not only stripping) whitespace keeps a normalised query on one line of the
    # vocabulary file whatever line-breaking characters the raw text holds.
    return " ".join(query.split()).lower()


def tokenize_query(query: str, max_tokens: int) -> list[str]:
    return _TOKEN_RE.findall(normalize_query(query))[:max_tokens]


def query_token_table(queries: list[str], tokens: list[str], max_tokens: int) -> np.ndarray:
    """Token ids of each query: int64 ``[len(queries) + 2, max_tokens]`` (row ``i + 2`` for
    ``queries[i]``; rows 0 and 1, padding and OOV, empty), 0-padded, tokens missing from
    ``tokens`` as the OOV id 1: what preprocessing writes for an event of that query."""
    token_ids = {t: i + NUM_RESERVED_IDS for i, t in enumerate(tokens)}
    out = np.zeros((len(queries) + NUM_RESERVED_IDS, max_tokens), np.int64)
    for row, query in enumerate(queries, start=NUM_RESERVED_IDS):
        ids = [token_ids.get(t, OOV_ID) for t in tokenize_query(query, max_tokens)]
        out[row, : len(ids)] = ids
    return out


def read_vocabulary(data_dir: str, kind: str) -> list[str]:
    """The values of ``vocab/<kind>.txt`` of a preprocessing output, in id order (the first
    is id 2). Split on "\\n" only: a value never holds one, but may hold other characters
    that ``str.splitlines`` would split on."""
    path = os.path.join(data_dir, VOCAB_DIR, VOCAB_FILES[kind])
    with open(path, encoding="utf-8") as f:
        return f.read().split("\n")[:-1]


def load_query_token_table(data_dir: str, max_tokens: int) -> np.ndarray:
    """:func:`query_token_table` of a preprocessing output's query and token vocabularies
    (``spec.DERIVED_TABLE_ARRAYS``: derived, so outputs of any age have it)."""
    return query_token_table(
        read_vocabulary(data_dir, "query"), read_vocabulary(data_dir, "query_token"), max_tokens
    )
