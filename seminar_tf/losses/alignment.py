"""PSU task 1: multi-modal alignment (CLIP-style, between every pair of modalities)."""

from __future__ import annotations

import itertools

from keras import ops

from seminar_tf.losses.info_nce import symmetric_info_nce_loss


def alignment_pair_losses(
    vectors: dict, masks: dict, ids=None, temperature: float = 0.05, modalities=None
) -> dict:
    """``{(m1, m2): symmetric InfoNCE between modalities m1 and m2}`` over the rows where both
    are present, for every pair of ``modalities`` (default: all keys of ``vectors``, in
    order).

    Args:
        vectors: ``{modality: [B, d]}``.
        masks: ``{modality: bool [B]}`` presence masks.
        ids: optional int ``[B]`` item ids (a repeated item is not its own negative).
        temperature: softmax temperature (0.05 in SEMINAR).
        modalities: optional subset/order of modality names.
    """
    names = list(vectors) if modalities is None else list(modalities)
    missing = [m for m in names if m not in vectors or m not in masks]
    if missing:
        raise ValueError(f"`modalities` {missing} have no vectors/masks.")
    out = {}
    for m1, m2 in itertools.combinations(names, 2):
        both = ops.logical_and(ops.cast(masks[m1], "bool"), ops.cast(masks[m2], "bool"))
        out[(m1, m2)] = symmetric_info_nce_loss(
            vectors[m1], vectors[m2], both, ids=ids, temperature=temperature
        )
    return out


def multimodal_alignment_loss(
    vectors: dict, masks: dict, ids=None, temperature: float = 0.05, modalities=None
):
    """Mean of :func:`alignment_pair_losses` over the modality pairs that have at least one
    row with both modalities in the batch; 0 when there is none (e.g. a single modality).

    Args: as :func:`alignment_pair_losses`.
    """
    names = list(vectors) if modalities is None else list(modalities)
    pair_losses = alignment_pair_losses(vectors, masks, ids, temperature, names)
    total, count = ops.zeros(()), ops.zeros(())
    for (m1, m2), loss in pair_losses.items():
        both = ops.logical_and(ops.cast(masks[m1], "bool"), ops.cast(masks[m2], "bool"))
        has = ops.cast(ops.any(both), "float32")
        total = total + loss * has
        count = count + has
    return total / ops.maximum(count, 1.0)
