"""The cascade client against a local PredictionService (gRPC) and REST API on 127.0.0.1."""

from __future__ import annotations

import os
import time
from concurrent import futures

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from export import writer  # noqa: E402
from seminar_tf import spec  # noqa: E402
from serving import local_server  # noqa: E402
from serving.client import (  # noqa: E402
    CascadeClient,
    ServingError,
    pad_attributes,
    pad_histories,
)


@pytest.fixture(scope="module")
def server(tiny):
    with local_server.LocalServer.from_export(tiny["export"], rest=True) as s:
        yield s


@pytest.fixture(scope="module")
def vocab(tiny):
    out = {}
    for kind in ("item", "query"):
        path = os.path.join(tiny["data"], spec.VOCAB_DIR, spec.VOCAB_FILES[kind])
        out[kind] = [line.rstrip("\n") for line in open(path, encoding="utf-8")]
    return out


def _history(vocab, n=12):
    items, queries = vocab["item"], vocab["query"]
    return [
        {"item_id": items[i * 7 % len(items)], "query": queries[i % 5] if i % 3 == 0 else "",
         "label": 1}
        for i in range(n)
    ]  # fmt: skip


def _candidates(vocab):
    return [
        {"item_id": vocab["item"][3]},
        {"item_id": vocab["item"][10], "query": vocab["query"][0].upper() + "  "},
        {"item_id": "an-item-nobody-has-seen"},
    ]


def _reference(tiny, history, candidates, user_id=""):
    """The same cascade through the SavedModels in process (tf.saved_model.load); the
    candidates' ``attributes`` (if any) as ``target_attributes``, the user as ``user_id``."""
    loaded = {
        m: tf.saved_model.load(writer.version_dir(tiny["export"], m)) for m in spec.SERVING_MODELS
    }
    features = {k: np.repeat(v, len(candidates), 0) for k, v in pad_histories([history]).items()}
    features["target_item"] = np.array([c["item_id"].encode() for c in candidates], object)
    features["target_query"] = np.array([c.get("query", "").encode() for c in candidates], object)
    width = spec.DataSpec.load(tiny["data"]).max_attributes
    features["target_attributes"] = pad_attributes([c.get("attributes") for c in candidates], width)
    features["user_id"] = np.array([user_id.encode()] * len(candidates), object)
    # what the client sends without given counts: the history's events and clicks, gap 0
    counts = [len(history), sum(int(h.get("label", 1)) > 0 for h in history), 0]
    features["user_counts"] = np.array([counts] * len(candidates), np.int64)
    retrieve = loaded["retrieval"].signatures["serving_default"]
    out = {
        k: v.numpy()
        for k, v in retrieve(**{k: tf.constant(v) for k, v in features.items()}).items()
    }
    names = {f.name for f in spec.serving_signature("rank", user_features=True).inputs}
    ranking = {k: v for k, v in {**features, **out}.items() if k in names}
    rank = loaded["ranking"].signatures["serving_default"]
    return out, rank(**{k: tf.constant(v) for k, v in ranking.items()})["probability"].numpy()


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_cascade_over_the_wire_equals_in_process(tiny, server, vocab, protocol):
    target = server.grpc_target if protocol == "grpc" else server.rest_url
    history, candidates = _history(vocab), _candidates(vocab)
    with CascadeClient(target, protocol=protocol) as client:
        ranked = client.rank_candidates(history, candidates)
    retrieved, probability = _reference(tiny, history, candidates)
    assert [r["item_id"] for r in ranked] == [
        candidates[i]["item_id"] for i in np.argsort(-probability, kind="stable")
    ]
    by_item = {r["item_id"]: r for r in ranked}
    for i, c in enumerate(candidates):
        got = by_item[c["item_id"]]
        assert got["probability"] == pytest.approx(float(probability[i]), rel=1e-5, abs=1e-6)
        kept = [p for p in retrieved["kept_position"][i] if p >= 0]
        assert [k["position"] for k in got["kept"]] == [p - 1 for p in kept]  # lead slot
        for k in got["kept"]:
            assert k["item_id"] == history[k["position"]]["item_id"]
    assert len(ranked[0]["kept"]) == min(8, len(history))


def test_encoded_cascade_and_metadata(tiny, server):
    import seminar_tf.models  # noqa: F401
    from seminar_tf.data.dataset import make_dataset
    from seminar_tf.training import load_model

    features, _ = next(iter(make_dataset(tiny["data"], "test", 16)))
    features = {k: v.numpy() for k, v in features.items()}
    with CascadeClient(server.grpc_target, encoded=True) as client:
        retrieved, probability = client.cascade(features)
        meta = client.metadata("retrieval")
    expected = load_model(tiny["model"])(features).numpy()
    np.testing.assert_allclose(probability, expected, rtol=1e-5, atol=1e-6)
    assert retrieved["kept_query_tokens"].shape == (16, 8, 5)
    assert meta["version"] == 1
    sigs = meta["signature_def"]
    assert {"retrieve", "retrieve_encoded", "serving_default"} <= set(sigs)
    assert set(sigs["retrieve"]["inputs"]) == {
        f.name for f in spec.serving_signature("retrieve", user_features=True).inputs
    }


def test_rest_metadata_and_status(server):
    import json
    import urllib.request

    with urllib.request.urlopen(f"{server.rest_url}/v1/models/ranking/metadata") as r:
        body = json.loads(r.read())
    assert set(body["metadata"]["signature_def"]["signature_def"]) >= {"rank", "rank_encoded"}
    with urllib.request.urlopen(f"{server.rest_url}/v1/models/retrieval") as r:
        status = json.loads(r.read())
    assert status["model_version_status"][0]["state"] == "AVAILABLE"
    assert all(s.warmup_replayed >= 4 for s in server.repository.servables.values())


def _stub(server):
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    return prediction_service_pb2_grpc.PredictionServiceStub(
        grpc.insecure_channel(server.grpc_target)
    )


def _raw_request(model, signature, inputs):
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = model, signature
    for k, v in inputs.items():
        request.inputs[k].CopyFrom(tf.make_tensor_proto(v))
    return request


def test_server_is_dtype_and_rank_strict_like_tf_serving(tiny, server, vocab):
    good = pad_histories([_history(vocab, 3)])
    good["target_item"] = np.array([vocab["item"][0].encode()], object)
    good["target_query"] = np.array([b""], object)
    good["user_id"] = np.array([b""], object)
    good["user_counts"] = np.array([[3, 3, 0]], np.int64)
    good["target_attributes"] = pad_attributes(
        [None], spec.DataSpec.load(tiny["data"]).max_attributes
    )
    stub = _stub(server)
    response = stub.Predict(_raw_request("retrieval", "", good), timeout=10)
    assert response.model_spec.signature_name == "serving_default"
    assert tf.make_ndarray(response.outputs["kept_position"]).shape == (1, 8)
    cases = [
        ({**good, "hist_label": good["hist_label"].astype(np.int32)}, "expects int64 but int32"),
        ({**good, "hist_item": good["hist_item"][0]}, "expects shape"),
        ({k: v for k, v in good.items() if k != "hist_query"}, "missing ['hist_query']"),
        (
            {**good, "target_attributes": np.zeros(good["target_attributes"].shape, np.int64)},
            "input 'target_attributes' expects string but int64",
        ),
        (
            {**good, "target_attributes": good["target_attributes"][:, :2]},
            "input 'target_attributes' expects shape",
        ),
        ({**good, "user": np.array([b"u"], object)}, "unexpected ['user']"),
    ]
    for inputs, message in cases:
        with pytest.raises(grpc.RpcError) as e:
            stub.Predict(_raw_request("retrieval", "", inputs), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.Predict(_raw_request("nope", "", good), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        stub.Predict(_raw_request("retrieval", "no_such_signature", good), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no_such_signature" in e.value.details()


def test_get_model_metadata_errors(server):
    from tensorflow_serving.apis import get_model_metadata_pb2

    stub = _stub(server)
    for name, fields, code in (
        ("retrieval", ["signature_def", "extra"], grpc.StatusCode.INVALID_ARGUMENT),
        ("nope", ["signature_def"], grpc.StatusCode.NOT_FOUND),
    ):
        request = get_model_metadata_pb2.GetModelMetadataRequest()
        request.model_spec.name = name
        request.metadata_field.extend(fields)
        with pytest.raises(grpc.RpcError) as e:
            stub.GetModelMetadata(request, timeout=10)
        assert e.value.code() == code


def test_client_errors_name_stage_and_field(server, vocab):
    client = CascadeClient(server.grpc_target, encoded=True)
    features = {
        "target_item": [2], "target_query": [0], "target_query_tokens": [[0] * 5],
        "hist_item": [[0, -4, 3]], "hist_query": [[0, 0, 0]],
        "hist_query_tokens": [[[0] * 5] * 3], "hist_label": [[0, 1, 1]],
    }  # fmt: skip
    with pytest.raises(ServingError) as e:
        client.retrieve(features)
    assert e.value.stage == "retrieval" and e.value.field == "hist_item"
    assert "negative id" in str(e.value) and e.value.code == "INVALID_ARGUMENT"
    with pytest.raises(ServingError, match="field 'hist_label'.*int64"):
        client.retrieve({**features, "hist_item": [[0, 4, 3]], "hist_label": [[0.0, 1.5, 1.0]]})
    with pytest.raises(ServingError, match="field 'hist_query'.*missing"):
        client.retrieve({k: v for k, v in features.items() if k != "hist_query"})
    with pytest.raises(ServingError, match="field 'target_query_tokens'.*shape"):
        client.retrieve({**features, "target_query_tokens": [[0] * 4]})
    raw = CascadeClient(server.rest_url, protocol="rest")
    with pytest.raises(ServingError) as e:
        raw.rank({"target_item": ["x"], "target_query": [""], "kept_item": [[""] * 8],
                  "kept_query": [[""] * 8], "kept_label": [[0] * 8],
                  "kept_score": [[float("nan")] + [0.0] * 7],
                  "history_stats": [[0.0] * 5]})  # fmt: skip
    assert e.value.stage == "ranking" and e.value.field == "kept_score" and e.value.code == 400
    wrong = CascadeClient(server.grpc_target, ranking_model="no-such-model")
    with pytest.raises(ServingError) as e:
        wrong.rank_candidates(_history(vocab, 2), _candidates(vocab))
    assert e.value.stage == "ranking" and e.value.code == "NOT_FOUND"


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_candidates_with_attributes_over_the_wire(tiny, server, vocab, protocol):
    target = server.grpc_target if protocol == "grpc" else server.rest_url
    attributes = [line.rstrip("\n") for line in open(
        os.path.join(tiny["data"], spec.VOCAB_DIR, spec.VOCAB_FILES["attribute"]))]  # fmt: skip
    history = _history(vocab)
    candidates = [
        {"item_id": "new-item-a"},  # unknown, no attributes: the OOV item alone
        {"item_id": "new-item-b", "attributes": [attributes[0], " " + attributes[4]]},
        {"item_id": "new-item-c", "attributes": [attributes[0], "never-seen-attribute"]},
        {"item_id": "new-item-d", "attributes": []},  # empty: as none
        {"item_id": vocab["item"][5], "attributes": ["", "   "]},  # blank: as none
        {"item_id": vocab["item"][6]},
    ]
    with CascadeClient(target, protocol=protocol) as client:
        ranked = client.rank_candidates(history, candidates)
    _, probability = _reference(tiny, history, candidates)
    by_item = {r["item_id"]: r for r in ranked}
    for i, c in enumerate(candidates):
        got = by_item[c["item_id"]]
        assert got["probability"] == pytest.approx(float(probability[i]), rel=1e-5, abs=1e-6)
        assert got.get("attributes") == c.get("attributes")
    p = {c["item_id"]: by_item[c["item_id"]]["probability"] for c in candidates}
    assert abs(p["new-item-b"] - p["new-item-a"]) > 1e-6  # attributes count for a new item
    assert abs(p["new-item-c"] - p["new-item-b"]) > 1e-6  # an unknown attribute is OOV, not ""
    assert p["new-item-d"] == pytest.approx(p["new-item-a"], rel=1e-6)


def test_client_pads_or_refuses_target_attributes(tiny, server, vocab):
    from serving.client import check_inputs

    width = spec.DataSpec.load(tiny["data"]).max_attributes
    sig = spec.SERVING_SIGNATURES["rank"]
    features = {"target_item": ["x", "y"], "target_query": ["", ""], "kept_item": [[""] * 8] * 2,
                "kept_query": [[""] * 8] * 2, "kept_label": [[0] * 8] * 2,
                "kept_score": [[0.0] * 8] * 2}  # fmt: skip
    filled = check_inputs(sig, features, {"K": 8, "A": width})
    assert filled["target_attributes"].shape == (2, width)
    assert filled["target_attributes"].dtype == object and not filled["target_attributes"].any()
    with pytest.raises(ServingError, match="field 'target_attributes'.*missing"):
        check_inputs(sig, features, {"K": 8})  # A unknown: cannot pad
    with pytest.raises(ServingError, match="field 'target_attributes'.*shape"):
        check_inputs(sig, {**features, "target_attributes": [[""] * (width + 1)] * 2},
                     {"K": 8, "A": width})  # fmt: skip
    with CascadeClient(server.grpc_target) as client:
        with pytest.raises(ServingError) as e:
            client.rank_candidates(_history(vocab), [{"item_id": "x", "attributes": "red"}])
        assert e.value.field == "target_attributes" and "list of strings" in str(e.value)
    with CascadeClient(server.grpc_target, encoded=True) as client:
        encoded = {"target_item": [2], "target_query": [0], "target_query_tokens": [[0] * 5],
                   "target_attributes": [[3, -1] + [0] * (width - 2)], "hist_item": [[0, 4]],
                   "hist_query": [[0, 0]], "hist_query_tokens": [[[0] * 5] * 2],
                   "hist_label": [[0, 1]]}  # fmt: skip
        with pytest.raises(ServingError) as e:
            client.retrieve(encoded)
        assert e.value.field == "target_attributes" and "negative id" in str(e.value)
        assert e.value.code == "INVALID_ARGUMENT"


class _Flaky:
    """A PredictionService that answers UNAVAILABLE ``failures`` times, or sleeps, then
    delegates to the real one."""

    def __init__(self, repository, failures=0, delay=0.0):
        self.inner = local_server._servicer_class()(repository)
        self.failures, self.delay, self.calls = failures, delay, 0

    def Predict(self, request, context):
        self.calls += 1
        if self.calls <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        time.sleep(self.delay)
        return self.inner.Predict(request, context)

    def GetModelMetadata(self, request, context):
        return self.inner.GetModelMetadata(request, context)


def _serve(servicer):
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler_cls = type("H", (prediction_service_pb2_grpc.PredictionServiceServicer,), {
        "Predict": lambda self, r, c: servicer.Predict(r, c),
        "GetModelMetadata": lambda self, r, c: servicer.GetModelMetadata(r, c),
    })  # fmt: skip
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(handler_cls(), srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    return srv, f"127.0.0.1:{port}"


def test_retries_on_unavailable_then_succeeds_or_says_so(server, vocab):
    flaky = _Flaky(server.repository, failures=2)
    srv, target = _serve(flaky)
    try:
        client = CascadeClient(target, retries=2, backoff_s=0.01)
        ranked = client.rank_candidates(_history(vocab), _candidates(vocab))
        assert len(ranked) == 3 and flaky.calls == 4  # 2 failures + retrieval + ranking
        flaky.calls, flaky.failures = 0, 10
        with pytest.raises(ServingError, match="retrieval stage: warming up .after 3 attempts"):
            CascadeClient(target, retries=2, backoff_s=0.01).rank_candidates(
                _history(vocab), _candidates(vocab)
            )
    finally:
        srv.stop(0)
    # Nothing listening: UNAVAILABLE on every attempt.
    with pytest.raises(ServingError) as e:
        CascadeClient(target, retries=1, backoff_s=0.01, timeout_s=2).metadata("retrieval")
    assert e.value.code == "UNAVAILABLE" and "after 2 attempts" in str(e.value)


def test_timeout_is_a_deadline_error(server, vocab):
    slow = _Flaky(server.repository, delay=1.0)
    srv, target = _serve(slow)
    try:
        client = CascadeClient(target, timeout_s=0.3, retries=2)
        client.metadata("retrieval")
        with pytest.raises(ServingError) as e:
            client.rank_candidates(_history(vocab), _candidates(vocab))
        assert e.value.stage == "retrieval" and e.value.code == "DEADLINE_EXCEEDED"
        assert slow.calls == 1  # a deadline is not retried
    finally:
        time.sleep(slow.delay)  # let the abandoned call finish before the server goes
        srv.stop(0)


def test_cli_query_against_the_local_server(server, vocab, tmp_path, capsys):
    import json

    from seminar_tf.cli import main

    request = tmp_path / "request.json"
    request.write_text(json.dumps({"history": _history(vocab), "candidates": _candidates(vocab)}))
    assert main(["query", "--server", server.grpc_target, "--request", str(request)]) == 0
    ranked = json.loads(capsys.readouterr().out)["ranked"]
    assert len(ranked) == 3 and ranked[0]["probability"] >= ranked[-1]["probability"]
    rc = main(["query", "--server", "127.0.0.1:1", "--request", str(request), "--timeout", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "retrieval stage" in err[0]
