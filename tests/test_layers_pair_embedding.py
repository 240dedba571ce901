"""Tests of MultiModalPairEmbedding: shapes, numpy references, masking, tables, config."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from keras import ops  # noqa: E402

from seminar_tf import testing  # noqa: E402
from seminar_tf.layers import MultiModalPairEmbedding  # noqa: E402
from seminar_tf.models.factory import data_kwargs  # noqa: E402

D = 8
FULL = testing.make_data_spec()
NO_VECTORS = testing.make_data_spec(text_dim=0, image_dim=0, query_text_dim=0)
BARE = testing.make_data_spec(
    num_attributes=0, max_attributes=0, text_dim=0, image_dim=0, query_text_dim=0
)
TEXT_ONLY = testing.make_data_spec(image_dim=0, query_text_dim=0)


def make_layer(data_spec=FULL, seed=0, **kwargs):
    layer = MultiModalPairEmbedding(
        **data_kwargs(data_spec),
        embedding_dim=D,
        tables=testing.make_tables(data_spec, seed=seed),
        **kwargs,
    )
    layer.build()
    return layer


def np_(x):
    return ops.convert_to_numpy(x)


def batch(data_spec=FULL, n=6, seed=1):
    return testing.make_features(data_spec, n, seed=seed, min_history=1, padding="mixed")


@pytest.mark.parametrize(
    "data_spec,modalities,query",
    [
        (FULL, ("id", "attr", "text", "image"), True),
        (NO_VECTORS, ("id", "attr"), True),
        (TEXT_ONLY, ("id", "attr", "text"), True),
        (BARE, ("id",), True),
        (testing.make_data_spec(num_query_tokens=0, query_text_dim=0), None, False),
    ],
)
def test_shapes_and_modalities(data_spec, modalities, query):
    layer = make_layer(data_spec)
    x = batch(data_spec)
    pair = layer(x["hist_item"], x["hist_query"], x["hist_query_tokens"])
    assert tuple(pair.shape) == x["hist_item"].shape + (D,)
    assert tuple(layer(x["target_item"]).shape) == (6, D)
    vectors, masks = layer.encode(x["hist_item"], x["hist_query"], x["hist_query_tokens"])
    if modalities is not None:
        assert layer.item_modalities == modalities
    assert (("query" in vectors) is query) and layer.use_query is query
    for m, v in vectors.items():
        assert tuple(v.shape) == x["hist_item"].shape + (D,)
        assert np_(masks[m]).dtype == bool
    assert np.isfinite(np_(pair)).all()


@pytest.mark.parametrize("project_first", [True, False])
def test_vectors_match_numpy_reference(project_first):
    layer = make_layer(project_tables_first=project_first)
    tables = layer.get_tables()
    x = batch()
    ids, qids, tokens = x["hist_item"], x["hist_query"], x["hist_query_tokens"]
    vectors, masks = layer.encode(ids, qids, tokens)
    vectors = {k: np_(v) for k, v in vectors.items()}
    masks = {k: np_(v) for k, v in masks.items()}
    item_emb = np_(layer.item_embeddings)
    attr_emb = np_(layer.attribute_embeddings)
    tok_emb = np_(layer.query_token_embeddings)
    valid = ids != 0

    np.testing.assert_allclose(vectors["id"], item_emb[ids] * valid[..., None], atol=1e-6)
    attr_ids = tables["item_attributes"][ids]
    amask = attr_ids != 0
    attr_ref = (attr_emb[attr_ids] * amask[..., None]).sum(-2) / np.maximum(
        amask.sum(-1, keepdims=True), 1
    )
    a_present = valid & amask.any(-1)
    np.testing.assert_array_equal(masks["attr"], a_present)
    np.testing.assert_allclose(vectors["attr"], attr_ref * a_present[..., None], atol=1e-6)

    t_present = valid & (tables["item_has_text"][ids] > 0)
    w, b = (np_(v) for v in layer.text_projection.weights)
    text_ref = tables["item_text_vectors"][ids] @ w + b
    np.testing.assert_array_equal(masks["text"], t_present)
    np.testing.assert_allclose(vectors["text"], text_ref * t_present[..., None], atol=1e-5)

    tmask = tokens != 0
    tok_mean = (tok_emb[tokens] * tmask[..., None]).sum(-2) / np.maximum(
        tmask.sum(-1, keepdims=True), 1
    )
    has_tok = tmask.any(-1)
    has_qt = (qids != 0) & (tables["query_has_text"][qids] > 0)
    w, b = (np_(v) for v in layer.query_text_projection.weights)
    qt = tables["query_text_vectors"][qids] @ w + b
    count = has_tok.astype(float) + has_qt
    q_ref = (tok_mean * has_tok[..., None] + qt * has_qt[..., None]) / np.maximum(count, 1)[
        ..., None
    ]
    np.testing.assert_array_equal(masks["query"], has_tok | has_qt)
    np.testing.assert_allclose(vectors["query"], q_ref, atol=1e-5)


def test_fusion_matches_numpy_reference_and_renormalises():
    layer = make_layer(query_weight=0.3)
    layer.modality_logits.assign(np.array([0.5, -0.2, 1.0, 0.1], np.float32))
    x = batch()
    ids, qids, tokens = x["hist_item"], x["hist_query"], x["hist_query_tokens"]
    vectors, masks = layer.encode(ids, qids, tokens)
    v = {k: np_(a) for k, a in vectors.items()}
    m = {k: np_(a).astype(float) for k, a in masks.items()}
    logits = np_(layer.modality_logits)
    weights = np.stack(
        [np.exp(logits[i]) * m[name] for i, name in enumerate(layer.item_modalities)]
    )
    norm = np.maximum(weights.sum(0), 1e-12)
    item = sum(weights[i][..., None] * v[name] for i, name in enumerate(layer.item_modalities))
    item = item / norm[..., None]
    lam = 0.3 * m["query"][..., None]
    pair_ref = (item + lam * (v["query"] - item)) * (ids != 0)[..., None]
    np.testing.assert_allclose(np_(layer.fuse_items(vectors, masks)), item, atol=1e-5)
    np.testing.assert_allclose(np_(layer(ids, qids, tokens)), pair_ref, atol=1e-5)
    # An item without text: its weights sum to one over the modalities it has.
    no_text = (m["text"] == 0) & (ids != 0)
    assert no_text.any()
    np.testing.assert_allclose((weights[:, no_text] / norm[no_text]).sum(0), 1.0, atol=1e-6)


def test_empty_query_gives_the_item_vector():
    layer = make_layer(query_weight=0.5)
    ids = np.array([5, 7, 9])
    no_query = layer(ids, np.zeros(3, np.int64), np.zeros((3, 4), np.int64))
    item_only = layer(ids)
    vectors, masks = layer.encode(ids)
    np.testing.assert_allclose(np_(no_query), np_(item_only), atol=1e-6)
    np.testing.assert_allclose(np_(item_only), np_(layer.fuse_items(vectors, masks)), atol=1e-6)
    assert np.linalg.norm(np_(item_only), axis=-1).min() > 0


def test_padding_changes_nothing():
    layer = make_layer()
    x = batch()
    ids, qids, tokens = x["hist_item"], x["hist_query"], x["hist_query_tokens"]
    base = np_(layer(ids, qids, tokens))
    rng = np.random.default_rng(5)
    pad = ids == 0
    assert pad.any()
    # Queries of padded behaviours, padded token slots, and the vectors of items without
    # text/image are ignored.
    qids2 = np.where(pad, rng.integers(2, FULL.num_queries, ids.shape), qids)
    tokens2 = np.where(pad[..., None], rng.integers(2, FULL.num_query_tokens, tokens.shape), tokens)
    np.testing.assert_allclose(np_(layer(ids, qids2, tokens2)), base, atol=1e-6)
    assert np.abs(base[pad]).max() == 0.0
    tables = layer.get_tables()
    tables["item_text_vectors"][~tables["item_has_text"].astype(bool)] = 99.0
    tables["item_image_vectors"][~tables["item_has_image"].astype(bool)] = -7.0
    tables["item_attributes"][0] = 3  # the padding row
    layer.set_tables(tables)
    np.testing.assert_allclose(np_(layer(ids, qids, tokens)), base, atol=1e-6)


def test_given_attribute_ids_replace_the_table_row_where_any_is_set():
    layer = make_layer()
    tables = layer.get_tables()
    attr_emb = np_(layer.attribute_embeddings)
    a = FULL.max_attributes
    # Items 1 (OOV: an empty table row) and 2..6 (rows with attributes).
    ids = np.array([1, 1, 2, 3, 4, 5, 6])
    given = np.zeros((len(ids), a), np.int64)
    given[1, :2] = [4, 7]  # an unknown item with attributes
    given[3, 1] = 5  # a padding slot first: still given
    given[5] = tables["item_attributes"][5]  # the table's own attributes
    given[6, 0] = 1  # the OOV attribute counts as given
    vectors, masks = layer.encode(ids, attribute_ids=given)
    table_vectors, table_masks = layer.encode(ids)
    rows = np.where((given != 0).any(-1)[:, None], given, tables["item_attributes"][ids])
    valid = rows != 0
    ref = (attr_emb[rows] * valid[..., None]).sum(-2) / np.maximum(valid.sum(-1, keepdims=True), 1)
    np.testing.assert_array_equal(np_(masks["attr"]), valid.any(-1))
    np.testing.assert_allclose(np_(vectors["attr"]), ref * valid.any(-1)[:, None], atol=1e-6)
    assert np_(masks["attr"])[1] and not np_(table_masks["attr"])[1]
    # Rows of padding only, and the table's own attributes, give the table's vectors.
    for row in (0, 2, 4, 5):
        np.testing.assert_allclose(
            np_(vectors["attr"])[row], np_(table_vectors["attr"])[row], atol=1e-7
        )
    assert not np.allclose(np_(vectors["attr"])[3], np_(table_vectors["attr"])[3])
    # The fused pair follows: equal where nothing replaced the table's attributes.
    pair = np_(layer(ids, attribute_ids=given))
    np.testing.assert_allclose(pair[[0, 2, 4, 5]], np_(layer(ids))[[0, 2, 4, 5]], atol=1e-7)
    # A padded item stays zero whatever attributes come with it.
    assert not np_(layer(np.array([0]), attribute_ids=given[1:2])).any()


def test_tables_validation_and_values():
    layer = MultiModalPairEmbedding(**data_kwargs(FULL), embedding_dim=D)
    tables = testing.make_tables(FULL, seed=3)
    bad = dict(tables, item_text_vectors=np.zeros((FULL.num_items, 3), np.float32))
    with pytest.raises(ValueError, match="item_text_vectors"):
        layer.set_tables(bad)
    with pytest.raises(ValueError, match="item_has_image"):
        layer.set_tables({k: v for k, v in tables.items() if k != "item_has_image"})
    with pytest.raises(ValueError, match="bogus"):
        layer.set_tables(dict(tables, bogus=np.zeros(3)))
    attrs = tables["item_attributes"].copy()
    attrs[3, 0] = FULL.num_attributes
    with pytest.raises(ValueError, match="item_attributes"):
        layer.set_tables(dict(tables, item_attributes=attrs))
    layer.set_tables(tables)  # before build: kept until build
    layer.build()
    got = layer.get_tables()
    for name, value in got.items():
        np.testing.assert_array_equal(value, tables[name].astype(value.dtype))
    assert all(not v.trainable for v in layer.non_trainable_weights)
    assert {v.name for v in layer.non_trainable_weights} == set(layer.table_names)
    # Tables of modalities the layer does not use are ignored (the query tokens it has).
    bare = MultiModalPairEmbedding(**data_kwargs(BARE), embedding_dim=D)
    bare.set_tables(tables)
    bare.build()
    assert set(bare.get_tables()) == {"query_tokens"}


def test_constructor_validation():
    kwargs = data_kwargs(FULL)
    with pytest.raises(ValueError, match="query_weight"):
        MultiModalPairEmbedding(**kwargs, query_weight=1.5)
    with pytest.raises(ValueError, match="embedding_dim"):
        MultiModalPairEmbedding(**kwargs, embedding_dim=0)
    with pytest.raises(ValueError, match="num_items"):
        MultiModalPairEmbedding(**dict(kwargs, num_items=1))
    with pytest.raises(ValueError, match="text_dim"):
        MultiModalPairEmbedding(**dict(kwargs, text_dim=-1))


def test_config_round_trip():
    layer = make_layer(query_weight=0.25, embeddings_regularizer="l2")
    config = layer.get_config()
    assert "tables" not in config
    clone = MultiModalPairEmbedding.from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, MultiModalPairEmbedding)
    restored.build()
    restored.set_weights(layer.get_weights())
    x = batch()
    args = (x["hist_item"], x["hist_query"], x["hist_query_tokens"])
    np.testing.assert_allclose(np_(restored(*args)), np_(layer(*args)), atol=1e-6)
    np.testing.assert_allclose(np_(layer(*args)), np_(layer(*args)))  # repeatable
