"""The first-stage (GSU) scorer interface and its registry of scorers by name."""

from __future__ import annotations

import keras
from keras import ops

_SCORERS: dict[str, type] = {}


def register_scorer(name: str):
    """Class decorator registering a :class:`SearchScorer` subclass under ``name``.

    ``TopKSearch(scorer=name, scorer_config={...})`` then builds ``cls(**scorer_config)``.
    """

    def decorator(cls):
        if not (isinstance(cls, type) and issubclass(cls, SearchScorer)):
            raise TypeError(f"{cls!r} is not a SearchScorer subclass.")
        if name in _SCORERS and _SCORERS[name] is not cls:
            raise ValueError(f"A scorer named {name!r} is already registered.")
        _SCORERS[name] = cls
        cls.scorer_name = name
        return cls

    return decorator


def get_scorer_class(name: str) -> type:
    """The scorer class registered under ``name``; ``ValueError`` listing the known names."""
    if name not in _SCORERS:
        raise ValueError(f"Unknown search scorer {name!r}; registered: {sorted(_SCORERS)}.")
    return _SCORERS[name]


def available_scorers() -> tuple:
    """Names of the registered scorers."""
    return tuple(sorted(_SCORERS))


@keras.saving.register_keras_serializable(package="seminar_tf")
class SearchScorer(keras.layers.Layer):
    """Base of the first-stage scorers: one relevance score per behaviour.

    ``call(target [B, d], keys [B, L, d], mask [B, L], target_parts=None, key_parts=None,
    key_weights=None)`` returns scores ``[B, L]`` (larger = keep first); values at masked
    positions are ignored by the caller. ``target_parts`` / ``key_parts`` are optional
    ``{modality: vectors}`` dicts (``[B, d]`` / ``[B, L, d]``) and ``key_weights``
    ``{modality: [B, L]}`` the fusion weights with ``keys = sum_m key_weights[m] *
    key_parts[m]``, for scorers that work per modality (product quantization, ``"pq"``);
    ``key_parts`` may also carry inputs a scorer declares in ``serving_features`` (stored
    codes). The other built-in scorers use the fused vectors only.

    Class attribute ``serving_features``: ``spec.FeatureSpec``s of extra retrieval inputs
    (per-behaviour, shape starting with ``"L"``) the scorer reads from ``key_parts``; an
    instance may resolve their other symbols in ``serving_sizes``.

    Class attribute ``differentiable``: whether the scores carry a useful gradient to the
    vectors and the scorer's weights (a model can then feed them to its second stage).

    Args:
        **kwargs: ``keras.layers.Layer`` arguments.
    """

    differentiable = False
    scorer_name = None
    serving_features = ()
    serving_sizes = {}

    def build(self, target_shape, keys_shape=None, mask_shape=None):
        self.built = True

    def call(self, target, keys, mask, target_parts=None, key_parts=None, key_weights=None):
        raise NotImplementedError

    def score_many(
        self, targets, keys, mask, target_parts=None, key_parts=None, key_weights=None,
        training=None,
    ):  # fmt: skip
        """Scores ``[B, C, L]`` of ``C`` targets per history: ``targets [B, C, d]`` (and
        ``target_parts`` ``{m: [B, C, d]}``) against one history ``keys [B, L, d]`` each,
        equal to ``call`` on each (target, history) row. This default repeats the history
        per target; a scorer whose keys' cost does not depend on the target overrides it
        to transform the history once."""
        shape = ops.shape(targets)
        b, c = shape[0], shape[1]

        def flat(x):
            return ops.reshape(x, (-1,) + tuple(x.shape[2:]))

        def rep(x):
            return ops.repeat(x, c, axis=0)

        kwargs = {"target_parts": None, "key_parts": None}
        if target_parts is not None:
            kwargs["target_parts"] = {m: flat(v) for m, v in target_parts.items()}
        if key_parts is not None:
            kwargs["key_parts"] = {m: rep(v) for m, v in key_parts.items()}
        if key_weights is not None:
            kwargs["key_weights"] = {m: rep(v) for m, v in key_weights.items()}
        scores = self(flat(targets), rep(keys), rep(mask), training=training, **kwargs)
        return ops.reshape(scores, (b, c, -1))
