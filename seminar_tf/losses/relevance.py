"""PSU task 3: query-item relevance (InfoNCE with -log, unlike the public code)."""

from __future__ import annotations

from seminar_tf.losses.info_nce import info_nce_loss


def query_item_relevance_loss(
    query_vectors, item_vectors, query_mask, item_mask=None, ids=None, temperature: float = 0.05
):
    """``mean_i -log softmax_j(cos(q_i, v_j) / t)[i]`` over the rows ``i`` that have a query.

    The query of row ``i`` should score its own (clicked) item above the other items of the
    batch; minimising it pulls relevant query-item pairs together (the public SEMINAR code
    has no ``-log`` and pushes them apart). Items of rows without a query still serve as
    negatives. 0 when no row has a query.

    Args:
        query_vectors: ``[B, d]``.
        item_vectors: ``[B, d]``.
        query_mask: bool ``[B]``: the row has a query (and counts as an anchor).
        item_mask: optional bool ``[B]``: the row's item is real (a valid negative).
        ids: optional int ``[B]`` item ids (the same item is not its own negative).
        temperature: softmax temperature.
    """
    return info_nce_loss(
        query_vectors,
        item_vectors,
        anchor_mask=query_mask,
        candidate_mask=item_mask,
        ids=ids,
        temperature=temperature,
    )
