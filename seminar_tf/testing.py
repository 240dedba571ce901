"""Random-but-consistent data for tests: a small DataSpec, side tables, feature batches, and a
planted-signal data set whose labels a history model can learn and a no-history model cannot.

Everything is numpy and follows ``seminar_tf.spec`` (feature names, dtypes, shapes, 0 =
padding, 1 = OOV). Nothing here imports Keras.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from seminar_tf import spec


def make_data_spec(
    num_items: int = 50,
    num_attributes: int = 12,
    num_query_tokens: int = 30,
    num_queries: int = 20,
    max_attributes: int = 3,
    max_query_tokens: int = 4,
    text_dim: int = 6,
    image_dim: int = 5,
    query_text_dim: int = 4,
    max_len: int = 12,
    num_users: int = 10,
    num_user_attributes: int = 0,
    max_user_attributes: int = 0,
    user_embedding_dim: int = 0,
) -> spec.DataSpec:
    """A small :class:`spec.DataSpec`; a dimension of 0 makes that modality absent (the users
    table's sizes default to 0: no users table)."""
    return spec.DataSpec(
        num_items=num_items,
        num_attributes=num_attributes,
        num_query_tokens=num_query_tokens,
        num_queries=num_queries,
        max_attributes=max_attributes,
        max_query_tokens=max_query_tokens,
        text_dim=text_dim,
        image_dim=image_dim,
        query_text_dim=query_text_dim,
        max_len=max_len,
        num_users=num_users,
        num_user_attributes=num_user_attributes,
        max_user_attributes=max_user_attributes,
        user_embedding_dim=user_embedding_dim,
    )


def make_tables(data_spec: spec.DataSpec, seed: int = 0, coverage: float = 0.6) -> dict:
    """Side tables per ``spec.TABLE_ARRAYS`` (row 0 = padding: empty; row 1 = OOV).

    Each item has 1..max_attributes attribute ids (0-padded); a fraction ``coverage`` of the
    items (and queries) has text / image vectors, the others have zeros and ``has`` False.
    Modalities with dimension 0 get ``[n, 0]`` arrays and all-False flags. A spec with a
    users table (``num_user_attributes`` or ``user_embedding_dim``) also gets
    ``spec.USER_TABLE_ARRAYS``: rows 0 and 1 empty, other users 0..max_user_attributes
    attribute ids and a vector for a fraction ``coverage`` of them.
    """
    rng = np.random.default_rng(seed)
    s = data_spec
    n_items, n_queries = s.num_items, max(s.num_queries, 0)
    attrs = np.zeros((n_items, s.max_attributes), np.int64)
    if s.max_attributes and s.num_attributes > spec.NUM_RESERVED_IDS:
        for i in range(spec.NUM_RESERVED_IDS, n_items):
            k = rng.integers(1, s.max_attributes + 1)
            attrs[i, :k] = rng.integers(spec.NUM_RESERVED_IDS, s.num_attributes, size=k)

    def vectors(rows, dim):
        has = np.zeros(rows, bool)
        vec = np.zeros((rows, dim), np.float32)
        if dim and rows > spec.NUM_RESERVED_IDS:
            has[spec.NUM_RESERVED_IDS :] = rng.random(rows - spec.NUM_RESERVED_IDS) < coverage
            vec[has] = rng.normal(size=(int(has.sum()), dim)).astype(np.float32)
        return vec, has

    text, has_text = vectors(n_items, s.text_dim)
    image, has_image = vectors(n_items, s.image_dim)
    qtext, q_has_text = vectors(n_queries, s.query_text_dim)
    out = {
        "item_attributes": attrs,
        "item_text_vectors": text,
        "item_has_text": has_text,
        "item_image_vectors": image,
        "item_has_image": has_image,
        "query_text_vectors": qtext,
        "query_has_text": q_has_text,
        "query_tokens": query_token_table(s),
    }
    if s.num_user_attributes or s.user_embedding_dim:
        user_attrs = np.zeros((s.num_users, s.max_user_attributes), np.int64)
        if s.num_user_attributes > spec.NUM_RESERVED_IDS:
            for u in range(spec.NUM_RESERVED_IDS, s.num_users):
                k = rng.integers(0, s.max_user_attributes + 1)
                user_attrs[u, :k] = rng.integers(
                    spec.NUM_RESERVED_IDS, s.num_user_attributes, size=k
                )
        user_vectors, user_has = vectors(s.num_users, s.user_embedding_dim)
        out.update(user_attributes=user_attrs, user_vectors=user_vectors, user_has_vector=user_has)
    return out


def query_token_table(data_spec: spec.DataSpec, seed: int = 0) -> np.ndarray:
    """``[num_queries, max_query_tokens]`` token ids of each query id (row 0: none), so a
    query id always comes with the same tokens."""
    rng = np.random.default_rng(seed + 7)
    s = data_spec
    table = np.zeros((max(s.num_queries, 1), s.max_query_tokens), np.int64)
    if s.num_query_tokens > spec.NUM_RESERVED_IDS and s.max_query_tokens:
        for q in range(1, s.num_queries):
            k = rng.integers(1, s.max_query_tokens + 1)
            table[q, :k] = rng.integers(spec.NUM_RESERVED_IDS, s.num_query_tokens, size=k)
    return table


def _place(rows: list, max_len: int, padding: str, rng) -> np.ndarray:
    """Left/right/mixed padding of variable-length rows into ``[n, max_len]``."""
    out = np.zeros((len(rows), max_len), np.int64)
    for i, row in enumerate(rows):
        n = len(row)
        left = padding == "left" or (padding == "mixed" and rng.random() < 0.5)
        if n:
            if left:
                out[i, max_len - n :] = row
            else:
                out[i, :n] = row
    return out


def make_features(
    data_spec: spec.DataSpec,
    batch_size: int,
    seed: int = 0,
    min_history: int = 0,
    query_rate: float = 0.5,
    padding: str = "left",
) -> dict:
    """A random batch of model inputs ``{name: int64 array}`` per ``spec.MODEL_FEATURES``.

    History lengths are uniform in ``[min_history, max_len]``; a fraction ``query_rate`` of
    the events has a query (whose tokens come from :func:`query_token_table`); ``padding``
    is ``"left"``, ``"right"`` or ``"mixed"``. Padded positions are 0 in every feature.
    ``user`` ids are uniform in ``[0, num_users)`` (0: unknown user), drawn from their own
    random stream so the other features do not depend on ``num_users``.
    """
    if padding not in ("left", "right", "mixed"):
        raise ValueError(f"`padding` must be 'left', 'right' or 'mixed', got {padding!r}.")
    rng = np.random.default_rng(seed)
    s = data_spec
    L, Q = s.max_len, s.max_query_tokens
    tokens = query_token_table(s)  # the tables' (make_tables): one world whatever the seed
    lo = spec.NUM_RESERVED_IDS

    def queries(shape):
        if s.num_queries <= lo:
            return np.zeros(shape, np.int64)
        q = rng.integers(lo, s.num_queries, size=shape)
        return np.where(rng.random(shape) < query_rate, q, 0)

    lengths = rng.integers(min_history, L + 1, size=batch_size)
    rows = [rng.integers(lo, s.num_items, size=n) for n in lengths]
    hist_item = _place(rows, L, padding, np.random.default_rng(seed + 1))
    mask = hist_item != 0
    hist_query = np.where(mask, queries((batch_size, L)), 0)
    hist_label = np.where(mask, rng.integers(0, 2, size=(batch_size, L)), 0)
    target_query = queries((batch_size,))
    return {
        "target_item": rng.integers(lo, s.num_items, size=batch_size).astype(np.int64),
        "target_query": target_query.astype(np.int64),
        "target_query_tokens": tokens[target_query].reshape(batch_size, Q),
        "hist_item": hist_item,
        "hist_query": hist_query.astype(np.int64),
        "hist_query_tokens": tokens[hist_query].reshape(batch_size, L, Q),
        "hist_label": hist_label.astype(np.int64),
        "user": np.random.default_rng([seed, 11])
        .integers(0, max(s.num_users, 1), size=batch_size)
        .astype(np.int64),
        "user_counts": _user_counts(hist_item, hist_label, np.random.default_rng([seed, 13])),
    }


def _user_counts(hist_item, hist_label, rng) -> np.ndarray:
    """``spec.USER_COUNTS`` consistent with the windows: the window's events and clicks plus
    a random earlier part of the history, and a random gap (0 for a user with no events)."""
    events = (hist_item != 0).sum(axis=1) + rng.integers(0, 50, size=len(hist_item))
    clicks = (hist_label > 0).sum(axis=1) + rng.integers(0, 25, size=len(hist_item))
    clicks = np.minimum(clicks, events)
    gap = np.where(events > 0, rng.integers(1, 10**7, size=len(hist_item)), 0)
    return np.stack([events, clicks, gap], axis=1).astype(np.int64)


def make_batch(data_spec: spec.DataSpec, batch_size: int, seed: int = 0, **kwargs):
    """``(features, labels)``: :func:`make_features` and random float32 0/1 labels."""
    features = make_features(data_spec, batch_size, seed=seed, **kwargs)
    labels = np.random.default_rng(seed + 3).integers(0, 2, size=batch_size).astype(np.float32)
    return features, labels


@dataclasses.dataclass
class PlantedData:
    """Output of :func:`make_planted_data`."""

    data_spec: spec.DataSpec
    tables: dict
    features: dict
    labels: np.ndarray
    item_topic: np.ndarray


def make_planted_data(
    num_examples: int,
    seed: int = 0,
    world_seed: int = 0,
    num_topics: int = 8,
    items_per_topic: int = 12,
    max_len: int = 20,
    min_history: int = 3,
    text_dim: int = 8,
    query_rate: float = 0.3,
    padding: str = "mixed",
) -> PlantedData:
    """A data set with a planted rule: ``label = 1`` iff the target item's topic appears
    anywhere in the history.

    The world (``world_seed``): items belong to topics; an item's first attribute is its
    topic (so attributes carry the signal) and its second a noise attribute; half of the
    items have a text vector near their topic's centre; there is no image modality; query
    ``2 + t`` is about topic ``t``. The examples (``seed``): a history mostly from two
    favourite topics; the target's topic is, with probability one half each, one of the
    history's topics (label 1) or one it lacks (label 0). The target alone says nothing
    about the label, so a model without history stays near AUC 0.5 while one that matches
    the target against the history can learn the rule. Data sets with the same
    ``world_seed`` share tables, so one can train on one and evaluate on another.
    """
    rng = np.random.default_rng(world_seed)
    lo = spec.NUM_RESERVED_IDS
    num_items = lo + num_topics * items_per_topic
    item_topic = np.full(num_items, -1, np.int64)
    item_topic[lo:] = np.repeat(np.arange(num_topics), items_per_topic)
    topic_items = [np.flatnonzero(item_topic == t) for t in range(num_topics)]
    num_noise_attrs = 10
    num_attributes = lo + num_topics + num_noise_attrs
    num_queries = lo + num_topics
    num_query_tokens = lo + num_topics + 5
    data_spec = spec.DataSpec(
        num_items=num_items,
        num_attributes=num_attributes,
        num_query_tokens=num_query_tokens,
        num_queries=num_queries,
        max_attributes=2,
        max_query_tokens=2,
        text_dim=text_dim,
        image_dim=0,
        query_text_dim=0,
        max_len=max_len,
        num_users=spec.NUM_RESERVED_IDS,  # no users: every example's user is unknown (0)
    )
    attrs = np.zeros((num_items, 2), np.int64)
    attrs[lo:, 0] = lo + item_topic[lo:]
    attrs[lo:, 1] = rng.integers(lo + num_topics, num_attributes, size=num_items - lo)
    centres = rng.normal(size=(num_topics, text_dim)).astype(np.float32)
    has_text = np.zeros(num_items, bool)
    has_text[lo:] = rng.random(num_items - lo) < 0.5
    text = np.zeros((num_items, text_dim), np.float32)
    text[has_text] = centres[item_topic[has_text]] + 0.3 * rng.normal(
        size=(int(has_text.sum()), text_dim)
    ).astype(np.float32)
    tables = {
        "item_attributes": attrs,
        "item_text_vectors": text,
        "item_has_text": has_text,
        "item_image_vectors": np.zeros((num_items, 0), np.float32),
        "item_has_image": np.zeros(num_items, bool),
        "query_text_vectors": np.zeros((num_queries, 0), np.float32),
        "query_has_text": np.zeros(num_queries, bool),
    }
    # Query q = lo + t is about topic t; its tokens: the topic token and a noise token.
    qtokens = np.zeros((num_queries, 2), np.int64)
    qtokens[lo:, 0] = lo + np.arange(num_topics)
    qtokens[lo:, 1] = rng.integers(lo + num_topics, num_query_tokens, size=num_topics)

    rng = np.random.default_rng([seed, 1])
    rows, hist_topics, targets = [], [], []
    for _ in range(num_examples):
        fav = rng.choice(num_topics, size=2, replace=False)
        n = int(rng.integers(min_history, max_len + 1))
        topics = np.where(
            rng.random(n) < 0.85, rng.choice(fav, size=n), rng.integers(0, num_topics, size=n)
        )
        rows.append(np.array([rng.choice(topic_items[t]) for t in topics], np.int64))
        hist_topics.append(set(topics.tolist()))
        present = sorted(set(topics.tolist()))
        absent = sorted(set(range(num_topics)) - set(present))
        pool = present if (rng.random() < 0.5 or not absent) else absent
        targets.append(int(rng.choice(topic_items[int(rng.choice(pool))])))
    target_item = np.asarray(targets, np.int64)
    labels = np.array([item_topic[t] in h for t, h in zip(target_item, hist_topics)], np.float32)
    hist_item = _place(rows, max_len, padding, rng)
    mask = hist_item != 0

    def queries_for(items, present):
        return np.where(present, lo + item_topic[items].clip(min=0), 0).astype(np.int64)

    hist_query = queries_for(hist_item, mask & (rng.random(hist_item.shape) < query_rate))
    target_query = queries_for(target_item, rng.random(num_examples) < query_rate)
    tables["query_tokens"] = qtokens
    features = {
        "target_item": target_item,
        "target_query": target_query,
        "target_query_tokens": qtokens[target_query],
        "hist_item": hist_item,
        "hist_query": hist_query,
        "hist_query_tokens": qtokens[hist_query],
        "hist_label": mask.astype(np.int64),
    }
    return PlantedData(data_spec, tables, features, labels, item_topic)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties get half credit), numpy only."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, np.float64).ravel()
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        raise ValueError("AUC needs both positive and negative labels.")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order), np.float64)
    all_scores = np.concatenate([pos, neg])[order]
    # average ranks for ties
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and all_scores[j + 1] == all_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1
        i = j + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def loss_and_gradients(model, inputs: dict, labels) -> tuple[float, list]:
    """The binary cross-entropy of ``model(inputs, training=True)`` against ``labels`` and
    its gradient for each trainable variable (numpy), on the TensorFlow or JAX backend: what
    tests compare between two graphs or two input layouts of one model."""
    import keras

    variables = model.trainable_variables
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = keras.losses.binary_crossentropy(labels, model(inputs, training=True))
        grads = tape.gradient(loss, variables)
        return float(loss), [np.asarray(tf.convert_to_tensor(g)) for g in grads]
    import jax

    fixed = [v.value for v in model.non_trainable_variables]

    def loss_fn(values):
        p, _ = model.stateless_call(values, fixed, inputs, training=True)
        return keras.losses.binary_crossentropy(labels, p)

    loss, grads = jax.value_and_grad(loss_fn)([v.value for v in variables])
    return float(loss), [np.asarray(g) for g in grads]
