"""Seeded synthetic lifelong recommendation data in the raw contract of :mod:`seminar_tf.spec`.

``generate(SynthConfig(...))`` returns three ``pyarrow.Table`` objects (``events``, ``items``,
``queries``) with exactly the columns and types of ``spec.EVENT_FIELDS``, ``spec.ITEM_FIELDS``
and ``spec.QUERY_VECTOR_FIELDS``; ``write()`` stores them as Parquet, CSV or JSON Lines.
Everything is vectorised numpy (no per-event Python loop) and deterministic for a seed.

Generative story
----------------
*Topics.* There are ``num_interests`` latent topics with unit centres ``C[k]`` in
``latent_dim`` dimensions and a Zipf-like global popularity. Each topic owns
``brands_per_topic`` brands and ``subcats_per_topic`` sub-categories (each with its own latent
offset around the topic centre); sub-categories are grouped into ``num_categories`` categories.

*Items.* Item ``i`` has a primary topic ``t1`` (drawn by topic popularity; every topic gets at
least one item), a different secondary topic ``t2`` and a mixture weight ``w ~ U(0.6, 1)``; its
latent vector is ``z = w C[t1] + (1 - w) C[t2] + brand/sub-category offsets + noise``. Its
attributes are, in this order and truncated to 1..5 of them: ``genre_<t1>``,
``brand_<b>``, ``cat_<c>/sub_<s>``, ``genre_<t2>``, ``style_<r>`` (so the first attribute is
always the primary genre). Its text is ``"item <n> "`` followed by the attribute words and a
few filler words. The text vector is ``z @ P_text + noise`` and the image vector is
``image_norm_scale * (z @ P_image + noise)`` with an independent projection: the image
modality has a norm ~``image_norm_scale`` times larger than the text modality (the failure
the multi-modal alignment task exists for). A fraction ``missing_image_fraction`` of items
have no image: their ``image_embedding`` is an empty list (the contract's "missing"). Every
item has a text vector. Item popularity is log-normal.

*Users.* User ``u`` has 2..``max_user_interests`` long-lived interests (topics drawn by
popularity, without replacement) with Dirichlet weights, and a click-propensity bias. The
number of events is heavy-tailed between ``min_events`` and ``max_events`` (a truncated Pareto
with exponent ``length_alpha``; 0 means log-uniform); with ``force_max_user`` one random user
has exactly ``max_events`` so small sets still contain a very long history. A user's activity
starts at a random point in the first 60% of a ``span_days`` window and lasts until its end;
it comes in sessions (geometric lengths, mean ``mean_session_length``, events ~1 minute
apart) separated by heavy-tailed gaps (log-normal), so a user's history spans months to years.

*Session interests.* Each session focuses on one of the user's interests. The focus is a
sticky chain over sessions: with probability ``interest_stickiness`` a session keeps the
previous session's interest, otherwise it redraws one from the user's weights. Interests
therefore come in eras and resurface after long gaps.

*Impressions.* Every event is an impression of one item. Its topic is the session's interest
with probability ``p_session_topic``, one of the user's long-lived interests drawn uniformly
(so dormant, low-weight ones too) with probability ``p_other_interest`` (lifelong
recommendations), and otherwise a random topic by global popularity (exploration); the item
is then drawn within the topic by item popularity. Because a session and an era are
dominated by one interest, the most recent ~20-50 events are a poor sample of the user's
interests, while the full history estimates all of them.

*Queries.* A fraction ``query_fraction`` of events are searches. Their query is made of the
impressed item's attribute tokens (``genre_7``, ``brand_40``, ``sub_12``, from the
attributes the item lists, plus at most one filler word such as ``best``) following a few
templates, so query strings repeat and a query vocabulary is meaningful. ``query_case_noise``
of the search events carry a raw variant of the query (capitalised, padded with spaces);
normalising it (``text.normalize_query``) gives the canonical form. The ``queries`` table has
one row per distinct normalised query; its vector is ``mean(token latents) @ P_text + noise``,
in the same space as the item text vectors (genre token -> topic centre, brand / sub-category
token -> its latent, filler word -> a small random vector).

*Labels.* Event ``j`` of user ``u`` at position ``p`` is clicked with probability
``sigmoid(click_bias + click_affinity_weight * sqrt(a) + pop_weight * log_pop_z + quality
+ user_bias + query_click_boost * is_search)`` where the affinity
``a = w * share(t1) + (1 - w) * share(t2)`` uses ``share(t)``, the fraction of the user's
``p`` earlier events (all of them, over the whole lifetime) whose item has primary topic
``t``; ``a = 0`` for a user's first event. A model that sees the full history can estimate
``a``; one that sees only the last ~20 events sees mostly the current session's interest and
cannot tell a dormant long-lived interest from a random exploration impression; one with no
history sees only item popularity. ``tests/test_synth.py`` checks that the genre share in
the full history predicts the label clearly better (AUC) than the genre share in the last 20
(with the defaults: AUC ~0.78 for the full-history share, ~0.70 for the last 50, ~0.68 for
the last 20, ~0.56 for item popularity alone; ~0.78 vs ~0.75 for logistic regressions that
also use the clicked share). Positives are ~40% of events.

Events come sorted by (user, timestamp) unless ``shuffle_rows``; timestamps are int64
seconds, strictly increasing within a user.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa

from seminar_tf import spec
from seminar_tf.data.readers import write_tables
from seminar_tf.text import normalize_query

FILLER_WORDS = ("best", "cheap", "new", "top", "sale", "gift", "review", "classic")
TEXT_WORDS = ("great", "quality", "original", "edition", "deluxe", "value", "pack", "series")

_PA_TYPES = {
    "string": pa.string(),
    "int64": pa.int64(),
    "list<string>": pa.list_(pa.string()),
    "list<float32>": pa.list_(pa.float32()),
}


def arrow_schema(fields: dict) -> pa.Schema:
    """A ``pyarrow.Schema`` from one of the ``spec`` field dictionaries."""
    return pa.schema([(name, _PA_TYPES[t]) for name, t in fields.items()])


@dataclasses.dataclass
class SynthConfig:
    num_users: int = 2000
    num_items: int = 5000
    min_events: int = 20
    max_events: int = 2000  # per user
    num_interests: int = 32  # latent topics
    latent_dim: int = 16
    text_dim: int = 32
    image_dim: int = 16
    query_fraction: float = 0.3
    seed: int = 0
    # Sequence lengths: truncated Pareto exponent (0: log-uniform); one user gets max_events.
    length_alpha: float = 0.0
    force_max_user: bool = True
    # Users and sessions.
    max_user_interests: int = 10
    mean_session_length: float = 12.0
    interest_stickiness: float = 0.85
    mean_event_gap_s: float = 60.0
    start_time: int = 1_500_000_000  # 2017-07-14
    span_days: float = 3 * 365.0
    # Impressions: session interest / other long-lived interest / random (the rest).
    p_session_topic: float = 0.7
    p_other_interest: float = 0.15
    topic_zipf: float = 0.5
    # Items and modalities.
    num_categories: int = 8
    brands_per_topic: int = 4
    subcats_per_topic: int = 3
    num_styles: int = 20
    image_norm_scale: float = 20.0
    missing_image_fraction: float = 0.2
    vector_noise: float = 0.2
    # Queries.
    query_case_noise: float = 0.05
    query_noise: float = 0.3
    # Labels.
    click_bias: float = -3.2
    click_affinity_weight: float = 5.0
    pop_weight: float = 0.3
    item_quality_std: float = 0.3
    user_bias_std: float = 0.4
    query_click_boost: float = 0.3
    # Row order of the events table.
    shuffle_rows: bool = False

    def validate(self) -> None:
        if self.num_users < 1 or self.num_items < 1:
            raise ValueError("num_users and num_items must be positive")
        if not 1 <= self.min_events <= self.max_events:
            raise ValueError("need 1 <= min_events <= max_events")
        if self.num_interests < 2:
            raise ValueError("num_interests must be at least 2")
        if self.num_items < self.num_interests:
            raise ValueError("num_items must be at least num_interests")
        if not 2 <= self.max_user_interests <= self.num_interests:
            raise ValueError("need 2 <= max_user_interests <= num_interests")
        if not 0.0 <= self.query_fraction <= 1.0:
            raise ValueError("query_fraction must be in [0, 1]")
        if self.p_session_topic + self.p_other_interest > 1.0:
            raise ValueError("p_session_topic + p_other_interest must be <= 1")
        if not 0.0 <= self.missing_image_fraction <= 1.0:
            raise ValueError("missing_image_fraction must be in [0, 1]")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _ids(prefix: str, n: int) -> np.ndarray:
    width = max(6, len(str(max(n - 1, 0))))
    return np.array([f"{prefix}{i:0{width}d}" for i in range(n)], dtype=object)


def _list_array(values: np.ndarray, lengths: np.ndarray, value_type: pa.DataType) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))


def _segment_exclusive_cumsum(values: np.ndarray, starts: np.ndarray, seg: np.ndarray):
    """Cumulative sum of ``values`` before each element within its segment.

    ``starts`` are the first indices of the segments, ``seg`` the segment of each element.
    """
    cs = np.cumsum(values)
    before = cs - values
    return before - before[starts][seg]


def _sample_lengths(cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    a, b = float(cfg.min_events), float(cfg.max_events) + 1.0
    u = rng.random(cfg.num_users)
    if cfg.length_alpha <= 0:
        x = a * (b / a) ** u
    else:
        al = cfg.length_alpha
        x = (a**-al - u * (a**-al - b**-al)) ** (-1.0 / al)
    lengths = np.clip(np.floor(x).astype(np.int64), cfg.min_events, cfg.max_events)
    if cfg.force_max_user:
        lengths[rng.integers(cfg.num_users)] = cfg.max_events
    return lengths


def generate(config: SynthConfig) -> dict[str, pa.Table]:
    """Generate ``{"events", "items", "queries"}`` tables (see the module docstring)."""
    cfg = config
    cfg.validate()
    rng = np.random.default_rng(cfg.seed)
    K, D, NI, U = cfg.num_interests, cfg.latent_dim, cfg.num_items, cfg.num_users
    B, S = cfg.brands_per_topic, cfg.subcats_per_topic

    # ---- topics, brands, sub-categories ------------------------------------------------------
    centres = _unit(rng.standard_normal((K, D)))
    topic_pop = 1.0 / np.arange(1, K + 1) ** cfg.topic_zipf
    topic_pop = topic_pop[rng.permutation(K)]
    topic_pop /= topic_pop.sum()
    brand_vec = centres[np.repeat(np.arange(K), B)] + 0.4 * rng.standard_normal((K * B, D)) / D**0.5
    sub_vec = centres[np.repeat(np.arange(K), S)] + 0.4 * rng.standard_normal((K * S, D)) / D**0.5
    sub_category = rng.integers(cfg.num_categories, size=K * S)

    # ---- items -------------------------------------------------------------------------------
    t1 = rng.choice(K, size=NI, p=topic_pop)
    t1[:K] = rng.permutation(K)  # every topic has at least one item
    t2 = (t1 + 1 + rng.integers(K - 1, size=NI)) % K
    w1 = rng.uniform(0.6, 1.0, size=NI)
    brand = t1 * B + rng.integers(B, size=NI)
    sub = t1 * S + rng.integers(S, size=NI)
    style = rng.integers(cfg.num_styles, size=NI)
    z = (
        w1[:, None] * centres[t1]
        + (1 - w1)[:, None] * centres[t2]
        + 0.5 * (brand_vec[brand] - centres[t1])
        + 0.3 * (sub_vec[sub] - centres[t1])
        + 0.1 * rng.standard_normal((NI, D)) / D**0.5
    )
    log_pop = rng.normal(0.0, 1.0, size=NI)
    pop = np.exp(log_pop)
    quality = rng.normal(0.0, cfg.item_quality_std, size=NI)
    n_attr = rng.choice(5, size=NI, p=[0.1, 0.2, 0.3, 0.2, 0.2]) + 1

    # Projections scaled so that |z @ P| ~ |z| whatever the output dimension.
    td, imd = cfg.text_dim, cfg.image_dim
    p_text = rng.standard_normal((D, td)) / td**0.5
    p_image = rng.standard_normal((D, imd)) / imd**0.5
    text_vec = z @ p_text + cfg.vector_noise * rng.standard_normal((NI, td)) / td**0.5
    image_vec = cfg.image_norm_scale * (
        z @ p_image + cfg.vector_noise * rng.standard_normal((NI, imd)) / imd**0.5
    )
    has_image = rng.random(NI) >= cfg.missing_image_fraction
    word_a = rng.integers(len(TEXT_WORDS), size=NI)
    word_b = (word_a + 1 + rng.integers(len(TEXT_WORDS) - 1, size=NI)) % len(TEXT_WORDS)

    # ---- users -------------------------------------------------------------------------------
    M = cfg.max_user_interests
    n_int = rng.integers(2, M + 1, size=U)
    gumbel = -np.log(-np.log(rng.random((U, K))))
    user_topics = np.argsort(-(np.log(topic_pop)[None, :] + gumbel), axis=1)[:, :M]
    weights = rng.gamma(1.0, size=(U, M)) * (np.arange(M)[None, :] < n_int[:, None])
    cum_w = np.cumsum(weights / weights.sum(1, keepdims=True), axis=1)
    user_bias = rng.normal(0.0, cfg.user_bias_std, size=U)
    span_s = cfg.span_days * 86400.0
    win_start = cfg.start_time + np.floor(rng.uniform(0.0, 0.6, size=U) * span_s).astype(np.int64)
    win_len = cfg.start_time + int(span_s) - win_start
    lengths = _sample_lengths(cfg, rng)

    # ---- events: users -> sessions -> events --------------------------------------------------
    N = int(lengths.sum())
    ustart = np.zeros(U, dtype=np.int64)
    np.cumsum(lengths[:-1], out=ustart[1:])
    user_ev = np.repeat(np.arange(U), lengths)
    pos = np.arange(N) - ustart[user_ev]

    new_sess = rng.random(N) < 1.0 / cfg.mean_session_length
    new_sess[ustart] = True
    sess_first = np.flatnonzero(new_sess)
    sess_ev = np.cumsum(new_sess) - 1
    sess_user = user_ev[sess_first]
    n_sess = len(sess_first)
    first_sess_of_user = np.zeros(U, dtype=np.int64)
    np.cumsum(np.bincount(sess_user, minlength=U)[:-1], out=first_sess_of_user[1:])

    # Sticky interest chain over a user's sessions.
    switch = rng.random(n_sess) >= cfg.interest_stickiness
    switch[first_sess_of_user] = True
    drawn_slot = (rng.random(n_sess)[:, None] > cum_w[sess_user]).sum(1)
    drawn_slot = np.minimum(drawn_slot, n_int[sess_user] - 1)
    last_switch = np.maximum.accumulate(np.where(switch, np.arange(n_sess), 0))
    sess_topic = user_topics[sess_user, drawn_slot[last_switch]]

    # Timestamps: gaps within sessions (>= 1 s), heavy-tailed gaps between sessions, scaled so
    # that a user's sessions fill the user's activity window; strictly increasing per user.
    gap = np.ceil(rng.exponential(cfg.mean_event_gap_s, size=N)).astype(np.int64) + 1
    offset = _segment_exclusive_cumsum(gap, sess_first, sess_ev)
    sess_dur = np.bincount(sess_ev, weights=gap, minlength=n_sess).astype(np.int64)
    dur_before = _segment_exclusive_cumsum(sess_dur, first_sess_of_user, sess_user)
    user_dur = np.bincount(sess_user, weights=sess_dur, minlength=U).astype(np.int64)
    sess_gap = rng.lognormal(0.0, 1.5, size=n_sess)
    sess_gap[first_sess_of_user] = 0.0
    gap_before = np.cumsum(sess_gap)
    gap_before -= gap_before[first_sess_of_user][sess_user]
    gap_total = np.bincount(sess_user, weights=sess_gap, minlength=U)
    frac = gap_before / np.maximum(gap_total[sess_user], 1e-12)
    room = np.maximum(win_len - user_dur, 0)[sess_user]
    sess_start = win_start[sess_user] + np.floor(frac * room).astype(np.int64) + dur_before
    timestamp = sess_start[sess_ev] + offset

    # Impressions: session interest / another long-lived interest / random topic.
    r = rng.random(N)
    other_slot = np.minimum((rng.random(N) * n_int[user_ev]).astype(np.int64), n_int[user_ev] - 1)
    random_topic = rng.choice(K, size=N, p=topic_pop)
    ev_topic = np.where(
        r < cfg.p_session_topic,
        sess_topic[sess_ev],
        np.where(
            r < cfg.p_session_topic + cfg.p_other_interest,
            user_topics[user_ev, other_slot],
            random_topic,
        ),
    )
    # Item within the topic, by popularity.
    item_order = np.argsort(t1, kind="stable")
    cum_pop = np.cumsum(pop[item_order])
    topic_first = np.searchsorted(t1[item_order], np.arange(K), side="left")
    topic_last = np.searchsorted(t1[item_order], np.arange(K), side="right") - 1
    lo = np.where(topic_first > 0, cum_pop[np.maximum(topic_first - 1, 0)], 0.0)
    hi = cum_pop[topic_last]
    target = lo[ev_topic] + rng.random(N) * (hi - lo)[ev_topic]
    k = np.searchsorted(cum_pop, target, side="right")
    k = np.clip(k, topic_first[ev_topic], topic_last[ev_topic])
    ev_item = item_order[k]

    # ---- labels: affinity of the target's topic mixture to the user's whole history ----------
    span = int(lengths.max()) + 1
    comb = np.sort((user_ev * K + t1[ev_item]) * span + pos)

    def count_before(topic):
        key = (user_ev * K + topic) * span
        return np.searchsorted(comb, key + pos) - np.searchsorted(comb, key)

    denom = np.maximum(pos, 1)
    share1 = count_before(t1[ev_item]) / denom
    share2 = count_before(t2[ev_item]) / denom
    affinity = w1[ev_item] * share1 + (1 - w1[ev_item]) * share2

    is_search = rng.random(N) < cfg.query_fraction
    logit = (
        cfg.click_bias
        + cfg.click_affinity_weight * np.sqrt(affinity)
        + cfg.pop_weight * log_pop[ev_item]
        + quality[ev_item]
        + user_bias[user_ev]
        + cfg.query_click_boost * is_search
    )
    label = (rng.random(N) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)

    # ---- queries -----------------------------------------------------------------------------
    # Token ids: genres [0, K), brands [K, K + K*B), sub-categories next, then filler words.
    brand_tok0, sub_tok0 = K, K + K * B
    fill_tok0 = sub_tok0 + K * S
    n_tok = fill_tok0 + len(FILLER_WORDS)
    q_ev = np.flatnonzero(is_search)
    q_item = ev_item[q_ev]
    nq = len(q_ev)
    genre_t = t1[q_item]
    brand_t = np.where(n_attr[q_item] >= 2, brand_tok0 + brand[q_item], genre_t)
    sub_t = np.where(n_attr[q_item] >= 3, sub_tok0 + sub[q_item], genre_t)
    fill_t = fill_tok0 + rng.integers(len(FILLER_WORDS), size=nq)
    none = np.full(nq, -1)
    templates = [  # (first token, second token); -1: none
        (genre_t, none),
        (genre_t, fill_t),
        (brand_t, none),
        (genre_t, brand_t),
        (fill_t, sub_t),
        (brand_t, sub_t),
    ]
    tmpl = rng.choice(len(templates), size=nq, p=[0.2, 0.15, 0.2, 0.2, 0.1, 0.15])
    tok_a = np.choose(tmpl, [t[0] for t in templates])
    tok_b = np.choose(tmpl, [t[1] for t in templates])
    tok_b = np.where(tok_b == tok_a, -1, tok_b)  # e.g. "genre_3 genre_3" after a fallback
    code = tok_a * (n_tok + 1) + (tok_b + 1)
    uniq_code, q_index = np.unique(code, return_inverse=True)

    tok_names = (
        [f"genre_{t}" for t in range(K)]
        + [f"brand_{b}" for b in range(K * B)]
        + [f"sub_{s}" for s in range(K * S)]
        + list(FILLER_WORDS)
    )
    tok_vec = np.concatenate(
        [centres, brand_vec, sub_vec, 0.3 * rng.standard_normal((len(FILLER_WORDS), D)) / D**0.5]
    )
    ua, ub = uniq_code // (n_tok + 1), uniq_code % (n_tok + 1) - 1
    q_strings = [
        tok_names[a] if b < 0 else f"{tok_names[a]} {tok_names[b]}"
        for a, b in zip(ua.tolist(), ub.tolist(), strict=True)
    ]
    q_latent = np.where(
        (ub >= 0)[:, None], (tok_vec[ua] + tok_vec[np.maximum(ub, 0)]) / 2, tok_vec[ua]
    )
    nu = len(uniq_code)
    q_vec = q_latent @ p_text + cfg.query_noise * rng.standard_normal((nu, td)) / td**0.5
    raw_variants = [f"  {s.title()} " for s in q_strings]
    all_queries = np.array([""] + q_strings + raw_variants, dtype=object)
    variant = rng.random(nq) < cfg.query_case_noise
    ev_query_idx = np.zeros(N, dtype=np.int64)
    ev_query_idx[q_ev] = 1 + q_index + nu * variant

    # ---- tables ------------------------------------------------------------------------------
    user_ids = pa.array(_ids("u", U), type=pa.string())
    item_ids = pa.array(_ids("i", NI), type=pa.string())
    order = rng.permutation(N) if cfg.shuffle_rows else np.arange(N)
    events = pa.table(
        {
            "user_id": user_ids.take(pa.array(user_ev[order])),
            "timestamp": pa.array(timestamp[order], type=pa.int64()),
            "item_id": item_ids.take(pa.array(ev_item[order])),
            "query": pa.array(all_queries, type=pa.string()).take(pa.array(ev_query_idx[order])),
            "label": pa.array(label[order], type=pa.int64()),
        },
        schema=arrow_schema(spec.EVENT_FIELDS),
    )

    attr_matrix = [
        [f"genre_{t}" for t in range(K)],
        [f"brand_{b}" for b in range(K * B)],
        [f"cat_{sub_category[s]}/sub_{s}" for s in range(K * S)],
        [f"genre_{t}" for t in range(K)],
        [f"style_{x}" for x in range(cfg.num_styles)],
    ]
    attr_codes = [t1, brand, sub, t2, style]
    attributes, texts = [], []
    for i in range(NI):  # per item, cheap (no per-event work)
        attrs = [attr_matrix[j][attr_codes[j][i]] for j in range(n_attr[i])]
        attributes.extend(attrs)
        words = " ".join(a.replace("/", " ") for a in attrs)
        extra = f"{TEXT_WORDS[word_a[i]]} {TEXT_WORDS[word_b[i]]}"
        texts.append(f"item {i} {words} {extra}")
    items = pa.table(
        {
            "item_id": item_ids,
            "text": pa.array(texts, type=pa.string()),
            "attributes": _list_array(np.array(attributes, dtype=object), n_attr, pa.string()),
            "text_embedding": _list_array(
                text_vec.astype(np.float32).ravel(), np.full(NI, td), pa.float32()
            ),
            "image_embedding": _list_array(
                image_vec[has_image].astype(np.float32).ravel(),
                np.where(has_image, imd, 0),
                pa.float32(),
            ),
        },
        schema=arrow_schema(spec.ITEM_FIELDS),
    )
    assert all(normalize_query(s) == s for s in q_strings)
    queries = pa.table(
        {
            "query": pa.array(q_strings, type=pa.string()),
            "text_embedding": _list_array(
                q_vec.astype(np.float32).ravel(), np.full(nu, td), pa.float32()
            ),
        },
        schema=arrow_schema(spec.QUERY_VECTOR_FIELDS),
    )
    return {"events": events, "items": items, "queries": queries}


def write(tables: dict, out_dir: str, fmt: str = "parquet") -> dict[str, str]:
    """Write ``tables`` (as returned by :func:`generate`) to ``out_dir/<name>.<ext>``.

    ``fmt`` is ``parquet`` (the Arrow types as they are), ``csv`` or ``jsonl``; the file
    extension is the format name. In CSV (with a header row), list columns (``attributes``,
    ``text_embedding``, ``image_embedding``) are written as JSON strings in the cell, e.g.
    ``["genre_7","brand_40"]`` or ``[0.1,0.2]`` (``[]`` for a missing image); an empty string
    (the ``query`` of a recommendation event) is written as ``""``, so read it back as a
    string, not a null (pandas: ``keep_default_na=False``). In JSON Lines every row is one
    JSON object and list columns are plain JSON arrays. Floats are written in their shortest
    float32 form and read back exactly as float32. Returns ``{name: path}``.
    """
    return write_tables(tables, out_dir, fmt)
