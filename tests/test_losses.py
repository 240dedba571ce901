"""Tests of the PSU losses against small numpy references (incl. the relevance sign)."""

from __future__ import annotations

import itertools
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from keras import ops  # noqa: E402

from seminar_tf.losses import (  # noqa: E402
    alignment_pair_losses,
    info_nce_loss,
    multimodal_alignment_loss,
    next_pair_loss,
    query_item_relevance_loss,
    symmetric_info_nce_loss,
)

N, D = 7, 5


def ref_info_nce(a, c, amask=None, cmask=None, ids=None, t=0.05, normalize=True):
    """Plain-loop numpy InfoNCE: -log softmax_j(sim(a_i, c_j) / t)[i], mean over anchors."""
    n = len(a)
    amask = np.ones(n, bool) if amask is None else np.asarray(amask, bool)
    cmask = np.ones(n, bool) if cmask is None else np.asarray(cmask, bool)
    if normalize:
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-6)
        c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-6)
    losses = []
    for i in range(n):
        if not (amask[i] and cmask[i]):
            continue
        cols = [j for j in range(n) if cmask[j] and (j == i or ids is None or ids[j] != ids[i])]
        logits = np.array([a[i] @ c[j] / t for j in cols])
        log_z = logits.max() + np.log(np.exp(logits - logits.max()).sum())
        losses.append(log_z - a[i] @ c[i] / t)
    return float(np.mean(losses)) if losses else 0.0


def vecs(seed=0, n=N):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, D)).astype(np.float32), rng.normal(size=(n, D)).astype(np.float32)


def value(x):
    return float(ops.convert_to_numpy(x))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_info_nce_matches_reference(normalize, temperature):
    a, c = vecs()
    amask = np.array([1, 1, 0, 1, 1, 1, 1], bool)
    cmask = np.array([1, 1, 1, 0, 1, 1, 1], bool)
    ids = np.array([3, 4, 5, 6, 3, 8, 9])  # rows 0 and 4: the same item
    got = info_nce_loss(a, c, amask, cmask, ids, temperature=temperature, normalize=normalize)
    want = ref_info_nce(a, c, amask, cmask, ids, temperature, normalize)
    assert value(got) == pytest.approx(want, rel=1e-4, abs=1e-4)
    # Temperature divides: a smaller temperature sharpens (scales the logits up).
    plain = info_nce_loss(a, c, temperature=1.0, normalize=normalize)
    assert value(plain) == pytest.approx(ref_info_nce(a, c, t=1.0, normalize=normalize), rel=1e-4)


def test_info_nce_zero_safe():
    a, c = vecs()
    none = np.zeros(N, bool)
    assert value(info_nce_loss(a, c, anchor_mask=none)) == 0.0
    assert value(info_nce_loss(a[:1], c[:1])) == pytest.approx(0.0, abs=1e-6)


def test_symmetric_info_nce_matches_reference_and_masks_rows():
    a, b = vecs(1)
    mask = np.array([1, 0, 1, 1, 0, 1, 1], bool)
    got = value(symmetric_info_nce_loss(a, b, mask, temperature=0.05))
    want = 0.5 * (ref_info_nce(a, b, mask, mask) + ref_info_nce(b, a, mask, mask))
    assert got == pytest.approx(want, rel=1e-4)
    a2 = a.copy()
    a2[~mask] = 100.0  # absent rows change nothing
    assert value(symmetric_info_nce_loss(a2, b, mask)) == pytest.approx(got, rel=1e-5)


def test_alignment_loss_over_modality_pairs():
    rng = np.random.default_rng(2)
    vectors = {m: rng.normal(size=(N, D)).astype(np.float32) for m in ("id", "attr", "text")}
    masks = {
        "id": np.ones(N, bool),
        "attr": rng.random(N) < 0.8,
        "text": np.array([1, 0, 1, 0, 0, 1, 0], bool),
    }
    ids = np.arange(N)
    pairs = alignment_pair_losses(vectors, masks, ids=ids)
    assert set(pairs) == {("id", "attr"), ("id", "text"), ("attr", "text")}
    refs = {}
    for m1, m2 in itertools.combinations(vectors, 2):
        both = masks[m1] & masks[m2]
        refs[(m1, m2)] = 0.5 * (
            ref_info_nce(vectors[m1], vectors[m2], both, both)
            + ref_info_nce(vectors[m2], vectors[m1], both, both)
        )
        assert value(pairs[(m1, m2)]) == pytest.approx(refs[(m1, m2)], rel=1e-4)
    total = value(multimodal_alignment_loss(vectors, masks, ids=ids))
    assert total == pytest.approx(np.mean(list(refs.values())), rel=1e-4)
    # A pair with no row holding both modalities does not count.
    masks["text"] = np.zeros(N, bool)
    total = value(multimodal_alignment_loss(vectors, masks, ids=ids))
    assert total == pytest.approx(refs[("id", "attr")], rel=1e-4)
    assert value(multimodal_alignment_loss({"id": vectors["id"]}, {"id": masks["id"]})) == 0.0
    # Aligned modalities give a lower loss than unrelated ones.
    aligned = {"id": vectors["id"], "text": vectors["id"] + 0.01}
    both = {"id": np.ones(N, bool), "text": np.ones(N, bool)}
    unrelated = {"id": vectors["id"], "text": vectors["attr"]}
    assert value(multimodal_alignment_loss(aligned, both)) < value(
        multimodal_alignment_loss(unrelated, both)
    )


def test_next_pair_loss_matches_reference():
    state, target = vecs(3)
    mask = np.array([1, 1, 1, 0, 1, 0, 1], bool)
    candidates = np.array([1, 1, 1, 1, 1, 0, 1], bool)
    ids = np.array([2, 3, 2, 5, 6, 7, 8])
    got = value(next_pair_loss(state, target, mask, candidates, ids=ids, temperature=0.1))
    assert got == pytest.approx(ref_info_nce(state, target, mask, candidates, ids, 0.1), rel=1e-4)
    # candidate_mask defaults to mask
    got = value(next_pair_loss(state, target, mask, temperature=0.1))
    assert got == pytest.approx(ref_info_nce(state, target, mask, mask, None, 0.1), rel=1e-4)


def test_relevance_loss_reference_sign_and_zero_safety():
    rng = np.random.default_rng(4)
    items = rng.normal(size=(N, D)).astype(np.float32)
    noise = rng.normal(size=(N, D)).astype(np.float32)
    has_query = np.array([1, 1, 0, 1, 0, 1, 1], bool)
    close = items + 0.1 * noise  # queries near their own items
    far = items + 3.0 * noise
    loss_close = value(query_item_relevance_loss(close, items, has_query))
    loss_far = value(query_item_relevance_loss(far, items, has_query))
    assert loss_close == pytest.approx(ref_info_nce(close, items, has_query), rel=1e-4)
    assert loss_far == pytest.approx(ref_info_nce(far, items, has_query), rel=1e-4)
    assert 0.0 <= loss_close < loss_far  # lower loss when relevant pairs are closer
    # The public code's mean(exp(pos/t) / sum exp(neg/t)) would be *larger* when closer:
    # a -log of the softmax makes the minimisation pull the pairs together.
    assert value(query_item_relevance_loss(close, items, np.zeros(N, bool))) == 0.0
    item_mask = np.array([1, 1, 1, 1, 1, 1, 0], bool)
    got = value(query_item_relevance_loss(close, items, has_query, item_mask, ids=np.arange(N)))
    assert got == pytest.approx(ref_info_nce(close, items, has_query, item_mask), rel=1e-4)


def test_invalid_temperature():
    a, c = vecs()
    with pytest.raises(ValueError, match="temperature"):
        info_nce_loss(a, c, temperature=0.0)
