"""Multi-modal product quantization: the "pq" scorer, stored codes, codebook fitting, recall."""

from __future__ import annotations

import math
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from keras import ops  # noqa: E402

from seminar_tf import spec, testing  # noqa: E402
from seminar_tf.layers import PQScorer  # noqa: E402
from seminar_tf.models import build_model  # noqa: E402
from seminar_tf.quantization import gsu_recall, kmeans, quantize_model  # noqa: E402

SPEC = testing.make_data_spec()
TABLES = testing.make_tables(SPEC)
CONFIG = {"embedding_dim": 8, "num_heads": 2, "hidden_units": [16], "dropout": 0.1, "top_k": 5}


def np_(x):
    return np.asarray(ops.convert_to_numpy(x))


def batch(n=32, seed=1):
    return testing.make_batch(SPEC, n, seed=seed, min_history=1, padding="mixed")[0]


@pytest.fixture(scope="module")
def exact_model():
    """An exact model with perturbed weights (G(j) and the attention away from identity)."""
    model = build_model(SPEC, CONFIG, TABLES)
    model.build()
    rng = np.random.default_rng(0)
    for v in model.trainable_weights:
        v.assign(np_(v) + rng.normal(0, 0.2, v.shape).astype("float32"))
    model.gsu_bias_weight.assign(0.7)
    return model


def _numpy_exact_score(scorer, target, key):
    """The exact scorer's mean-over-heads attention logit, in numpy."""
    att = scorer.attention
    wq, bq = np_(att.query_kernel), np_(att.query_bias)
    wk, bk = np_(att.key_kernel), np_(att.key_bias)
    q = np.einsum("d,dhe->he", target, wq) + bq
    k = np.einsum("d,dhe->he", key, wk) + bk
    return float((q * k).sum(-1).mean() / math.sqrt(wq.shape[-1]))


def test_fusion_weights_reproduce_the_fused_pair():
    emb = build_model(SPEC, CONFIG, TABLES).pair_embedding
    x = batch()
    vectors, masks = emb.encode(x["hist_item"], x["hist_query"], x["hist_query_tokens"])
    weights = emb.fusion_weights(masks)
    assert set(weights) == set(vectors)
    fused = sum(np_(vectors[m]) * np_(weights[m])[..., None] for m in vectors)
    np.testing.assert_allclose(fused, np_(emb.fuse(vectors, masks)), atol=1e-6)
    padded = np_(x["hist_item"]) == 0
    assert padded.any() and all(np.all(np_(w)[padded] == 0) for w in weights.values())
    total = sum(np_(w) for w in weights.values())
    np.testing.assert_allclose(total[~padded], 1.0, atol=1e-6)


def test_lookup_table_scores_equal_the_exact_score_of_the_quantized_vectors():
    """Asymmetric PQ: exact target against the centroid reconstruction of each behaviour."""
    rng = np.random.default_rng(3)
    modalities = ("id", "text", "query")
    scorer = PQScorer(modalities=modalities, num_subvectors=4, num_centroids=3, num_heads=2)
    scorer.build((None, 8), (None, None, 8))
    for v in scorer.attention.weights:
        v.assign(rng.normal(size=v.shape).astype("float32"))
    books = rng.normal(size=(3, 4, 3, 2)).astype("float32")
    scorer.set_codebooks(books)
    b, length = 3, 6
    target = rng.normal(size=(b, 8)).astype("float32")
    codes = rng.integers(0, 3, size=(b, length, 3, 4)).astype("int32")
    codes[:, :, 1][rng.random((b, length)) < 0.5] = -1  # some behaviours lack text
    weights = rng.random((b, length, 3)).astype("float32")
    weights[codes[..., 0] < 0] = 0.0
    got = np_(scorer.score_codes(target, codes, weights))
    for i in range(b):
        for j in range(length):
            key = np.zeros(8, np.float32)
            for m in range(3):
                if codes[i, j, m, 0] < 0:
                    continue
                rebuilt = np.concatenate([books[m, s, codes[i, j, m, s]] for s in range(4)])
                key += weights[i, j, m] * rebuilt
            assert got[i, j] == pytest.approx(_numpy_exact_score(scorer, target[i], key), abs=1e-4)


def test_encode_codes_picks_the_nearest_centroid_and_marks_absence():
    rng = np.random.default_rng(4)
    scorer = PQScorer(modalities=("id", "query"), num_subvectors=2, num_centroids=5, num_heads=2)
    scorer.build((None, 4))
    books = rng.normal(size=(2, 2, 5, 2)).astype("float32")
    scorer.set_codebooks(books)
    parts = {m: rng.normal(size=(2, 7, 4)).astype("float32") for m in ("id", "query")}
    masks = {"id": np.ones((2, 7), bool), "query": rng.random((2, 7)) < 0.5}
    codes = np_(scorer.encode_codes(parts, masks))
    assert codes.shape == (2, 7, 2, 2) and codes.dtype == np.int32
    for mi, m in enumerate(("id", "query")):
        sub = parts[m].reshape(2, 7, 2, 2)
        dist = ((sub[..., None, :] - books[mi][None, None]) ** 2).sum(-1)  # [2, 7, S, C]
        want = np.where(masks[m][..., None], dist.argmin(-1), -1)
        np.testing.assert_array_equal(codes[:, :, mi], want)
    presence = scorer.presence(codes)
    np.testing.assert_array_equal(np_(presence["query"]), masks["query"])


@pytest.mark.parametrize(
    "layout,rotation,score_aware",
    [("modality", False, False), ("sides", False, False), ("fused", False, False),
     ("fused", True, False), ("sides", True, False), ("fused", False, True),
     ("sides", True, True)],
)  # fmt: skip
def test_with_one_centroid_per_vector_pq_equals_exact(exact_model, layout, rotation, score_aware):
    """Exact codes (a centroid per distinct sub-vector) give the exact first stage whatever
    is coded (modalities, sides, the fused key), after an OPQ rotation and after the
    score-aware transform (the target turned by its inverse)."""
    x = batch()
    pq_model, report = quantize_model(
        exact_model, [x], num_subvectors=2, num_centroids=4096, layout=layout, rotation=rotation,
        score_aware=score_aware,
    )  # fmt: skip
    rotations = np_(pq_model.gsu.scorer.rotations)
    assert len(rotations) == len(pq_model.gsu.scorer.groups)
    for r in rotations:  # orthogonal unless score-aware, away from the identity when learned
        orthogonal = np.abs(r @ r.T - np.eye(len(r))).max() < 1e-4
        assert orthogonal != score_aware
        assert (np.abs(r - np.eye(len(r))).max() > 1e-3) == (rotation or score_aware)
    assert all(r["relative_error"] < 1e-6 for r in report.values() if r["vectors"])
    ref, got = exact_model.retrieve(x), pq_model.retrieve(x)
    np.testing.assert_allclose(np_(got["scores"]), np_(ref["scores"]), atol=1e-4)
    np.testing.assert_array_equal(np_(got["indices"]), np_(ref["indices"]))
    np.testing.assert_allclose(np_(pq_model(x)), np_(exact_model(x)), atol=1e-5)
    assert gsu_recall(exact_model, pq_model, [x], ks=(1, 5))["recall@5"] == 1.0


@pytest.mark.parametrize("layout", ["modality", "sides", "fused"])
def test_stored_codes_give_the_in_model_quantization(exact_model, layout):
    x = batch(seed=5)
    pq_model, _ = quantize_model(
        exact_model, [x], num_subvectors=4, num_centroids=4, layout=layout, rotation=True
    )
    codes = np_(pq_model.pq_codes(x))
    m = {"modality": 5, "sides": 2, "fused": 1}[layout]
    assert len(pq_model.gsu.scorer.groups) == m
    assert codes.shape == x["hist_item"].shape + (m, 4)
    padded = np_(x["hist_item"]) == 0
    assert np.all(codes[padded] == -1) and np.all(codes[~padded][:, 0] >= 0)  # id present
    in_model = pq_model.retrieve(x)
    stored = pq_model.retrieve(x, extra_key_parts={spec.PQ_CODES.name: codes})
    for key in ("indices", "kept_mask", "scores"):
        np.testing.assert_allclose(np_(stored[key]), np_(in_model[key]), atol=1e-5)
    # Few centroids: a real approximation, so some of the exact top-5 is lost.
    recall = gsu_recall(exact_model, pq_model, [x], ks=(5,))["recall@5"]
    assert 0.0 < recall < 1.0


def test_training_scores_exactly_and_inference_from_codes(exact_model):
    x = batch(seed=6)
    pq_model, _ = quantize_model(exact_model, [x], num_subvectors=4, num_centroids=2)
    parts, masks = pq_model.gsu_parts(x)
    emb = pq_model.pair_embedding
    weights = emb.fusion_weights(masks)
    keys = emb.fuse(parts, masks)
    t_vec, t_mask = emb.encode(x["target_item"], x["target_query"], x["target_query_tokens"])
    target = pq_model._gsu_target(t_vec, t_mask, emb.fuse(t_vec, t_mask))
    mask = np_(x["hist_item"]) != 0
    scorer, exact = pq_model.gsu.scorer, exact_model.gsu.scorer
    trained = scorer(target, keys, mask, key_parts=parts, key_weights=weights, training=True)
    np.testing.assert_allclose(np_(trained), np_(exact(target, keys, mask)), atol=1e-5)
    served = scorer(target, keys, mask, key_parts=parts, key_weights=weights)
    assert np.abs(np_(served) - np_(trained))[mask].max() > 1e-3
    with pytest.raises(ValueError, match="key_weights"):
        scorer(target, keys, mask)


def test_pq_model_saves_loads_and_keeps_its_codebooks(exact_model, tmp_path):
    x = batch(seed=7)
    pq_model, _ = quantize_model(exact_model, [x], num_subvectors=4, num_centroids=8)
    path = str(tmp_path / "pq.keras")
    pq_model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.search == "pq" and loaded.gsu.scorer.num_centroids == 8
    np.testing.assert_array_equal(
        np_(loaded.gsu.scorer.codebooks), np_(pq_model.gsu.scorer.codebooks)
    )
    np.testing.assert_allclose(np_(loaded(x)), np_(pq_model(x)), atol=1e-6)
    config = loaded.gsu.scorer.get_config()
    assert config["modalities"] == list(pq_model.gsu.scorer.modalities)


def test_pq_trains_with_the_fit_codebooks_callback():
    from seminar_tf.quantization import FitCodebooks

    x, y = testing.make_batch(SPEC, 64, seed=8, min_history=1)
    model = build_model(SPEC, {**CONFIG, "search": "pq", "search_config": {
        "num_heads": 2, "num_subvectors": 2, "num_centroids": 8}}, TABLES)  # fmt: skip
    model.compile(optimizer="adam", loss="binary_crossentropy", run_eagerly=True)
    callback = FitCodebooks([x], max_vectors=1000)
    model.fit(
        x, y, batch_size=32, epochs=1, validation_data=(x, y), verbose=0, callbacks=[callback]
    )
    assert np.abs(np_(model.gsu.scorer.codebooks)).sum() > 0
    assert callback.report["id"]["vectors"] > 0


@pytest.mark.parametrize("library", ["faiss", "sklearn"])
def test_kmeans_returns_k_centroids_and_is_exact_on_few_points(library, monkeypatch):
    if library == "sklearn":
        monkeypatch.setitem(__import__("sys").modules, "faiss", None)  # import fails: fallback
    rng = np.random.default_rng(9)
    few = rng.normal(size=(5, 3)).astype("float32")
    centroids = kmeans(np.concatenate([few, few]), 8)
    assert centroids.shape == (8, 3)
    assert {tuple(r) for r in centroids} == {tuple(r) for r in few}
    # Repeated rows count as their number: k = 1 lands on the weighted mean.
    two = np.array([[0.0, 0.0]] * 9 + [[10.0, 0.0]], np.float32)
    np.testing.assert_allclose(kmeans(two, 1)[0], [1.0, 0.0], atol=1e-3)
    np.testing.assert_allclose(
        kmeans(two[[0, 9]], 1, weights=np.array([1.0, 3.0]))[0], [7.5, 0.0], atol=1e-3
    )
    blobs = np.concatenate([rng.normal(c, 0.01, size=(200, 2)) for c in (-5, 0, 5)])
    found = np.sort(kmeans(blobs.astype("float32"), 3)[:, 0])
    np.testing.assert_allclose(found, [-5, 0, 5], atol=0.1)


def test_invalid_configurations_say_what_is_wrong(exact_model):
    with pytest.raises(ValueError, match="num_subvectors"):
        PQScorer(modalities=("id",), num_subvectors=3).build((None, 8))
    with pytest.raises(ValueError, match="modalities"):
        PQScorer(modalities=())
    scorer = PQScorer(modalities=("id",), num_subvectors=2, num_centroids=4)
    scorer.build((None, 8))
    with pytest.raises(ValueError, match="do not fit"):
        scorer.set_codebooks(np.zeros((1, 2, 5, 4), np.float32))
    with pytest.raises(ValueError, match="search='pq'"):
        exact_model.pq_codes(batch())
    soft = build_model(SPEC, {**CONFIG, "search": "soft"}, TABLES)
    with pytest.raises(ValueError, match="search='exact'"):
        quantize_model(soft, [batch()])


JAX_SCRIPT = """
import os
import keras, numpy as np
assert keras.backend.backend() == "jax"
from seminar_tf import spec, testing
from seminar_tf.models import build_model
from seminar_tf.quantization import FitCodebooks, gsu_recall, quantize_model
ds = testing.make_data_spec()
tables = testing.make_tables(ds)
x, y = testing.make_batch(ds, 32, seed=1, min_history=1, padding="mixed")
config = {"embedding_dim": 8, "num_heads": 2, "top_k": 5, "hidden_units": [16]}
exact = build_model(ds, config, tables)
exact.build()
pq_model, _ = quantize_model(exact, [x], num_subvectors=2, num_centroids=4)
codes = pq_model.pq_codes(x)
stored = pq_model.retrieve(x, extra_key_parts={spec.PQ_CODES.name: codes})
in_model = pq_model.retrieve(x)
np.testing.assert_allclose(np.asarray(stored["scores"]), np.asarray(in_model["scores"]), atol=1e-5)
assert 0.0 < gsu_recall(exact, pq_model, [x], ks=(5,))["recall@5"] <= 1.0
pq_model.compile(optimizer="adam", loss="binary_crossentropy")
h = pq_model.fit(x, y, batch_size=16, epochs=1, verbose=0, validation_data=(x, y),
                 callbacks=[FitCodebooks([x])]).history
assert np.isfinite(h["loss"]).all() and np.isfinite(h["val_loss"]).all()
print("PQ", keras.backend.backend())
"""


def test_pq_runs_under_jax(run_script):
    """Layers use keras.ops only: the pq scorer, its codes and a fit run on JAX too."""
    import importlib.util

    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed (pip install 'seminar-tf[jax]')")
    assert "PQ jax" in run_script(JAX_SCRIPT, "jax")


@pytest.mark.parametrize("layout", ["modality", "sides", "fused"])
def test_pq_scores_many_candidates_as_repeated_rows(exact_model, layout):
    """The pq scorer codes the history once for all candidates and gives
    ``score_candidates`` what ``call`` gives on the repeated rows."""
    x = batch(n=5, seed=7)
    pq_model, _ = quantize_model(
        exact_model, [x], num_subvectors=2, num_centroids=4, layout=layout, rotation=True
    )
    rng = np.random.default_rng(1)
    candidates = rng.integers(spec.NUM_RESERVED_IDS, SPEC.num_items, size=(5, 6))
    got = np_(pq_model.score_candidates(x, candidates))
    tiled = {k: np.repeat(v, 6, axis=0) for k, v in x.items()}
    tiled["target_item"] = candidates.reshape(-1).astype(x["target_item"].dtype)
    np.testing.assert_allclose(got, np_(pq_model(tiled)).reshape(5, 6), rtol=1e-5, atol=1e-6)


def test_side_codes_come_from_per_item_and_per_query_tables(exact_model):
    """With layout "sides" a behaviour's codes are its item's and its query's: tables of
    codes per item and per query rebuild the stored codes of any history from its ids."""
    from seminar_tf.quantization import code_tables, codes_from_tables

    x = batch(n=48, seed=8)
    pq_model, _ = quantize_model(
        exact_model, [x], num_subvectors=4, num_centroids=8, layout="sides", rotation=True
    )
    tables = code_tables(pq_model, batch_size=7)
    emb = pq_model.pair_embedding
    assert tables["item"].shape == (emb.num_items, 4) and tables["query"].shape[0] == (
        emb.num_queries
    )
    assert (tables["item"][1:] >= 0).all() and (tables["item"][0] == -1).all()
    rebuilt = codes_from_tables(tables, x["hist_item"], x["hist_query"])
    np.testing.assert_array_equal(rebuilt, np_(pq_model.pq_codes(x)))
    stored = pq_model.retrieve(x, extra_key_parts={spec.PQ_CODES.name: rebuilt})
    np.testing.assert_allclose(
        np_(stored["scores"]), np_(pq_model.retrieve(x)["scores"]), atol=1e-5
    )
    modality_model, _ = quantize_model(exact_model, [x], num_subvectors=4, num_centroids=8)
    with pytest.raises(ValueError, match="sides"):
        code_tables(modality_model)


def _retrieve_with_k(model, x, k, **kwargs):
    """``model.retrieve`` keeping ``k`` (the GSU's own k is restored after)."""
    kept, model.gsu.k = model.gsu.k, k
    try:
        return {n: np_(v) for n, v in model.retrieve(x, **kwargs).items()}
    finally:
        model.gsu.k = kept


@pytest.mark.parametrize("layout", ["modality", "fused"])
def test_a_shortlist_covering_the_history_gives_the_exact_first_stage(exact_model, layout):
    """With r x K >= L every behaviour is re-ranked by its exact score: whatever the codes
    (one centroid: every behaviour has the same code score), the kept K, their scores and
    the click probability are the exact model's, in both of ``call``'s paths and from
    stored codes."""
    x = batch(seed=9)
    length, k = x["hist_item"].shape[1], exact_model.top_k
    coarse, _ = quantize_model(exact_model, [x], num_subvectors=1, num_centroids=1, layout=layout)
    assert gsu_recall(exact_model, coarse, [x], ks=(k,))[f"recall@{k}"] < 0.9
    full, _ = quantize_model(
        exact_model, [x], num_subvectors=1, num_centroids=1, layout=layout,
        shortlist=-(-length // k),
    )  # fmt: skip
    assert full.shortlist * k >= length and full.gsu.scorer.get_config()["shortlist"] > 1
    ref = exact_model.retrieve(x)
    codes = {spec.PQ_CODES.name: full.pq_codes(x)}
    for got in (full.retrieve(x), full.retrieve(x, extra_key_parts=codes)):
        np.testing.assert_array_equal(np_(got["kept_mask"]), np_(ref["kept_mask"]))
        np.testing.assert_array_equal(np_(got["indices"]), np_(ref["indices"]))
        np.testing.assert_allclose(np_(got["scores"]), np_(ref["scores"]), atol=1e-5)
    expected = np_(exact_model(x))
    for reembed in (False, True):
        full.reembed_kept = exact_model.reembed_kept = reembed
        np.testing.assert_allclose(np_(full(x)), np_(exact_model(x)), atol=1e-5)
        np.testing.assert_allclose(np_(full(x)), expected, atol=1e-5)
    full.reembed_kept = exact_model.reembed_kept = None


def test_a_shortlist_keeps_its_best_by_exact_score(exact_model):
    """r = 2: the kept K are the K best by exact score among the top 2K by the codes, the
    same through ``score_candidates`` as on repeated rows; training still scores exactly."""
    x = batch(seed=10)
    length, k = x["hist_item"].shape[1], exact_model.top_k
    pq_model, _ = quantize_model(
        exact_model, [x], num_subvectors=2, num_centroids=2, layout="fused", shortlist=2
    )
    got = {n: np_(v) for n, v in pq_model.retrieve(x).items()}
    pq_model.gsu.scorer.shortlist = 1
    try:
        short = _retrieve_with_k(pq_model, x, 2 * k)  # the codes' top 2K
    finally:
        pq_model.gsu.scorer.shortlist = 2
    every = _retrieve_with_k(exact_model, x, length)  # all behaviours, by exact score
    changed = 0
    for r in range(len(got["indices"])):
        exact = dict(zip(every["indices"][r][every["kept_mask"][r]].tolist(),
                         every["scores"][r][every["kept_mask"][r]].tolist()))  # fmt: skip
        listed = [i for i in short["indices"][r][short["kept_mask"][r]].tolist()]
        want = sorted(listed, key=lambda i: (-exact[i], i))[:k]
        kept = got["indices"][r][got["kept_mask"][r]].tolist()
        assert kept == want[: len(kept)] and len(kept) == min(k, len(listed))
        np.testing.assert_allclose(got["scores"][r][: len(kept)], [exact[i] for i in kept],
                                   atol=1e-5)  # fmt: skip
        changed += kept != short["indices"][r][: len(kept)].tolist()
    assert changed > 0  # the re-rank changed some rows' choice
    candidates = np.random.default_rng(2).integers(
        spec.NUM_RESERVED_IDS, SPEC.num_items, size=(len(got["indices"]), 3)
    )
    scored = np_(pq_model.score_candidates(x, candidates))
    tiled = {n: np.repeat(v, 3, axis=0) for n, v in x.items()}
    tiled["target_item"] = candidates.reshape(-1).astype(x["target_item"].dtype)
    np.testing.assert_allclose(scored.reshape(-1), np_(pq_model(tiled)), rtol=1e-5, atol=1e-6)
    loaded = PQScorer.from_config(pq_model.gsu.scorer.get_config())
    assert loaded.shortlist == 2
    with pytest.raises(ValueError, match="shortlist"):
        PQScorer(modalities=("id",), shortlist=0)


def test_score_aware_transform_is_the_quarter_power_of_the_targets_second_moment():
    from seminar_tf.quantization import score_aware_transform

    rng = np.random.default_rng(4)
    forms = rng.normal(size=(500, 6)) * np.array([4.0, 2.0, 1.0, 1.0, 0.5, 0.0])
    a = score_aware_transform(forms)
    moment = forms.T @ forms / len(forms)
    np.testing.assert_allclose(a, a.T, atol=1e-6)
    a4 = np.linalg.matrix_power(a.astype(np.float64), 4)
    # A^4 = S where S has weight; the null direction is floored (A stays invertible).
    big = np.abs(moment) > 1e-3 * np.abs(moment).max()
    np.testing.assert_allclose(a4[big], moment[big], rtol=2e-2, atol=2e-3 * moment.max())
    assert np.linalg.cond(a) < 1e3
