"""Example requests for the serving signatures, and the TF Serving warmup file.

``assets.extra/tf_serving_warmup_requests`` is a TFRecord file of ``PredictionLog`` records
(``tensorflow_serving.apis``); TF Serving replays them when it loads a version, before the
version takes traffic. A file it cannot parse is silently skipped by the server, so
:func:`read_warmup` parses it back the same way and the tests replay it.
"""

from __future__ import annotations

import numpy as np

from seminar_tf import spec

WARMUP_FILE = "tf_serving_warmup_requests"
_UNKNOWN = "\x00unknown"  # a value no vocabulary holds: exercises the OOV bucket


def _strings(values: list, rng, shape) -> np.ndarray:
    pool = list(values[:50]) + [_UNKNOWN]
    return np.asarray(pool, dtype=object)[rng.integers(0, len(pool), size=shape)]


def _given_attributes(values: np.ndarray, rng, seed: int) -> np.ndarray:
    """``values`` ``[B, A]`` kept in a random non-empty prefix of every other row (which
    rows alternates with ``seed``) and padding elsewhere: requests both with and without
    target attributes."""
    batch, width = values.shape
    given = (np.arange(batch) + seed) % 2 == 1
    count = rng.integers(1, max(width, 1) + 1, size=batch)
    keep = given[:, None] & (np.arange(width)[None, :] < count[:, None])
    empty = "" if values.dtype == object else 0
    return np.where(keep, values, empty).astype(values.dtype)


def example_inputs(
    signature: spec.SignatureSpec,
    sizes: dict,
    vocab_values: dict,
    vocab_sizes: dict,
    batch_size: int,
    length: int,
    seed: int = 0,
) -> dict:
    """A valid request ``{name: numpy array}`` for ``signature``.

    Histories have ``length`` columns with a padding slot first and a random number of real
    behaviours, most recent last; about one behaviour in two has a query, about one request
    in two a user (``user_id`` / ``user``: the others "" / 0); every other target has
    attributes (``target_attributes``), the others none. Raw signatures draw
    strings from ``vocab_values`` (``{kind: [values]}``) plus one unknown value; encoded ones
    draw ids below ``vocab_sizes`` (``{kind: size}``). Kept behaviours (ranking inputs) fill a
    random prefix of the ``K`` slots.
    """
    rng = np.random.default_rng(seed)
    k = sizes["K"]
    shapes = {**sizes, "L": length}
    real_hist = rng.integers(0, max(length, 1), size=batch_size) if length else np.zeros(batch_size)
    real_kept = rng.integers(0, k + 1, size=batch_size)
    out = {}
    for f in signature.inputs:
        shape = (batch_size,) + spec.resolve_serving_shape(f.shape, shapes)
        kind = spec.vocab_kind(f.name)
        if f.dtype == "string":
            values = _strings(vocab_values.get(kind, []), rng, shape)
            if kind in ("query", "user"):  # "" = no query / unknown user
                values = np.where(rng.random(shape) < 0.5, values, "")
            out[f.name] = values.astype(object)
        elif kind is not None:
            size = max(vocab_sizes.get(kind, 0), spec.NUM_RESERVED_IDS)
            ids = rng.integers(spec.OOV_ID, size, size=shape)
            if kind not in ("item", "attribute") and not f.name.endswith("_tokens"):
                ids = np.where(rng.random(shape) < 0.5, ids, 0)
            out[f.name] = ids.astype(np.int64)
        elif f.dtype == "float32":
            out[f.name] = rng.normal(size=shape).astype(np.float32)
        else:
            out[f.name] = rng.integers(0, 2, size=shape).astype(f.dtype)
        if kind == "attribute":
            out[f.name] = _given_attributes(out[f.name], rng, seed)
    # Padding: a history is real in its last positions only; kept slots in a prefix.
    for prefix, real, width in (("hist", real_hist, length), ("kept", real_kept, k)):
        if f"{prefix}_item" not in out or width == 0:
            continue
        cols = np.arange(width)[None, :]
        present = cols >= width - real[:, None] if prefix == "hist" else cols < real[:, None]
        for name in [n for n in out if n.startswith(prefix + "_")]:
            value = out[name]
            m = present.reshape(present.shape + (1,) * (value.ndim - 2))
            empty = "" if value.dtype == object else 0
            out[name] = np.where(m, value, empty).astype(value.dtype)
    return out


def write_warmup(path: str, model_name: str, requests: list) -> int:
    """Writes ``[(signature_name, {name: array})]`` as PredictionLog records; returns the
    count."""
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    with tf.io.TFRecordWriter(path) as writer:
        for signature_name, inputs in requests:
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature_name)
            )
            for name, value in inputs.items():
                request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())
    return len(requests)


def read_warmup(path: str) -> list:
    """The warmup file's requests as ``[(model_name, signature_name, {name: array})]``;
    raises on a record that is not a PredictionLog with a PredictRequest."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    out = []
    for record in tf.data.TFRecordDataset(path):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        if log.WhichOneof("log_type") != "predict_log":
            raise ValueError(f"{path}: a warmup record is not a predict_log")
        request = log.predict_log.request
        inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        out.append((request.model_spec.name, request.model_spec.signature_name, inputs))
    return out
