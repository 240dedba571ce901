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


def top_k_by_blocks(x, k: int, block: int):
    """``(values [B, k], indices [B, k] int32)``: the exact ``top_k(x, k, sorted=True)`` of
    ``x [B, L]`` (``L`` static), found among the ``k`` blocks of ``block`` consecutive
    positions with the largest maxima (each top-k element lies in one of them: a block left
    out has ``k`` maxima at or ahead of its own). Ties keep the lower position first, as
    ``top_k`` does. At lifelong lengths two small top-k calls (over ``L / block`` maxima,
    then ``k * block`` candidates) cost less than one over ``L``."""
    length = x.shape[1]
    if length is None:
        raise ValueError("top_k_by_blocks needs a static length (x.shape[1]).")
    n_blocks = -(-length // block)
    if n_blocks <= k:
        values, indices = ops.top_k(x, k=k, sorted=True)
        return values, ops.cast(indices, "int32")
    pad = n_blocks * block - length
    # -inf never ties a real value (masked ones are MASK_VALUE), so padding is never kept.
    padded = ops.pad(x, [[0, 0], [0, pad]], constant_values=float("-inf")) if pad else x
    blocks = ops.reshape(padded, (-1, n_blocks, block))
    _, chosen = ops.top_k(ops.max(blocks, axis=-1), k=k, sorted=False)
    # In position order, so the final top_k breaks ties by position as over the whole row.
    chosen = ops.sort(ops.cast(chosen, "int32"), axis=-1)
    candidates = ops.take_along_axis(blocks, ops.expand_dims(chosen, -1), axis=1)
    candidates = ops.reshape(candidates, (-1, k * block))
    positions = ops.expand_dims(chosen * block, -1) + ops.arange(block, dtype="int32")
    positions = ops.reshape(positions, (-1, k * block))
    values, where = ops.top_k(candidates, k=k, sorted=True)
    return values, ops.take_along_axis(positions, ops.cast(where, "int32"), axis=1)
