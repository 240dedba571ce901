"""In-batch InfoNCE (softmax cross entropy against the other rows), masked and zero-safe."""

from __future__ import annotations

from keras import ops

from seminar_tf.layers import _ops


def info_nce_loss(
    anchors,
    candidates,
    anchor_mask=None,
    candidate_mask=None,
    ids=None,
    temperature: float = 0.05,
    normalize: bool = True,
):
    """One-directional in-batch InfoNCE: row ``i`` of ``anchors`` should pick row ``i`` of
    ``candidates`` among all valid candidate rows.

    ``loss_i = -log softmax_j(sim(a_i, c_j) / temperature)[i]`` with ``sim`` the cosine
    (``normalize=True``, CLIP-style) or the inner product. Candidates with
    ``candidate_mask`` false are removed from every softmax; anchors with ``anchor_mask``
    false, or whose own candidate is masked, are left out of the mean. With ``ids`` ``[B]``,
    a candidate ``j != i`` with ``ids[j] == ids[i]`` (the same item twice in the batch) is
    not used as a negative for ``i``. Returns the mean over valid anchors, 0 when none.

    Args:
        anchors: ``[B, d]``.
        candidates: ``[B, d]``; row ``i`` is anchor ``i``'s positive.
        anchor_mask: optional bool ``[B]``.
        candidate_mask: optional bool ``[B]``.
        ids: optional int ``[B]`` identities for removing accidental hits.
        temperature: softmax temperature (logits are divided by it).
        normalize: L2-normalise both sides first.
    """
    if temperature <= 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature!r}.")
    anchors = ops.cast(anchors, "float32")
    candidates = ops.cast(candidates, "float32")
    if normalize:
        anchors = _ops.l2_normalize(anchors)
        candidates = _ops.l2_normalize(candidates)
    n = ops.shape(anchors)[0]
    ones = ops.ones((n,), dtype="bool")
    anchor_mask = ones if anchor_mask is None else ops.cast(anchor_mask, "bool")
    candidate_mask = ones if candidate_mask is None else ops.cast(candidate_mask, "bool")
    logits = ops.matmul(anchors, ops.transpose(candidates)) / temperature  # [B, B]
    eye = ops.eye(n, dtype="bool")
    allowed = ops.logical_and(ops.expand_dims(candidate_mask, 0), ops.ones_like(eye))
    if ids is not None:
        ids = ops.convert_to_tensor(ids)
        same = ops.equal(ops.expand_dims(ids, 1), ops.expand_dims(ids, 0))
        allowed = ops.logical_and(allowed, ops.logical_or(ops.logical_not(same), eye))
    logits = ops.where(allowed, logits, _ops.MASK_VALUE)
    log_probs = logits - ops.logsumexp(logits, axis=1, keepdims=True)
    positive = ops.sum(ops.where(eye, log_probs, 0.0), axis=1)
    valid = ops.cast(ops.logical_and(anchor_mask, candidate_mask), "float32")
    return -ops.sum(positive * valid) / ops.maximum(ops.sum(valid), 1.0)


def symmetric_info_nce_loss(a, b, mask=None, ids=None, temperature: float = 0.05):
    """CLIP's symmetric loss: ``(InfoNCE(a -> b) + InfoNCE(b -> a)) / 2`` over the rows
    where ``mask`` is true (absent rows are neither anchors nor negatives), cosine
    similarity divided by ``temperature``. 0 when no row is valid.

    Args:
        a: ``[B, d]`` vectors of one modality.
        b: ``[B, d]`` vectors of another modality; row ``i`` pairs with ``a[i]``.
        mask: optional bool ``[B]``: both modalities present on the row.
        ids: optional int ``[B]`` identities for removing accidental hits.
        temperature: softmax temperature.
    """
    forward = info_nce_loss(a, b, mask, mask, ids=ids, temperature=temperature)
    backward = info_nce_loss(b, a, mask, mask, ids=ids, temperature=temperature)
    return 0.5 * (forward + backward)
