"""Tests of MultiHeadTargetAttention against a numpy reference, with masking."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from keras import ops  # noqa: E402

from seminar_tf.layers import MultiHeadTargetAttention  # noqa: E402

B, L, D, H = 4, 9, 8, 2


def data(seed=0):
    rng = np.random.default_rng(seed)
    target = rng.normal(size=(B, D)).astype(np.float32)
    keys = rng.normal(size=(B, L, D)).astype(np.float32)
    mask = rng.random((B, L)) < 0.6
    mask[0] = True
    mask[1, :] = False  # all padding
    mask[2, :3] = False
    mask[2, 3] = True
    return target, keys, mask


def make_layer(seed=0, **kwargs):
    layer = MultiHeadTargetAttention(num_heads=H, **kwargs)
    layer.build((None, D), (None, None, D))
    rng = np.random.default_rng(seed + 10)
    layer.set_weights([rng.normal(size=w.shape).astype(np.float32) * 0.5 for w in layer.weights])
    return layer


def reference(layer, target, keys, mask, bias=None):
    w = {v.name: ops.convert_to_numpy(v) for v in layer.weights}
    e = w["query_kernel"].shape[-1]
    q = np.einsum("bd,dhe->bhe", target, w["query_kernel"]) + w["query_bias"]
    k = np.einsum("bld,dhe->blhe", keys, w["key_kernel"]) + w["key_bias"]
    v = np.einsum("bld,dhe->blhe", keys, w["value_kernel"]) + w["value_bias"]
    scores = np.einsum("bhe,blhe->bhl", q, k) / np.sqrt(e)
    logits = scores + (0 if bias is None else bias[:, None, :])
    pooled = np.zeros((B, w["output_bias"].shape[0]), np.float32)
    for b in range(B):
        if not mask[b].any():
            continue
        x = np.where(mask[b][None], logits[b], -np.inf)
        a = np.exp(x - x.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        heads = np.einsum("hl,lhe->he", a, v[b])
        pooled[b] = np.einsum("he,heo->o", heads, w["output_kernel"]) + w["output_bias"]
    return pooled, np.where(mask[:, None, :], scores, 0.0)


@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_numpy_reference(with_bias):
    layer = make_layer()
    target, keys, mask = data()
    bias = np.random.default_rng(3).normal(size=(B, L)).astype(np.float32) if with_bias else None
    pooled, scores = layer(target, keys, mask, score_bias=bias)
    ref_pooled, ref_scores = reference(layer, target, keys, mask, bias)
    assert tuple(pooled.shape) == (B, D) and tuple(scores.shape) == (B, H, L)
    np.testing.assert_allclose(ops.convert_to_numpy(pooled), ref_pooled, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ops.convert_to_numpy(scores), ref_scores, rtol=1e-4, atol=1e-4)
    again, _ = layer(target, keys, mask, score_bias=bias)
    np.testing.assert_allclose(ops.convert_to_numpy(again), ops.convert_to_numpy(pooled))


def test_padding_changes_nothing_and_all_padding_gives_zeros():
    layer = make_layer()
    target, keys, mask = data()
    pooled, scores = layer(target, keys, mask)
    keys2 = np.where(mask[..., None], keys, 1e3 * np.random.default_rng(1).normal(size=keys.shape))
    pooled2, scores2 = layer(target, keys2.astype(np.float32), mask)
    np.testing.assert_allclose(
        ops.convert_to_numpy(pooled2), ops.convert_to_numpy(pooled), atol=1e-5
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(scores2), ops.convert_to_numpy(scores), atol=1e-5
    )
    p = ops.convert_to_numpy(pooled)
    assert np.all(p[1] == 0.0) and np.isfinite(p).all()


def test_gradient_is_finite_for_all_padding():
    layer = make_layer()
    target, keys, mask = data()
    mask[:] = False
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        keys_t = tf.constant(keys)
        with tf.GradientTape() as tape:
            tape.watch(keys_t)
            pooled, _ = layer(target, keys_t, mask)
            loss = tf.reduce_sum(pooled)
        grads = tape.gradient(loss, [keys_t] + layer.trainable_variables)
        for g in grads:
            assert g is None or np.isfinite(np.asarray(g)).all()
    assert np.all(ops.convert_to_numpy(layer(target, keys, mask)[0]) == 0.0)


def test_scores_only():
    full = make_layer()
    layer = MultiHeadTargetAttention(num_heads=H, scores_only=True)
    layer.build((None, D), (None, None, D))
    assert sorted(v.name for v in layer.weights) == [
        "key_bias",
        "key_kernel",
        "query_bias",
        "query_kernel",
    ]
    by_name = {v.name: v for v in full.weights}
    for v in layer.weights:
        v.assign(by_name[v.name])
    target, keys, mask = data()
    scores = layer(target, keys, mask)
    np.testing.assert_allclose(
        ops.convert_to_numpy(scores), ops.convert_to_numpy(full(target, keys, mask)[1]), atol=1e-5
    )


def test_validation_and_config_round_trip():
    with pytest.raises(ValueError, match="num_heads"):
        MultiHeadTargetAttention(num_heads=0)
    with pytest.raises(ValueError, match="dropout"):
        MultiHeadTargetAttention(dropout=1.0)
    with pytest.raises(ValueError, match="num_heads"):
        MultiHeadTargetAttention(num_heads=3).build((None, 8), (None, None, 8))
    layer = MultiHeadTargetAttention(num_heads=2, head_dim=3, output_dim=5, dropout=0.1)
    config = layer.get_config()
    clone = MultiHeadTargetAttention.from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    target, keys, mask = data()
    pooled, scores = restored(target, keys, mask)
    assert tuple(pooled.shape) == (B, 5) and tuple(scores.shape) == (B, 2, L)
