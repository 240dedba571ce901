"""Small masked tensor helpers shared by the layers, losses and models (``keras.ops`` only)."""

from __future__ import annotations

from keras import ops

# Large negative logit for masked positions: finite, so a row with every position masked
# gives a uniform softmax (then multiplied by the zero mask) instead of NaN.
MASK_VALUE = -1e9


def as_float_mask(mask, dtype="float32"):
    """``mask`` (bool or 0/1 numbers) as a float tensor of ``dtype``."""
    return ops.cast(mask, dtype)


def masked_mean(values, mask, axis):
    """Mean of ``values`` over ``axis`` counting only positions where ``mask`` is true.

    ``values`` has one more (trailing feature) dimension than ``mask``; ``axis`` indexes
    ``mask``. Rows with no valid position give zeros.
    """
    if axis < 0:
        axis += len(mask.shape)
    m = ops.cast(mask, values.dtype)
    total = ops.sum(values * ops.expand_dims(m, -1), axis=axis)
    count = ops.expand_dims(ops.sum(m, axis=axis), -1)
    return total / ops.maximum(count, 1.0)


def masked_softmax(logits, mask, axis=-1):
    """Softmax over ``axis`` restricted to ``mask``; all-masked rows give zeros, never NaN."""
    m = ops.cast(mask, logits.dtype)
    logits = ops.where(ops.cast(mask, "bool"), logits, ops.cast(MASK_VALUE, logits.dtype))
    logits = logits - ops.stop_gradient(ops.max(logits, axis=axis, keepdims=True))
    weights = ops.exp(logits) * m
    return weights / ops.maximum(ops.sum(weights, axis=axis, keepdims=True), 1e-12)


def l2_normalize(x, axis=-1, epsilon=1e-12):
    """``x / max(||x||, sqrt(epsilon))`` along ``axis`` (zero vectors stay zero)."""
    sq = ops.sum(ops.square(x), axis=axis, keepdims=True)
    return x * ops.rsqrt(ops.maximum(sq, epsilon))
