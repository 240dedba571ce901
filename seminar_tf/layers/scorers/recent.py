"""GSU scorer ``"recent"``: the most recent behaviours first (DIN-style window)."""

from __future__ import annotations

import keras
from keras import ops

from seminar_tf.layers.scorers.base import SearchScorer, register_scorer


@register_scorer("recent")
@keras.saving.register_keras_serializable(package="seminar_tf")
class RecentScorer(SearchScorer):
    """``score[b, l] = l``: with the history stored most-recent-last, keeping the top K keeps
    the K most recent real behaviours, whatever the padding side (padding is masked by the
    caller). No weights; not differentiable.

    Shapes: target ``[B, d]``, keys ``[B, L, d]`` -> ``[B, L]``.

    Args:
        **kwargs: ``keras.layers.Layer`` arguments.

    Example:

    ```python
    scores = RecentScorer()(target, keys, mask)  # [B, L]: 0, 1, ..., L - 1
    ```
    """

    def call(self, target, keys, mask, target_parts=None, key_parts=None, key_weights=None):
        positions = ops.cast(ops.arange(ops.shape(keys)[1]), keys.dtype)
        return ops.zeros_like(ops.cast(mask, keys.dtype)) + positions
