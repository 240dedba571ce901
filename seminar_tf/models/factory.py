"""Builds SEMINAR models from a preprocessing output's :class:`spec.DataSpec` and a config."""

from __future__ import annotations

import inspect

from seminar_tf import spec
from seminar_tf.models.psu import PSU
from seminar_tf.models.seminar import SeminarCTR

# Baselines as configurations of SeminarCTR (``{"preset": name, ...}`` in the config).
# Every preset with a history also has the short-term branch (the last SHORT_TERM_LEN
# behaviours, clicks and non-clicks, pooled), as production lifelong models run beside the
# long-term search; the baselines get it too, so a comparison isolates the long-term search.
SHORT_TERM_LEN = 20
PRESETS = {
    "seminar": {"search": "exact", "short_term_len": SHORT_TERM_LEN},
    "twin": {"search": "exact", "short_term_len": SHORT_TERM_LEN},
    "sim": {"search": "soft", "short_term_len": SHORT_TERM_LEN},
    "eta": {
        "search": "simhash",
        "search_config": {"num_bits": 16},
        "short_term_len": SHORT_TERM_LEN,
    },
    "din": {"search": "recent", "short_term_len": SHORT_TERM_LEN},
    "full_attention": {"search": "all", "short_term_len": SHORT_TERM_LEN},
    "dnn": {"use_history": False},
}

_DATA_ARGS = (
    "num_items",
    "num_attributes",
    "num_query_tokens",
    "num_queries",
    "max_attributes",
    "text_dim",
    "image_dim",
    "query_text_dim",
    "max_query_tokens",
)


# Data arguments of SeminarCTR only (the PSU and the pair embedding have no user input): the
# user vocabulary and the sizes of the optional users table (0 without one).
_CTR_DATA_ARGS = ("num_users", "num_user_attributes", "max_user_attributes", "user_embedding_dim")


def data_kwargs(data_spec: spec.DataSpec, users: bool = False) -> dict:
    """The constructor arguments that come from the data: vocabulary sizes and dimensions
    (with ``users``, also ``num_users`` and the users-table sizes, which only
    :class:`SeminarCTR` takes)."""
    names = _DATA_ARGS + (_CTR_DATA_ARGS if users else ())
    return {name: getattr(data_spec, name) for name in names}


def _model_kwargs(cls, data_spec, config, what):
    config = dict(config or {})
    preset = config.pop("preset", None)
    if preset is not None:
        if cls is not SeminarCTR:
            raise ValueError(f"`preset` applies to SeminarCTR only, not {what}.")
        if preset not in PRESETS:
            raise ValueError(f"Unknown `preset` {preset!r}; known: {sorted(PRESETS)}.")
        config = {**PRESETS[preset], **config}
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "tables", "kwargs"}
    allowed.add("name")
    data_keys = sorted(set(config) & set(_DATA_ARGS + _CTR_DATA_ARGS))
    if data_keys:
        raise ValueError(f"config keys {data_keys} come from the DataSpec; remove them.")
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(f"Unknown {what} config key(s) {unknown}; allowed: {sorted(allowed)}.")
    return {**data_kwargs(data_spec, users=cls is SeminarCTR), **config}


def build_model(
    data_spec: spec.DataSpec, config: dict | None = None, tables: dict | None = None
) -> SeminarCTR:
    """A built, uncompiled :class:`SeminarCTR` for ``data_spec`` (create it inside a
    ``tf.distribute`` strategy scope when training with one).

    Args:
        data_spec: sizes of the preprocessing output (``DataSpec.load(data_dir)``).
        config: SeminarCTR constructor arguments except the data sizes (e.g.
            ``{"search": "exact", "top_k": 50, "dropout": 0.5}``), optionally with
            ``"preset"``: one of ``PRESETS`` (``"seminar"``, ``"twin"``, ``"sim"``, ``"eta"``,
            ``"din"``, ``"full_attention"``, ``"dnn"``), overridden by the other keys.
        tables: the side tables (``np.load(tables.npz)`` as a dict, the users table's
            included), or None to set later.

    Every preset gets the user tower (unless ``"use_user_features": false``), and with it
    the users table's attributes and vector when the data has them.
    """
    model = SeminarCTR(**_model_kwargs(SeminarCTR, data_spec, config, "SeminarCTR"), tables=tables)
    model.build()
    return model


def build_psu(
    data_spec: spec.DataSpec, config: dict | None = None, tables: dict | None = None
) -> PSU:
    """A built, uncompiled :class:`PSU` for ``data_spec``; ``config`` holds PSU constructor
    arguments except the data sizes (e.g. ``{"embedding_dim": 64, "align_weight": 0.1}``)."""
    model = PSU(**_model_kwargs(PSU, data_spec, config, "PSU"), tables=tables)
    model.build()
    return model
