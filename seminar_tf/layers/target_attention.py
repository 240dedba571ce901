"""Multi-head target attention: one target vector attends over a masked sequence."""

from __future__ import annotations

import math

import keras
from keras import ops

from seminar_tf.layers import _ops


@keras.saving.register_keras_serializable(package="seminar_tf")
class HeadIdentity(keras.initializers.Initializer):
    """Initializer of a ``[d_in, heads, head_dim]`` kernel as the identity ``eye(d_in,
    heads * head_dim)`` split into heads, so that at initialisation the per-head logits sum
    to the plain inner product of target and key (scaled by ``1 / sqrt(head_dim)``)."""

    def __call__(self, shape, dtype=None):
        d_in, heads, head_dim = shape
        eye = ops.eye(d_in, heads * head_dim, dtype=dtype or "float32")
        return ops.reshape(eye, shape)

    def get_config(self):
        return {}


@keras.saving.register_keras_serializable(package="seminar_tf")
class MultiHeadTargetAttention(keras.layers.Layer):
    """Multi-head attention of a target vector over a sequence of keys, with a mask.

    For a target ``t`` ``[B, d_t]``, keys ``x`` ``[B, L, d_k]`` and a mask ``[B, L]``
    (true = real behaviour), head ``h`` computes

    ``s_h[l] = (t W_q^h) . (x_l W_k^h) / sqrt(head_dim)`` (plus an optional score bias),
    ``a_h = softmax over the unmasked l of s_h``, ``o_h = sum_l a_h[l] x_l W_v^h``,

    and the output is ``concat_h(o_h) W_o + b_o`` ``[B, output_dim]``. Masked positions
    never influence the result; a row with no unmasked position gives zeros (never NaN).

    ``call`` returns ``(pooled [B, output_dim], scores [B, H, L])`` where ``scores`` are the
    scaled logits ``s_h`` (without the score bias) with 0 at masked positions. With
    ``scores_only=True`` only the query and key projections exist and ``call`` returns just
    the scores (this is how a first-stage search unit uses the same attention structure).

    Args:
        num_heads: number of heads ``H``.
        head_dim: size of each head's query/key/value; default ``d_k // num_heads``.
        output_dim: size of the pooled output; default ``d_k``.
        use_bias: whether the projections have biases.
        dropout: dropout rate on the attention weights (training only).
        scores_only: build only the query/key projections and return only the scores.
        kernel_initializer: initializer of the projection kernels.
        **kwargs: other ``keras.layers.Layer`` arguments.

    Example:

    ```python
    attention = MultiHeadTargetAttention(num_heads=4)
    pooled, scores = attention(target, keys, mask)  # [B, 64], [B, 4, L]
    ```
    """

    def __init__(
        self,
        num_heads: int = 4,
        head_dim: int | None = None,
        output_dim: int | None = None,
        use_bias: bool = True,
        dropout: float = 0.0,
        scores_only: bool = False,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"`num_heads` must be a positive integer, got {num_heads!r}.")
        if head_dim is not None and (not isinstance(head_dim, int) or head_dim < 1):
            raise ValueError(f"`head_dim` must be a positive integer or None, got {head_dim!r}.")
        if output_dim is not None and (not isinstance(output_dim, int) or output_dim < 1):
            raise ValueError(
                f"`output_dim` must be a positive integer or None, got {output_dim!r}."
            )
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}.")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.output_dim = output_dim
        self.use_bias = bool(use_bias)
        self.dropout = float(dropout)
        self.scores_only = bool(scores_only)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.dropout_layer = keras.layers.Dropout(self.dropout) if self.dropout else None

    def build(self, target_shape, keys_shape=None, mask_shape=None):
        if self.built:
            return
        keys_shape = target_shape if keys_shape is None else keys_shape
        d_t, d_k = int(target_shape[-1]), int(keys_shape[-1])
        if self.head_dim is None and d_k % self.num_heads:
            raise ValueError(
                f"Key size {d_k} is not divisible by `num_heads`={self.num_heads}; pass `head_dim`."
            )
        self._head_dim = self.head_dim or d_k // self.num_heads
        self._output_dim = self.output_dim or d_k
        h, e = self.num_heads, self._head_dim

        def kernel(name, shape):
            return self.add_weight(name=name, shape=shape, initializer=self.kernel_initializer)

        def bias(name, shape):
            return self.add_weight(name=name, shape=shape, initializer="zeros")

        self.query_kernel = kernel("query_kernel", (d_t, h, e))
        self.key_kernel = kernel("key_kernel", (d_k, h, e))
        if self.use_bias:
            self.query_bias = bias("query_bias", (h, e))
            self.key_bias = bias("key_bias", (h, e))
        if not self.scores_only:
            self.value_kernel = kernel("value_kernel", (d_k, h, e))
            self.output_kernel = kernel("output_kernel", (h, e, self._output_dim))
            if self.use_bias:
                self.value_bias = bias("value_bias", (h, e))
                self.output_bias = bias("output_bias", (self._output_dim,))
        self.built = True

    def _project(self, x, kernel, bias, equation):
        y = ops.einsum(equation, x, kernel)
        return y + bias if self.use_bias else y

    def compute_scores(self, target, keys, mask=None):
        """Scaled per-head logits ``[B, H, L]``, 0 at masked positions."""
        q = self._project(
            target, self.query_kernel, getattr(self, "query_bias", None), "bd,dhe->bhe"
        )
        k = self._project(keys, self.key_kernel, getattr(self, "key_bias", None), "bld,dhe->blhe")
        scores = ops.einsum("bhe,blhe->bhl", q, k) / math.sqrt(self._head_dim)
        if mask is not None:
            scores = ops.where(ops.expand_dims(ops.cast(mask, "bool"), 1), scores, 0.0)
        return scores

    def call(self, target, keys, mask=None, score_bias=None, training=None):
        scores = self.compute_scores(target, keys, mask)
        if self.scores_only:
            return scores
        if mask is None:
            mask = ops.ones(ops.shape(keys)[:2], dtype="bool")
        mask = ops.cast(mask, "bool")
        logits = scores
        if score_bias is not None:
            bias = ops.cast(score_bias, scores.dtype)
            logits = logits + (bias if len(bias.shape) == 3 else ops.expand_dims(bias, 1))
        weights = _ops.masked_softmax(logits, ops.expand_dims(mask, 1), axis=-1)
        if self.dropout_layer is not None:
            weights = self.dropout_layer(weights, training=training)
        v = self._project(
            keys, self.value_kernel, getattr(self, "value_bias", None), "bld,dhe->blhe"
        )
        heads = ops.einsum("bhl,blhe->bhe", weights, v)
        pooled = ops.einsum("bhe,heo->bo", heads, self.output_kernel)
        if self.use_bias:
            pooled = pooled + self.output_bias
        has_any = ops.cast(ops.any(mask, axis=-1, keepdims=True), pooled.dtype)
        return pooled * has_any, scores

    def compute_output_shape(self, target_shape, keys_shape=None, mask_shape=None):
        keys_shape = target_shape if keys_shape is None else keys_shape
        scores_shape = (target_shape[0], self.num_heads, keys_shape[1])
        if self.scores_only:
            return scores_shape
        return (target_shape[0], self.output_dim or keys_shape[-1]), scores_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "head_dim": self.head_dim,
                "output_dim": self.output_dim,
                "use_bias": self.use_bias,
                "dropout": self.dropout,
                "scores_only": self.scores_only,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            }
        )
        return config
