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
    ranking = {**{f.name: features[f.name] for f in spec.TARGET_FEATURES}, **kept}
    if "short_term" in retrieved:
        ranking["short_term"] = retrieved["short_term"]
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
