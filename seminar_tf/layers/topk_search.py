"""First-stage search (GSU): score every behaviour, keep the top K."""

from __future__ import annotations

import keras
from keras import ops

from seminar_tf.layers import _ops
from seminar_tf.layers.scorers import get_scorer_class


@keras.saving.register_keras_serializable(package="seminar_tf")
class TopKSearch(keras.layers.Layer):
    """Scores all ``L`` behaviours against the target and keeps the ``k`` best.

    The scorer is chosen by name from the scorer registry (``seminar_tf.layers.scorers``):
    ``"exact"`` (multi-head target-attention logits averaged over heads: SEMINAR / TWIN),
    ``"soft"`` (inner product: SIM), ``"recent"`` (the last K: DIN), ``"simhash"`` (ETA),
    ``"pq"`` (product-quantized exact scores), and any scorer registered later, with ``scorer_config`` passed to its
    constructor.

    Masked behaviours are never kept ahead of real ones. When fewer than ``k`` behaviours
    are real (including ``L < k`` and all-padding rows) the kept set is padded with masked
    entries. Ties keep the lower position first.

    ``call(target [B, d], keys [B, L, d], mask [B, L], target_parts=None, key_parts=None,
    key_weights=None)`` (see ``SearchScorer``) returns ``(indices [B, k] int32, kept_mask [B, k] bool, scores [B, k])``, in decreasing
    score order; where ``kept_mask`` is false the index is 0 and the score 0, so gathering
    with the indices is always in range.

    Args:
        k: how many behaviours to keep.
        scorer: registered scorer name.
        scorer_config: keyword arguments of the scorer's constructor.
        block_size: the exact top-K by blocks (``_ops.top_k_by_blocks``): ``None`` (default)
            uses blocks of ``AUTO_BLOCK`` where they measured faster: the JAX backend with a
            static length ``L >= AUTO_BLOCK_MIN_RATIO * k`` (2-core CPU, jit: L = 100,000,
            K = 100, batch 64: 5.6 ms against 15.0 ms; L = 10,000: 0.9x; TensorFlow never
            gained; ``benchmarks/results/train_throughput_topk_*.json``); ``0``: one
            ``top_k`` over all L always; a positive int: blocks of that size whenever ``L`` is
            static and holds more than ``k`` blocks. The kept set is the same either way.
        **kwargs: ``keras.layers.Layer`` arguments.

    Example:

    ```python
    search = TopKSearch(k=50, scorer="exact", scorer_config={"num_heads": 4})
    indices, kept_mask, scores = search(target, keys, mask)  # [B, 50] each
    kept = ops.take_along_axis(keys, indices[..., None], axis=1)
    ```
    """

    AUTO_BLOCK = 32
    AUTO_BLOCK_MIN_RATIO = 1000

    def __init__(
        self,
        k: int = 50,
        scorer: str = "exact",
        scorer_config: dict | None = None,
        block_size: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"`k` must be a positive integer, got {k!r}.")
        if block_size is not None and (
            isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 0
        ):
            raise ValueError(f"`block_size` must be None or an integer >= 0, got {block_size!r}.")
        self.block_size = block_size
        if scorer_config is not None and not isinstance(scorer_config, dict):
            raise ValueError(f"`scorer_config` must be a dict or None, got {scorer_config!r}.")
        self.k = k
        self.scorer_name = scorer
        self.scorer_config = dict(scorer_config or {})
        scorer_cls = get_scorer_class(scorer)
        try:
            self.scorer = scorer_cls(name=f"{scorer}_scorer", **self.scorer_config)
        except (TypeError, ValueError) as e:
            raise ValueError(f"`scorer_config` does not fit scorer {scorer!r}: {e}") from e

    @property
    def differentiable(self) -> bool:
        """Whether the scores carry gradients (see ``SearchScorer.differentiable``)."""
        return self.scorer.differentiable

    def build(self, target_shape, keys_shape=None, mask_shape=None):
        if self.built:
            return
        keys_shape = (target_shape[0], None, target_shape[-1]) if keys_shape is None else keys_shape
        self.scorer.build(target_shape, keys_shape, mask_shape)
        self.built = True

    def score_all(
        self, target, keys, mask, target_parts=None, key_parts=None, key_weights=None,
        training=None,
    ):  # fmt: skip
        """Scores of all ``L`` behaviours ``[B, L]`` (masked positions unspecified)."""
        kwargs = {"target_parts": target_parts, "key_parts": key_parts}
        if key_weights is not None:
            kwargs["key_weights"] = key_weights
        return self.scorer(target, keys, mask, training=training, **kwargs)

    def call(
        self, target, keys, mask, target_parts=None, key_parts=None, key_weights=None,
        training=None,
    ):  # fmt: skip
        mask = ops.cast(mask, "bool")
        scores = self.score_all(
            target, keys, mask, target_parts, key_parts, key_weights, training=training
        )
        return self.select(scores, mask)

    def search_many(
        self, targets, keys, mask, target_parts=None, key_parts=None, key_weights=None,
        training=None, k: int | None = None,
    ):  # fmt: skip
        """``call`` for ``C`` targets per history: ``targets [B, C, d]`` (``target_parts``
        ``{m: [B, C, d]}``) against ``keys [B, L, d]`` / ``mask [B, L]`` (and the history's
        parts and weights) -> ``(indices, kept_mask, scores)`` each ``[B, C, k]``, equal
        to ``call`` on every (target, history) pair, with the history transformed once
        where the scorer allows (``SearchScorer.score_many``). ``k`` overrides the layer's
        ``k`` (a longer shortlist)."""
        mask = ops.cast(mask, "bool")
        scores = self.scorer.score_many(
            targets, keys, mask, target_parts=target_parts, key_parts=key_parts,
            key_weights=key_weights, training=training,
        )  # fmt: skip
        c = ops.shape(targets)[1]
        flat = ops.reshape(scores, (-1, ops.shape(scores)[-1]))
        out = self.select(flat, ops.repeat(mask, c, axis=0), k)
        return tuple(ops.reshape(x, (-1, c, k or self.k)) for x in out)

    def _block(self, length, k: int | None = None) -> int:
        """Block size for a history of static ``length`` and ``k`` kept (default: the
        layer's; 0: one plain ``top_k``)."""
        k = k or self.k
        if length is None or self.block_size == 0:
            return 0
        if self.block_size is not None:
            return self.block_size
        if keras.backend.backend() == "jax" and length >= self.AUTO_BLOCK_MIN_RATIO * k:
            return self.AUTO_BLOCK
        return 0

    def select(self, scores, mask, k: int | None = None):
        """``(indices, kept_mask, kept scores)`` of the ``k`` (default: the layer's) best of
        ``scores [B, L]`` where ``mask [B, L]`` is true (see the class docstring)."""
        k = k or self.k
        mask = ops.cast(mask, "bool")
        scores = ops.cast(scores, "float32")
        # Append k masked columns so top_k always has >= k candidates (handles L < k).
        scores = ops.pad(scores, [[0, 0], [0, k]])
        mask_f = ops.pad(ops.cast(mask, "float32"), [[0, 0], [0, k]])
        ranked = ops.where(mask_f > 0, scores, _ops.MASK_VALUE)
        block = self._block(ranked.shape[1], k)
        if block:
            _, indices = _ops.top_k_by_blocks(ranked, k, block)
        else:
            _, indices = ops.top_k(ranked, k=k, sorted=True)
        kept_mask = ops.take_along_axis(mask_f, indices, axis=1) > 0
        kept_scores = ops.take_along_axis(scores, indices, axis=1)
        indices = ops.where(kept_mask, ops.cast(indices, "int32"), 0)
        kept_scores = ops.where(kept_mask, kept_scores, 0.0)
        return indices, kept_mask, kept_scores

    def compute_output_shape(self, target_shape, keys_shape=None, mask_shape=None):
        shape = (target_shape[0], self.k)
        return shape, shape, shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "k": self.k,
                "scorer": self.scorer_name,
                "scorer_config": dict(self.scorer_config),
                "block_size": self.block_size,
            }
        )
        return config
