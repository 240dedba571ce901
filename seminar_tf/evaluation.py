"""Evaluation: CTR metrics over a split, and the sampled-negatives ranking protocol.

- CTR: AUC, GAUC (per-user AUC weighted by the user's impressions, over users with both
  labels), logloss, on every target of the split.
- Ranking (the paper's protocol): each positive target is ranked against ``num_negatives``
  (99) items drawn uniformly from the item vocabulary (excluding the positive), with the same
  user history and query; HR@K (keras-rs ``RecallAtK``, one relevant item) and NDCG@K
  (keras-rs ``NDCG``) for K in (1, 5, 10, 50).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from seminar_tf import spec

RANK_KS = (1, 5, 10, 50)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC (ties count one half); NaN when only one class is present."""
    labels = np.asarray(labels).astype(bool)
    n_pos = labels.sum()
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    r = rankdata(np.asarray(scores, np.float64))  # ties get their average rank
    return float((r[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def gauc(labels: np.ndarray, scores: np.ndarray, users: np.ndarray) -> float:
    """Impression-weighted mean of per-user AUC over users having both labels."""
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    users = np.asarray(users)
    order = np.argsort(users, kind="mergesort")
    users_sorted = users[order]
    bounds = np.flatnonzero(np.r_[True, users_sorted[1:] != users_sorted[:-1], True])
    total, weight = 0.0, 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        idx = order[a:b]
        y = labels[idx]
        if 0 < y.sum() < len(y):
            total += auc(y, scores[idx]) * len(y)
            weight += len(y)
    return total / weight if weight else float("nan")


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probs, np.float64), eps, 1 - eps)
    y = np.asarray(labels, np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def ranking_metrics(scores: np.ndarray, ks=RANK_KS, seed: int = 0) -> dict[str, float]:
    """HR@K and NDCG@K for a [N, 1 + negatives] score matrix whose column 0 is the positive."""
    import keras_rs

    labels = np.zeros_like(scores, dtype=np.float32)
    labels[:, 0] = 1.0
    out = {}
    for k in ks:
        hr = keras_rs.metrics.RecallAtK(k=k, seed=seed, name=f"hr_{k}")
        ndcg = keras_rs.metrics.NDCG(k=k, name=f"ndcg_{k}")
        hr.update_state(labels, scores.astype(np.float32))
        ndcg.update_state(labels, scores.astype(np.float32))
        out[f"hr@{k}"] = float(hr.result())
        out[f"ndcg@{k}"] = float(ndcg.result())
    return out


def evaluate_ctr(predict: Callable[[dict], np.ndarray], dataset) -> dict:
    """Runs ``predict`` over a dataset of ``(features, label)`` with meta features."""
    labels, probs, users = [], [], []
    for features, label in dataset:
        # compact windows leave out hist_query_tokens (the model's table holds them)
        model_inputs = {k: features[k] for k in spec.MODEL_FEATURE_NAMES if k in features}
        probs.append(np.asarray(predict(model_inputs)).reshape(-1))
        labels.append(np.asarray(label).reshape(-1))
        users.append(np.asarray(features["user_id"]).reshape(-1))
    if not labels:
        return {"examples": 0}
    y, p, u = np.concatenate(labels), np.concatenate(probs), np.concatenate(users)
    return {
        "examples": int(len(y)),
        "positives": int(y.sum()),
        "auc": auc(y, p),
        "gauc": gauc(y, p, u),
        "logloss": logloss(y, p),
    }


def evaluate_ranking(
    predict: Callable[[dict], np.ndarray],
    dataset,
    num_items: int,
    num_negatives: int = 99,
    seed: int = 0,
    max_positives: int | None = None,
    score_candidates: Callable[[dict, np.ndarray], np.ndarray] | None = None,
) -> dict:
    """The sampled-negatives protocol over the positive targets of ``dataset``.

    ``predict`` scores model inputs row by row; ``score_candidates(features [b rows],
    items [b, 1 + negatives]) -> [b, 1 + negatives]`` (e.g.
    ``SeminarCTR.score_candidates``), when given, scores each row's candidates together,
    so a history is encoded once rather than once per candidate; the numbers are the same.
    """
    rng = np.random.default_rng(seed)
    first_item = spec.NUM_RESERVED_IDS
    if num_items - first_item < num_negatives + 1:
        raise ValueError(
            f"num_items={num_items}: too few items for {num_negatives} distinct negatives"
        )
    all_scores, seen = [], 0
    for features, label in dataset:
        keep = np.asarray(label).reshape(-1) > 0
        if not keep.any():
            continue
        feats = {
            k: np.asarray(features[k])[keep] for k in spec.MODEL_FEATURE_NAMES if k in features
        }
        b = int(keep.sum())
        if max_positives is not None:
            b = min(b, max_positives - seen)
            feats = {k: v[:b] for k, v in feats.items()}
        pos = feats["target_item"]
        cand = rng.integers(first_item, num_items - 1, size=(b, num_negatives))
        cand = cand + (cand >= pos[:, None])  # skip the positive, stay uniform
        items = np.concatenate([pos[:, None], cand], axis=1)  # [b, 1 + negatives]
        n = items.shape[1]
        if score_candidates is not None:
            scores = np.asarray(score_candidates(feats, items)).reshape(b, n)
        else:
            tiled = {k: np.repeat(v, n, axis=0) for k, v in feats.items()}
            tiled["target_item"] = items.reshape(-1)
            scores = np.asarray(predict(tiled)).reshape(b, n)
        all_scores.append(scores)
        seen += b
        if max_positives is not None and seen >= max_positives:
            break
    if not all_scores:
        return {"ranked_positives": 0}
    scores = np.concatenate(all_scores)
    out = ranking_metrics(scores, seed=seed)
    out["ranked_positives"] = int(scores.shape[0])
    out["negatives_per_positive"] = num_negatives
    return out
