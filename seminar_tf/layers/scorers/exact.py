"""GSU scorer ``"exact"``: multi-head target-attention logits, averaged over heads."""

from __future__ import annotations

import math

import keras
from keras import ops

from seminar_tf.layers.scorers.base import SearchScorer, register_scorer
from seminar_tf.layers.target_attention import HeadIdentity, MultiHeadTargetAttention


@register_scorer("exact")
@keras.saving.register_keras_serializable(package="seminar_tf")
class ExactScorer(SearchScorer):
    """Scores behaviours with the query/key part of a multi-head target attention.

    ``score[b, l] = reduce_h s_h[b, l]`` with ``s_h`` the scaled attention logits of
    :class:`MultiHeadTargetAttention` (SEMINAR's GSU shares the PSU's attention structure);
    ``reduction`` is ``"mean"`` or ``"sum"`` over heads. Shapes: target ``[B, d]``, keys
    ``[B, L, d]`` -> ``[B, L]``. Its attention sublayer is named ``attention`` so weights can
    be restored from a pretrained attention by name.

    Args:
        num_heads: attention heads.
        head_dim: size per head; default ``d // num_heads``.
        reduction: ``"mean"`` or ``"sum"`` over heads.
        initialization: ``"identity"`` (default): the query/key kernels start as the
            identity split into heads, so before training (or restoring) the scores rank
            behaviours like the plain inner product (SIM's soft search) rather than at
            random; ``"random"``: Glorot-uniform kernels.
        **kwargs: ``keras.layers.Layer`` arguments.

    Example:

    ```python
    scorer = ExactScorer(num_heads=4)
    scores = scorer(target, keys, mask)  # [B, L]
    ```
    """

    differentiable = True

    def __init__(
        self,
        num_heads: int = 4,
        head_dim: int | None = None,
        reduction: str = "mean",
        initialization: str = "identity",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if reduction not in ("mean", "sum"):
            raise ValueError(f"`reduction` must be 'mean' or 'sum', got {reduction!r}.")
        if initialization not in ("identity", "random"):
            raise ValueError(
                f"`initialization` must be 'identity' or 'random', got {initialization!r}."
            )
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.reduction = reduction
        self.initialization = initialization
        self.attention = MultiHeadTargetAttention(
            num_heads=num_heads,
            head_dim=head_dim,
            scores_only=True,
            kernel_initializer=HeadIdentity() if initialization == "identity" else "glorot_uniform",
            name="attention",
        )

    def build(self, target_shape, keys_shape=None, mask_shape=None):
        if self.built:
            return
        self.attention.build(target_shape, keys_shape)
        self.built = True

    def call(self, target, keys, mask, target_parts=None, key_parts=None, key_weights=None):
        scores = self.attention(target, keys, mask)
        return ops.mean(scores, axis=1) if self.reduction == "mean" else ops.sum(scores, axis=1)

    def score_many(
        self, targets, keys, mask, target_parts=None, key_parts=None, key_weights=None,
        training=None,
    ):  # fmt: skip
        # The key projection is the costly part and is the same for every target.
        attention = self.attention
        if not attention.built:
            attention.build(targets.shape[-1:], keys.shape)
        q = attention._project(
            targets, attention.query_kernel, getattr(attention, "query_bias", None),
            "bcd,dhe->bche",
        )  # fmt: skip
        k = attention._project(
            keys, attention.key_kernel, getattr(attention, "key_bias", None), "bld,dhe->blhe"
        )
        scores = ops.einsum("bche,blhe->bchl", q, k) / math.sqrt(attention._head_dim)
        return ops.mean(scores, axis=2) if self.reduction == "mean" else ops.sum(scores, axis=2)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "head_dim": self.head_dim,
                "reduction": self.reduction,
                "initialization": self.initialization,
            }
        )
        return config
