"""Query normalisation and tokenisation, shared by preprocessing and (later) the export.

A query is normalised by collapsing every whitespace run (``str.split()`` semantics, which
includes line breaks such as ``\r``, ``\x85``, ``\u2028``) into one space, stripping and
lower-casing (the key of the query vector table, one line of ``vocab/queries.txt``); its
tokens are the maximal runs of letters, digits and underscores, at most ``max_tokens`` of them
(the first ones), as the paper's "mean of up to 5 keyword embeddings".
"""

from __future__ import annotations

import re

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
