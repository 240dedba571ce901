"""MovieLens "latest-small" (with the shipped text/image/tag vectors) -> the raw data contract.

- events: every rating is an impression; ``label = rating >= 4``. When the same user tagged the
  same movie, the earliest such tag becomes the event's query (real user-written text);
  otherwise the query is empty. Tags with no matching rating are dropped and counted.
- items: ``text`` is the title (with year), ``attributes`` are the genres plus ``year:YYYY``
  and ``decade:YYY0s``; ``text_embedding`` (384) for every movie and ``image_embedding`` (64)
  only where a poster exists (an empty list otherwise: a missing modality).
- queries: the tag vectors, keyed by the normalised tag.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pyarrow as pa

from seminar_tf.data.readers import DataError
from seminar_tf.text import normalize_query

REQUIRED_FILES = ("ratings.csv", "movies.csv", "tags.csv", "item_features.parquet")
_YEAR_RE = re.compile(r"\((\d{4})\)\s*$")


def is_movielens_dir(path: str) -> bool:
    return os.path.isdir(path) and all(
        os.path.exists(os.path.join(path, f)) for f in ("ratings.csv", "movies.csv")
    )


def load(path: str) -> tuple[dict[str, pa.Table], dict[str, int]]:
    """Reads the MovieLens folder; returns ``({"events", "items", "queries"}, counts)``."""
    import pandas as pd
    import pyarrow.parquet as pq

    missing = [f for f in REQUIRED_FILES if not os.path.exists(os.path.join(path, f))]
    if missing:
        raise DataError(f"{path}: not a MovieLens folder, missing {', '.join(missing)}")
    ratings = pd.read_csv(os.path.join(path, "ratings.csv"))
    movies = pd.read_csv(os.path.join(path, "movies.csv"))
    tags = pd.read_csv(os.path.join(path, "tags.csv"), keep_default_na=False)

    tags = tags.sort_values(["userId", "movieId", "timestamp", "tag"], kind="stable")
    first_tag = tags.drop_duplicates(["userId", "movieId"])[["userId", "movieId", "tag"]]
    events = ratings.merge(first_tag, on=["userId", "movieId"], how="left")
    events["tag"] = events["tag"].fillna("")
    matched = events["tag"] != ""
    tag_pairs = set(zip(first_tag.userId, first_tag.movieId))
    rated_pairs = set(zip(ratings.userId, ratings.movieId))

    events_table = pa.table(
        {
            "user_id": pa.array(events.userId.astype(str).to_numpy(), pa.string()),
            "timestamp": pa.array(events.timestamp.to_numpy(np.int64)),
            "item_id": pa.array(events.movieId.astype(str).to_numpy(), pa.string()),
            "query": pa.array(events.tag.astype(str).to_numpy(), pa.string()),
            "label": pa.array((events.rating >= 4.0).to_numpy().astype(np.int64)),
        }
    )

    features = pq.read_table(os.path.join(path, "item_features.parquet")).to_pandas()
    features = features.set_index("movieId")
    texts, attrs, text_vecs, image_vecs = [], [], [], []
    for movie_id, title, genres in zip(movies.movieId, movies.title, movies.genres):
        texts.append(str(title))
        attr = [g for g in str(genres).split("|") if g and g != "(no genres listed)"]
        year = _YEAR_RE.search(str(title).strip())
        if year:
            attr += [f"year:{year.group(1)}", f"decade:{year.group(1)[:3]}0s"]
        attrs.append(attr)
        if movie_id in features.index:
            row = features.loc[movie_id]
            text_vecs.append(np.asarray(row.text_embedding, np.float32))
            image_vecs.append(
                np.asarray(row.image_embedding, np.float32) if row.has_image else np.zeros(0)
            )
        else:
            text_vecs.append(np.zeros(0))
            image_vecs.append(np.zeros(0))
    items_table = pa.table(
        {
            "item_id": pa.array(movies.movieId.astype(str).to_numpy(), pa.string()),
            "text": pa.array(texts, pa.string()),
            "attributes": pa.array(attrs, pa.list_(pa.string())),
            "text_embedding": pa.array([v.tolist() for v in text_vecs], pa.list_(pa.float32())),
            "image_embedding": pa.array([v.tolist() for v in image_vecs], pa.list_(pa.float32())),
        }
    )

    tables = {"events": events_table, "items": items_table}
    tag_file = os.path.join(path, "tag_embeddings.parquet")
    if os.path.exists(tag_file):
        q = pq.read_table(tag_file)
        norm = [normalize_query(t) for t in q.column("tag").to_pylist()]
        tables["queries"] = pa.table(
            {
                "query": pa.array(norm, pa.string()),
                "text_embedding": q.column("text_embedding").cast(pa.list_(pa.float32())),
            }
        )
    counts = {
        "ratings": len(ratings),
        "tags": len(tags),
        "events_with_query": int(matched.sum()),
        "tags_without_rating": len(tag_pairs - rated_pairs),
    }
    return tables, counts
