"""TF Serving's API protos for the client, without TensorFlow's start-up cost.

``tensorflow_serving.apis.*_pb2`` import ``tensorflow.core.framework.*_pb2`` (and
``tensorflow.core.protobuf`` / ``tensorflow.compiler.xla.tsl.protobuf``), and importing any
``tensorflow.*`` module first executes ``tensorflow/__init__.py``: several seconds, Keras
included, for a client that only needs a few generated protobuf modules.

:func:`serving_apis` loads the same generated modules (the installed tensorflow-serving-api and
tensorflow files, nothing re-declared) with ``tensorflow`` registered for the duration of the
import as a bare package over the installed ``tensorflow`` directory, so its ``__init__`` does
not run (the packages below it are empty ``__init__`` files). Afterwards every ``tensorflow*``
entry the import added to ``sys.modules`` is removed again: a later ``import tensorflow`` in the
same process runs normally (the descriptors it registers again are identical, which protobuf
accepts, and the message classes are shared). Where TensorFlow is already imported, the plain
import is used.

:func:`make_tensor_proto` / :func:`make_ndarray` do what ``tf.make_tensor_proto`` and
``tf.make_ndarray`` do for the dtypes the signatures use (numbers, bools, strings).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import threading
import types

import numpy as np

_LOCK = threading.Lock()
_APIS = None  # the modules, once loaded (their tensorflow.* names are gone from sys.modules)
_MODULES = (
    "tensorflow_serving.apis.predict_pb2",
    "tensorflow_serving.apis.get_model_metadata_pb2",
    "tensorflow_serving.apis.prediction_service_pb2_grpc",
    "tensorflow.core.framework.tensor_pb2",
    "tensorflow.core.framework.types_pb2",
)


def _import_all() -> types.SimpleNamespace:
    mods = {name.rsplit(".", 1)[1]: importlib.import_module(name) for name in _MODULES}
    return types.SimpleNamespace(**mods)


def serving_apis() -> types.SimpleNamespace:
    """``predict_pb2``, ``get_model_metadata_pb2``, ``prediction_service_pb2_grpc``,
    ``tensor_pb2`` and ``types_pb2`` (as attributes), imported without running
    ``tensorflow/__init__.py`` where TensorFlow is not imported yet."""
    global _APIS
    with _LOCK:
        if _APIS is None:
            _APIS = _load()
        return _APIS


def _load() -> types.SimpleNamespace:
    if "tensorflow" in sys.modules:
        return _import_all()
    spec = importlib.machinery.PathFinder.find_spec("tensorflow")
    if spec is None or not spec.submodule_search_locations:
        return _import_all()  # not a plain install: take the ordinary way
    bare = types.ModuleType("tensorflow", "bare stand-in while loading generated protos")
    bare.__path__ = list(spec.submodule_search_locations)
    bare.__spec__ = importlib.machinery.ModuleSpec("tensorflow", None, is_package=True)
    bare.__spec__.submodule_search_locations = bare.__path__
    before = set(sys.modules)
    sys.modules["tensorflow"] = bare
    try:
        return _import_all()
    finally:
        for name in list(sys.modules):
            if name not in before and (name == "tensorflow" or name.startswith("tensorflow.")):
                del sys.modules[name]


# DataType enum values (tensorflow/core/framework/types.proto) <-> numpy.
_NUMPY = {
    1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8,
    9: np.int64, 10: np.bool_, 17: np.uint16, 19: np.float16, 22: np.uint32, 23: np.uint64,
}  # fmt: skip
_DTYPE = {np.dtype(t): code for code, t in _NUMPY.items()}
DT_STRING = 7
_VALUE_FIELD = {
    1: "float_val", 2: "double_val", 3: "int_val", 4: "int_val", 5: "int_val", 6: "int_val",
    9: "int64_val", 10: "bool_val", 17: "int_val", 19: "half_val", 22: "uint32_val",
    23: "uint64_val",
}  # fmt: skip


def make_tensor_proto(value, tensor_pb2=None):
    """A ``TensorProto`` of ``value`` (a numpy array or nested lists): numbers and bools as
    little-endian ``tensor_content``, strings (bytes, str or object arrays) as
    ``string_val``, as ``tf.make_tensor_proto`` writes them."""
    tensor_pb2 = tensor_pb2 or serving_apis().tensor_pb2
    array = np.asarray(value)
    proto = tensor_pb2.TensorProto()
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    if array.dtype == object or array.dtype.kind in "SU":
        proto.dtype = DT_STRING
        proto.string_val.extend(
            v if isinstance(v, bytes) else str(v).encode("utf-8") for v in array.reshape(-1)
        )
        return proto
    code = _DTYPE.get(array.dtype)
    if code is None:
        raise TypeError(f"no TensorProto dtype for numpy {array.dtype}")
    proto.dtype = code
    proto.tensor_content = np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
    return proto


def make_ndarray(proto) -> np.ndarray:
    """The numpy array of a ``TensorProto`` (``tensor_content`` or the typed ``*_val``
    fields, a short list repeating its last value as TensorFlow reads it); strings as an
    object array of bytes."""
    shape = tuple(d.size for d in proto.tensor_shape.dim)
    size = int(np.prod(shape, dtype=np.int64))
    if proto.dtype == DT_STRING:
        values = list(proto.string_val)
        if len(values) < size:
            values += [values[-1] if values else b""] * (size - len(values))
        out = np.empty(size, dtype=object)
        out[:] = values[:size]
        return out.reshape(shape)
    if proto.dtype not in _NUMPY:
        raise TypeError(f"TensorProto dtype {proto.dtype} is not supported by this client")
    dtype = np.dtype(_NUMPY[proto.dtype])
    if proto.tensor_content:
        flat = np.frombuffer(proto.tensor_content, dtype.newbyteorder("<")).astype(dtype)
        return flat.reshape(shape)
    field = getattr(proto, _VALUE_FIELD[proto.dtype])
    if proto.dtype == 19:  # half_val holds the float16 bit patterns
        values = np.array(field, np.uint16).view(np.float16)
    else:
        values = np.array(field, dtype)
    if values.size == 0:
        return np.zeros(shape, dtype)
    if values.size < size:
        values = np.pad(values, (0, size - values.size), mode="edge")
    return values[:size].reshape(shape)
