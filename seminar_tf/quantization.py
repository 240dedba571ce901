"""Multi-modal product quantization of the first stage: codebooks, conversion, recall.

SEMINAR serves its first stage from product-quantized behaviours (see
``seminar_tf.layers.scorers.PQScorer``). The public code's codebooks are random and never
trained; here they are learned by k-means (faiss when installed, else scikit-learn) on the
trained model's own GSU vectors, per (modality, sub-vector), sampled from real histories so
frequent behaviours weigh as much as they do at serving time.

Typical use: train an exact model, then

```python
pq_model, report = quantize_model(model, dataset, num_subvectors=16, num_centroids=512)
recall = gsu_recall(model, pq_model, dataset, ks=(10, 50))   # share of the exact top-K kept
codes = pq_model.pq_codes(features)                          # what a store keeps per event
```
"""

from __future__ import annotations

import logging
import time

import keras
import numpy as np

log = logging.getLogger("seminar.quantize")


def distinct_rows(x: np.ndarray, weights: np.ndarray | None = None) -> tuple:
    """``(rows [N', e], weights [N'])``: the distinct rows of ``x`` ``[N, e]`` and the
    summed weight (default: the count) of each."""
    x = np.ascontiguousarray(x)
    keys = x.view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))).ravel()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    w = np.ones(len(x)) if weights is None else np.asarray(weights, np.float64)
    return x[first], np.bincount(inverse.ravel(), weights=w).astype(np.float32)


def kmeans(
    x: np.ndarray, k: int, seed: int = 0, iterations: int = 25, weights: np.ndarray | None = None
) -> np.ndarray:
    """``k`` centroids ``[k, e]`` of the rows of ``x`` ``[N, e]`` (each weighted by
    ``weights``, default 1).

    With at most ``k`` distinct rows the distinct rows themselves are the centroids (padded
    by repeating the first), so quantization is exact. Clusters the distinct rows with their
    summed weights (histories repeat items many times). Uses faiss when it is installed and
    scikit-learn's ``KMeans`` otherwise."""
    distinct, w = distinct_rows(np.asarray(x, np.float32), weights)
    if len(distinct) <= k:
        pad = np.repeat(distinct[:1], k - len(distinct), axis=0)
        return np.concatenate([distinct, pad], axis=0)
    try:
        import faiss
    except ImportError:
        faiss = None
    if faiss is not None:
        km = faiss.Kmeans(
            distinct.shape[1], k, niter=iterations, seed=seed + 1, verbose=False,
            max_points_per_centroid=512, min_points_per_centroid=1,
        )  # fmt: skip
        # k-means++ seeding (faiss seeds at random, which can leave a dense cluster
        # without a centroid).
        from sklearn.cluster import kmeans_plusplus

        pool = np.arange(len(distinct))
        if len(pool) > 20 * k:  # seeding on a weighted sample keeps it O(20 k^2 e)
            rng = np.random.default_rng(seed)
            pool = rng.choice(pool, 20 * k, replace=False, p=w / w.sum())
        init, _ = kmeans_plusplus(distinct[pool], k, sample_weight=w[pool], random_state=seed)
        km.train(distinct, weights=w, init_centroids=init.astype(np.float32))
        return np.asarray(km.centroids, dtype=np.float32)
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=1, max_iter=iterations, random_state=seed)
    km.fit(distinct, sample_weight=w)
    return km.cluster_centers_.astype(np.float32)


def _features(batch):
    return batch[0] if isinstance(batch, tuple) else batch


def collect_gsu_vectors(model, dataset, max_vectors: int = 200_000) -> dict:
    """The coded GSU vectors (``model.pq_vectors``: per modality, per side or fused, as the
    ``"pq"`` scorer's layout says) of the histories in ``dataset`` (batches of model
    features, or ``(features, label)``), read until every one has ``max_vectors`` distinct
    vectors or the data ends; padding and absent modalities are left out. (Stopping at
    ``max_vectors`` behaviours instead read one or two batches of histories that repeat
    the same items: the codebooks then fitted fewer items and lost recall against FAISS
    trained on a sample of the whole set.)

    Returns ``{group: (vectors [N_g, d], counts [N_g])}``: the distinct vectors and how
    many behaviours had each (a history repeats items and queries)."""
    from seminar_tf.compiled import compiled

    vectors_of = compiled(model.pq_vectors)
    found: dict[str, list] = {}
    distinct: dict[str, int] = {}
    for batch in dataset:
        parts, masks = vectors_of(_features(batch))
        for m, vectors in parts.items():
            present = np.asarray(keras.ops.convert_to_numpy(masks[m]), bool)
            v = np.asarray(keras.ops.convert_to_numpy(vectors), np.float32)[present]
            found.setdefault(m, []).append(distinct_rows(v))
            if len(found[m]) >= 8:  # merged now and then: memory stays O(distinct vectors)
                found[m] = [_merge(found[m])]
                distinct[m] = len(found[m][0][0])
        if distinct and min(distinct.values()) >= max_vectors:
            break
    merged = {m: _merge(chunks) for m, chunks in found.items()}
    return {m: (r, w) for m, (r, w) in merged.items() if len(r)}


def _merge(chunks: list) -> tuple:
    """One ``(distinct rows, summed weights)`` of several."""
    if len(chunks) == 1:
        return chunks[0]
    return distinct_rows(
        np.concatenate([r for r, _ in chunks]), np.concatenate([w for _, w in chunks])
    )


# Score-aware transform: coded vectors are multiplied by S^p, S the second moment of the
# targets' linear forms u (score = u . x), so k-means spends its error where targets look.
# p = 1/2 would minimize the mean squared score error; on MovieLens (d = 64, recall 50@50 at
# 8 B) p = 0.5 gave 0.955, 0.125 0.970, 0.25 0.972 against 0.960 for plain k-means: the top
# of the ranking cares less for the average error than for the largest ones.
SCORE_AWARE_POWER = 0.25


def target_forms(model, dataset, max_rows: int = 50_000) -> np.ndarray:
    """The linear forms ``u`` ``[N, d]`` of the GSU scores of the targets in ``dataset``
    (``exact score(x) = u . x + c``, ``PQScorer._linear_form``), at most ``max_rows``."""
    scorer = _pq_scorer(model)
    out, n = [], 0
    for batch in dataset:
        t_vec, t_mask, pair = model._encode_target(_features(batch))
        u, _ = scorer._linear_form(model._gsu_target(t_vec, t_mask, pair))
        out.append(np.asarray(keras.ops.convert_to_numpy(u), np.float32))
        n += len(out[-1])
        if n >= max_rows:
            break
    return np.concatenate(out)[:max_rows]


def score_aware_transform(forms: np.ndarray, power: float = SCORE_AWARE_POWER) -> np.ndarray:
    """``S^power`` ``[d, d]`` (symmetric, invertible) of the second moment ``S = E[u u^T]``
    of target forms ``[N, d]``, its eigenvalues floored at 1e-6 of the largest."""
    forms = np.asarray(forms, np.float64)
    moment = forms.T @ forms / max(len(forms), 1)
    values, vectors = np.linalg.eigh(moment)
    values = np.maximum(values, max(values.max(), 1e-12) * 1e-6)
    return ((vectors * values**power) @ vectors.T).astype(np.float32)


def fit_codebooks(
    model, dataset, max_vectors: int = 200_000, seed: int = 0, rotation: bool = False,
    score_aware: bool = False,
) -> dict:  # fmt: skip
    """Fits the codebooks of a ``search="pq"`` model's scorer by k-means on its coded GSU
    vectors (:func:`collect_gsu_vectors`, each distinct vector weighted by how many behaviours
    had it) and assigns them; with ``score_aware``, the vectors are first multiplied by
    :func:`score_aware_transform` of the targets' forms in ``dataset`` (the error k-means
    minimizes is then weighted towards the directions the targets score); with
    ``rotation``, then by an OPQ rotation per coded vector (faiss ``OPQMatrix``), which
    balances the variance across sub-vectors. The scorer turns the targets by the inverse.

    Returns ``{group: {"vectors": behaviours, "distinct": N, "relative_error":
    sum ||x - q(x)||^2 / sum ||x||^2}}`` (``x`` after the transforms), the error weighted by
    behaviours over (at most
    20,000 of the most frequent) distinct vectors it was fitted on. A group with no vector
    in the data keeps zero codebooks (and its behaviours score 0 on it).
    """
    scorer = _pq_scorer(model)
    t0 = time.time()
    vectors = collect_gsu_vectors(model, dataset, max_vectors)
    s, c = scorer.num_subvectors, scorer.num_centroids
    books = np.array(keras.ops.convert_to_numpy(scorer.codebooks), np.float32)
    rotations = np.array(keras.ops.convert_to_numpy(scorer.rotations), np.float32)
    e = books.shape[-1]
    d = rotations.shape[-1]
    base = score_aware_transform(target_forms(model, dataset)) if score_aware else np.eye(d)
    report = {}
    for i, m in enumerate(scorer.group_names):
        rotations[i] = base
        if m not in vectors:
            report[m] = {"vectors": 0, "distinct": 0, "relative_error": None}
            continue
        x, w = vectors[m]
        if rotation:
            rotations[i] = base @ opq_rotation(x @ base, w, s, seed=seed + i)
        sub = (x @ rotations[i]).reshape(len(x), s, e)
        for j in range(s):
            books[i, j] = kmeans(sub[:, j], c, seed=seed + 1000 * i + j, weights=w)
        err = _quantization_error(sub, books[i], w)
        report[m] = {"vectors": int(w.sum()), "distinct": int(len(x)), "relative_error": err}
    scorer.set_rotations(rotations)
    scorer.set_codebooks(books)
    log.info(
        "quantize: codebooks %s fitted in %.1fs (%s)",
        tuple(books.shape),
        time.time() - t0,
        ", ".join(
            f"{m}: {r['distinct']} distinct vectors, error {r['relative_error']:.3f}"
            for m, r in report.items()
            if r["vectors"]
        ),
    )
    return report


def opq_rotation(
    x: np.ndarray, weights: np.ndarray, num_subvectors: int, seed: int = 0, limit: int = 50_000
) -> np.ndarray:
    """An orthogonal ``R`` ``[d, d]`` learned by faiss's OPQ for ``num_subvectors`` sub-
    vectors on the rows of ``x`` ``[N, d]`` (at most ``limit``, drawn by ``weights``), to be
    applied as ``x @ R``. Identity when there are too few rows to learn from."""
    d = x.shape[1]
    import faiss

    if len(x) < 2 * num_subvectors or d % num_subvectors:
        return np.eye(d, dtype=np.float32)
    rng = np.random.default_rng(seed)
    if len(x) > limit:
        x = x[rng.choice(len(x), limit, replace=True, p=weights / weights.sum())]
    opq = faiss.OPQMatrix(d, num_subvectors)
    opq.niter, opq.verbose = 20, False
    # OPQ alternates with a PQ of 2^bits centroids per sub-vector: fewer bits on few rows
    # (``pq`` stays referenced here while faiss uses it).
    pq = faiss.ProductQuantizer(d, num_subvectors, int(min(8, max(1, np.log2(len(x)) - 2))))
    opq.pq = pq
    opq.train(np.ascontiguousarray(x, np.float32))
    a = faiss.vector_to_array(opq.A).reshape(d, d)  # faiss applies y = A x
    return np.ascontiguousarray(a.T, np.float32)


def code_tables(model, batch_size: int = 4096) -> dict:
    """The codes of every catalog item's item side and of every query, for a ``"pq"`` model
    with ``layout="sides"``: ``{"item": int32 [num_items, S], "query": int32 [num_queries,
    S]}`` (-1 in row 0, the padding / no-query id). A stored behaviour is then its item id and query id,
    and :func:`codes_from_tables` rebuilds its codes: the item side depends on the item alone
    and the query side on the query alone."""
    scorer = _pq_scorer(model)
    if scorer.layout != "sides":
        raise ValueError(
            f"code tables need the pq layout 'sides' (item and query codes), not {scorer.layout!r}"
        )
    from seminar_tf import spec

    emb = model.pair_embedding
    if emb.use_query_tokens and not emb.use_query_token_table:
        raise ValueError("code tables need the model's query_tokens table")
    sizes = {"item": emb.num_items, "query": emb.num_queries if emb.use_query else 0}
    s = scorer.num_subvectors
    tables = {}
    for side, n in sizes.items():
        if side not in scorer.group_names:
            continue
        table = np.full((n, s), -1, np.int32)
        for start in range(spec.PAD_ID + 1, n, batch_size):
            ids = np.arange(start, min(start + batch_size, n), dtype=np.int32)[None, :]
            # One "history" of these ids: the item side with no query, the query beside a
            # real item (the query side does not depend on it).
            item = ids if side == "item" else np.full_like(ids, spec.NUM_RESERVED_IDS)
            query = ids if side == "query" else np.zeros_like(ids)
            inputs = {"hist_item": item, "hist_query": query}
            vectors, masks = model.pq_vectors(inputs)
            codes = scorer.encode_codes({side: vectors[side]}, {side: masks[side]})
            at = scorer.group_names.index(side)
            table[ids[0]] = np.asarray(keras.ops.convert_to_numpy(codes))[0, :, at]
        tables[side] = table
    return tables


def codes_from_tables(tables: dict, hist_item, hist_query) -> np.ndarray:
    """Stored codes ``int32 [B, L, M, S]`` of histories given as ids ``[B, L]``, from
    :func:`code_tables` (-1 for padding and for behaviours without a query)."""
    hist_item, hist_query = np.asarray(hist_item), np.asarray(hist_query)
    item = tables["item"][hist_item]
    item[hist_item == 0] = -1
    sides = [item]
    if "query" in tables:
        query = tables["query"][hist_query]
        query[(hist_query == 0) | (hist_item == 0)] = -1
        sides.append(query)
    return np.stack(sides, axis=-2)


def _quantization_error(
    sub: np.ndarray, books: np.ndarray, weights: np.ndarray, limit: int = 20_000
) -> float:
    """``sum w ||x - q(x)||^2 / sum w ||x||^2`` for sub-vectors ``[N, S, e]`` and books
    ``[S, C, e]``, on at most ``limit`` rows (the heaviest: it is a report, not a fit)."""
    if len(sub) > limit:
        keep = np.argsort(-weights, kind="stable")[:limit]
        sub, weights = sub[keep], weights[keep]
    total, norm = 0.0, 0.0
    for j in range(sub.shape[1]):
        x = sub[:, j]
        d = (x * x).sum(1, keepdims=True) - 2 * x @ books[j].T + (books[j] ** 2).sum(1)[None]
        total += float((np.maximum(d.min(axis=1), 0) * weights).sum())
        norm += float(((x * x).sum(1) * weights).sum())
    return total / max(norm, 1e-12)


def _pq_scorer(model):
    if getattr(model, "search", None) != "pq" or model.gsu is None:
        raise ValueError(
            "The model's first stage is not product-quantized (search="
            f"{getattr(model, 'search', None)!r}); convert it with `quantize_model`."
        )
    return model.gsu.scorer


def quantize_model(
    model,
    dataset,
    num_subvectors: int = 16,
    num_centroids: int = 512,
    max_vectors: int = 200_000,
    seed: int = 0,
    layout: str = "modality",
    rotation: bool = False,
    shortlist: int = 1,
    score_aware: bool = False,
):
    """A copy of a trained ``search="exact"`` SeminarCTR whose first stage is the ``"pq"``
    scorer (codes of each modality, of the item and query sides, or of the fused key:
    ``layout``), with the same weights and codebooks (after an OPQ rotation with
    ``rotation``, after the score-aware transform with ``score_aware``: :func:`fit_codebooks`)
    fitted on ``dataset``; with ``shortlist`` ``r > 1`` its first stage keeps
    the top ``r x K`` by the codes and re-ranks them exactly (``PQScorer``).

    Returns ``(pq_model, report)`` with the report of :func:`fit_codebooks`.
    """
    from seminar_tf.models.seminar import SeminarCTR, copy_layer_weights

    if not isinstance(model, SeminarCTR) or model.search not in ("exact", "pq"):
        raise ValueError(
            "Only a SeminarCTR with search='exact' (or 'pq') can be product-quantized; got "
            f"{type(model).__name__} with search={getattr(model, 'search', None)!r}."
        )
    model._require_cascade("quantize_model")
    if not model.built:
        model.build()
    scorer = model.gsu.scorer
    config = model.get_config()
    search_config = {
        "num_heads": scorer.num_heads,
        "head_dim": scorer.head_dim,
        "reduction": scorer.reduction,
        "initialization": scorer.initialization,
        "num_subvectors": int(num_subvectors),
        "num_centroids": int(num_centroids),
        "layout": layout,
        "shortlist": int(shortlist),
    }
    config.update(search="pq", search_config=search_config, name=f"{model.name}_pq")
    copy = SeminarCTR.from_config(config)
    copy.build()
    skip = tuple(n for n in (_gsu_names(model) | _gsu_names(copy)) if n.startswith("gsu/"))
    copy_layer_weights(model, copy, skip=skip, what="quantized model")
    copy_layer_weights(scorer.attention, copy.gsu.scorer.attention, what="GSU attention")
    report = fit_codebooks(
        copy, dataset, max_vectors=max_vectors, seed=seed, rotation=rotation,
        score_aware=score_aware,
    )  # fmt: skip
    return copy, report


def _gsu_names(model) -> set:
    from seminar_tf.models.seminar import _relative_name

    return {_relative_name(v, model) for v in model.weights}


def gsu_recall(reference, model, dataset, ks=(10, 50), max_batches: int | None = None) -> dict:
    """How much of ``reference``'s first-stage top-K ``model`` keeps: for each ``k`` in
    ``ks``, the mean over examples with at least one real behaviour of
    ``|top_k(reference) & top_K(model)| / min(k, real behaviours)`` where ``K`` is the
    model's own ``top_k`` (``k <= K``). Both models must have the same ``top_k``.
    Returns ``{"recall@k": value, ..., "examples": n}``."""
    from seminar_tf.compiled import compiled

    ref_retrieve, got_retrieve = compiled(reference.retrieve), compiled(model.retrieve)
    sums = {k: 0.0 for k in ks}
    n = 0
    for i, batch in enumerate(dataset):
        if max_batches is not None and i >= max_batches:
            break
        features = _features(batch)
        ref = ref_retrieve(features)
        got = got_retrieve(features)
        ref_idx = keras.ops.convert_to_numpy(ref["indices"])
        ref_kept = keras.ops.convert_to_numpy(ref["kept_mask"])
        got_idx = keras.ops.convert_to_numpy(got["indices"])
        got_kept = keras.ops.convert_to_numpy(got["kept_mask"])
        for r in range(len(ref_idx)):
            real = int(ref_kept[r].sum())
            if real == 0:
                continue
            kept = set(got_idx[r][got_kept[r]].tolist())
            for k in ks:
                top = ref_idx[r][: min(k, real)]
                sums[k] += len(kept.intersection(top.tolist())) / len(top)
            n += 1
    out = {f"recall@{k}": (sums[k] / n if n else float("nan")) for k in ks}
    out["examples"] = n
    return out


class FitCodebooks(keras.callbacks.Callback):
    """Refits a ``"pq"`` model's codebooks before each validation and at the end of
    training, so validation metrics (and early stopping) see the quantized first stage
    while the weights train with exact scores.

    Args:
        dataset: batches of model features (a finite sample of the training data).
        max_vectors: distinct vectors per coded vector for k-means.
    """

    def __init__(self, dataset, max_vectors: int = 100_000):
        super().__init__()
        self.dataset = dataset
        self.max_vectors = max_vectors
        self.report = None

    def _fit(self):
        self.report = fit_codebooks(self.model, self.dataset, self.max_vectors)

    def on_test_begin(self, logs=None):
        self._fit()

    def on_train_end(self, logs=None):
        self._fit()
