"""Tests of TopKSearch and the scorer registry against numpy references."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from keras import ops  # noqa: E402

from seminar_tf.layers import (  # noqa: E402
    SearchScorer,
    TopKSearch,
    available_scorers,
    get_scorer_class,
    register_scorer,
)

B, D = 5, 8


def data(length, seed=0):
    rng = np.random.default_rng(seed)
    target = rng.normal(size=(B, D)).astype(np.float32)
    keys = rng.normal(size=(B, length, D)).astype(np.float32)
    mask = rng.random((B, length)) < 0.7
    mask[0] = True
    mask[1] = False  # all padding
    if length > 2:  # left-padded and right-padded rows
        mask[2] = np.arange(length) >= length // 2
        mask[3] = np.arange(length) < length // 2
    return target, keys, mask


def numpy_scores(search, target, keys):
    """Independent numpy scores for each built-in scorer."""
    name = search.scorer_name
    if name == "soft":
        return np.einsum("bd,bld->bl", target, keys)
    if name == "recent":
        return np.broadcast_to(np.arange(keys.shape[1], dtype=np.float32), keys.shape[:2])
    if name == "simhash":
        planes = ops.convert_to_numpy(search.scorer.hyperplanes)
        t = (target @ planes) > 0
        k = (keys @ planes) > 0
        return (t[:, None, :] == k).sum(-1).astype(np.float32)
    if name == "exact":
        w = {v.name: ops.convert_to_numpy(v) for v in search.scorer.attention.weights}
        q = np.einsum("bd,dhe->bhe", target, w["query_kernel"]) + w["query_bias"]
        k = np.einsum("bld,dhe->blhe", keys, w["key_kernel"]) + w["key_bias"]
        e = w["query_kernel"].shape[-1]
        return (np.einsum("bhe,blhe->bhl", q, k) / np.sqrt(e)).mean(1)
    raise AssertionError(name)


def numpy_topk(scores, mask, k):
    """Stable descending argsort over the real behaviours, padded with masked entries."""
    n, length = scores.shape
    idx = np.zeros((n, k), np.int64)
    kept = np.zeros((n, k), bool)
    top = np.zeros((n, k), np.float32)
    for b in range(n):
        real = np.flatnonzero(mask[b])
        order = real[np.argsort(-scores[b, real], kind="stable")][:k]
        idx[b, : len(order)] = order
        kept[b, : len(order)] = True
        top[b, : len(order)] = scores[b, order]
    return idx, kept, top


@pytest.mark.parametrize("scorer", ["exact", "soft", "recent", "simhash"])
@pytest.mark.parametrize("length", [3, 7, 16])
def test_topk_matches_numpy_argsort(scorer, length):
    k = 6
    config = {"num_heads": 2} if scorer == "exact" else {}
    search = TopKSearch(k=k, scorer=scorer, scorer_config=config)
    target, keys, mask = data(length)
    indices, kept_mask, scores = search(target, keys, mask)
    indices = ops.convert_to_numpy(indices)
    kept_mask = ops.convert_to_numpy(kept_mask)
    scores = ops.convert_to_numpy(scores)
    assert indices.shape == kept_mask.shape == scores.shape == (B, k)
    assert indices.dtype == np.int32 and kept_mask.dtype == bool
    ref_scores = numpy_scores(search, target, keys)
    all_scores = ops.convert_to_numpy(search.score_all(target, keys, mask))
    np.testing.assert_allclose(all_scores[mask], ref_scores[mask], rtol=1e-4, atol=1e-4)
    ref_idx, ref_kept, ref_top = numpy_topk(ref_scores, mask, k)
    np.testing.assert_array_equal(kept_mask, ref_kept)
    np.testing.assert_allclose(scores, ref_top, rtol=1e-4, atol=1e-4)
    if scorer in ("recent", "simhash"):  # integer scores: ties broken by position
        np.testing.assert_array_equal(indices, ref_idx)
    else:
        for b in range(B):  # same kept sets (float scores have no ties)
            assert set(indices[b][kept_mask[b]]) == set(ref_idx[b][ref_kept[b]])
    assert not kept_mask[1].any() and (indices[1] == 0).all()  # all padding
    assert (indices < length).all() and (indices >= 0).all()
    # Padding changes nothing.
    keys2 = np.where(mask[..., None], keys, 50.0).astype(np.float32)
    again = search(target, keys2, mask)
    np.testing.assert_array_equal(ops.convert_to_numpy(again[1]), kept_mask)
    np.testing.assert_allclose(ops.convert_to_numpy(again[2]), scores, rtol=1e-5, atol=1e-5)


def test_recent_keeps_the_last_k_real_behaviours():
    search = TopKSearch(k=3, scorer="recent")
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0]], bool)
    keys = np.zeros((3, 6, D), np.float32)
    indices, kept, _ = search(np.zeros((3, D), np.float32), keys, mask)
    np.testing.assert_array_equal(ops.convert_to_numpy(indices), [[5, 4, 3], [1, 0, 0], [2, 0, 0]])
    np.testing.assert_array_equal(ops.convert_to_numpy(kept), [[1, 1, 1], [1, 1, 0], [1, 1, 0]])


def test_registry():
    assert {"exact", "soft", "recent", "simhash"} <= set(available_scorers())
    with pytest.raises(ValueError, match="registered"):
        TopKSearch(k=2, scorer="nope")
    with pytest.raises(ValueError, match="scorer_config"):
        TopKSearch(k=2, scorer="soft", scorer_config={"num_bits": 3})
    with pytest.raises(ValueError, match="already registered"):
        register_scorer("soft")(type("Other", (SearchScorer,), {}))

    @register_scorer("test_negated_soft")
    @keras.saving.register_keras_serializable(package="seminar_tf_tests")
    class NegatedSoft(SearchScorer):
        def call(self, target, keys, mask, target_parts=None, key_parts=None):
            return -ops.einsum("bd,bld->bl", target, keys)

    assert get_scorer_class("test_negated_soft") is NegatedSoft
    target, keys, mask = data(7)
    low = TopKSearch(k=3, scorer="test_negated_soft")(target, keys, mask)
    ref = numpy_topk(-np.einsum("bd,bld->bl", target, keys), mask, 3)
    np.testing.assert_array_equal(ops.convert_to_numpy(low[1]), ref[1])


@pytest.mark.parametrize("scorer", ["exact", "simhash"])
def test_validation_and_config_round_trip(scorer):
    with pytest.raises(ValueError, match="`k`"):
        TopKSearch(k=0)
    search = TopKSearch(
        k=4,
        scorer=scorer,
        scorer_config={"num_bits": 8} if scorer == "simhash" else {"num_heads": 2},
    )
    config = search.get_config()
    assert TopKSearch.from_config(config).get_config() == config
    target, keys, mask = data(7)
    first = search(target, keys, mask)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(search))
    restored.build((None, D), (None, None, D))
    restored.set_weights(search.get_weights())
    second = restored(target, keys, mask)
    for a, b in zip(first, second):
        np.testing.assert_allclose(ops.convert_to_numpy(a), ops.convert_to_numpy(b), atol=1e-6)


def test_exact_scorer_starts_as_inner_product_search():
    target, keys, mask = data(12)
    exact = TopKSearch(k=4, scorer="exact", scorer_config={"num_heads": 2})
    soft = TopKSearch(k=4, scorer="soft")
    e_idx, e_kept, e_scores = (ops.convert_to_numpy(t) for t in exact(target, keys, mask))
    s_idx, s_kept, s_scores = (ops.convert_to_numpy(t) for t in soft(target, keys, mask))
    np.testing.assert_array_equal(e_idx, s_idx)
    np.testing.assert_array_equal(e_kept, s_kept)
    # mean over 2 heads of (t_h . x_h) / sqrt(4) == (t . x) / (2 * 2)
    np.testing.assert_allclose(e_scores, s_scores / 4.0, rtol=1e-5, atol=1e-5)
    random = TopKSearch(
        k=4, scorer="exact", scorer_config={"num_heads": 2, "initialization": "random"}
    )
    random(target, keys, mask)
    assert not np.allclose(
        ops.convert_to_numpy(random.scorer.attention.query_kernel).reshape(D, D), np.eye(D)
    )


def _tied_scores(n, length, seed):
    """Scores with many exact ties (a few distinct values) and padded rows."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, size=(n, length)).astype(np.float32)
    mask = rng.random((n, length)) < 0.8
    mask[0] = False
    mask[1, : length - 3] = False  # fewer real behaviours than k
    return scores, mask


@pytest.mark.parametrize("block", [1, 4, 7, 32])
@pytest.mark.parametrize("length", [50, 203])
def test_top_k_by_blocks_equals_a_stable_sort(block, length):
    from seminar_tf.layers import _ops

    k = 5
    scores, mask = _tied_scores(6, length, seed=block)
    ranked = np.where(mask, scores, _ops.MASK_VALUE).astype(np.float32)
    values, indices = _ops.top_k_by_blocks(ops.convert_to_tensor(ranked), k, block)
    order = np.argsort(-ranked, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(ops.convert_to_numpy(indices), order)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(values), np.take_along_axis(ranked, order, axis=1)
    )
    # The search keeps the same set, in the same order, with blocks as without.
    search = TopKSearch(k=k, scorer="soft", block_size=block)
    plain = TopKSearch(k=k, scorer="soft", block_size=0)
    for a, b in zip(search.select(scores, mask), plain.select(scores, mask)):
        np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))
    ref_idx, ref_kept, _ = numpy_topk(scores, mask, k)
    got = search.select(scores, mask)
    np.testing.assert_array_equal(ops.convert_to_numpy(got[0]), ref_idx)
    np.testing.assert_array_equal(ops.convert_to_numpy(got[1]), ref_kept)


def test_block_size_validation_and_auto_rule():
    with pytest.raises(ValueError, match="block_size"):
        TopKSearch(k=3, block_size=-1)
    search = TopKSearch(k=3, block_size=None)
    assert search._block(None) == 0  # dynamic length: plain top_k
    big = TopKSearch.AUTO_BLOCK_MIN_RATIO * 3
    expected = TopKSearch.AUTO_BLOCK if keras.backend.backend() == "jax" else 0
    assert search._block(big) == expected and search._block(big - 1) == 0
    assert TopKSearch(k=3, block_size=0)._block(10**6) == 0
    assert TopKSearch(k=3, block_size=8)._block(100) == 8


BLOCK_SCRIPT = """
import numpy as np
from keras import ops
from seminar_tf.layers import TopKSearch, _ops
k = 4
search = TopKSearch(k=k, scorer="soft")
length = TopKSearch.AUTO_BLOCK_MIN_RATIO * k + 13
assert search._block(length + k) == TopKSearch.AUTO_BLOCK
rng = np.random.default_rng(0)
scores = rng.integers(0, 9, size=(8, length)).astype(np.float32)
mask = rng.random((8, length)) < 0.5
idx, kept, top = (ops.convert_to_numpy(t) for t in search.select(scores, mask))
ranked = np.where(mask, scores, _ops.MASK_VALUE)
order = np.argsort(-ranked, axis=1, kind="stable")[:, :k]
assert np.array_equal(idx, order) and kept.all(), (idx, order)
print("BLOCKS EXACT")
"""


def test_auto_blocks_under_jax_equal_a_stable_sort(run_script):
    import importlib.util

    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed")
    assert "BLOCKS EXACT" in run_script(BLOCK_SCRIPT, "jax")
