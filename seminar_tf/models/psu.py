"""PSU: SEMINAR's Pretraining Search Unit (multi-task pretraining of the pair embeddings)."""

from __future__ import annotations

import keras
from keras import ops

from seminar_tf import spec
from seminar_tf.distribute import replica_loss_scale
from seminar_tf.layers.pair_embedding import QUERY_MODALITY, MultiModalPairEmbedding
from seminar_tf.layers.target_attention import MultiHeadTargetAttention
from seminar_tf.losses import (
    multimodal_alignment_loss,
    next_pair_loss,
    query_item_relevance_loss,
)

LOSS_NAMES = ("align_loss", "next_loss", "relevance_loss")


def _check_weight(name, value):
    if float(value) < 0:
        raise ValueError(f"`{name}` must be >= 0, got {value!r}.")
    return float(value)


def last_valid(values, mask):
    """``values[b, l*]`` at the last true position ``l*`` of ``mask[b]`` (zeros if none).

    ``values`` ``[B, L, d]``, ``mask`` ``[B, L]`` -> ``[B, d]``; works for left and right
    padding (the history is most-recent-last).
    """
    mask = ops.cast(mask, "bool")
    length = ops.shape(mask)[1]
    positions = ops.arange(length)
    last = ops.argmax(ops.where(mask, positions, -1), axis=1)
    one_hot = ops.logical_and(
        ops.equal(positions[None, :], ops.expand_dims(ops.cast(last, positions.dtype), 1)),
        ops.any(mask, axis=1, keepdims=True),
    )
    return ops.sum(values * ops.expand_dims(ops.cast(one_hot, values.dtype), -1), axis=1)


@keras.saving.register_keras_serializable(package="seminar_tf")
class PSU(keras.Model):
    """Pretraining Search Unit: pair embeddings + multi-head target attention over the
    history, trained with SEMINAR's three pretraining tasks.

    On a batch of per-target examples (``spec.MODEL_FEATURES``) it embeds the target pair and
    the history pairs with a :class:`MultiModalPairEmbedding` (layer name
    ``pair_embedding``), and forms a user state: a :class:`MultiHeadTargetAttention` (layer
    name ``attention``) whose target is the last real behaviour plus a learned vector
    attends over the history; ``state_projection(concat(pooled, last))`` is the state
    ``[B, d]``. The loss is ``align_weight * align_loss + next_weight * next_loss +
    relevance_weight * relevance_loss`` (plus any regularisation losses):

    - ``align_loss``: CLIP-style symmetric InfoNCE between every pair of the target item's
      present modalities (id, attr, text, image), rows lacking a modality masked out;
    - ``next_loss``: the user state predicts the target pair against the other targets of
      the batch (softmax cross entropy), on rows with a clicked target and a history;
    - ``relevance_loss``: the target query picks its clicked item among the batch's items
      (InfoNCE with -log), on clicked rows that have a query; 0 when none does.

    The same item appearing twice in a batch is never its own negative. With
    ``positives_only`` (default) only rows with label 1 are anchors of the next-pair and
    relevance tasks (all rows when ``fit`` gets no labels); every row with a real target
    item serves the alignment task and as a negative. Each task's unweighted loss is tracked
    as a metric, so ``fit`` history and the progress bar show ``loss``, ``align_loss``,
    ``next_loss`` and ``relevance_loss``. Works under the TensorFlow and JAX backends
    (it overrides ``compute_loss`` only).

    ``call`` returns a dict: ``user_state`` ``[B, d]``, ``target_pair`` ``[B, d]``,
    ``target_item_vector`` ``[B, d]``, ``target_query_vector`` ``[B, d]``,
    ``target_has_query`` bool ``[B]``, ``score`` ``[B]`` (cosine of state and target pair),
    and, for each item modality ``m``, ``modality_<m>`` ``[B, d]`` and ``mask_<m>`` ``[B]``.

    Args:
        num_items, num_attributes, num_query_tokens, num_queries, max_attributes, text_dim,
            image_dim, query_text_dim, max_query_tokens: data sizes (``spec.DataSpec``;
            ``max_query_tokens`` > 0 gives the ``query_tokens`` table, so the history may
            carry query ids without ``hist_query_tokens``), see
            :class:`MultiModalPairEmbedding`.
        embedding_dim: ``d``.
        num_heads: attention heads.
        query_weight: ``lambda`` of the pair fusion.
        temperature: softmax temperature of the three InfoNCE losses.
        align_weight: weight of ``align_loss`` (SEMINAR used 0.1 on Amazon, 1.0 elsewhere).
        next_weight: weight of ``next_loss``.
        relevance_weight: weight of ``relevance_loss``.
        positives_only: use only label-1 rows as next-pair / relevance anchors.
        tables: optional side tables (``spec.TABLE_ARRAYS``), not part of ``get_config``;
            or call ``set_tables`` later.
        **kwargs: ``keras.Model`` arguments (``name``, ...).

    Example:

    ```python
    psu = PSU(num_items=1000, num_attributes=50, num_query_tokens=500, num_queries=300,
              text_dim=512, tables=tables)
    psu.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = psu.fit(features, labels, batch_size=256, epochs=1)
    history.history["relevance_loss"]
    ```
    """

    def __init__(
        self,
        num_items: int,
        num_attributes: int,
        num_query_tokens: int,
        num_queries: int,
        max_attributes: int = spec.DEFAULT_MAX_ATTRIBUTES,
        text_dim: int = 0,
        image_dim: int = 0,
        query_text_dim: int = 0,
        max_query_tokens: int = 0,
        embedding_dim: int = 64,
        num_heads: int = 4,
        query_weight: float = 0.5,
        temperature: float = 0.05,
        align_weight: float = 0.1,
        next_weight: float = 1.0,
        relevance_weight: float = 1.0,
        positives_only: bool = True,
        tables: dict | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if float(temperature) <= 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature!r}.")
        self.temperature = float(temperature)
        self.align_weight = _check_weight("align_weight", align_weight)
        self.next_weight = _check_weight("next_weight", next_weight)
        self.relevance_weight = _check_weight("relevance_weight", relevance_weight)
        self.positives_only = bool(positives_only)
        self.num_heads = num_heads
        self.pair_embedding = MultiModalPairEmbedding(
            num_items=num_items,
            num_attributes=num_attributes,
            num_query_tokens=num_query_tokens,
            num_queries=num_queries,
            embedding_dim=embedding_dim,
            max_attributes=max_attributes,
            text_dim=text_dim,
            image_dim=image_dim,
            query_text_dim=query_text_dim,
            max_query_tokens=max_query_tokens,
            query_weight=query_weight,
            tables=tables,
            name="pair_embedding",
        )
        self.embedding_dim = self.pair_embedding.embedding_dim
        self.attention = MultiHeadTargetAttention(num_heads=num_heads, name="attention")
        self.state_projection = keras.layers.Dense(self.embedding_dim, name="state_projection")
        self.align_tracker = keras.metrics.Mean(name="align_loss")
        self.next_tracker = keras.metrics.Mean(name="next_loss")
        self.relevance_tracker = keras.metrics.Mean(name="relevance_loss")

    def build(self, input_shape=None):
        if self.built:
            return
        d = self.embedding_dim
        self.pair_embedding.build()
        self.state_query = self.add_weight(name="state_query", shape=(d,), initializer="zeros")
        self.attention.build((None, d), (None, None, d))
        self.state_projection.build((None, 2 * d))
        self.built = True

    def build_from_config(self, config):
        self.build()

    def set_tables(self, tables: dict):
        """Assigns the side tables (see ``MultiModalPairEmbedding.set_tables``)."""
        self.pair_embedding.set_tables(tables)

    def call(self, inputs, training=None):
        emb = self.pair_embedding
        t_vec, t_mask = emb.encode(
            inputs["target_item"], inputs["target_query"], inputs["target_query_tokens"]
        )
        target_item_vector = emb.fuse_items(t_vec, t_mask)
        if QUERY_MODALITY in t_vec:
            query_vector, has_query = t_vec[QUERY_MODALITY], t_mask[QUERY_MODALITY]
        else:
            query_vector = ops.zeros_like(target_item_vector)
            has_query = ops.zeros(ops.shape(target_item_vector)[:1], dtype="bool")
        target_pair = emb.fuse_pair(target_item_vector, query_vector, has_query)

        hist_mask = ops.not_equal(inputs["hist_item"], 0)
        hist_pair = emb(inputs["hist_item"], inputs["hist_query"], inputs.get("hist_query_tokens"))
        last = last_valid(hist_pair, hist_mask)
        pooled, _ = self.attention(last + self.state_query, hist_pair, hist_mask)
        user_state = self.state_projection(ops.concatenate([pooled, last], axis=-1))

        norm = ops.sqrt(
            ops.maximum(
                ops.sum(ops.square(user_state), -1) * ops.sum(ops.square(target_pair), -1), 1e-12
            )
        )
        outputs = {
            "user_state": user_state,
            "target_pair": target_pair,
            "target_item_vector": target_item_vector,
            "target_query_vector": query_vector,
            "target_has_query": has_query,
            "score": ops.sum(user_state * target_pair, -1) / norm,
        }
        for m in emb.item_modalities:
            outputs[f"modality_{m}"] = t_vec[m]
            outputs[f"mask_{m}"] = t_mask[m]
        return outputs

    def compute_task_losses(self, x, y, y_pred) -> dict:
        """``{"align_loss", "next_loss", "relevance_loss"}`` (unweighted scalars)."""
        target_item = x["target_item"]
        item_valid = ops.not_equal(target_item, 0)
        anchors = item_valid
        if y is not None and self.positives_only:
            anchors = ops.logical_and(anchors, ops.reshape(y, (-1,)) > 0.5)
        has_history = ops.any(ops.not_equal(x["hist_item"], 0), axis=1)
        modalities = self.pair_embedding.item_modalities
        align = multimodal_alignment_loss(
            {m: y_pred[f"modality_{m}"] for m in modalities},
            {m: y_pred[f"mask_{m}"] for m in modalities},
            ids=target_item,
            temperature=self.temperature,
        )
        next_loss = next_pair_loss(
            y_pred["user_state"],
            y_pred["target_pair"],
            mask=ops.logical_and(anchors, has_history),
            candidate_mask=item_valid,
            ids=target_item,
            temperature=self.temperature,
        )
        relevance = query_item_relevance_loss(
            y_pred["target_query_vector"],
            y_pred["target_item_vector"],
            query_mask=ops.logical_and(anchors, y_pred["target_has_query"]),
            item_mask=item_valid,
            ids=target_item,
            temperature=self.temperature,
        )
        return {"align_loss": align, "next_loss": next_loss, "relevance_loss": relevance}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        losses = self.compute_task_losses(x, y, y_pred)
        total = (
            self.align_weight * losses["align_loss"]
            + self.next_weight * losses["next_loss"]
            + self.relevance_weight * losses["relevance_loss"]
        )
        if self.losses:
            total = total + ops.sum(ops.stack([ops.cast(v, "float32") for v in self.losses]))
        # Under tf.distribute each replica's gradient is summed: its loss counts 1 / N.
        total = total * replica_loss_scale()
        self.align_tracker.update_state(losses["align_loss"])
        self.next_tracker.update_state(losses["next_loss"])
        self.relevance_tracker.update_state(losses["relevance_loss"])
        return total

    def get_config(self):
        emb = self.pair_embedding
        config = super().get_config()
        config.update(
            {
                "num_items": emb.num_items,
                "num_attributes": emb.num_attributes,
                "num_query_tokens": emb.num_query_tokens,
                "num_queries": emb.num_queries,
                "max_attributes": emb.max_attributes,
                "text_dim": emb.text_dim,
                "image_dim": emb.image_dim,
                "query_text_dim": emb.query_text_dim,
                "max_query_tokens": emb.max_query_tokens,
                "embedding_dim": emb.embedding_dim,
                "num_heads": self.num_heads,
                "query_weight": emb.query_weight,
                "temperature": self.temperature,
                "align_weight": self.align_weight,
                "next_weight": self.next_weight,
                "relevance_weight": self.relevance_weight,
                "positives_only": self.positives_only,
            }
        )
        return config
