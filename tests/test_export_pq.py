"""Export and serving of a product-quantized ("pq") model: stored-code inputs, the pq_codes
signatures, equality with Keras, warmup, invalid codes, and the client over the wire."""

from __future__ import annotations

import json
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from export import warmup, writer  # noqa: E402
from export.testing import PQ_CENTROIDS, PQ_SUBVECTORS  # noqa: E402
from seminar_tf import spec, training  # noqa: E402
from serving import local_server  # noqa: E402
from serving.client import CascadeClient, ServingError, pad_histories  # noqa: E402

CODES = spec.PQ_CODES.name


@pytest.fixture(scope="module")
def pq_model(tiny):
    import seminar_tf.models  # noqa: F401

    return training.load_model(tiny["pq_model"])


@pytest.fixture(scope="module")
def loaded(tiny):
    return {
        m: tf.saved_model.load(writer.version_dir(tiny["pq_export"], m))
        for m in spec.SERVING_MODELS
    }


def _call(loaded, model, signature, inputs):
    """Calls an exported signature with the inputs it takes from ``inputs``; a request
    without the user gets the unknown user ("" raw, 0 encoded) with no earlier events."""
    fn = loaded[model].signatures[signature]
    names = fn.structured_input_signature[1]
    batch = len(next(iter(inputs.values())))
    unknown_user = {"user_id": np.full(batch, b"", object), "user": np.zeros(batch, np.int64),
                    "user_counts": np.zeros((batch, 3), np.int64)}  # fmt: skip
    inputs = {**{k: v for k, v in unknown_user.items() if k in names}, **inputs}
    out = fn(**{k: tf.constant(v) for k, v in inputs.items() if k in names})
    return {k: v.numpy() for k, v in out.items()}


def _no_attributes(tiny, n, raw=False):
    """``target_attributes`` of ``n`` targets without attributes (all padding)."""
    width = spec.DataSpec.load(tiny["data"]).max_attributes
    return np.full((n, width), b"", object) if raw else np.zeros((n, width), np.int64)


def _batch(tiny, n=16):
    from seminar_tf.data.dataset import make_dataset

    features, _ = next(iter(make_dataset(tiny["data"], "test", n)))
    features = {k: v.numpy() for k, v in features.items()}
    features["target_attributes"] = _no_attributes(tiny, n)
    return features


def _history_inputs(features, names):
    return {n: features[n] for n in names}


def _code_inputs(encoded: bool):
    return [
        f.name for f in spec.PQ_SIGNATURES["pq_codes_encoded" if encoded else "pq_codes"].inputs
    ]


def _retrieve_both(tiny, served, raw, raw_codes, encoded, enc_codes, item):
    """``(raw, encoded)`` retrieval answers for one history given both ways (strings and
    ids), against the catalog's ``item`` (its string) as the target."""
    items = _items(tiny)
    q = spec.DataSpec.load(tiny["data"]).max_query_tokens
    raw_out = _call(served, "retrieval", "retrieve", {
        **raw, CODES: raw_codes, "target_item": np.array([item.encode()], object),
        "target_query": np.array([b""], object),
        "target_attributes": _no_attributes(tiny, 1, raw=True)})  # fmt: skip
    enc_out = _call(served, "retrieval", "retrieve_encoded", {
        **encoded, CODES: enc_codes, "hist_label": raw["hist_label"],
        "target_item": np.array([items.index(item) + 2]), "target_query": np.array([0]),
        "target_query_tokens": np.zeros((1, q), np.int64),
        "target_attributes": _no_attributes(tiny, 1)})  # fmt: skip
    return raw_out, enc_out


def _items(tiny) -> list:
    """The item vocabulary (id = position + 2)."""
    vocab = os.path.join(tiny["data"], spec.VOCAB_DIR, spec.VOCAB_FILES["item"])
    return [line.rstrip("\n") for line in open(vocab, encoding="utf-8")]


def test_quantize_writes_a_model_and_its_report(tiny, pq_model):
    with open(os.path.join(tiny["pq_model"], training.QUANTIZATION_FILE)) as f:
        report = json.load(f)
    assert report["num_subvectors"] == PQ_SUBVECTORS and report["num_centroids"] == PQ_CENTROIDS
    recall = report["valid_gsu_recall"]
    assert recall["examples"] > 0 and 0.0 < recall["recall@8"] <= 1.0
    assert pq_model.search == "pq" and pq_model.gsu.scorer.num_centroids == PQ_CENTROIDS
    with open(os.path.join(tiny["pq_model"], training.CONFIG_FILE)) as f:
        assert json.load(f)["train"]["model"]["search"] == "pq"


def test_pq_export_declares_stored_codes(tiny, pq_model):
    meta = writer.read_metadata(writer.version_dir(tiny["pq_export"], spec.RETRIEVAL_MODEL))
    m = len(pq_model.gsu.scorer.groups)
    assert meta["search"] == "pq" and meta["pq"]["num_centroids"] == PQ_CENTROIDS
    assert set(meta["signatures"]) == {
        "retrieve",
        "retrieve_encoded",
        "pq_codes",
        "pq_codes_encoded",
    }
    for name in ("retrieve", "retrieve_encoded"):
        codes = {f["name"]: f for f in meta["signatures"][name]["inputs"]}[CODES]
        assert codes["dtype"] == "int32" and codes["shape"][-2:] == [m, PQ_SUBVECTORS]
    ranking = writer.read_metadata(writer.version_dir(tiny["pq_export"], spec.RANKING_MODEL))
    assert set(ranking["signatures"]) == {"rank", "rank_encoded"}


def test_codes_and_cascade_equal_the_keras_model(tiny, pq_model, loaded):
    """Stored codes, retrieval and ranking served as Keras computes them; the model is
    ``seminar quantize``'s default, so its retrieval re-ranks a 2K shortlist exactly."""
    assert pq_model.shortlist == 2
    features = _batch(tiny)
    codes = _call(loaded, "retrieval", "pq_codes_encoded",
                  _history_inputs(features, _code_inputs(True)))[CODES]  # fmt: skip
    np.testing.assert_array_equal(codes, np.asarray(pq_model.pq_codes(features)))
    wanted = spec.SERVING_TARGET_FEATURES + spec.HISTORY_FEATURES + (spec.USER_COUNTS,)
    hist = {f.name: features[f.name] for f in wanted}
    out = _call(loaded, "retrieval", "retrieve_encoded", {**hist, CODES: codes})
    want = pq_model.retrieve(features)
    kept = np.asarray(want["kept_mask"])
    np.testing.assert_array_equal(out["kept_position"], np.where(kept, want["indices"], -1))
    np.testing.assert_allclose(out["kept_score"], np.asarray(want["scores"]), rtol=1e-4, atol=1e-4)
    ranking = {**features, **out}
    probability = _call(loaded, "ranking", "rank_encoded", ranking)["probability"]
    np.testing.assert_allclose(probability, np.asarray(pq_model(features)), rtol=1e-4, atol=1e-5)


def test_raw_codes_equal_encoded_codes(tiny, loaded):
    items = _items(tiny)
    history = [{"item_id": items[i * 5 % len(items)], "query": ""} for i in range(9)]
    history.append({"item_id": "never-seen-item", "query": ""})
    raw = pad_histories([history])
    raw_codes = _call(loaded, "retrieval", "pq_codes",
                      _history_inputs(raw, _code_inputs(False)))[CODES]  # fmt: skip
    ids = np.array([[0] + [items.index(h["item_id"]) + 2 for h in history[:-1]] + [1]], np.int64)
    q = spec.DataSpec.load(tiny["data"]).max_query_tokens
    encoded = {"hist_item": ids, "hist_query": np.zeros_like(ids),
               "hist_query_tokens": np.zeros(ids.shape + (q,), np.int64)}  # fmt: skip
    enc_codes = _call(loaded, "retrieval", "pq_codes_encoded", encoded)[CODES]
    np.testing.assert_array_equal(raw_codes, enc_codes)
    assert np.all(raw_codes[0, 0] == -1) and np.all(raw_codes[0, 1:, 0] >= 0)
    # The raw retrieval keeps what the encoded one keeps.
    raw_out, enc_out = _retrieve_both(tiny, loaded, raw, raw_codes, encoded, enc_codes, items[4])
    for name in ("kept_position", "kept_score", "kept_label"):
        np.testing.assert_allclose(raw_out[name], enc_out[name], rtol=1e-5, atol=1e-6)
    kept = raw_out["kept_position"][0]
    assert (kept >= 0).sum() == 8
    names = [h["item_id"] for h in history]
    for j, pos in enumerate(kept):
        if pos >= 0:
            assert raw_out["kept_item"][0, j].decode() == names[pos - 1]


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda c: c.__setitem__((0, -1, 0, 0), PQ_CENTROIDS), "code out of range"),
        (lambda c: c.__setitem__((0, -1, 0, 0), -2), "code below -1"),
    ],
    ids=["too-large", "below-minus-one"],
)
def test_invalid_codes_are_rejected_naming_the_field(tiny, loaded, change, match):
    features = _batch(tiny, 4)
    codes = _call(loaded, "retrieval", "pq_codes_encoded",
                  _history_inputs(features, _code_inputs(True)))[CODES]  # fmt: skip
    change(codes)
    wanted = spec.SERVING_TARGET_FEATURES + spec.HISTORY_FEATURES + (spec.USER_COUNTS,)
    hist = {f.name: features[f.name] for f in wanted}
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"{CODES}: .*{match}"):
        _call(loaded, "retrieval", "retrieve_encoded", {**hist, CODES: codes})
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError, TypeError)):
        _call(loaded, "retrieval", "retrieve_encoded", {**hist, CODES: codes[:, :, :1]})


def test_pq_warmup_covers_every_signature_and_replays(tiny, loaded):
    for name in spec.SERVING_MODELS:
        path = writer.version_dir(tiny["pq_export"], name)
        requests = warmup.read_warmup(os.path.join(path, "assets.extra", warmup.WARMUP_FILE))
        meta = writer.read_metadata(path)
        assert {s for _, s, _ in requests} == set(meta["signatures"])
        for _, signature, inputs in requests:
            out = _call(loaded, name, signature, inputs)
            assert all(np.all(np.isfinite(v)) for v in out.values() if v.dtype.kind == "f")


def test_client_ranks_with_stored_codes_over_grpc(tiny, loaded):
    items = _items(tiny)
    history = [{"item_id": items[i * 3 % len(items)], "query": ""} for i in range(12)]
    candidates = [{"item_id": items[4]}, {"item_id": items[9]}, {"item_id": "unknown"}]
    with local_server.LocalServer.from_export(tiny["pq_export"]) as server:
        with CascadeClient(server.grpc_target) as client:
            assert client.uses_stored_codes
            ranked = client.rank_candidates(history, candidates)
            hist = pad_histories([history])
            codes = client.history_codes(hist)
            with pytest.raises(ServingError) as err:
                client.retrieve({**hist, "target_item": [items[4]], "target_query": [""]})
            assert err.value.field == CODES and err.value.stage == spec.RETRIEVAL_MODEL
    # The same cascade in process, from the codes the client fetched.
    features = {k: np.repeat(v, 3, 0) for k, v in {**hist, CODES: codes}.items()}
    features["target_item"] = np.array([c["item_id"].encode() for c in candidates], object)
    features["target_query"] = np.array([b""] * 3, object)
    features["target_attributes"] = _no_attributes(tiny, 3, raw=True)
    # what the client sends without given counts: the history's 12 events, all clicks
    features["user_counts"] = np.array([[12, 12, 0]] * 3, np.int64)
    out = _call(loaded, "retrieval", "retrieve", features)
    ranking = {**features, **out}
    probability = _call(loaded, "ranking", "rank", ranking)["probability"]
    by_item = {r["item_id"]: r["probability"] for r in ranked}
    for i, c in enumerate(candidates):
        assert by_item[c["item_id"]] == pytest.approx(float(probability[i]), rel=1e-5, abs=1e-6)


def test_a_shortlist_model_serves_its_exact_re_rank_raw_as_encoded(tiny, pq_model, loaded):
    """The default's 2K shortlist over a history longer than it: the raw retrieval looks the
    history's strings up for the re-rank and keeps what the encoded one keeps (the encoded
    cascade against Keras: ``test_codes_and_cascade_equal_the_keras_model``)."""
    model, served = pq_model, loaded
    assert model.shortlist == 2
    items = _items(tiny)
    history = [{"item_id": items[i * 7 % len(items)], "query": ""} for i in range(40)]
    raw = pad_histories([history])
    pad = raw["hist_item"].shape[1] - len(history)  # the client pads on the left
    ids = np.array([[0] * pad + [items.index(h["item_id"]) + 2 for h in history]], np.int64)
    q = spec.DataSpec.load(tiny["data"]).max_query_tokens
    encoded = {"hist_item": ids, "hist_query": np.zeros_like(ids),
               "hist_query_tokens": np.zeros(ids.shape + (q,), np.int64)}  # fmt: skip
    enc_codes = np.asarray(model.pq_codes(encoded))
    raw_out, enc_out = _retrieve_both(tiny, served, raw, enc_codes, encoded, enc_codes, items[4])
    assert (enc_out["kept_position"] >= 0).sum() == model.top_k
    for name in ("kept_position", "kept_score"):
        np.testing.assert_allclose(raw_out[name], enc_out[name], rtol=1e-5, atol=1e-6)
