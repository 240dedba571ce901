"""SavedModel export: layout, equality with the Keras model, loaders, warmup, invalid requests."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from export import graph, warmup, writer  # noqa: E402
from export.testing import MAX_LEN  # noqa: E402
from preprocessing.vocab import lookup_table  # noqa: E402
from seminar_tf import spec, text, training  # noqa: E402
from seminar_tf.layers.scorers import SearchScorer, register_scorer  # noqa: E402
from serving.client import pad_histories  # noqa: E402


@pytest.fixture(scope="module")
def model(tiny):
    import seminar_tf.models  # noqa: F401

    return training.load_model(tiny["model"])


@pytest.fixture(scope="module")
def loaded(tiny):
    return {
        m: tf.saved_model.load(writer.version_dir(tiny["export"], m)) for m in spec.SERVING_MODELS
    }


def _call(loaded, signature, inputs):
    fn = loaded[spec.SERVING_SIGNATURES[signature].model].signatures[signature]
    out = fn(**{k: tf.constant(v) for k, v in inputs.items()})
    return {k: v.numpy() for k, v in out.items()}


def _no_attributes(tiny, n, raw=False):
    """``target_attributes`` of ``n`` targets without attributes: all padding, what a caller
    that has none sends."""
    width = spec.DataSpec.load(tiny["data"]).max_attributes
    return np.full((n, width), b"", object) if raw else np.zeros((n, width), np.int64)


def _dataset_batch(tiny, n=32):
    from seminar_tf.data.dataset import make_dataset

    features, _ = next(iter(make_dataset(tiny["data"], "test", n)))
    features = {k: v.numpy() for k, v in features.items()}
    features["target_attributes"] = _no_attributes(tiny, len(features["target_item"]))
    return features


def _ranking_inputs(features, kept):
    out = {f.name: features[f.name] for f in spec.SERVING_TARGET_FEATURES}
    out.update({f.name: kept[f.name] for f in spec.KEPT_FEATURES})
    if spec.HISTORY_STATS.name in kept:  # a model with user features
        out[spec.HISTORY_STATS.name] = kept[spec.HISTORY_STATS.name]
        out[spec.USER.name] = features[spec.USER.name]
    return out


def _python_encoder(data_dir):
    """The preprocessing's own (Python) encoding of raw strings, as in preprocessing/."""
    tables = {}
    for kind in ("item", "query", "query_token", "attribute", "user"):
        path = os.path.join(data_dir, spec.VOCAB_DIR, spec.VOCAB_FILES[kind])
        with open(path, encoding="utf-8") as f:
            tables[kind] = lookup_table([line.rstrip("\n") for line in f])
    q = spec.DataSpec.load(data_dir).max_query_tokens

    def item(v):
        return tables["item"].get(v.strip(), spec.OOV_ID) if v.strip() else 0

    def attribute(v):
        return tables["attribute"].get(v.strip(), spec.OOV_ID) if v.strip() else 0

    def query(v):
        if not v.strip():
            return 0, [0] * q
        toks = [tables["query_token"].get(t, spec.OOV_ID) for t in text.tokenize_query(v, q)]
        return tables["query"].get(text.normalize_query(v), spec.OOV_ID), toks + [0] * (
            q - len(toks)
        )

    def encode(raw):
        out = {}
        for prefix in ("target", "hist", "kept"):
            if f"{prefix}_item" not in raw:
                continue
            items = np.asarray(raw[f"{prefix}_item"], dtype=object)
            queries = np.asarray(raw[f"{prefix}_query"], dtype=object)
            dec = np.vectorize(lambda b: b.decode() if isinstance(b, bytes) else b, otypes=[object])
            out[f"{prefix}_item"] = np.vectorize(item, otypes=[np.int64])(dec(items))
            pairs = [query(v) for v in dec(queries).reshape(-1)]
            out[f"{prefix}_query"] = np.array([p[0] for p in pairs], np.int64).reshape(
                queries.shape
            )
            out[f"{prefix}_query_tokens"] = np.array([p[1] for p in pairs], np.int64).reshape(
                queries.shape + (q,)
            )
        if "target_attributes" in raw:
            dec = np.vectorize(lambda b: b.decode() if isinstance(b, bytes) else b, otypes=[object])
            values = dec(np.asarray(raw["target_attributes"], dtype=object))
            out["target_attributes"] = np.vectorize(attribute, otypes=[np.int64])(values)
        if "user_id" in raw:
            dec = np.vectorize(lambda b: b.decode() if isinstance(b, bytes) else b, otypes=[object])
            out["user"] = np.array(
                [tables["user"].get(u.strip(), spec.OOV_ID) if u.strip() else 0
                 for u in dec(np.asarray(raw["user_id"], dtype=object))], np.int64,
            )  # fmt: skip
        for name in ("hist_label", "kept_label", "kept_score", spec.HISTORY_STATS.name,
                     spec.USER_COUNTS.name):  # fmt: skip
            if name in raw:
                out[name] = raw[name]
        return out

    return encode


def _raw_requests(tiny, n_users=6, length=15):
    """Raw histories and targets from the synthetic event logs, with unknown ids and queries
    that need normalising mixed in; users known, unseen ("never-seen-user"), "" (unknown)
    and padded with spaces."""
    import pyarrow.parquet as pq

    events = pq.read_table(os.path.join(tiny["raw"], "events.parquet")).to_pandas()
    histories, targets, users, counts = [], [], [], []
    for i, (user, rows) in enumerate(
        events.sort_values(["user_id", "timestamp"]).groupby("user_id")
    ):
        users.append({3: "never-seen-user", 4: "", 5: f"  {user} "}.get(i, user))
        if len(histories) == n_users:
            break
        rows = rows.to_dict("records")
        hist = [dict(r) for r in rows[-length - 1 - i : -1]]
        if i == 1:
            hist[-1]["item_id"] = "never-seen-item"
            hist[-2]["query"] = "  " + hist[-2]["query"].upper() + " !!"
        histories.append(hist)
        target = dict(rows[-1])
        earlier = [r for r in rows if r["timestamp"] < target["timestamp"]]
        gap = target["timestamp"] - earlier[-1]["timestamp"] if earlier else 0
        counts.append([len(earlier), sum(r["label"] > 0 for r in earlier), gap])
        if i == 2:
            target["query"] = "Unknown Words ÉCOLE"
        targets.append(target)
    features = pad_histories(histories)
    features["target_item"] = np.array([t["item_id"].encode() for t in targets], dtype=object)
    features["target_query"] = np.array([t["query"].encode() for t in targets], dtype=object)
    features["target_attributes"] = _no_attributes(tiny, len(targets), raw=True)
    features["user_id"] = np.array([u.encode() for u in users[: len(targets)]], dtype=object)
    features["user_counts"] = np.array(counts, np.int64)  # the whole earlier history
    return features


# --------------------------------------------------------------------------------- layout
def _batching_parameters_message():
    """TF Serving's BatchingParameters proto (session_bundle_config.proto, fields 1-7),
    built here: tensorflow-serving-api does not ship it."""
    from google.protobuf import (
        descriptor_pb2,
        descriptor_pool,
        message_factory,
        wrappers_pb2,  # noqa: F401  (registers wrappers.proto)
    )

    f = descriptor_pb2.FileDescriptorProto(
        name="seminar_test_batching.proto", package="seminar_test", syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )  # fmt: skip
    m = f.message_type.add(name="BatchingParameters")
    fd = descriptor_pb2.FieldDescriptorProto
    for number, name, type_name in (
        (1, "max_batch_size", ".google.protobuf.Int64Value"),
        (2, "batch_timeout_micros", ".google.protobuf.Int64Value"),
        (3, "max_enqueued_batches", ".google.protobuf.Int64Value"),
        (4, "num_batch_threads", ".google.protobuf.Int64Value"),
        (5, "thread_pool_name", ".google.protobuf.StringValue"),
    ):
        m.field.add(name=name, number=number, type=fd.TYPE_MESSAGE, type_name=type_name,
                    label=fd.LABEL_OPTIONAL)  # fmt: skip
    m.field.add(name="allowed_batch_sizes", number=6, type=fd.TYPE_INT64, label=fd.LABEL_REPEATED)
    m.field.add(name="pad_variable_length_inputs", number=7, type=fd.TYPE_BOOL,
                label=fd.LABEL_OPTIONAL)  # fmt: skip
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(f)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("seminar_test.BatchingParameters")
    )()


def test_layout_configs_and_metadata(tiny):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    out = tiny["export"]
    for name in spec.SERVING_MODELS:
        version = os.path.join(out, name, "1")
        for part in ("saved_model.pb", "variables", "assets.extra/tf_serving_warmup_requests"):
            assert os.path.exists(os.path.join(version, part)), part
        assets = sorted(os.listdir(os.path.join(version, "assets")))
        kinds = graph.Vocabularies.KINDS + ("user",)  # the tiny model has user features
        assert assets == sorted(spec.VOCAB_FILES[k] for k in kinds)
        meta = writer.read_metadata(version)
        assert meta["model"] == name and meta["version"] == 1 and meta["max_len"] == MAX_LEN
        assert meta["default_signature"] == spec.DEFAULT_SIGNATURES[name]
        for sig_name, sig in meta["signatures"].items():
            assert [f["name"] for f in sig["inputs"]] == [
                f.name for f in spec.serving_signature(sig_name, user_features=True).inputs
            ]
        assert not [n for n in os.listdir(os.path.join(out, name)) if not n.isdigit()]
    config = text_format.Parse(
        open(os.path.join(out, writer.MODELS_CONFIG_FILE)).read(),
        model_server_config_pb2.ModelServerConfig(),
    )
    assert {c.name: c.base_path for c in config.model_config_list.config} == {
        m: os.path.join(os.path.abspath(out), m) for m in spec.SERVING_MODELS
    }
    params = text_format.Parse(
        open(os.path.join(out, writer.BATCHING_FILE)).read(), _batching_parameters_message()
    )
    assert params.pad_variable_length_inputs
    assert params.allowed_batch_sizes[-1] == params.max_batch_size.value
    summary = json.load(open(os.path.join(out, writer.EXPORT_FILE)))
    assert summary["version"] == 1 and summary["top_k"] == 8


# ------------------------------------------------------------------------ equality
def test_encoded_signatures_equal_the_keras_model(tiny, model, loaded):
    features = _dataset_batch(tiny)
    expected = model(features).numpy()
    retrieved = _call(loaded, "retrieve_encoded", features)
    reference = model.retrieve(features)
    kept_ref = model.gather_kept(features, reference)
    mask = reference["kept_mask"].numpy()
    np.testing.assert_array_equal(
        retrieved["kept_position"], np.where(mask, reference["indices"].numpy(), -1)
    )
    for f in spec.KEPT_FEATURES:
        np.testing.assert_allclose(
            retrieved[f.name], kept_ref[f.name].numpy(), rtol=1e-5, atol=1e-6
        )
        assert retrieved[f.name].dtype == np.dtype(f.dtype)
    probability = _call(loaded, "rank_encoded", _ranking_inputs(features, retrieved))
    np.testing.assert_allclose(probability["probability"], expected, rtol=1e-5, atol=1e-6)
    # Every output keeps the batch dimension, also for a batch of one.
    one = _call(loaded, "retrieve_encoded", {k: v[:1] for k, v in features.items()})
    assert all(v.shape[0] == 1 for v in one.values())


def test_raw_signatures_equal_the_python_encoding(tiny, model, loaded):
    raw = _raw_requests(tiny)
    encoded = _python_encoder(tiny["data"])(raw)
    expected = model(encoded).numpy()
    retrieved = _call(loaded, "retrieve", raw)
    enc_retrieved = _call(loaded, "retrieve_encoded", encoded)
    np.testing.assert_array_equal(retrieved["kept_position"], enc_retrieved["kept_position"])
    np.testing.assert_allclose(
        retrieved["kept_score"], enc_retrieved["kept_score"], rtol=1e-5, atol=1e-6
    )
    rows = np.arange(len(raw["target_item"]))[:, None]
    pos = retrieved["kept_position"]
    kept = pos >= 0
    assert kept.any(axis=1).all()
    np.testing.assert_array_equal(
        retrieved["kept_item"], np.where(kept, raw["hist_item"][rows, np.maximum(pos, 0)], b"")
    )
    np.testing.assert_array_equal(
        retrieved["kept_query"], np.where(kept, raw["hist_query"][rows, np.maximum(pos, 0)], b"")
    )
    ranking = {
        "target_item": raw["target_item"], "target_query": raw["target_query"],
        "target_attributes": raw["target_attributes"],
        **{f.name: retrieved[f.name] for f in spec.SERVING_SIGNATURES["rank"].inputs
           if f.name.startswith("kept_")},
        "user_id": raw["user_id"], "history_stats": retrieved["history_stats"],
    }  # fmt: skip
    assert encoded["user"].tolist()[3:] == [spec.OOV_ID, spec.PAD_ID, encoded["user"][5]]
    assert encoded["user"][0] >= spec.NUM_RESERVED_IDS and encoded["user"][5] >= 2
    np.testing.assert_allclose(
        retrieved["history_stats"], enc_retrieved["history_stats"], rtol=1e-6
    )
    probability = _call(loaded, "rank", ranking)["probability"]
    np.testing.assert_allclose(probability, expected, rtol=1e-5, atol=1e-6)
    # The raw ranking equals the encoded ranking on the Python-encoded kept behaviours.
    enc_rank = _call(loaded, "rank_encoded", _python_encoder(tiny["data"])(ranking))
    np.testing.assert_allclose(enc_rank["probability"], expected, rtol=1e-5, atol=1e-6)


QUERIES = [
    "", "   ", "Red Shoes", "  red   SHOES!! ", "genre_8", "GENRE_8,sub_60;brand-81", "a b c d e f g",
    "Ünïcode ÉCOLE straße", "日本語 テスト", "ΟΔΟΣ", "x\u00a0y\u3000", "\u00a0padded\u2003",
    "tab\there\nnewline", "émoji 😀 ok", "1234 5_6", "İstanbul",
]  # fmt: skip


def test_in_graph_text_matches_seminar_text():
    q = 5
    tokens = graph.tokenize_query(tf.constant(QUERIES), q).numpy()
    normalized = graph.normalize_query(tf.constant(QUERIES)).numpy()
    for i, query in enumerate(QUERIES):
        want = text.tokenize_query(query, q)
        assert [t.decode() for t in tokens[i] if t] == want, query
        assert normalized[i].decode() == text.normalize_query(query), query
    assert graph.strip_text(tf.constant(["  x  ", "\u00a0y\u2003"])).numpy().tolist() == [
        b"x",
        b"y",
    ]


# ---------------------------------------------------------------------- loaders, warmup
def test_v1_graph_loader_and_saved_model_cli(tiny, loaded):
    features = _dataset_batch(tiny, 8)
    expected = _call(loaded, "retrieve_encoded", features)
    path = writer.version_dir(tiny["export"], spec.RETRIEVAL_MODEL)
    with tf.Graph().as_default() as g, tf.compat.v1.Session(graph=g) as sess:
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], path)
        assert {"retrieve", "retrieve_encoded", "serving_default"} <= set(meta.signature_def)
        sig = meta.signature_def["retrieve_encoded"]
        out = sess.run(
            {k: v.name for k, v in sig.outputs.items()},
            {sig.inputs[k].name: v for k, v in features.items()},
        )
    for name, value in expected.items():
        np.testing.assert_allclose(out[name], value, rtol=1e-6)
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    shown = subprocess.run(
        [cli, "show", "--dir", writer.version_dir(tiny["export"], spec.RANKING_MODEL), "--all"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr[-2000:]
    for name in ("signature_def['rank']", "signature_def['rank_encoded']", "serving_default"):
        assert name in shown.stdout
    assert "kept_query_tokens" in shown.stdout and "probability" in shown.stdout


class _TFOutput(ctypes.Structure):
    _fields_ = [("oper", ctypes.c_void_p), ("index", ctypes.c_int)]


def _c_api_run(path: str, signature_def, inputs: dict) -> dict:
    """Loads ``path`` with the TensorFlow C API's ``TF_LoadSessionFromSavedModel`` (the C++
    SavedModelBundle loader TF Serving uses, from the wheel's libtensorflow_cc) and runs one
    signature with numeric inputs through ``TF_SessionRun``."""
    lib = ctypes.CDLL(os.path.join(os.path.dirname(tf.__file__), "libtensorflow_cc.so.2"))
    vp = ctypes.c_void_p
    for name, res, args in (
        ("TF_NewStatus", vp, []), ("TF_NewGraph", vp, []), ("TF_NewSessionOptions", vp, []),
        ("TF_LoadSessionFromSavedModel", vp,
         [vp, vp, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, vp, vp, vp]),
        ("TF_GetCode", ctypes.c_int, [vp]), ("TF_Message", ctypes.c_char_p, [vp]),
        ("TF_GraphOperationByName", vp, [vp, ctypes.c_char_p]),
        ("TF_AllocateTensor", vp, [ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.c_int,
                                   ctypes.c_size_t]),
        ("TF_TensorData", vp, [vp]), ("TF_TensorByteSize", ctypes.c_size_t, [vp]),
        ("TF_NumDims", ctypes.c_int, [vp]), ("TF_Dim", ctypes.c_int64, [vp, ctypes.c_int]),
        ("TF_TensorType", ctypes.c_int, [vp]),
        ("TF_SessionRun", None, [vp, vp, vp, vp, ctypes.c_int, vp, vp, ctypes.c_int, vp,
                                 ctypes.c_int, vp, vp]),
        ("TF_DeleteTensor", None, [vp]),
    ):  # fmt: skip
        getattr(lib, name).restype, getattr(lib, name).argtypes = res, args
    status, graph = lib.TF_NewStatus(), lib.TF_NewGraph()
    tags = (ctypes.c_char_p * 1)(b"serve")
    session = lib.TF_LoadSessionFromSavedModel(
        lib.TF_NewSessionOptions(), None, path.encode(), tags, 1, graph, None, status
    )
    assert lib.TF_GetCode(status) == 0, lib.TF_Message(status)

    def output(tensor_name):
        op, index = tensor_name.split(":")
        oper = lib.TF_GraphOperationByName(graph, op.encode())
        assert oper, tensor_name
        return _TFOutput(oper, int(index))

    dtypes = {np.dtype(np.int64): 9, np.dtype(np.float32): 1}
    names = list(inputs)
    feeds = (_TFOutput * len(names))(*[output(signature_def.inputs[n].name) for n in names])
    values = (ctypes.c_void_p * len(names))()
    for i, n in enumerate(names):
        array = np.ascontiguousarray(inputs[n])
        dims = (ctypes.c_int64 * array.ndim)(*array.shape)
        tensor = lib.TF_AllocateTensor(dtypes[array.dtype], dims, array.ndim, array.nbytes)
        ctypes.memmove(lib.TF_TensorData(tensor), array.ctypes.data, array.nbytes)
        values[i] = tensor
    out_names = list(signature_def.outputs)
    fetches = (_TFOutput * len(out_names))(
        *[output(signature_def.outputs[n].name) for n in out_names]
    )
    results = (ctypes.c_void_p * len(out_names))()
    lib.TF_SessionRun(session, None, feeds, values, len(names), fetches, results,
                      len(out_names), None, 0, None, status)  # fmt: skip
    assert lib.TF_GetCode(status) == 0, lib.TF_Message(status)
    out = {}
    for i, n in enumerate(out_names):
        t = results[i]
        shape = [lib.TF_Dim(t, d) for d in range(lib.TF_NumDims(t))]
        dtype = {9: np.int64, 1: np.float32}[lib.TF_TensorType(t)]
        buffer = (ctypes.c_char * lib.TF_TensorByteSize(t)).from_address(lib.TF_TensorData(t))
        out[n] = np.frombuffer(bytes(buffer), dtype=dtype).reshape(shape)
        lib.TF_DeleteTensor(t)
    for v in values:
        lib.TF_DeleteTensor(v)
    return out


def test_the_c_loader_tf_serving_uses_runs_the_export(tiny, loaded):
    features = _dataset_batch(tiny, 4)
    path = writer.version_dir(tiny["export"], spec.RETRIEVAL_MODEL)
    with tf.Graph().as_default() as g, tf.compat.v1.Session(graph=g) as sess:
        sig = tf.compat.v1.saved_model.loader.load(sess, ["serve"], path).signature_def
    got = _c_api_run(path, sig["retrieve_encoded"], features)
    want = _call(loaded, "retrieve_encoded", features)
    assert set(got) == set(want)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-6)


def test_warmup_parses_and_replays(tiny, loaded):
    for name in spec.SERVING_MODELS:
        path = os.path.join(writer.version_dir(tiny["export"], name), "assets.extra",
                            warmup.WARMUP_FILE)  # fmt: skip
        requests = warmup.read_warmup(path)
        meta = writer.read_metadata(writer.version_dir(tiny["export"], name))
        assert len(requests) == meta["warmup_requests"] >= 4
        assert {s for _, s, _ in requests} == {
            s.name for s in spec.SERVING_SIGNATURES.values() if s.model == name
        }
        for model_name, signature, inputs in requests:
            assert model_name == name
            out = _call(loaded, signature, inputs)
            assert all(np.all(np.isfinite(v)) for v in out.values() if v.dtype.kind == "f")
            # the history's first slot is padding (see export.writer.BATCHING_NOTE)
            if "hist_item" in inputs:
                assert not inputs["hist_item"][:, 0].any()


# ---------------------------------------------------------------------- invalid requests
def _encoded(tiny, n=4):
    return _dataset_batch(tiny, n)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda f: f.update(hist_item=f["hist_item"].astype(np.int32)), "int32|int64|dtype"),
        (lambda f: f.update(hist_item=f["hist_item"][:, :, None]), "shape|rank"),
        (lambda f: f.update(target_item=f["target_item"][:, None]), "shape|rank"),
        (lambda f: f["hist_item"].__setitem__((0, -1), -5), "hist_item: negative id"),
        (lambda f: f["target_item"].__setitem__(0, 10**6), "target_item: id out of range"),
        (lambda f: f.update(hist_query=f["hist_query"][:, 1:]), "hist_query must have the shape"),
        (lambda f: f.update(hist_label=f["hist_label"][:2]), "same batch size"),
    ],
    ids=["dtype", "rank-3-history", "rank-2-target", "negative-id", "id-range", "length", "batch"],
)
def test_invalid_encoded_requests_give_clear_errors(tiny, loaded, change, match):
    features = _encoded(tiny)
    change(features)
    with pytest.raises((tf.errors.InvalidArgumentError, TypeError, ValueError), match=match):
        _call(loaded, "retrieve_encoded", features)


def test_invalid_ranking_requests(tiny, loaded):
    features = _encoded(tiny)
    kept = _call(loaded, "retrieve_encoded", features)
    inputs = _ranking_inputs(features, kept)
    inputs["kept_score"] = inputs["kept_score"].copy()
    inputs["kept_score"][0, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="kept_score must be finite"):
        _call(loaded, "rank_encoded", inputs)
    inputs = _ranking_inputs(features, kept)
    inputs["kept_item"] = inputs["kept_item"][:, :3]  # K is fixed by the signature
    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError)):
        _call(loaded, "rank_encoded", inputs)


def test_empty_history_and_unknown_ids_give_defined_results(tiny, loaded, model):
    raw = _raw_requests(tiny, n_users=3)
    raw["target_item"][0] = b"not-an-item"
    raw["hist_item"][1] = b""  # row 1: all padding
    for name in ("hist_query",):
        raw[name][1] = b""
    raw["hist_label"][1] = 0
    out = _call(loaded, "retrieve", raw)
    assert (out["kept_position"][1] == -1).all() and not out["kept_item"][1].any()
    names = {f.name for f in spec.serving_signature("rank", user_features=True).inputs}
    ranking = {"target_item": raw["target_item"], "target_query": raw["target_query"],
               "target_attributes": raw["target_attributes"], "user_id": raw["user_id"],
               **{k: v for k, v in out.items() if k in names}}  # fmt: skip
    probability = _call(loaded, "rank", ranking)["probability"]
    assert np.all(np.isfinite(probability)) and probability.shape == (3,)
    # An empty history dimension (L = 0) works too.
    empty = {k: (v[:, :0] if k.startswith("hist_") else v) for k, v in raw.items()}
    out = _call(loaded, "retrieve", empty)
    assert (out["kept_position"] == -1).all()
    encoded = _python_encoder(tiny["data"])(raw)
    assert encoded["target_item"][0] == spec.OOV_ID
    np.testing.assert_allclose(probability, model(encoded).numpy(), rtol=1e-5, atol=1e-6)


def test_longer_history_keeps_the_most_recent_max_len(tiny, loaded):
    features = _dataset_batch(tiny, 8)
    rng = np.random.default_rng(0)
    n_items = spec.DataSpec.load(tiny["data"]).num_items
    extra = 13  # older behaviours in front: beyond max_len they must not count
    older = {
        "hist_item": rng.integers(2, n_items, size=(8, extra)),
        "hist_query": np.zeros((8, extra), np.int64),
        "hist_query_tokens": np.zeros((8, extra, features["hist_query_tokens"].shape[2]), np.int64),
        "hist_label": np.ones((8, extra), np.int64),
    }
    # Rows whose window is full (max_len real behaviours) are the ones truncation affects.
    long = {
        k: (np.concatenate([older[k], v], axis=1) if k in older else v) for k, v in features.items()
    }
    assert long["hist_item"].shape[1] == MAX_LEN + extra
    got = _call(loaded, "retrieve_encoded", long)
    want = _call(loaded, "retrieve_encoded", features)
    full = (features["hist_item"] != 0).sum(axis=1) == MAX_LEN
    assert full.any()
    for name in ("kept_item", "kept_score", "kept_label"):
        np.testing.assert_allclose(got[name][full], want[name][full], rtol=1e-6)
    # positions index the request's own (longer) history
    kept = got["kept_position"] >= 0
    np.testing.assert_array_equal(got["kept_position"][kept & full[:, None]],
                                  (want["kept_position"] + extra)[kept & full[:, None]])  # fmt: skip
    rows = np.arange(8)[:, None]
    np.testing.assert_array_equal(
        np.where(kept, long["hist_item"][rows, np.maximum(got["kept_position"], 0)], 0),
        got["kept_item"],
    )


def test_padding_anywhere_is_masked_as_tf_serving_batching_pads(tiny, loaded):
    """TF Serving pads a shorter request on the right with its first element; with a padding
    first slot that changes nothing."""
    raw = _raw_requests(tiny, n_users=4)
    want = _call(loaded, "retrieve", raw)
    padded = {k: (np.concatenate([v, np.repeat(v[:, :1], 7, axis=1)], axis=1)
                  if k.startswith("hist_") else v) for k, v in raw.items()}  # fmt: skip
    got = _call(loaded, "retrieve", padded)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value) if value.dtype.kind in "iOS" else (
            np.testing.assert_allclose(got[name], value, rtol=1e-6)
        )


# ---------------------------------------------------------------------- versions, options
def test_versions_are_integers_and_appear_atomically(tiny, tmp_path, monkeypatch):
    import seminar_tf.models  # noqa: F401

    out = str(tmp_path / "exp")
    os.makedirs(os.path.join(out, "retrieval", "7"))  # an existing version: next is 8
    assert writer.next_version(out) == 8
    with pytest.raises(ValueError, match="exists"):
        writer.export_models(tiny["model"], out, version=7)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(warmup, "write_warmup", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        writer.export_models(tiny["model"], out)
    # Nothing half-written is visible: no version 8, no temporary directory left.
    for name in spec.SERVING_MODELS:
        base = os.path.join(out, name)
        entries = os.listdir(base) if os.path.isdir(base) else []
        assert entries == (["7"] if name == "retrieval" else []), entries
        assert "8" not in entries and not [e for e in entries if e.startswith(".tmp")]


def test_short_term_model_exports_the_extra_feature(tiny):
    """A model option that adds a ranking input: ``short_term`` goes from the retrieval
    outputs to the ranking inputs, and the cascade still equals the Keras model."""
    from seminar_tf.models import build_model

    data_spec = spec.DataSpec.load(tiny["data"])
    model = build_model(data_spec, {"embedding_dim": 8, "num_heads": 2, "top_k": 4,
                                    "hidden_units": [8], "short_term_len": 3},
                        training.load_tables(tiny["data"]))  # fmt: skip
    graphs = graph.ServingGraphs(model, graph.Vocabularies(tiny["data"], users=True), MAX_LEN,
                                 data_spec.max_query_tokens)  # fmt: skip
    assert "short_term" in [f.name for f in graphs.signature("rank").inputs]
    assert "short_term" in [f.name for f in graphs.signature("retrieve").outputs]
    features = _dataset_batch(tiny, 8)
    retrieve = graphs.function("retrieve_encoded")
    retrieved = {k: v.numpy() for k, v in retrieve(**features).items()}
    assert retrieved["short_term"].shape == (8, 8)
    inputs = {**_ranking_inputs(features, retrieved), "short_term": retrieved["short_term"]}
    probability = graphs.function("rank_encoded")(**inputs)["probability"].numpy()
    np.testing.assert_allclose(probability, model(features).numpy(), rtol=1e-5, atol=1e-6)


def test_one_stage_models_are_refused(tiny, tmp_path):
    from seminar_tf.models import build_model

    data_spec = spec.DataSpec.load(tiny["data"])
    model = build_model(data_spec, {"embedding_dim": 8, "num_heads": 2, "use_history": False})
    with pytest.raises(ValueError, match="two-stage model"):
        writer.export_model(model, tiny["data"], str(tmp_path / "e"), max_len=MAX_LEN)


def test_cli_export_and_its_errors(tiny, tmp_path, capsys):
    from seminar_tf.cli import main

    rc = main(["export", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "config.json" in err[0]
    rc = main(["export", "--model", tiny["model"], "--out", tiny["export"], "--version", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "exists" in err[0]


# A scorer that declares a serving input (as a product-quantization scorer will declare its
# stored codes): the retrieval signatures take it and the scorer receives it in key_parts.
@register_scorer("test_stored_codes")
class _StoredCodesScorer(SearchScorer):
    serving_features = (
        spec.FeatureSpec("hist_codes", "int64", ("L", 3), 0, "stored codes per behaviour"),
    )

    def call(self, target, keys, mask, target_parts=None, key_parts=None, key_weights=None):
        if key_parts and "hist_codes" in key_parts:
            return tf.cast(tf.reduce_sum(key_parts["hist_codes"], axis=-1), tf.float32)
        return tf.einsum("bd,bld->bl", target, keys)


def test_a_scorer_can_add_stored_codes_to_the_retrieval_signature(tiny):
    from seminar_tf.models import build_model

    data_spec = spec.DataSpec.load(tiny["data"])
    model = build_model(data_spec, {"embedding_dim": 8, "num_heads": 2, "top_k": 3,
                                    "hidden_units": [8], "search": "test_stored_codes"},
                        training.load_tables(tiny["data"]))  # fmt: skip
    graphs = graph.ServingGraphs(model, graph.Vocabularies(tiny["data"], users=True), MAX_LEN,
                                 data_spec.max_query_tokens)  # fmt: skip
    for name in ("retrieve", "retrieve_encoded"):
        assert graphs.signature(name).inputs[-1].name == "hist_codes"
    features = _dataset_batch(tiny, 4)
    length = features["hist_item"].shape[1]
    codes = np.zeros((4, length, 3), np.int64)
    codes[:, -5:, :] = np.arange(5)[None, :, None]  # the last 5 behaviours score 0..12
    real = features["hist_item"] != 0
    out = graphs.function("retrieve_encoded")(**features, hist_codes=codes)
    want = np.argsort(-np.where(real, codes.sum(-1), -1), axis=1, kind="stable")[:, :3]
    full = real[:, -5:].all(axis=1)
    np.testing.assert_array_equal(out["kept_position"].numpy()[full], want[full])
    with pytest.raises(tf.errors.InvalidArgumentError, match="hist_codes must have the shape"):
        graphs.function("retrieve_encoded")(**features, hist_codes=codes[:, 1:])
