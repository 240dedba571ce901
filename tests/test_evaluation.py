"""Evaluation metrics against independent references."""

from __future__ import annotations

import numpy as np
import pytest

from seminar_tf import evaluation


def _pairwise_auc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / (len(pos) * len(neg))


def test_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) + 0.3 * y, 1)  # many ties
    assert evaluation.auc(y, s) == pytest.approx(_pairwise_auc(y, s))
    assert np.isnan(evaluation.auc(np.ones(4), np.arange(4.0)))


def test_gauc_weights_users_by_impressions_and_skips_single_class_users():
    y = np.array([1, 0, 0, 1, 1, 0, 1, 1])
    s = np.array([0.9, 0.1, 0.8, 0.2, 0.5, 0.4, 0.3, 0.2])
    u = np.array(["a", "a", "b", "b", "b", "b", "c", "c"])
    a = _pairwise_auc(y[:2], s[:2])
    b = _pairwise_auc(y[2:6], s[2:6])
    assert evaluation.gauc(y, s, u) == pytest.approx((2 * a + 4 * b) / 6)


def test_logloss_reference():
    y = np.array([1, 0, 1])
    p = np.array([0.8, 0.3, 0.6])
    ref = -np.mean(np.log([0.8, 0.7, 0.6]))
    assert evaluation.logloss(y, p) == pytest.approx(ref)


def test_ranking_metrics_hr_and_ndcg():
    # Positive (column 0) ranked 1st, 3rd and 7th among 10.
    scores = np.zeros((3, 10), np.float32)
    scores[0] = [9, 1, 2, 3, 4, 5, 6, 7, 0, -1]
    scores[1] = [7, 9, 8, 1, 2, 3, 4, 5, 0, -1]
    scores[2] = [3, 9, 8, 7, 6, 5, 4, 2, 1, 0]
    m = evaluation.ranking_metrics(scores, ks=(1, 5, 10))
    assert m["hr@1"] == pytest.approx(1 / 3)
    assert m["hr@5"] == pytest.approx(2 / 3)
    assert m["hr@10"] == pytest.approx(1.0)
    ref5 = (1 / np.log2(2) + 1 / np.log2(4)) / 3
    assert m["ndcg@5"] == pytest.approx(ref5, rel=1e-5)
    ref10 = (1 / np.log2(2) + 1 / np.log2(4) + 1 / np.log2(8)) / 3
    assert m["ndcg@10"] == pytest.approx(ref10, rel=1e-5)


def test_evaluate_ranking_samples_distinct_negatives_and_ranks_an_oracle_first():
    from seminar_tf import spec

    b, L, q = 8, 3, 2
    feats = {
        "target_item": np.arange(2, 2 + b),
        "target_query": np.zeros(b, np.int64),
        "target_query_tokens": np.zeros((b, q), np.int64),
        "hist_item": np.zeros((b, L), np.int64),
        "hist_query": np.zeros((b, L), np.int64),
        "hist_query_tokens": np.zeros((b, L, q), np.int64),
        "hist_label": np.zeros((b, L), np.int64),
        "user": np.full(b, 2, np.int64),
        "user_counts": np.zeros((b, 3), np.int64),
        "user_id": np.array([b"u"] * b),
    }
    labels = np.ones(b, np.float32)
    seen = []

    def recording(x):
        seen.append(x["target_item"].copy())
        assert set(x) == set(spec.MODEL_FEATURE_NAMES)
        return np.zeros(len(x["target_item"]))

    def perfect(x):  # knows the positives: scores them 1, anything else 0
        return np.isin(x["target_item"], feats["target_item"]).astype(float)

    out = evaluation.evaluate_ranking(perfect, [(feats, labels)], num_items=500, seed=1)
    assert out["ranked_positives"] == b
    evaluation.evaluate_ranking(recording, [(feats, labels)], num_items=500, seed=1)
    cand = seen[0].reshape(b, 100)
    assert (cand[:, 1:] != cand[:, :1]).all() and (cand >= 2).all() and (cand < 500).all()
    # Negatives that collide with other rows' positives are rare; HR@50 stays near 1.
    assert out["hr@50"] > 0.9


def test_ranking_with_score_candidates_gives_the_repeated_rows_numbers():
    """``seminar evaluate``'s fast path (each history encoded once, its 100 candidates scored
    together, compiled as evaluate compiles it) reports what scoring repeated rows reports."""
    import keras

    from seminar_tf import testing, training
    from seminar_tf.models import build_model

    keras.utils.set_random_seed(0)
    ds = testing.make_data_spec(num_items=300)
    model = build_model(
        ds, {"preset": "seminar", "embedding_dim": 8, "num_heads": 2, "top_k": 4,
             "hidden_units": [16]}, testing.make_tables(ds),
    )  # fmt: skip
    model.build()
    rng = np.random.default_rng(0)
    for v in model.trainable_weights:
        v.assign(keras.ops.convert_to_numpy(v) + rng.normal(0, 0.3, v.shape).astype("float32"))
    batches = [testing.make_batch(ds, 6, seed=s, min_history=0, padding="mixed") for s in (1, 2)]
    batches = [(x, np.ones_like(y)) for x, y in batches]

    def predict(x):
        return np.asarray(model.predict_on_batch(x)).reshape(-1)

    fast = training._compiled_score_candidates(model)
    slow_report = evaluation.evaluate_ranking(predict, batches, ds.num_items, seed=3)
    fast_report = evaluation.evaluate_ranking(
        predict, batches, ds.num_items, seed=3, score_candidates=fast
    )
    assert slow_report["ranked_positives"] == fast_report["ranked_positives"] == 12
    for key, value in slow_report.items():
        assert fast_report[key] == pytest.approx(value, abs=1e-6), key
    assert 0 < slow_report["hr@50"] < 1  # the scores rank, not a degenerate tie
