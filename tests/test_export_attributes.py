"""Target attributes as request inputs of the exported SavedModels (``target_attributes``): the
table's own attributes change nothing, given attributes replace the table's (a brand-new
item), raw and encoded signatures agree, bad inputs are refused naming the field, the "pq"
export honours them, and the warmup covers them."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from export import graph, warmup, writer  # noqa: E402
from preprocessing.vocab import lookup_table  # noqa: E402
from seminar_tf import spec, training  # noqa: E402
from serving.client import pad_attributes  # noqa: E402

ATTRS = spec.TARGET_ATTRIBUTES.name


@pytest.fixture(scope="module")
def model(tiny):
    import seminar_tf.models  # noqa: F401

    return training.load_model(tiny["model"])


def _load(export_dir):
    return {m: tf.saved_model.load(writer.version_dir(export_dir, m)) for m in spec.SERVING_MODELS}


@pytest.fixture(scope="module")
def loaded(tiny):
    return _load(tiny["export"])


def _vocab(tiny, kind) -> list:
    path = os.path.join(tiny["data"], spec.VOCAB_DIR, spec.VOCAB_FILES[kind])
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def _width(tiny) -> int:
    return spec.DataSpec.load(tiny["data"]).max_attributes


def _item_attributes(tiny) -> dict:
    """``{item_id: [attribute strings]}`` of the raw item catalog."""
    import pyarrow.parquet as pq

    items = pq.read_table(os.path.join(tiny["raw"], "items.parquet")).to_pandas()
    return {i: list(a) for i, a in zip(items["item_id"], items["attributes"])}


def _encode_attributes(tiny, raw: np.ndarray) -> np.ndarray:
    """The preprocessing's (Python) lookup of attribute strings ``[B, A]``: stripped, ""
    -> 0, unknown -> OOV."""
    table = lookup_table(_vocab(tiny, "attribute"))

    def one(value):
        text = (value.decode() if isinstance(value, bytes) else value).strip()
        return table.get(text, spec.OOV_ID) if text else spec.PAD_ID

    return np.vectorize(one, otypes=[np.int64])(np.asarray(raw, dtype=object))


def _requests(tiny, targets: list, attributes: list) -> tuple:
    """``(raw, encoded)`` requests of the retrieval: ``targets`` (item id strings, known or
    not, no query) with ``attributes`` (lists or None), all with one history of known items
    (a leading padding slot, no queries)."""
    items = _vocab(tiny, "item")
    q = spec.DataSpec.load(tiny["data"]).max_query_tokens
    b = len(targets)
    n = spec.NUM_RESERVED_IDS
    hist_ids = np.array([[0] + [n + (i * 7) % len(items) for i in range(12)]] * b, np.int64)
    ids = {v: i + n for i, v in enumerate(items)}
    by_id = np.array([b""] * n + [i.encode() for i in items], object)  # id -> raw string
    raw = {
        "target_item": np.array([t.encode() for t in targets], object),
        "target_query": np.full(b, b"", object),
        ATTRS: pad_attributes(attributes, _width(tiny)),
        "hist_item": by_id[hist_ids],
        "hist_query": np.full(hist_ids.shape, b"", object),
        "hist_label": (hist_ids > 0).astype(np.int64),
        "user_id": np.full(b, b"", object),  # unknown user
        "user_counts": np.zeros((b, 3), np.int64),
    }
    encoded = {
        "target_item": np.array([ids.get(t, spec.OOV_ID) for t in targets], np.int64),
        "target_query": np.zeros(b, np.int64),
        "target_query_tokens": np.zeros((b, q), np.int64),
        ATTRS: _encode_attributes(tiny, raw[ATTRS]),
        "hist_item": hist_ids,
        "hist_query": np.zeros_like(hist_ids),
        "hist_query_tokens": np.zeros(hist_ids.shape + (q,), np.int64),
        "hist_label": raw["hist_label"],
        "user": np.zeros(b, np.int64),
        "user_counts": raw["user_counts"],
    }
    return raw, encoded


def _call(loaded, signature, inputs):
    model = {**spec.SERVING_SIGNATURES, **spec.PQ_SIGNATURES}[signature].model
    fn = loaded[model].signatures[signature]
    out = fn(**{k: tf.constant(v) for k, v in inputs.items()})
    return {k: v.numpy() for k, v in out.items()}


def _input_names(loaded, signature) -> set:
    """The inputs the exported ``signature`` takes (the user inputs included)."""
    model = {**spec.SERVING_SIGNATURES, **spec.PQ_SIGNATURES}[signature].model
    return set(loaded[model].signatures[signature].structured_input_signature[1])


def _cascade(loaded, features, encoded: bool):
    """``(retrieved, probability [B])`` of ``retrieve[_encoded]`` -> ``rank[_encoded]``."""
    suffix = "_encoded" if encoded else ""
    retrieved = _call(loaded, "retrieve" + suffix, features)
    names = _input_names(loaded, "rank" + suffix)
    ranking = {k: v for k, v in {**features, **retrieved}.items() if k in names}
    return retrieved, _call(loaded, "rank" + suffix, ranking)["probability"]


def _known_items_with_attributes(tiny, n) -> list:
    catalog = _item_attributes(tiny)
    known = [i for i in _vocab(tiny, "item") if catalog.get(i)]
    assert len(known) >= n
    return known[:n]


def test_metadata_declares_target_attributes(tiny):
    for name in spec.SERVING_MODELS:
        meta = writer.read_metadata(writer.version_dir(tiny["export"], name))
        assert meta["max_attributes"] == _width(tiny)
        assert meta["vocab_sizes"]["attribute"] == len(_vocab(tiny, "attribute")) + 2
        for sig in meta["signatures"].values():
            field = {f["name"]: f for f in sig["inputs"]}[ATTRS]
            assert field["shape"] == [None, _width(tiny)] and field["optional"] is True
            assert field["dtype"] == ("int64" if sig["encoded"] else "string")
        assets = os.listdir(os.path.join(writer.version_dir(tiny["export"], name), "assets"))
        assert spec.VOCAB_FILES["attribute"] in assets


@pytest.mark.parametrize("encoded", [False, True], ids=["raw", "encoded"])
def test_the_tables_own_attributes_change_nothing(tiny, loaded, encoded):
    """Old clients send padding; sending the attributes the item table already has for a
    known item gives the same outputs."""
    targets = _known_items_with_attributes(tiny, 6)
    catalog = _item_attributes(tiny)
    without = _requests(tiny, targets, [None] * len(targets))[int(encoded)]
    given = _requests(tiny, targets, [catalog[t] for t in targets])[int(encoded)]
    assert not without[ATTRS].any() and all(given[ATTRS].any(axis=1))
    if encoded:  # the table's ids, exactly as tables.npz has them
        table = training.load_tables(tiny["data"])["item_attributes"]
        np.testing.assert_array_equal(given[ATTRS], table[given["target_item"]])
    kept_without, p_without = _cascade(loaded, without, encoded)
    kept_given, p_given = _cascade(loaded, given, encoded)
    np.testing.assert_array_equal(kept_given["kept_position"], kept_without["kept_position"])
    np.testing.assert_allclose(kept_given["kept_score"], kept_without["kept_score"], rtol=1e-6)
    np.testing.assert_allclose(p_given, p_without, rtol=1e-6, atol=1e-7)


def test_a_new_item_with_attributes_scores_as_the_keras_model(tiny, model, loaded):
    catalog = _item_attributes(tiny)
    known = _known_items_with_attributes(tiny, 2)
    targets = ["a-brand-new-item"] * 3 + known[:1]
    attributes = [None, catalog[known[0]], catalog[known[1]] + ["an-attribute-never-seen"],
                  catalog[known[1]]]  # fmt: skip
    raw, encoded = _requests(tiny, targets, attributes)
    assert encoded["target_item"][:3].tolist() == [spec.OOV_ID] * 3
    retrieved, probability = _cascade(loaded, raw, encoded=False)
    # The same unknown item scores differently with attributes than without.
    assert abs(probability[1] - probability[0]) > 1e-6
    assert abs(probability[2] - probability[0]) > 1e-6
    # ... exactly as the Keras model (not the serving copy) fed the encoded attribute ids.
    np.testing.assert_allclose(probability, model(encoded).numpy(), rtol=1e-5, atol=1e-6)
    reference = model.retrieve(encoded)
    np.testing.assert_allclose(
        retrieved["kept_score"], reference["scores"].numpy(), rtol=1e-5, atol=1e-6
    )
    # The Keras model without the input is the table's behaviour (row 0: no attributes).
    plain = {k: v for k, v in encoded.items() if k != ATTRS}
    np.testing.assert_allclose(model(plain).numpy()[0], probability[0], rtol=1e-5, atol=1e-6)


def test_raw_and_encoded_attributes_agree_and_unknown_strings_are_oov(tiny, loaded):
    vocab = _vocab(tiny, "attribute")
    messy = [
        [f"  {vocab[0]} ", "", vocab[3]],  # padding whitespace, a blank slot
        ["never-an-attribute", "\u00a0" + vocab[5]],  # unknown -> OOV; a Unicode space
        [],
        ["ÉCOLE unknown", "日本語"],
    ]
    targets = [_vocab(tiny, "item")[4], "a-new-item", "another-new-item", "x"]
    raw, encoded = _requests(tiny, targets, messy)
    assert encoded[ATTRS][1, 0] == spec.OOV_ID and encoded[ATTRS][3, :2].tolist() == [1, 1]
    assert encoded[ATTRS][0, :2].tolist() == [2, 5]  # "" dropped as the preprocessing does
    # The in-graph lookup of the export equals the Python one, value by value.
    values = tf.constant(np.array(
        [f"  {vocab[0]} ", vocab[7], "", "   ", "never-an-attribute", "\u3000" + vocab[2]]
    ))  # fmt: skip
    got = graph.Vocabularies(tiny["data"]).lookup("attribute", graph.strip_text(values)).numpy()
    np.testing.assert_array_equal(got, _encode_attributes(tiny, values.numpy()))
    raw_kept, raw_p = _cascade(loaded, raw, encoded=False)
    enc_kept, enc_p = _cascade(loaded, encoded, encoded=True)
    np.testing.assert_array_equal(raw_kept["kept_position"], enc_kept["kept_position"])
    np.testing.assert_allclose(raw_kept["kept_score"], enc_kept["kept_score"], rtol=1e-6)
    np.testing.assert_allclose(raw_p, enc_p, rtol=1e-6, atol=1e-7)
    assert np.isfinite(raw_p).all()


def _encoded_request(tiny):
    return _requests(tiny, ["a-new-item", _vocab(tiny, "item")[3]], [None, None])[1]


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda x: x.update({ATTRS: x[ATTRS].astype(np.int32)}), "int32|int64"),
        (lambda x: x.update({ATTRS: np.zeros((2, 9), np.int64)}), f"{ATTRS} must have the shape"),
        (lambda x: x.update({ATTRS: x[ATTRS][:, :3]}), f"{ATTRS} must have the shape"),
        (lambda x: x[ATTRS].__setitem__((0, 1), -3), f"{ATTRS}: negative id"),
        (lambda x: x[ATTRS].__setitem__((1, 0), 10**6), f"{ATTRS}: id out of range"),
        (lambda x: x.update({ATTRS: x[ATTRS][:1]}), "same batch size"),
    ],
    ids=["dtype", "too-wide", "too-narrow", "negative-id", "id-range", "batch"],
)
@pytest.mark.parametrize("signature", ["retrieve_encoded", "rank_encoded"])
def test_invalid_encoded_attributes_are_refused(tiny, loaded, signature, change, match):
    features = _encoded_request(tiny)
    if signature == "rank_encoded":
        retrieved = _call(loaded, "retrieve_encoded", features)
        names = _input_names(loaded, signature)
        features = {k: v for k, v in {**features, **retrieved}.items() if k in names}
    change(features)
    with pytest.raises((tf.errors.InvalidArgumentError, TypeError, ValueError), match=match):
        _call(loaded, signature, features)


def test_invalid_raw_attributes_are_refused(tiny, loaded):
    raw = _requests(tiny, ["a-new-item"], [["x"]])[0]
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"{ATTRS} must have the shape"):
        _call(loaded, "retrieve", {**raw, ATTRS: raw[ATTRS][:, :2]})
    with pytest.raises((tf.errors.InvalidArgumentError, TypeError, ValueError)):
        _call(loaded, "retrieve", {**raw, ATTRS: np.zeros(raw[ATTRS].shape, np.int64)})


def test_pq_export_honours_target_attributes(tiny):
    import seminar_tf.models  # noqa: F401

    pq_model = training.load_model(tiny["pq_model"])
    loaded = _load(tiny["pq_export"])
    catalog = _item_attributes(tiny)
    known = _known_items_with_attributes(tiny, 1)
    _, encoded = _requests(tiny, ["a-new-item", "a-new-item"], [None, catalog[known[0]]])
    code_names = [f.name for f in spec.PQ_SIGNATURES["pq_codes_encoded"].inputs]
    codes = _call(loaded, "pq_codes_encoded", {n: encoded[n] for n in code_names})
    _, probability = _cascade(loaded, {**encoded, **codes}, encoded=True)
    assert abs(probability[1] - probability[0]) > 1e-6
    np.testing.assert_allclose(probability, pq_model(encoded).numpy(), rtol=1e-4, atol=1e-5)


def test_warmup_mixes_targets_with_and_without_attributes(tiny):
    for name in spec.SERVING_MODELS:
        path = os.path.join(writer.version_dir(tiny["export"], name), "assets.extra",
                            warmup.WARMUP_FILE)  # fmt: skip
        requests = warmup.read_warmup(path)
        by_signature = {}
        for _, signature, inputs in requests:
            rows = inputs[ATTRS]
            assert rows.shape[1] == _width(tiny)
            empty = (rows == (b"" if rows.dtype == object else 0)).all(axis=1)
            by_signature.setdefault(signature, []).extend(empty.tolist())
        for signature, empty in by_signature.items():
            assert any(empty) and not all(empty), signature
