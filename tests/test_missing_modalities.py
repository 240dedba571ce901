"""Every optional part a data set may lack, through to a served and a batch-scored answer.

For each absence a tiny synthetic data set is built once (synthetic tables with that part
blanked out, written with ``write_tables``) and taken through the whole path: preprocess ->
pretrain -> train (from the PSU) -> evaluate -> export, and ``quantize`` -> export of the
product-quantized copy. The tests then serve each export with the local PredictionService,
rank candidates with the client and check the order and probabilities against the Keras
model fed the same request, run ``seminar score`` (Beam RunInference) against the Keras
model, and check what the exports do with values the model never saw: a query sent to a
model trained without queries and attributes sent to one without attributes are OOV (as the
preprocessing encodes a value missing from its vocabulary), never an error, and the stored pq
codes of an absent modality are -1.

The absences: ``no_query`` (every event's query is "", no query-vector table),
``no_attributes`` (every item's attribute list is empty), ``no_text`` / ``no_image`` (no item
has that vector), ``no_query_vectors`` (queries but no query-vector table) and ``bare`` (a
catalog of item ids only, no queries). ``no_query`` and
``bare`` run by default; the others are ``slow``.
"""

from __future__ import annotations

import glob
import json
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from export import writer  # noqa: E402
from export.testing import _locked  # noqa: E402
from seminar_tf import spec, text  # noqa: E402

MODEL = {"embedding_dim": 8, "num_heads": 2, "top_k": 4, "hidden_units": [16]}
PSU_MODEL = {"embedding_dim": 8, "num_heads": 2}
MAX_LEN = 20
NEGATIVES = 19  # the tiny catalogs have about 100 items
ABSENCES = {
    # name: (parts blanked out, default run)
    "no_query": ({"query"}, True),
    "no_attributes": ({"attributes"}, False),
    "no_text": ({"text_embedding"}, False),
    "no_image": ({"image_embedding"}, False),
    "no_query_vectors": ({"query_vectors"}, False),  # queries, but no --queries table
    "bare": ({"query", "attributes", "text_embedding", "image_embedding", "text"}, True),
}
PARAMS = [
    pytest.param(name, marks=() if fast else pytest.mark.slow, id=name)
    for name, (_, fast) in ABSENCES.items()
]


def _raw_tables(absent: set) -> dict:
    """Synthetic tables with the ``absent`` parts blanked out (``bare``: the catalog is a
    table of item ids only)."""
    from seminar_tf.data import synth

    cfg = synth.SynthConfig(
        num_users=30, num_items=120, min_events=10, max_events=60, seed=5, text_dim=8,
        image_dim=6,
    )  # fmt: skip
    tables = synth.generate(cfg)
    events, items = tables["events"], tables["items"]
    out = {}
    if "query" in absent:
        i = events.column_names.index("query")
        events = events.set_column(i, "query", pa.array([""] * events.num_rows, pa.string()))
    if not absent & {"query", "query_vectors"}:
        out["queries"] = tables["queries"]
    if absent >= set(spec.ITEM_FIELDS) - {"item_id"}:
        items = items.select(["item_id"])
    else:
        for name in absent & {"attributes", "text_embedding", "image_embedding"}:
            i = items.column_names.index(name)
            empty = pa.array([[]] * items.num_rows, items.schema.field(name).type)
            items = items.set_column(i, name, empty)
    return {"events": events, "items": items, **out}


def build(root: str, name: str) -> dict:
    """Raw tables -> preprocess -> pretrain -> train -> evaluate -> export, and quantize ->
    export; built once per absence (later calls, from any process, reuse it)."""
    keys = ("raw", "data", "psu", "model", "export", "pq_model", "pq_export")
    paths = {k: os.path.join(root, k) for k in keys}
    done = os.path.join(root, "done.json")
    os.makedirs(root, exist_ok=True)
    with _locked(os.path.join(root, ".lock")):
        if os.path.exists(done):
            with open(done) as f:
                return json.load(f)
        import keras

        from export.writer import export_models
        from preprocessing.pipeline import PreprocessConfig, run
        from seminar_tf import training
        from seminar_tf.data.readers import write_tables

        os.environ.setdefault("SEMINAR_QUIET", "1")
        files = write_tables(_raw_tables(ABSENCES[name][0]), paths["raw"])
        run(
            PreprocessConfig(
                events=[files["events"]], items=[files["items"]],
                queries=[files["queries"]] if "queries" in files else [],
                out_dir=paths["data"], max_len=MAX_LEN,
            )
        )  # fmt: skip

        def cfg(model):
            return training.TrainConfig(
                epochs=1, batch_size=32, steps_per_epoch=3, validation_steps=1, model=model
            )

        training.pretrain(paths["data"], paths["psu"], cfg(PSU_MODEL))
        keras.backend.clear_session()
        training.train(paths["data"], paths["model"], cfg(MODEL), pretrained=paths["psu"])
        keras.backend.clear_session()
        report = training.evaluate(paths["data"], paths["model"], batch_size=64,
                                   num_negatives=NEGATIVES, max_ranked=20)  # fmt: skip
        keras.backend.clear_session()
        export_models(paths["model"], paths["export"], version=1)
        keras.backend.clear_session()
        # Per-modality codes: what these tests check is each absent modality's -1 code.
        training.quantize(paths["data"], paths["model"], paths["pq_model"], num_subvectors=2,
                          num_centroids=8, recall_ks=(1, MODEL["top_k"]), layout="modality",
                          rotation=False)  # fmt: skip
        keras.backend.clear_session()
        export_models(paths["pq_model"], paths["pq_export"], version=1)
        out = {**paths, "name": name, "report": report}
        with open(done, "w") as f:
            json.dump(out, f)
    return out


@pytest.fixture(scope="module", params=PARAMS)
def built(request, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return build(str(shared / f"seminar-absent-{request.param}"), request.param)


# ------------------------------------------------------------------------------- helpers
def _vocab(data_dir: str, kind: str) -> list:
    path = os.path.join(data_dir, spec.VOCAB_DIR, spec.VOCAB_FILES[kind])
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def _encoder(data_dir: str):
    """Raw strings -> ids as the preprocessing encodes them: "" is padding, a value missing
    from the vocabulary (every value, where the data set lacks that part) is OOV."""
    tables = {k: {v: i + spec.NUM_RESERVED_IDS for i, v in enumerate(_vocab(data_dir, k))}
              for k in ("item", "query", "query_token", "attribute")}  # fmt: skip

    def encode(kind: str, value: str) -> int:
        if not value:
            return spec.PAD_ID
        return tables[kind].get(value, spec.OOV_ID)

    return encode


def _keras_request(data_dir: str, history: list, candidates: list) -> dict:
    """The client's request (``rank_candidates``: one leading padding slot, attributes
    padded to ``A``) encoded as the Keras model's features."""
    data_spec = spec.DataSpec.load(data_dir)
    q, width = data_spec.max_query_tokens, data_spec.max_attributes
    encode = _encoder(data_dir)

    def query(value: str):
        value = text.normalize_query(value or "")
        tokens = [encode("query_token", t) for t in text.tokenize_query(value, q)]
        return encode("query", value), tokens + [0] * (q - len(tokens))

    n = len(candidates)
    hist_q = [query(h.get("query", "")) for h in history]
    row = {
        "hist_item": [0] + [encode("item", h["item_id"].strip()) for h in history],
        "hist_query": [0] + [p[0] for p in hist_q],
        "hist_query_tokens": [[0] * q] + [p[1] for p in hist_q],
        "hist_label": [0] + [int(h.get("label", 1)) for h in history],
    }
    # the client's user_counts without given counts: the history's events and clicks, gap 0
    row["user_counts"] = [len(history), sum(int(h.get("label", 1)) > 0 for h in history), 0]
    features = {k: np.repeat(np.asarray([v], np.int64), n, 0) for k, v in row.items()}
    target_q = [query(c.get("query", "")) for c in candidates]
    features["target_item"] = np.array([encode("item", c["item_id"]) for c in candidates])
    features["target_query"] = np.array([p[0] for p in target_q], np.int64)
    features["target_query_tokens"] = np.array([p[1] for p in target_q], np.int64)
    attrs = np.zeros((n, width), np.int64)
    for i, c in enumerate(candidates):
        values = [a.strip() for a in c.get("attributes") or [] if a.strip()][:width]
        attrs[i, : len(values)] = [encode("attribute", a) for a in values]
    features[spec.TARGET_ATTRIBUTES.name] = attrs
    return features


def _request(built) -> tuple:
    """One user's history and candidates: known and unknown items; queries and attributes
    (known ones where the data has them, any strings where it has none); and copies of a
    candidate with and without them."""
    data = built["data"]
    items = _vocab(data, "item")
    queries = _vocab(data, "query") or ["a query nobody asked", "genre_1 classic"]
    attributes = _vocab(data, "attribute") or ["genre_3", "brand_7"]
    history = [
        {"item_id": items[i * 7 % len(items)], "label": 1,
         **({"query": queries[i % len(queries)]} if i % 3 == 0 else {})}
        for i in range(12)
    ]  # fmt: skip
    candidates = [
        {"item_id": items[3]},
        {"item_id": items[3], "query": queries[0].upper() + " "},
        {"item_id": items[3], "attributes": attributes[:2]},
        {"item_id": items[10], "query": queries[-1], "attributes": [attributes[-1], "unknown"]},
        {"item_id": items[21]},
        {"item_id": "an-item-nobody-has-seen"},
        {"item_id": "another-new-item", "attributes": attributes[:1]},
    ]
    return history, candidates


def _load_model(model_dir: str):
    import seminar_tf.models  # noqa: F401
    from seminar_tf.training import load_model

    return load_model(model_dir)


# ------------------------------------------------------------------------------- tests
def test_the_preprocessing_output_and_the_exports_record_the_absence(built):
    absent = ABSENCES[built["name"]][0]
    data_spec = spec.DataSpec.load(built["data"])
    if "query" in absent:
        assert data_spec.num_queries == data_spec.num_query_tokens == spec.NUM_RESERVED_IDS
        assert data_spec.query_text_dim == 0
        assert _vocab(built["data"], "query") == _vocab(built["data"], "query_token") == []
    else:
        assert data_spec.num_queries > spec.NUM_RESERVED_IDS
        assert (data_spec.query_text_dim == 0) == ("query_vectors" in absent)
    assert (data_spec.num_attributes == spec.NUM_RESERVED_IDS) == ("attributes" in absent)
    assert (data_spec.text_dim == 0) == ("text_embedding" in absent)
    assert (data_spec.image_dim == 0) == ("image_embedding" in absent)
    for run in ("psu", "model"):  # every loss of the PSU (its tasks too) and the CTR model
        with open(os.path.join(built[run], "history.json")) as f:
            history = json.load(f)
        assert history and all(np.all(np.isfinite(v)) for v in history.values()), history
    report = built["report"]
    assert report["examples"] > 0 and np.isfinite(report["logloss"])
    assert np.isfinite(report["ndcg@10"])
    for key in ("export", "pq_export"):
        meta = writer.read_metadata(writer.version_dir(built[key], spec.RETRIEVAL_MODEL))
        assert meta["vocab_sizes"]["query"] == data_spec.num_queries
        assert meta["vocab_sizes"]["attribute"] == data_spec.num_attributes
        assert meta["max_attributes"] == data_spec.max_attributes


@pytest.mark.parametrize("kind", ["exact", "pq"])
def test_a_served_answer_ranks_as_the_keras_model(built, kind):
    """Local PredictionService + client == the Keras model on the same request (queries and
    attributes the model has no vocabulary for are OOV, as the preprocessing encodes them)."""
    from serving.client import CascadeClient
    from serving.local_server import LocalServer

    prefix = "pq_" if kind == "pq" else ""
    history, candidates = _request(built)
    with LocalServer.from_export(built[prefix + "export"]) as server:
        with CascadeClient(server.grpc_target, timeout_s=30.0) as client:
            assert client.uses_stored_codes == (kind == "pq")
            ranked = client.rank_candidates(history, candidates)
    assert len(ranked) == len(candidates)
    by_candidate = {json.dumps(r, sort_keys=True): r for r in
                    ({k: v for k, v in r.items() if k not in ("probability", "kept")}
                     for r in ranked)}  # fmt: skip
    assert len(by_candidate) == len(candidates)
    served = np.array([r["probability"] for r in ranked])
    assert np.all(np.isfinite(served)) and np.all((served > 0) & (served < 1))
    assert all(r["kept"] for r in ranked)  # 12 real behaviours, K = 4 kept
    order = [candidates.index({k: v for k, v in r.items() if k not in ("probability", "kept")})
             for r in ranked]  # fmt: skip

    model = _load_model(built[prefix + "model"])
    want = np.asarray(model(_keras_request(built["data"], history, candidates))).reshape(-1)
    np.testing.assert_allclose(served, want[order], rtol=1e-4, atol=1e-5)
    # The served order is the Keras order (up to ties closer than the float noise).
    assert np.all(np.diff(want[order]) <= 1e-5)


def test_raw_signatures_take_what_the_model_never_saw(built):
    """A query (or attribute strings) sent to a model without that vocabulary is OOV, as
    the preprocessing would encode it: no error, and the raw signatures answer what the
    encoded ones answer for the OOV ids."""
    import tensorflow as tf

    from serving.client import pad_attributes, pad_histories

    absent = ABSENCES[built["name"]][0] & {"query", "attributes"}
    if not absent:
        pytest.skip("the data set has queries and attributes")
    loaded = {m: tf.saved_model.load(writer.version_dir(built["export"], m))
              for m in spec.SERVING_MODELS}  # fmt: skip
    history, _ = _request(built)
    history = [{**h, "query": "Some Query 42" if i % 2 else ""} for i, h in enumerate(history)]
    item = _vocab(built["data"], "item")[5]
    candidates = [
        {"item_id": item},
        {"item_id": item, "query": "Some Query 42", "attributes": ["genre_1", "brand_7"]},
        {"item_id": "a-new-item", "query": "another", "attributes": ["genre_1"]},
    ]
    width = spec.DataSpec.load(built["data"]).max_attributes
    raw = {k: np.repeat(v, len(candidates), 0) for k, v in pad_histories([history]).items()}
    raw["target_item"] = np.array([c["item_id"].encode() for c in candidates], object)
    raw["target_query"] = np.array([c.get("query", "").encode() for c in candidates], object)
    raw["target_attributes"] = pad_attributes([c.get("attributes") for c in candidates], width)
    raw["user_id"] = np.full(len(candidates), b"", object)  # unknown user
    encoded = _keras_request(built["data"], history, candidates)
    encoded.setdefault("user", np.zeros(len(candidates), np.int64))
    raw["user_counts"] = encoded["user_counts"]
    if "query" in absent:
        assert set(encoded["target_query"].tolist()) == {spec.PAD_ID, spec.OOV_ID}
        assert set(np.unique(encoded["hist_query_tokens"])) == {spec.PAD_ID, spec.OOV_ID}
    if "attributes" in absent:
        assert set(np.unique(encoded["target_attributes"])) == {spec.PAD_ID, spec.OOV_ID}

    def cascade(features, suffix):
        inputs = {k: tf.constant(v) for k, v in features.items()}
        retrieve = loaded["retrieval"].signatures["retrieve" + suffix]
        out = retrieve(**{n: inputs[n] for n in retrieve.structured_input_signature[1]})
        rank = loaded["ranking"].signatures["rank" + suffix]
        merged = {**inputs, **out}
        probability = rank(**{n: merged[n] for n in rank.structured_input_signature[1]})[
            "probability"
        ]
        return {k: v.numpy() for k, v in out.items()}, probability.numpy()

    raw_out, raw_p = cascade(raw, "")
    enc_out, enc_p = cascade(encoded, "_encoded")
    assert np.all(np.isfinite(raw_p))
    np.testing.assert_array_equal(raw_out["kept_position"], enc_out["kept_position"])
    np.testing.assert_allclose(raw_out["kept_score"], enc_out["kept_score"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(raw_p, enc_p, rtol=1e-5, atol=1e-6)
    # The raw outputs echo the request's own strings.
    assert set(raw_out["kept_query"].ravel().tolist()) <= {b"Some Query 42", b""}


def test_pq_codes_of_absent_modalities_are_minus_one(built):
    import tensorflow as tf

    from serving.client import pad_histories

    meta = writer.read_metadata(writer.version_dir(built["pq_export"], spec.RETRIEVAL_MODEL))
    modalities = meta["pq"]["modalities"]
    loaded = tf.saved_model.load(writer.version_dir(built["pq_export"], spec.RETRIEVAL_MODEL))
    history, _ = _request(built)
    hist = pad_histories([history])
    names = [f.name for f in spec.PQ_SIGNATURES["pq_codes"].inputs]
    codes = loaded.signatures["pq_codes"](**{n: tf.constant(hist[n]) for n in names})
    codes = codes[spec.PQ_CODES.name].numpy()[0]  # [L, M, S]
    assert codes.shape[1:] == (len(modalities), meta["pq"]["num_subvectors"])
    assert np.all(codes[0] == -1)  # the leading padding slot
    real = codes[1:]
    absent = ABSENCES[built["name"]][0]
    # Item-side modalities come from the catalog: absent for every behaviour.
    gone = {"attributes": "attr", "text_embedding": "text", "image_embedding": "image"}
    for part, modality in gone.items():
        if part in absent and modality in modalities:
            assert np.all(real[:, modalities.index(modality)] == -1), modality
    # The query modality is absent for a behaviour without a query; a query sent to a model
    # without queries is the OOV query, which is present (coded against the codebook that
    # k-means left at zeros: it scores 0 there).
    if "query" in modalities:
        without = np.array([not h.get("query") for h in history])
        q_codes = real[:, modalities.index("query")]
        assert np.all(q_codes[without] == -1) and np.all(q_codes[~without] >= 0)
    assert np.all(real[:, modalities.index("id")] >= 0)
    assert np.all(real < meta["pq"]["num_centroids"])


def _keras_scores(built, split, model_key):
    from seminar_tf.data.dataset import make_dataset

    model = _load_model(built[model_key])
    rows = []
    for features, labels in make_dataset(built["data"], split, 128, include_meta=True):
        p = np.asarray(model.predict_on_batch({k: features[k] for k in spec.MODEL_FEATURE_NAMES}))
        for u, t, i, y, s in zip(features["user_id"].numpy(), features["timestamp"].numpy(),
                                 features["target_item"].numpy(), labels.numpy(), p.reshape(-1)):  # fmt: skip
            rows.append((u.decode(), int(t), int(i), int(y), float(s)))
    return sorted(rows)


@pytest.mark.parametrize("kind", ["exact", "pq"])
def test_batch_scoring_writes_the_keras_scores(built, tmp_path, kind):
    from serving import scoring

    prefix = "pq_" if kind == "pq" else ""
    out = str(tmp_path / "scores")
    stats = scoring.score(built["data"], built[prefix + "export"], out, split="test",
                          batch_size=64)  # fmt: skip
    files = glob.glob(os.path.join(out, "scores-*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    got = sorted(zip(table["user_id"].to_pylist(), table["timestamp"].to_pylist(),
                     table["item"].to_pylist(), table["label"].to_pylist(),
                     table["probability"].to_pylist()))  # fmt: skip
    want = _keras_scores(built, "test", prefix + "model")
    assert stats["scored"] == len(got) == len(want) > 0
    assert [g[:4] for g in got] == [w[:4] for w in want]
    probability = np.array([g[4] for g in got])
    assert np.all(np.isfinite(probability))
    np.testing.assert_allclose(probability, [w[4] for w in want], rtol=1e-4, atol=1e-5)
