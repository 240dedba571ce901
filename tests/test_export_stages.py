"""SeminarCTR's serving stages: ``rank(gather_kept(retrieve))`` equals ``call``."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from keras import ops  # noqa: E402

from seminar_tf import spec, testing  # noqa: E402
from seminar_tf.models import build_model  # noqa: E402

SPEC = testing.make_data_spec()
TABLES = testing.make_tables(SPEC)
SMALL = {"embedding_dim": 8, "num_heads": 2, "hidden_units": [16], "dropout": 0.1, "top_k": 5}


def _cascade(model, features):
    retrieved = model.retrieve(features)
    kept = model.gather_kept(features, retrieved)
    targets = [f for f in spec.SERVING_TARGET_FEATURES if f.name in features]
    ranking = {**{f.name: features[f.name] for f in targets}, **kept}
    for name in ("short_term", spec.HISTORY_STATS.name):
        if name in retrieved:
            ranking[name] = retrieved[name]
    if spec.USER.name in features:
        ranking[spec.USER.name] = features[spec.USER.name]
    return retrieved, kept, model.rank(ranking)


@pytest.mark.parametrize(
    "config",
    [
        {"search": "exact"},
        {"search": "exact", "short_term_len": 3, "use_history_labels": False},
        {"search": "soft"},
        {"search": "simhash", "search_config": {"num_bits": 8}},
        {"search": "recent", "gsu_score_bias": False},
    ],
    ids=["exact", "exact-short-term", "soft", "simhash", "recent"],
)
def test_rank_of_gathered_retrieve_equals_call(config):
    model = build_model(SPEC, {**SMALL, **config}, TABLES)
    if getattr(model, "gsu_bias_weight", None) is not None:
        model.gsu_bias_weight.assign(0.7)  # 0 at init: make the score bias matter
    features = testing.make_features(SPEC, 16, seed=4, padding="mixed")
    features["hist_item"][0] = 0  # an empty history
    for name in ("hist_query", "hist_query_tokens", "hist_label"):
        features[name][0] = 0
    expected = ops.convert_to_numpy(model(features))
    retrieved, kept, got = _cascade(model, features)
    np.testing.assert_allclose(ops.convert_to_numpy(got), expected, rtol=1e-5, atol=1e-6)
    indices = ops.convert_to_numpy(retrieved["indices"])
    kept_mask = ops.convert_to_numpy(retrieved["kept_mask"])
    assert indices.shape == kept_mask.shape == (16, 5)
    assert not kept_mask[0].any()
    # The kept ids are the history's at the kept positions, 0 in empty slots.
    rows = np.arange(16)[:, None]
    np.testing.assert_array_equal(
        ops.convert_to_numpy(kept["kept_item"]),
        np.where(kept_mask, features["hist_item"][rows, indices], 0),
    )
    np.testing.assert_array_equal(
        ops.convert_to_numpy(kept["kept_query_tokens"]),
        np.where(kept_mask[..., None], features["hist_query_tokens"][rows, indices], 0),
    )
    assert (features["hist_item"][rows, indices][kept_mask] != 0).all()


def test_stages_need_a_two_stage_model():
    features = testing.make_features(SPEC, 2, seed=1)
    for config in ({"search": "all"}, {"use_history": False}):
        model = build_model(SPEC, {**SMALL, **config}, TABLES)
        with pytest.raises(ValueError, match="two-stage model"):
            model.retrieve(features)


@pytest.mark.parametrize("config", [{"search": "exact"}, {"search": "soft", "short_term_len": 2}])
def test_serving_model_precomputes_constants_and_predicts_the_same(config):
    model = build_model(SPEC, {**SMALL, **config}, TABLES)
    if getattr(model, "gsu_bias_weight", None) is not None:
        model.gsu_bias_weight.assign(0.7)
    features = testing.make_features(SPEC, 16, seed=5, padding="mixed")
    copy = model.serving_model()
    emb = copy.pair_embedding
    assert emb.text_dim == emb.image_dim == emb.query_text_dim == emb.embedding_dim
    assert emb.max_attributes == 1 and emb.num_attributes == SPEC.num_items
    np.testing.assert_allclose(
        ops.convert_to_numpy(copy(features)), ops.convert_to_numpy(model(features)),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip
    _, _, got = _cascade(copy, features)
    np.testing.assert_allclose(
        ops.convert_to_numpy(got), ops.convert_to_numpy(model(features)), rtol=1e-5, atol=1e-6
    )
    # The trained model is left as it was.
    assert model.pair_embedding.text_dim == SPEC.text_dim


def _given_attributes(n, seed=0):
    """``target_attributes`` ``[n, A]``: 1..A attribute ids on the odd rows, none (padding)
    on the even ones."""
    rng = np.random.default_rng(seed)
    given = rng.integers(spec.OOV_ID, SPEC.num_attributes, size=(n, SPEC.max_attributes))
    count = rng.integers(1, SPEC.max_attributes + 1, size=(n, 1))
    given = np.where(np.arange(SPEC.max_attributes)[None, :] < count, given, 0)
    given[::2] = 0
    return given.astype(np.int64)


@pytest.mark.parametrize("config", [{"search": "exact"}, {"search": "soft", "short_term_len": 2}])
def test_target_attributes_reach_every_stage_and_the_serving_copy(config):
    model = build_model(SPEC, {**SMALL, **config}, TABLES)
    if getattr(model, "gsu_bias_weight", None) is not None:
        model.gsu_bias_weight.assign(0.7)
    features = testing.make_features(SPEC, 16, seed=6, padding="mixed")
    without = ops.convert_to_numpy(model(features))
    given = dict(features, target_attributes=_given_attributes(16))
    expected = ops.convert_to_numpy(model(given))
    # Padding rows keep the table's attributes; given ones replace them.
    np.testing.assert_allclose(expected[::2], without[::2], rtol=1e-6, atol=1e-7)
    assert (np.abs(expected[1::2] - without[1::2]) > 1e-7).all()
    copy = model.serving_model()
    emb = copy.pair_embedding
    assert emb.attribute_vocabulary_size == SPEC.num_attributes
    assert emb.attribute_input_size == SPEC.max_attributes
    for m in (model, copy):
        _, _, got = _cascade(m, given)
        np.testing.assert_allclose(ops.convert_to_numpy(got), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ops.convert_to_numpy(copy(given)), expected, rtol=1e-5, atol=1e-6)
