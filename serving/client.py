"""The cascade client: ``retrieve`` on the retrieval model, then ``rank`` on the ranking model,
over TF Serving's gRPC API (``PredictionServiceStub``) or its REST API.

Requests are built from ``seminar_tf.spec.SERVING_SIGNATURES``: the client checks every input
against the signature (present, dtype, rank) before sending, fills the optional ones the
caller left out (``target_attributes``; the ranking's ``user_id`` / ``user``: an unknown user)
with padding, and pipes the retrieval outputs named like ranking inputs (``kept_*``,
``short_term``, ``history_stats``) into the ranking request. Calls
have a deadline and are retried on UNAVAILABLE (gRPC) or connection errors / HTTP 503 (REST)
with exponential backoff; every failure raises :class:`ServingError` naming the stage and,
where known, the field.

Example:

```python
client = CascadeClient("localhost:8500")                 # or protocol="rest", port 8501
ranked = client.rank_candidates(
    user_id="u042",                                      # optional: "" / None = unknown user
    history=[{"item_id": "i000105", "query": "red shoes", "label": 1}, ...],  # oldest first
    candidates=[{"item_id": "i000159"}, {"item_id": "i000047", "query": "boots"},
                {"item_id": "a-new-item", "attributes": ["brand_81", "genre_8"]}],
)
ranked[0]["item_id"], ranked[0]["probability"], ranked[0]["kept"]
```
"""

from __future__ import annotations

import base64
import dataclasses
import json
import socket
import time
import urllib.error
import urllib.request

import numpy as np

from seminar_tf import spec

STAGES = {spec.RETRIEVAL_MODEL: "retrieve", spec.RANKING_MODEL: "rank"}


class ServingError(Exception):
    """A failed call: ``stage`` (``"retrieval"`` / ``"ranking"``), ``field`` (an input name
    or None), ``code`` (the gRPC status name or HTTP status) and the server's message."""

    def __init__(self, stage: str, message: str, field: str | None = None, code=None):
        self.stage, self.field, self.code, self.message = stage, field, code, message
        where = f"{stage} stage" + (f", field {field!r}" if field else "")
        super().__init__(f"{where}: {message}" + (f" [{code}]" if code else ""))


def _field_in(message: str, names) -> str | None:
    """The first input name the server's message mentions (longest names first)."""
    for name in sorted(names, key=len, reverse=True):
        if name in message:
            return name
    return None


# ------------------------------------------------------------------------------- requests
def _as_strings(value) -> np.ndarray:
    array = np.asarray(value, dtype=object)
    out = np.empty(array.shape, dtype=object)
    flat, src = out.reshape(-1), array.reshape(-1)
    for i, v in enumerate(src):
        if isinstance(v, bytes):
            flat[i] = v
        elif isinstance(v, str):
            flat[i] = v.encode("utf-8")
        else:
            raise TypeError(f"expects strings, got {type(v).__name__}")
    return out


def _as_input(stage: str, f: spec.FeatureSpec, value, sizes: dict) -> np.ndarray:
    """``value`` as the numpy array input ``f`` takes, or :class:`ServingError` naming it."""
    try:
        if f.dtype == "string":
            array = _as_strings(value)
        else:
            array = np.asarray(value)
            if array.dtype == object or array.dtype.kind not in "iub" + (
                "f" if f.dtype.startswith("float") else ""
            ):
                raise TypeError(f"expects {f.dtype}, got {array.dtype}")
            if f.dtype == "int64" and array.size and array.dtype.kind == "u":
                if array.max() > np.iinfo(np.int64).max:
                    raise TypeError("value too large for int64")
            array = array.astype(f.dtype)
    except TypeError as e:
        raise ServingError(stage, str(e), field=f.name) from None
    shape = (None,) + spec.resolve_serving_shape(f.shape, {**sizes, "L": None})
    symbolic = ["B"] + [str(d) for d in f.shape]
    if array.ndim != len(shape) or any(
        isinstance(d, int) and d != s for d, s in zip(shape, array.shape)
    ):
        raise ServingError(
            stage,
            f"expects shape [{', '.join(symbolic)}] = {list(shape)}, got {list(array.shape)}",
            field=f.name,
        )
    return array


def padding_input(f: spec.FeatureSpec, batch: int, sizes: dict) -> np.ndarray:
    """An all-padding ``[batch, ...]`` value of input ``f`` (``sizes`` resolves its fixed
    dimensions, e.g. ``{"A": 8}``): what a request without the optional ``f`` sends."""
    shape = (batch,) + spec.resolve_serving_shape(f.shape, sizes)
    unknown = [d for d in shape if not isinstance(d, int)]
    if unknown:
        raise ValueError(f"{f.name}: size {unknown[0]} unknown, cannot pad it")
    if f.dtype == "string":
        return np.full(shape, b"", dtype=object)
    return np.full(shape, f.padding, dtype=f.dtype)


def check_inputs(signature: spec.SignatureSpec, features: dict, sizes: dict | None = None) -> dict:
    """``features`` as the numpy arrays ``signature`` takes (strings as bytes, ints as
    int64, floats as float32), or :class:`ServingError` naming the field: missing, unknown,
    wrong type (a float for an int, a number for a string) or wrong rank / fixed size.

    An optional input (``FeatureSpec.optional``: ``target_attributes``) that ``features``
    lacks is filled with padding, ``[B, ...]`` with the fixed sizes from ``sizes`` (the
    signature still requires it: TF Serving signatures have fixed inputs)."""
    stage = signature.model
    sizes = sizes or {}
    wanted = {f.name: f for f in signature.inputs}
    unknown = sorted(set(features) - set(wanted))
    if unknown:
        raise ServingError(stage, f"not an input of {signature.name!r}", field=unknown[0])
    absent = [f for f in signature.inputs if f.name not in features]
    for f in absent:
        if not f.optional:
            raise ServingError(stage, f"missing (signature {signature.name!r})", field=f.name)
    out = {n: _as_input(stage, f, features[n], sizes) for n, f in wanted.items() if n in features}
    batch = {a.shape[0] for a in out.values()}
    if len(batch) > 1:
        raise ServingError(stage, f"inputs have different batch sizes {sorted(batch)}")
    for f in absent:
        try:
            out[f.name] = padding_input(f, next(iter(batch), 0), sizes)
        except ValueError as e:
            raise ServingError(stage, f"missing and {e}", field=f.name) from None
    return {n: out[n] for n in wanted}


def pad_histories(histories: list, lead: int = 1) -> dict:
    """``[[{"item_id", "query"?, "label"?}, ...], ...]`` (each oldest first) -> the raw
    history inputs ``hist_item`` / ``hist_query`` (strings) and ``hist_label`` (int64), all
    ``[B, lead + max length]``, left-padded with "" / 0, most recent last.

    ``lead`` padding slots come first in every row, so a TF Serving batch that pads requests
    with their first element pads with padding (see ``export.writer.BATCHING_NOTE``). A
    missing ``label`` is 1 (a click; with the default history mode "all" give every event's
    label, with "positive" send clicks only).
    """
    width = lead + max((len(h) for h in histories), default=0)
    b = len(histories)
    item = np.full((b, width), b"", dtype=object)
    query = np.full((b, width), b"", dtype=object)
    label = np.zeros((b, width), np.int64)
    for i, events in enumerate(histories):
        start = width - len(events)
        for j, e in enumerate(events):
            item[i, start + j] = str(e["item_id"]).encode("utf-8")
            query[i, start + j] = str(e.get("query") or "").encode("utf-8")
            label[i, start + j] = int(e.get("label", 1))
    return {"hist_item": item, "hist_query": query, "hist_label": label}


def pad_attributes(attributes: list, width: int) -> np.ndarray:
    """``[[attribute strings] or None, ...]`` (one list per target) -> ``target_attributes``
    ``[B, width]`` (bytes), "" padding on the right.

    As the preprocessing builds the item table: blank values are dropped and the first
    ``width`` (the model's max_attributes) are kept; an empty list or None leaves the row
    padding (the item table's attributes are used)."""
    out = np.full((len(attributes), width), b"", dtype=object)
    for i, values in enumerate(attributes):
        if values is None:
            continue
        if isinstance(values, (str, bytes)) or not all(isinstance(v, (str, bytes)) for v in values):
            raise TypeError(f"attributes must be a list of strings, got {values!r}")
        kept = [v for v in values if _text(v).strip()]
        for j, v in enumerate(kept[:width]):
            out[i, j] = v if isinstance(v, bytes) else v.encode("utf-8")
    return out


# ------------------------------------------------------------------------------ transports
class GrpcTransport:
    """TF Serving's gRPC ``PredictionService`` at ``target`` (``host:port``)."""

    def __init__(self, target: str, channel=None):
        import grpc

        from serving.tf_protos import serving_apis

        # The generated protos without running tensorflow/__init__ (seconds): see tf_protos.
        self.apis = serving_apis()
        self.target = target
        self.channel = channel or grpc.insecure_channel(
            target, options=[("grpc.max_receive_message_length", 256 << 20),
                             ("grpc.max_send_message_length", 256 << 20)]
        )  # fmt: skip
        self.stub = self.apis.prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

    def predict(self, model: str, signature: str, inputs: dict, timeout: float) -> dict:
        from serving.tf_protos import make_ndarray, make_tensor_proto

        request = self.apis.predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.model_spec.signature_name = signature
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(make_tensor_proto(value, self.apis.tensor_pb2))
        response = self.stub.Predict(request, timeout=timeout)
        return {k: make_ndarray(v) for k, v in response.outputs.items()}

    def metadata(self, model: str, timeout: float) -> dict:
        from google.protobuf import json_format

        get_model_metadata_pb2 = self.apis.get_model_metadata_pb2
        request = get_model_metadata_pb2.GetModelMetadataRequest()
        request.model_spec.name = model
        request.metadata_field.append("signature_def")
        response = self.stub.GetModelMetadata(request, timeout=timeout)
        defs = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(defs)
        as_json = json_format.MessageToDict(defs, preserving_proto_field_name=True)
        return {
            "version": response.model_spec.version.value,
            "signature_def": as_json["signature_def"],
        }

    def retryable(self, error) -> bool:
        import grpc

        return isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.UNAVAILABLE

    def describe(self, error):
        import grpc

        if isinstance(error, grpc.RpcError):
            code = error.code()
            return (error.details() or str(code)), code.name
        return str(error), None

    def close(self):
        self.channel.close()


class RestTransport:
    """TF Serving's REST API at ``base_url`` (``http://host:8501``), columnar format."""

    def __init__(self, base_url: str):
        self.base_url = base_url.rstrip("/")

    def _call(self, url: str, body: dict | None, timeout: float) -> dict:
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(
            url, data=data, headers={"Content-Type": "application/json"},
            method="GET" if body is None else "POST",
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    @staticmethod
    def _json(value: np.ndarray):
        if value.dtype == object:

            def text(b):
                try:
                    return b.decode("utf-8")
                except UnicodeDecodeError:
                    return {"b64": base64.b64encode(b).decode("ascii")}

            return np.vectorize(text, otypes=[object])(value).tolist() if value.size else []
        return value.tolist()

    def predict(self, model: str, signature: str, inputs: dict, timeout: float) -> dict:
        body = {
            "signature_name": signature,
            "inputs": {k: self._json(v) for k, v in inputs.items()},
        }
        out = self._call(f"{self.base_url}/v1/models/{model}:predict", body, timeout)
        outputs = out.get("outputs", {})
        if not isinstance(outputs, dict):  # a single-output signature answers a bare list
            outputs = {"output": outputs}
        return {k: np.asarray(v) for k, v in outputs.items()}

    def metadata(self, model: str, timeout: float) -> dict:
        out = self._call(f"{self.base_url}/v1/models/{model}/metadata", None, timeout)
        return {
            "version": int(out["model_spec"]["version"]),
            "signature_def": out["metadata"]["signature_def"]["signature_def"],
        }

    def retryable(self, error) -> bool:
        if isinstance(error, urllib.error.HTTPError):
            return error.code == 503
        return isinstance(error, (urllib.error.URLError, ConnectionError)) and not isinstance(
            getattr(error, "reason", None), socket.timeout
        )

    def describe(self, error):
        if isinstance(error, urllib.error.HTTPError):
            try:
                message = json.loads(error.read() or b"{}").get("error", error.reason)
            except (json.JSONDecodeError, AttributeError):
                message = str(error.reason)
            return message, error.code
        if isinstance(error, (TimeoutError, socket.timeout)) or isinstance(
            getattr(error, "reason", None), socket.timeout
        ):
            return "deadline exceeded", "DEADLINE_EXCEEDED"
        return str(getattr(error, "reason", error)), None

    def close(self):
        pass


# ---------------------------------------------------------------------------------- client
class CascadeClient:
    """Calls the exported retrieval and ranking models on TF Serving.

    Args:
        target: ``host:port`` of the gRPC API, or the REST base URL (``http://host:8501``)
            with ``protocol="rest"``.
        protocol: ``"grpc"`` or ``"rest"``.
        retrieval_model, ranking_model: the model names in TF Serving's ``models.config``.
        encoded: use the ``*_encoded`` signatures (int64 ids) instead of the raw ones.
        timeout_s: deadline of each call.
        retries: extra attempts after an UNAVAILABLE answer (or a refused connection).
        backoff_s: the first retry's wait; it doubles each time.
        top_k, max_query_tokens: the fixed sizes ``K`` and ``Q`` of the signatures, to check
            requests before sending; read from GetModelMetadata when None (the signatures
            themselves are read from it once per stage).
    """

    def __init__(
        self,
        target: str,
        protocol: str = "grpc",
        retrieval_model: str = spec.RETRIEVAL_MODEL,
        ranking_model: str = spec.RANKING_MODEL,
        encoded: bool = False,
        timeout_s: float = 5.0,
        retries: int = 2,
        backoff_s: float = 0.05,
        top_k: int | None = None,
        max_query_tokens: int | None = None,
    ):
        if protocol not in ("grpc", "rest"):
            raise ValueError(f"protocol must be 'grpc' or 'rest', got {protocol!r}")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0:
            raise ValueError("timeout_s must be > 0, retries and backoff_s >= 0")
        self.transport = GrpcTransport(target) if protocol == "grpc" else RestTransport(target)
        self.models = {spec.RETRIEVAL_MODEL: retrieval_model, spec.RANKING_MODEL: ranking_model}
        self.encoded = encoded
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self._sizes = {"K": top_k, "Q": max_query_tokens}
        self._served_inputs = {}

    # ------------------------------------------------------------------ plumbing
    def signature_name(self, stage: str) -> str:
        return STAGES[stage] + ("_encoded" if self.encoded else "")

    def _call(self, stage: str, fn, field_names=()):
        attempt = 0
        while True:
            try:
                return fn()
            except ServingError:
                raise
            except Exception as e:  # transport errors only: fn does no other work
                if attempt < self.retries and self.transport.retryable(e):
                    time.sleep(self.backoff_s * (2**attempt))
                    attempt += 1
                    continue
                message, code = self.transport.describe(e)
                if attempt:
                    message += f" (after {attempt + 1} attempts)"
                raise ServingError(stage, message, _field_in(message, field_names), code) from e

    def metadata(self, stage: str) -> dict:
        """GetModelMetadata of a stage's model: ``{"version", "signature_def"}``."""
        model = self.models[stage]
        return self._call(stage, lambda: self.transport.metadata(model, self.timeout_s))

    def _signature(self, stage: str, name: str | None = None) -> spec.SignatureSpec:
        """The spec signature of ``stage`` (or its signature ``name``) with the optional
        features the served model has (``short_term``; a scorer's extra retrieval inputs,
        typed from the metadata)."""
        name = name or self.signature_name(stage)
        if name in spec.PQ_SIGNATURES:
            return spec.serving_signature(name)
        if name not in self._served_inputs:
            sig_def = self.metadata(stage)["signature_def"].get(name)
            if sig_def is None:
                raise ServingError(stage, f"the served model has no signature {name!r}")
            self._served_inputs[name] = sig_def.get("inputs", {})
        served = self._served_inputs[name]
        for size, source in (
            ("K", "kept_label"), ("Q", "target_query_tokens"), ("A", spec.TARGET_ATTRIBUTES.name)
        ):  # fmt: skip
            if source in served and self._sizes.get(size) is None:
                self._sizes[size] = _dim(served[source], 1)
        short_term = spec.SHORT_TERM.name in served
        # a model with user features (both stages take the user, the ranking the stats)
        users = spec.raw_feature(spec.USER).name in served or spec.USER.name in served
        known = {f.name for f in spec.serving_signature(name, short_term, (), users).inputs}
        extra = tuple(_feature_from_metadata(n, served[n]) for n in sorted(set(served) - known))
        sig = spec.serving_signature(
            name, short_term, extra if stage == spec.RETRIEVAL_MODEL else (), users
        )
        # An export older than an optional input does not take it: leave it out.
        inputs = tuple(f for f in sig.inputs if f.name in served or not f.optional)
        return dataclasses.replace(sig, inputs=inputs)

    def _predict(self, stage: str, features: dict, name: str | None = None) -> dict:
        sig = self._signature(stage, name)
        sizes = {k: v for k, v in self._sizes.items() if v is not None}
        inputs = check_inputs(sig, features, sizes)
        model = self.models[stage]
        return self._call(
            stage,
            lambda: self.transport.predict(model, sig.name, inputs, self.timeout_s),
            field_names=[f.name for f in sig.inputs],
        )

    # ------------------------------------------------------------------ stages
    def retrieve(self, features: dict) -> dict:
        """Calls the retrieval signature: target + history -> ``kept_position`` and the
        ``kept_*`` behaviours (numpy arrays ``[B, K...]``)."""
        return self._predict(spec.RETRIEVAL_MODEL, features)

    @property
    def uses_stored_codes(self) -> bool:
        """Whether the served retrieval takes product-quantization codes
        (``hist_pq_codes``, a ``"pq"`` model): see :meth:`history_codes`."""
        names = {f.name for f in self._signature(spec.RETRIEVAL_MODEL).inputs}
        return spec.PQ_CODES.name in names

    def history_codes(self, features: dict) -> np.ndarray:
        """The stored codes ``hist_pq_codes`` ``[B, L, M, S]`` of histories (``hist_item``,
        ``hist_query`` and, encoded, ``hist_query_tokens``) from the retrieval model's
        ``pq_codes`` signature: what an event store keeps per behaviour, computed once per
        new event, and what :meth:`retrieve` then takes with the history."""
        name = "pq_codes_encoded" if self.encoded else "pq_codes"
        names = {f.name for f in spec.PQ_SIGNATURES[name].inputs}
        inputs = {n: v for n, v in features.items() if n in names}
        out = self._predict(spec.RETRIEVAL_MODEL, inputs, name)
        return np.asarray(out[spec.PQ_CODES.name], np.int32)

    def rank(self, features: dict) -> np.ndarray:
        """Calls the ranking signature: target + kept behaviours -> probability ``[B]``."""
        out = self._predict(spec.RANKING_MODEL, features)
        return np.asarray(out[spec.PROBABILITY.name], np.float32)

    def cascade(self, features: dict) -> tuple:
        """``retrieve`` then ``rank`` with the retrieval outputs piped in; returns
        ``(retrieved, probability [B])``."""
        retrieved = self.retrieve(features)
        ranking = self._signature(spec.RANKING_MODEL)
        names = {f.name for f in ranking.inputs}
        inputs = {n: v for n, v in features.items() if n in names and n not in retrieved}
        inputs.update({n: v for n, v in retrieved.items() if n in names})
        return retrieved, self.rank(inputs)

    def _target_attributes(self, candidates: list) -> np.ndarray | None:
        """``target_attributes`` ``[B, A]`` of ``candidates`` (their ``"attributes"``
        lists), or None when none has any (the request then sends padding)."""
        attributes = [c.get("attributes") for c in candidates]
        if not any(attributes):
            return None
        field = spec.TARGET_ATTRIBUTES.name
        self._signature(spec.RETRIEVAL_MODEL)  # reads A from the served model
        width = self._sizes.get("A")
        if width is None:
            raise ServingError(
                spec.RETRIEVAL_MODEL, "the served model takes no attributes (export it again)",
                field=field,
            )  # fmt: skip
        try:
            return pad_attributes(attributes, width)
        except TypeError as e:
            raise ServingError(spec.RETRIEVAL_MODEL, str(e), field=field) from None

    def rank_candidates(
        self,
        history: list,
        candidates: list,
        user_id: str | None = None,
        user_counts: tuple | None = None,
    ) -> list:
        """Scores ``candidates`` (``[{"item_id", "query"?, "attributes"?}]``) for one
        user's ``history`` (``[{"item_id", "query"?, "label"?}]``, oldest first) through the
        cascade (raw signatures; a ``"pq"`` model's history codes come from its ``pq_codes``
        signature, where a deployment would read them stored); returns the candidates sorted
        by decreasing probability, each with ``probability`` and ``kept`` (the behaviours the
        first stage kept for it: ``position``, ``item_id``, ``query``, ``score``).

        A candidate's ``attributes`` (attribute strings, e.g. of an item the model has never
        seen) replace the attributes the model's item table has for its ``item_id``; without
        them (or with an empty list) the table's are used. See :func:`pad_attributes`.

        ``user_id``: the user as in the logs, for a model with user features (None or "" =
        unknown user: "" is sent); a served model without user features ignores it.
        ``user_counts``: ``(events, clicks, seconds since the latest event)`` of the user's
        whole history before now (``spec.USER_COUNTS``, as an event store counts them);
        None counts the given ``history`` (its events, its clicks, gap 0), which is exact
        only when it is the whole history."""
        if self.encoded:
            raise ValueError("rank_candidates uses the raw signatures; create the client "
                             "with encoded=False")  # fmt: skip
        if not candidates:
            return []
        hist = pad_histories([history])
        if self.uses_stored_codes:
            hist[spec.PQ_CODES.name] = self.history_codes(hist)
        b = len(candidates)
        features = {n: np.repeat(v, b, axis=0) for n, v in hist.items()}
        features["target_item"] = [str(c["item_id"]) for c in candidates]
        features["target_query"] = [str(c.get("query") or "") for c in candidates]
        attributes = self._target_attributes(candidates)
        if attributes is not None:
            features[spec.TARGET_ATTRIBUTES.name] = attributes
        user_input = spec.raw_feature(spec.USER).name
        if user_input in {f.name for f in self._signature(spec.RETRIEVAL_MODEL).inputs}:
            if user_id is not None and not isinstance(user_id, str):
                raise ServingError(
                    spec.RANKING_MODEL, f"expects a string, got {user_id!r}", field=user_input
                )
            features[user_input] = [user_id or ""] * b
        if spec.USER_COUNTS.name in {f.name for f in self._signature(spec.RETRIEVAL_MODEL).inputs}:
            features[spec.USER_COUNTS.name] = np.repeat(
                _user_counts(history, user_counts)[None, :], b, axis=0
            )
        retrieved, probability = self.cascade(features)
        lead = hist["hist_item"].shape[1] - len(history)
        ranked = []
        for i, c in enumerate(candidates):
            kept = []
            for j, pos in enumerate(retrieved["kept_position"][i]):
                if pos < 0:
                    continue
                kept.append({
                    "position": int(pos) - lead,  # index into the given history
                    "item_id": _text(retrieved["kept_item"][i, j]),
                    "query": _text(retrieved["kept_query"][i, j]),
                    "score": float(retrieved["kept_score"][i, j]),
                })  # fmt: skip
            ranked.append({**c, "probability": float(probability[i]), "kept": kept})
        ranked.sort(key=lambda r: -r["probability"])
        return ranked

    def close(self):
        self.transport.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _user_counts(history: list, given) -> np.ndarray:
    """``user_counts`` ``[3]`` int64: ``given`` checked, or counted from ``history``."""
    field = spec.USER_COUNTS.name
    if given is None:
        clicks = sum(int(e.get("label", 1)) > 0 for e in history)
        return np.array([len(history), clicks, 0], np.int64)
    values = list(given) if isinstance(given, (list, tuple, np.ndarray)) else None
    if (
        values is None
        or len(values) != 3
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values)
        or min(values) < 0
    ):
        raise ServingError(
            spec.RETRIEVAL_MODEL,
            f"expects (events, clicks, seconds since the latest) as 3 non-negative integers, "
            f"got {given!r}",
            field=field,
        )
    return np.array(values, np.int64)


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _dim(tensor_info: dict, i: int) -> int | None:
    size = int(tensor_info["tensor_shape"]["dim"][i]["size"])
    return None if size < 0 else size


def _feature_from_metadata(name: str, tensor_info: dict) -> spec.FeatureSpec:
    """A served input the spec does not declare (e.g. a scorer's stored codes), typed from
    its TensorInfo: ``[B, L, fixed...]``."""
    dtype = tensor_info["dtype"].removeprefix("DT_").lower()
    dims = tensor_info["tensor_shape"].get("dim", [])[1:]
    shape = tuple("L" if i == 0 else int(d["size"]) for i, d in enumerate(dims))
    return spec.FeatureSpec(name, dtype, shape, 0, "input of the served retrieval model")
