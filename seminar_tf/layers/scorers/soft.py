"""GSU scorer ``"soft"``: inner product of target and behaviour (SIM soft search)."""

from __future__ import annotations

import keras
from keras import ops

from seminar_tf.layers.scorers.base import SearchScorer, register_scorer


@register_scorer("soft")
@keras.saving.register_keras_serializable(package="seminar_tf")
class SoftScorer(SearchScorer):
    """``score[b, l] = target[b] . keys[b, l]`` (SIM's soft search). No weights.

    Shapes: target ``[B, d]``, keys ``[B, L, d]`` -> ``[B, L]``.

    Args:
        **kwargs: ``keras.layers.Layer`` arguments.

    Example:

    ```python
    scores = SoftScorer()(target, keys, mask)  # [B, L]
    ```
    """

    differentiable = True

    def call(self, target, keys, mask, target_parts=None, key_parts=None, key_weights=None):
        return ops.einsum("bd,bld->bl", target, keys)

    def score_many(
        self, targets, keys, mask, target_parts=None, key_parts=None, key_weights=None,
        training=None,
    ):  # fmt: skip
        return ops.einsum("bcd,bld->bcl", targets, keys)
