"""PSU task 2: next query-item pair prediction against in-batch negatives."""

from __future__ import annotations

from seminar_tf.losses.info_nce import info_nce_loss


def next_pair_loss(
    user_state,
    next_pair,
    mask=None,
    candidate_mask=None,
    ids=None,
    temperature: float = 0.05,
    normalize: bool = True,
):
    """Softmax cross entropy of the user state ``[B, d]`` picking its own next pair
    ``[B, d]`` among the next pairs of the batch (in-batch negatives).

    Args:
        user_state: ``[B, d]`` the state after the history.
        next_pair: ``[B, d]`` pair vectors of the next behaviour of each row.
        mask: optional bool ``[B]``: rows used as anchors (e.g. clicked targets).
        candidate_mask: optional bool ``[B]``: rows whose pair may serve as a negative
            (default: ``mask``).
        ids: optional int ``[B]`` item ids (the same item is not its own negative).
        temperature: softmax temperature.
        normalize: cosine (True) or inner-product (False) logits.
    """
    candidate_mask = mask if candidate_mask is None else candidate_mask
    return info_nce_loss(
        user_state,
        next_pair,
        anchor_mask=mask,
        candidate_mask=candidate_mask,
        ids=ids,
        temperature=temperature,
        normalize=normalize,
    )
