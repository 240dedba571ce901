"""Query normalisation and tokenisation, shared by preprocessing and (later) the export.

A query is normalised by stripping and lower-casing (the key of the query vector table); its
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
    return query.strip().lower()


def tokenize_query(query: str, max_tokens: int) -> list[str]:
    return _TOKEN_RE.findall(normalize_query(query))[:max_tokens]
