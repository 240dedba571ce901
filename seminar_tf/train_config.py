"""Training settings, validated on construction without importing Keras or TensorFlow.

:class:`TrainConfig` checks every field's type and range when it is built, so a bad value in a
``--config`` file fails in milliseconds, naming the field, instead of minutes later inside
``model.fit``. :func:`check_model_config` checks the ``model`` settings against the model
constructors' arguments (read from the source of ``seminar_tf.models``, which imports Keras)
before anything is built: unknown keys are refused with the closest known name, and values of
the wrong type (a string for an int, a number for a list) are refused.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import importlib.util
import json
import math
import numbers
import os

from seminar_tf.spec import DEFAULT_HISTORY, HISTORY_MODES

# seminar quantize's defaults: what benchmarks/pq_recall.py measured best at <= 32 bytes a
# behaviour (docs/quantization.md).
PQ_DEFAULTS = {
    "layout": "fused",
    "rotation": True,
    "num_subvectors": 32,
    "num_centroids": 256,
    "shortlist": 2,
    "score_aware": True,
}

DISTRIBUTE = ("none", "data", "mirrored")
LR_SCALING = ("sqrt", "linear", "none")
READERS = ("auto", "tf.data", "numpy")
COMPACT_INPUTS = ("auto", "on", "off")


class ConfigError(ValueError):
    """A config field with a bad value; the message names the field and the value."""


def closest(name: str, known) -> str:
    """`` (did you mean X?)`` for the known name closest to ``name``, or ``""``."""
    match = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _is_int(value) -> bool:
    return (
        isinstance(value, numbers.Integral)
        and not isinstance(value, bool)
        and (type(value).__name__ != "bool_")
    )


def _is_real(value) -> bool:
    return _is_int(value) or (isinstance(value, numbers.Real) and not isinstance(value, bool))


def _int_field(name: str, value, minimum: int, optional: bool = False):
    if value is None and optional:
        return None
    if not _is_int(value):
        wanted = "an integer" + (" or null" if optional else "")
        raise ConfigError(f"{name} must be {wanted} >= {minimum}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


@dataclasses.dataclass
class TrainConfig:
    """Training settings; ``model`` holds the model constructor arguments (see
    ``seminar_tf.models.factory``), e.g. ``{"preset": "seminar", "top_k": 50}``.

    Every field is checked on construction (:class:`ConfigError`, a ``ValueError``, names the
    field and the bad value); integers given as numpy integers are stored as ``int``."""

    batch_size: int = 256
    # An epoch cap: training stops early on validation AUC (patience epochs without a gain)
    # and keeps the best epoch's weights, so the cap only bounds the time.
    epochs: int = 20
    learning_rate: float = 1e-3
    # Decoupled (AdamW-style) weight decay of the Adam optimizer: each step scales every
    # trainable variable by (1 - learning_rate * weight_decay); 0: plain Adam.
    weight_decay: float = 0.0
    seed: int = 0
    max_len: int | None = None  # None: the preprocessing max_len
    history: str = DEFAULT_HISTORY  # CTR history window (spec.HISTORY_MODES)
    patience: int = 2
    steps_per_epoch: int | None = None  # None: one pass over the split
    validation_steps: int | None = None
    shuffle_buffer: int = 20_000
    # "data": one replica per local device through the backend's engine (see
    # seminar_tf.distribute); batch_size is then per device and the learning rate is scaled
    # by lr_scaling for the global batch. "mirrored": the TensorFlow-only spelling of "data".
    distribute: str = "none"
    lr_scaling: str = "sqrt"
    bucket_by_length: bool = True  # batches of similar history length, trimmed (see dataset)
    # Input pipeline: "tf.data", "numpy" (seminar_tf.data.numpy_reader: no TensorFlow needed,
    # the same windows) or "auto" (tf.data where TensorFlow imports, else numpy).
    reader: str = "auto"
    # Compact inputs (spec.COMPACT_DROPPED): int32 ids and query ids without per-behaviour
    # tokens, which the model's query_tokens table gives. "auto": where that loses nothing
    # (spec.compact_inputs_exact); "on": the same, an error where it would lose tokens; "off".
    compact_inputs: str = "auto"
    # With --pretrained, also copy the PSU's attention to the GSU scorer. Off by default: the
    # pretrained pair embedding alone validated better on MovieLens (SEMINAR, history "all",
    # 3 seeds, H200: validation AUC 0.7525 +-0.005 against 0.7494 +-0.001 with the attention
    # restored; benchmarks/results/quality_arrays.json).
    restore_attention: bool = False
    model: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_file(cls, path: str | None, **overrides) -> TrainConfig:
        """The config of JSON file ``path`` (all fields optional), with the ``overrides``
        that are not None on top. Raises ``OSError`` / ``json.JSONDecodeError`` for an
        unreadable file and :class:`ConfigError` for an unknown key or a bad value."""
        data = {}
        if path:
            with open(path) as f:
                data = json.load(f)
            if not isinstance(data, dict):
                raise ConfigError(
                    f"{path}: expects a JSON object of TrainConfig fields, got "
                    f"{type(data).__name__}"
                )
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise ConfigError(
                    f"{path}: unknown config key {key!r}{closest(str(key), names)}; "
                    f"allowed: {', '.join(names)}"
                )
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}" if path else str(e)) from None

    def __post_init__(self):
        self.batch_size = _int_field("batch_size", self.batch_size, 1)
        self.epochs = _int_field("epochs", self.epochs, 1)
        self.seed = _int_field("seed", self.seed, 0)
        if self.seed >= 2**32:
            raise ConfigError(f"seed must be < 2**32, got {self.seed!r}")
        self.max_len = _int_field("max_len", self.max_len, 1, optional=True)
        self.patience = _int_field("patience", self.patience, 0)
        self.steps_per_epoch = _int_field("steps_per_epoch", self.steps_per_epoch, 1, True)
        self.validation_steps = _int_field("validation_steps", self.validation_steps, 1, True)
        self.shuffle_buffer = _int_field("shuffle_buffer", self.shuffle_buffer, 1)
        lr = self.learning_rate
        if not _is_real(lr) or not math.isfinite(lr) or lr <= 0:
            raise ConfigError(f"learning_rate must be a number > 0, got {lr!r}")
        self.learning_rate = float(lr)
        wd = self.weight_decay
        if not _is_real(wd) or not math.isfinite(wd) or wd < 0:
            raise ConfigError(f"weight_decay must be a number >= 0, got {wd!r}")
        self.weight_decay = float(wd)
        for name, allowed in (
            ("history", HISTORY_MODES), ("distribute", DISTRIBUTE), ("lr_scaling", LR_SCALING),
            ("reader", READERS), ("compact_inputs", COMPACT_INPUTS),
        ):  # fmt: skip
            value = getattr(self, name)
            if value not in allowed:
                hint = closest(value, allowed) if isinstance(value, str) else ""
                raise ConfigError(
                    f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}{hint}"
                )
        for name in ("bucket_by_length", "restore_attention"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be true or false, got {value!r}")
        if not isinstance(self.model, dict) or not all(isinstance(k, str) for k in self.model):
            raise ConfigError(f"model must be an object of model settings, got {self.model!r}")


# ------------------------------------------------------------------------- model settings
_MODEL_CLASSES = {  # kind -> (module, class)
    "ctr": ("seminar_tf.models.seminar", "SeminarCTR"),
    "psu": ("seminar_tf.models.psu", "PSU"),
}
_NOT_SETTINGS = {"self", "tables", "kwargs"}
_TYPES = {
    "int": (_is_int, "an integer"),
    "float": (_is_real, "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "dict": (lambda v: isinstance(v, dict), "an object"),
    "list": (lambda v: isinstance(v, (list, tuple)), "a list"),
    "tuple": (lambda v: isinstance(v, (list, tuple)), "a list"),
    "None": (lambda v: v is None, "null"),
}


def _module_ast(module: str) -> ast.Module | None:
    spec = importlib.util.find_spec(module.rsplit(".", 1)[0])  # the package, not the module
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], module.rsplit(".", 1)[1] + ".py")
    try:
        with open(path, encoding="utf-8") as f:
            return ast.parse(f.read(), path)
    except (OSError, SyntaxError):
        return None


@functools.cache
def model_arguments(kind: str) -> dict | None:
    """``{name: annotation string or None}``: the settings the ``kind`` model's constructor
    (``"ctr"``: SeminarCTR, ``"psu"``: PSU) takes, data sizes and ``tables`` excluded, read
    from its source without importing it; None where the source cannot be read."""
    module, cls_name = _MODEL_CLASSES[kind]
    tree = _module_ast(module)
    if tree is None:
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    args = item.args.args + item.args.kwonlyargs
                    out = {
                        a.arg: ast.unparse(a.annotation) if a.annotation else None
                        for a in args
                        if a.arg not in _NOT_SETTINGS
                    }
                    out["name"] = "str"  # a keras.Model keyword
                    return out
    return None


@functools.cache
def _factory_constants() -> tuple:
    """``(data argument names, preset names)`` from ``seminar_tf/models/factory.py``."""
    data_args, presets = (), ()
    tree = _module_ast("seminar_tf.models.factory")
    for node in tree.body if tree else ():
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = getattr(node.targets[0], "id", None)
            if target == "PRESETS" and isinstance(node.value, ast.Dict):
                # the names only: the settings may refer to module constants
                presets = tuple(ast.literal_eval(k) for k in node.value.keys)
                continue
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                continue
            if target == "_DATA_ARGS":
                data_args = tuple(value)
    return data_args, presets


def _type_check(annotation: str | None, value) -> str | None:
    """What ``value`` should be when it does not match ``annotation`` (e.g. ``"int | None"``),
    else None; None as well for annotations this check does not know."""
    if not annotation:
        return None
    parts = [p.strip() for p in annotation.split("|")]
    if any(p not in _TYPES for p in parts):
        return None
    if any(_TYPES[p][0](value) for p in parts):
        return None
    return " or ".join(dict.fromkeys(_TYPES[p][1] for p in parts))


def check_model_config(model: dict, kind: str) -> None:
    """Checks the ``model`` settings of a ``kind`` (``"ctr"`` or ``"psu"``) model against its
    constructor's arguments before anything is built: raises :class:`ConfigError` for an
    unknown key (with the closest known one), a data size (those come from the data), a
    ``preset`` that does not exist (or on a PSU) or a value of the wrong type. Ranges are left
    to the constructor."""
    what = "SeminarCTR" if kind == "ctr" else "PSU"
    allowed = model_arguments(kind)
    if not isinstance(model, dict):
        raise ConfigError(f"model must be an object of {what} settings, got {model!r}")
    if allowed is None:  # the source is not readable (e.g. a zipped install): build checks it
        return
    data_args, presets = _factory_constants()
    for key, value in model.items():
        if key == "preset":
            if kind != "ctr":
                raise ConfigError("model.preset applies to `seminar train` (SeminarCTR) only")
            if value not in presets:
                hint = closest(value, presets) if isinstance(value, str) else ""
                raise ConfigError(
                    f"model.preset must be one of {', '.join(presets)}, got {value!r}{hint}"
                )
            continue
        if key in data_args:
            raise ConfigError(f"model.{key} comes from the preprocessing output; remove it")
        if key not in allowed:
            known = [k for k in allowed if k not in data_args] + (["preset"] * (kind == "ctr"))
            raise ConfigError(
                f"unknown {what} setting model.{key}{closest(key, known)}; "
                f"known: {', '.join(sorted(known))}"
            )
        wanted = _type_check(allowed[key], value)
        if wanted:
            raise ConfigError(f"model.{key} must be {wanted}, got {value!r}")
