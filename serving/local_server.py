"""A local stand-in for TF Serving: its PredictionService gRPC API and its REST API on
127.0.0.1, serving the exported SavedModels. For tests and trying the client; production runs
the real ``tensorflow_model_server`` (see docs/serving.md), which cannot be installed here.

Each model's versions are loaded the way TF Serving loads them, through the v1
SavedModelBundle path (``tf.compat.v1.saved_model.loader.load`` into a Session), and its
warmup file is replayed at load. Requests are checked against the SignatureDef as TF Serving
does: inputs must be exactly the signature's, with its dtype and rank (an int32 tensor for an
int64 input is INVALID_ARGUMENT, never a silent cast). Implemented: ``Predict`` and
``GetModelMetadata`` (gRPC), ``:predict`` in the columnar ``{"inputs": ...}`` format,
``/metadata`` and the model status (REST). Other methods answer UNIMPLEMENTED.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np

log = logging.getLogger("seminar.serving")

DEFAULT_SIGNATURE = "serving_default"


class RequestError(Exception):
    """A bad request: ``code`` is a ``grpc.StatusCode``; REST maps it to an HTTP status."""

    def __init__(self, code, message: str):
        super().__init__(message)
        self.code = code


_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
}


class Servable:
    """One loaded version of one model: a v1 Session over its SavedModel."""

    def __init__(self, name: str, version: int, path: str, replay_warmup: bool = True):
        import tensorflow as tf

        self.name, self.version, self.path = name, version, path
        self.graph = tf.Graph()
        self.session = tf.compat.v1.Session(graph=self.graph)
        with self.graph.as_default():
            meta_graph = tf.compat.v1.saved_model.loader.load(self.session, ["serve"], path)
        self.signatures = dict(meta_graph.signature_def)
        self.warmup_replayed = 0
        warmup = os.path.join(path, "assets.extra", "tf_serving_warmup_requests")
        if replay_warmup and os.path.exists(warmup):
            from export.warmup import read_warmup

            for _, signature, inputs in read_warmup(warmup):
                self.run(signature, inputs)
                self.warmup_replayed += 1

    def signature(self, name: str):
        name = name or DEFAULT_SIGNATURE
        if name not in self.signatures:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f'Serving signature name: "{name}" not found in signature def '
                f"(model {self.name}: {sorted(self.signatures)})",
            )
        return self.signatures[name]

    def check(self, signature_name: str, inputs: dict) -> None:
        """Raises :class:`RequestError` unless ``inputs`` match the signature exactly."""
        import tensorflow as tf

        sig = self.signature(signature_name)
        missing = sorted(set(sig.inputs) - set(inputs))
        extra = sorted(set(inputs) - set(sig.inputs))
        if missing or extra:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input(s) of signature {signature_name or DEFAULT_SIGNATURE!r} do not match: "
                f"missing {missing}, unexpected {extra}",
            )
        for name, info in sig.inputs.items():
            value = inputs[name]
            want = tf.dtypes.as_dtype(info.dtype)
            have = _dtype_of(value)
            if have != want:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"input {name!r} expects {want.name} but {have.name} is provided",
                )
            dims = [d.size for d in info.tensor_shape.dim]
            if not info.tensor_shape.unknown_rank:
                if value.ndim != len(dims) or any(
                    d >= 0 and d != s for d, s in zip(dims, value.shape)
                ):
                    shape = ["?" if d < 0 else d for d in dims]
                    raise RequestError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"input {name!r} expects shape {shape} but got {list(value.shape)}",
                    )

    def run(self, signature_name: str, inputs: dict, output_filter=()) -> dict:
        import tensorflow as tf

        self.check(signature_name, inputs)
        sig = self.signature(signature_name)
        wanted = list(output_filter) or list(sig.outputs)
        unknown = sorted(set(wanted) - set(sig.outputs))
        if unknown:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, f"output_filter names unknown outputs {unknown}"
            )
        feed = {sig.inputs[n].name: v for n, v in inputs.items()}
        fetch = {n: sig.outputs[n].name for n in wanted}
        try:
            return self.session.run(fetch, feed)
        except tf.errors.InvalidArgumentError as e:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, _first_line(e.message)) from None
        except tf.errors.OpError as e:
            raise RequestError(grpc.StatusCode.INTERNAL, _first_line(e.message)) from None

    def close(self):
        self.session.close()


def _first_line(message: str) -> str:
    """The informative line of a TF error (the assertion text, not "Graph execution
    error:" or node traces), at most 500 characters."""
    skip = ("Graph execution error", "Detected at node", "<stack traces", "[[{{node")
    for line in message.strip().splitlines():
        line = line.strip()
        if line and not line.startswith(skip):
            return line[:500]
    return message.strip()[:500]


def _dtype_of(value: np.ndarray):
    import tensorflow as tf

    if value.dtype == object or value.dtype.kind in "SU":
        return tf.string
    return tf.dtypes.as_dtype(value.dtype)


class ModelRepository:
    """The served models: ``{name: base_path}``, each at its latest integer version (TF
    Serving's default version policy)."""

    def __init__(self, models: dict, replay_warmup: bool = True):
        from export.writer import latest_version

        self.servables = {}
        for name, base in models.items():
            version = latest_version(base)
            self.servables[name] = Servable(
                name, version, os.path.join(base, str(version)), replay_warmup
            )
            log.info("serving %s version %d from %s", name, version, base)

    @classmethod
    def from_export(cls, export_dir: str, replay_warmup: bool = True) -> ModelRepository:
        from seminar_tf import spec

        return cls({m: os.path.join(export_dir, m) for m in spec.SERVING_MODELS}, replay_warmup)

    def find(self, name: str, version: int | None = None) -> Servable:
        servable = self.servables.get(name)
        if servable is None:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({name})"
            )
        if version and version != servable.version:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found for request: Specific({name}, {version})",
            )
        return servable

    def close(self):
        for s in self.servables.values():
            s.close()


# ------------------------------------------------------------------------------------- gRPC
def _servicer_class():
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
        def __init__(self, repository: ModelRepository):
            self.repository = repository

        def _abort(self, context, error: RequestError):
            context.abort(error.code, str(error))

        def Predict(self, request, context):
            import tensorflow as tf
            from tensorflow_serving.apis import predict_pb2

            try:
                spec = request.model_spec
                version = spec.version.value if spec.HasField("version") else None
                servable = self.repository.find(spec.name, version)
                inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
                outputs = servable.run(spec.signature_name, inputs, request.output_filter)
            except RequestError as e:
                return self._abort(context, e)
            response = predict_pb2.PredictResponse()
            response.model_spec.name = servable.name
            response.model_spec.version.value = servable.version
            response.model_spec.signature_name = spec.signature_name or DEFAULT_SIGNATURE
            for name, value in outputs.items():
                response.outputs[name].CopyFrom(tf.make_tensor_proto(value))
            return response

        def GetModelMetadata(self, request, context):
            from tensorflow_serving.apis import get_model_metadata_pb2

            try:
                spec = request.model_spec
                version = spec.version.value if spec.HasField("version") else None
                servable = self.repository.find(spec.name, version)
                fields = list(request.metadata_field)
                if fields != ["signature_def"]:
                    raise RequestError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"Metadata field(s) {fields} not supported; only signature_def",
                    )
            except RequestError as e:
                return self._abort(context, e)
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = servable.name
            response.model_spec.version.value = servable.version
            defs = get_model_metadata_pb2.SignatureDefMap()
            for name, sig in servable.signatures.items():
                defs.signature_def[name].CopyFrom(sig)
            response.metadata["signature_def"].Pack(defs)
            return response

    return PredictionServicer


# ------------------------------------------------------------------------------------- REST
_REST_PATH = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?(?P<verb>:predict|/metadata)?$"
)


def _json_value(value: np.ndarray):
    if value.dtype == object or value.dtype.kind == "S":
        return np.vectorize(
            lambda b: b.decode("utf-8", "replace") if isinstance(b, bytes) else b, otypes=[object]
        )(value).tolist()
    return value.tolist()


def _array_from_json(value, info) -> np.ndarray:
    import tensorflow as tf

    dtype = tf.dtypes.as_dtype(info.dtype)
    if dtype == tf.string:

        def encode(v):
            if isinstance(v, dict) and "b64" in v:
                return base64.b64decode(v["b64"])
            if not isinstance(v, str):
                raise ValueError(f"expects strings, got {type(v).__name__}")
            return v.encode("utf-8")

        array = np.asarray(value, dtype=object)
        return np.vectorize(encode, otypes=[object])(array) if array.size else array
    array = np.asarray(value)
    if array.size and array.dtype.kind not in "iufb":
        raise ValueError(f"expects numbers ({dtype.name})")
    if dtype.is_integer and array.size and array.dtype.kind == "f":
        if not np.all(np.equal(np.mod(array, 1), 0)):
            raise ValueError(f"expects integers ({dtype.name})")
    return array.astype(dtype.as_numpy_dtype)


def _handler_class(repository: ModelRepository):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet
            log.debug("rest: " + fmt, *args)

        def _reply(self, status: int, body: dict):
            data = json.dumps(body).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self, verb_wanted):
            match = _REST_PATH.match(self.path)
            if not match or (match.group("verb") or "") != verb_wanted:
                raise RequestError(grpc.StatusCode.NOT_FOUND, f"Malformed request: {self.path}")
            version = int(match.group("version")) if match.group("version") else None
            return repository.find(match.group("name"), version)

        def _fail(self, e: RequestError):
            self._reply(_HTTP_STATUS.get(e.code, 500), {"error": str(e)})

        def do_GET(self):
            try:
                if self.path.endswith("/metadata"):
                    servable = self._route("/metadata")
                    from google.protobuf import json_format
                    from tensorflow_serving.apis import get_model_metadata_pb2

                    defs = get_model_metadata_pb2.SignatureDefMap()
                    for name, sig in servable.signatures.items():
                        defs.signature_def[name].CopyFrom(sig)
                    body = {
                        "model_spec": {"name": servable.name, "version": str(servable.version)},
                        "metadata": {
                            "signature_def": json_format.MessageToDict(
                                defs, preserving_proto_field_name=True
                            )
                        },
                    }
                else:
                    servable = self._route("")
                    body = {
                        "model_version_status": [
                            {"version": str(servable.version), "state": "AVAILABLE",
                             "status": {"error_code": "OK", "error_message": ""}}
                        ]
                    }  # fmt: skip
            except RequestError as e:
                return self._fail(e)
            self._reply(200, body)

        def do_POST(self):
            try:
                servable = self._route(":predict")
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except json.JSONDecodeError as e:
                    raise RequestError(
                        grpc.StatusCode.INVALID_ARGUMENT, f"JSON Parse error: {e}"
                    ) from None
                if "inputs" not in body or not isinstance(body["inputs"], dict):
                    raise RequestError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        'this local server takes the columnar format: {"inputs": {name: value}}',
                    )
                signature_name = body.get("signature_name", "")
                sig = servable.signature(signature_name)
                inputs = {}
                for name, value in body["inputs"].items():
                    if name not in sig.inputs:
                        continue  # reported by check() below
                    try:
                        inputs[name] = _array_from_json(value, sig.inputs[name])
                    except ValueError as e:
                        raise RequestError(
                            grpc.StatusCode.INVALID_ARGUMENT, f"input {name!r}: {e}"
                        ) from None
                unknown = {n: np.zeros(0) for n in body["inputs"] if n not in sig.inputs}
                outputs = servable.run(signature_name, {**inputs, **unknown})
            except RequestError as e:
                return self._fail(e)
            self._reply(200, {"outputs": {k: _json_value(v) for k, v in outputs.items()}})

    return Handler


class LocalServer:
    """The gRPC PredictionService (and optionally REST) on 127.0.0.1 over a
    :class:`ModelRepository`. Port 0 picks a free port; see ``grpc_port`` / ``rest_port``.

    Example:

    ```python
    with LocalServer.from_export("exported/", rest=True) as server:
        client = CascadeClient(f"127.0.0.1:{server.grpc_port}")
    ```
    """

    def __init__(
        self,
        repository: ModelRepository,
        host: str = "127.0.0.1",
        grpc_port: int = 0,
        rest_port: int | None = None,
        max_workers: int = 8,
    ):
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        self.repository = repository
        self.host = host
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers))
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            _servicer_class()(repository), self._grpc
        )
        self.grpc_port = self._grpc.add_insecure_port(f"{host}:{grpc_port}")
        if not self.grpc_port:
            raise OSError(f"cannot bind the gRPC port {host}:{grpc_port}")
        self._grpc.start()
        self._http = None
        self.rest_port = None
        if rest_port is not None:
            self._http = ThreadingHTTPServer((host, rest_port), _handler_class(repository))
            self._http.daemon_threads = True
            self.rest_port = self._http.server_address[1]
            threading.Thread(target=self._http.serve_forever, daemon=True).start()

    @classmethod
    def from_export(
        cls, export_dir: str, grpc_port: int = 0, rest: bool = False, rest_port: int = 0, **kw
    ) -> LocalServer:
        return cls(
            ModelRepository.from_export(export_dir), grpc_port=grpc_port,
            rest_port=rest_port if rest else None, **kw,
        )  # fmt: skip

    @property
    def grpc_target(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def rest_url(self) -> str | None:
        return f"http://{self.host}:{self.rest_port}" if self.rest_port else None

    def wait(self):
        self._grpc.wait_for_termination()

    def stop(self, grace: float | None = 0.5):
        self._grpc.stop(grace).wait()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        self.repository.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
