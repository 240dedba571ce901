"""Tests of PSU and SeminarCTR: shapes, masking, restore/freeze, save/load, backends, learning."""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from keras import ops  # noqa: E402

from seminar_tf import spec, testing  # noqa: E402
from seminar_tf.models import PRESETS, PSU, SeminarCTR, build_model, build_psu  # noqa: E402

SPEC = testing.make_data_spec()
TABLES = testing.make_tables(SPEC)
BARE = testing.make_data_spec(
    num_attributes=0, max_attributes=0, text_dim=0, image_dim=0, query_text_dim=0
)
SMALL = {"embedding_dim": 8, "num_heads": 2, "hidden_units": [16], "dropout": 0.1}
CTR = dict(SMALL, top_k=5, short_term_len=3)
PSU_CONFIG = {"embedding_dim": 8, "num_heads": 2}
TASK_LOSSES = ("align_loss", "next_loss", "relevance_loss")


def batch(n=32, seed=1, data_spec=SPEC, padding="mixed"):
    return testing.make_batch(data_spec, n, seed=seed, min_history=1, padding=padding)


def weights_of(layer):
    return [ops.convert_to_numpy(v).copy() for v in layer.weights]


# Tracing a train step costs seconds on a small CPU, so most tests run eagerly; the graph
# (tf.function) path is covered by test_psu_outputs_and_named_task_losses, the
# planted-signal fit (SeminarCTR) and the subprocess tests.
def compiled_ctr(config=None, tables=TABLES, data_spec=SPEC, lr=1e-2, run_eagerly=True):
    model = build_model(data_spec, {**CTR, **(config or {})}, tables)
    model.compile(
        optimizer=keras.optimizers.Adam(lr), loss="binary_crossentropy", run_eagerly=run_eagerly
    )
    return model


def fitted_psu(tables=TABLES, data_spec=SPEC, epochs=1, config=None, run_eagerly=True):
    psu = build_psu(data_spec, {**PSU_CONFIG, **(config or {})}, tables)
    psu.compile(optimizer=keras.optimizers.Adam(1e-2), run_eagerly=run_eagerly)
    x, y = batch(64, data_spec=data_spec)
    history = psu.fit(x, y, batch_size=32, epochs=epochs, verbose=0)
    return psu, history


# ------------------------------------------------------------------------------------- PSU
def test_psu_outputs_and_named_task_losses():
    psu, history = fitted_psu(epochs=2, run_eagerly=False)
    for name in ("loss",) + TASK_LOSSES:
        assert name in history.history and len(history.history[name]) == 2
        assert np.isfinite(history.history[name]).all()
    assert all(v > 0 for name in TASK_LOSSES for v in history.history[name])
    x, _ = batch(10)
    out = psu(x)
    d = 8
    assert tuple(out["user_state"].shape) == (10, d)
    assert tuple(out["target_pair"].shape) == (10, d)
    assert tuple(out["score"].shape) == (10,)
    for m in ("id", "attr", "text", "image"):
        assert tuple(out[f"modality_{m}"].shape) == (10, d)
    total = psu.compute_loss(x, None, out)
    losses = psu.compute_task_losses(x, None, out)
    expected = 0.1 * losses["align_loss"] + losses["next_loss"] + losses["relevance_loss"]
    assert float(total) == pytest.approx(float(expected), rel=1e-5)


def test_psu_without_modalities_and_without_labels():
    psu = build_psu(BARE, PSU_CONFIG, testing.make_tables(BARE))
    psu.compile(optimizer="adam", run_eagerly=True)
    x, _ = batch(32, data_spec=BARE)
    history = psu.fit(x, batch_size=16, epochs=1, verbose=0)  # no labels: all rows anchors
    assert history.history["align_loss"] == [0.0]  # one modality: nothing to align
    assert np.isfinite(history.history["loss"]).all()


def test_psu_learns_on_planted_data():
    data = testing.make_planted_data(1024, seed=0)
    psu = build_psu(data.data_spec, {"embedding_dim": 16, "num_heads": 2}, data.tables)
    psu.compile(optimizer=keras.optimizers.Adam(5e-3), run_eagerly=True)
    h = psu.fit(data.features, data.labels, batch_size=128, epochs=3, verbose=0).history
    for name in TASK_LOSSES:
        assert h[name][-1] < h[name][0], (name, h[name])


# ------------------------------------------------------------------------------------- CTR
@pytest.mark.parametrize(
    "config",
    [
        {"search": "exact"},
        {"search": "soft"},
        {"search": "recent"},
        {"search": "simhash"},
        {"search": "all"},
        {"use_history": False},
        {"search": "exact", "top_k": 20, "short_term_len": 0},  # K > L
        {"search": "exact", "gsu_score_bias": False, "use_history_labels": False},
    ],
)
def test_ctr_shapes_and_fit_step(config):
    model = compiled_ctr(config)
    x, y = batch(32)
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    p = model.predict(x, verbose=0)
    assert p.shape == (32,) and np.all((p > 0) & (p < 1))
    if model.gsu is not None and not model._use_gsu_bias:
        assert not model.gsu.trainable


def test_without_gsu_projections_the_gsu_scores_pair_vectors_and_still_trains():
    """``gsu_projections=False`` (the "without G(j)" ablation): no projection layers, the
    GSU keeps the score bias (so it trains), and the setting survives get_config."""
    with_g = compiled_ctr()
    without = compiled_ctr({"gsu_projections": False})
    assert with_g.gsu_modalities and not without.gsu_modalities
    assert not any("gsu_projection" in w.path for w in without.weights)
    assert without._use_gsu_bias and without.gsu.trainable
    assert SeminarCTR.from_config(without.get_config()).gsu_projections is False
    x, y = batch(32)
    before = weights_of(without.gsu)
    without.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert any(not np.allclose(a, b) for a, b in zip(before, weights_of(without.gsu)))


def test_ctr_padding_changes_nothing_and_padding_side_does_not_matter():
    model = build_model(SPEC, {**CTR, "search": "exact"}, TABLES)
    x, _ = batch(16, padding="left")
    base = ops.convert_to_numpy(model(x))
    pad = x["hist_item"] == 0
    assert pad.any()
    rng = np.random.default_rng(0)
    noisy = dict(x)
    noisy["hist_query"] = np.where(
        pad, rng.integers(2, SPEC.num_queries, pad.shape), x["hist_query"]
    )
    noisy["hist_query_tokens"] = np.where(pad[..., None], 3, x["hist_query_tokens"])
    noisy["hist_label"] = np.where(pad, 1, x["hist_label"])
    np.testing.assert_allclose(ops.convert_to_numpy(model(noisy)), base, atol=1e-6)
    # The same histories right-padded give the same predictions.
    right = dict(x)
    for name in ("hist_item", "hist_query", "hist_label", "hist_query_tokens"):
        right[name] = np.stack([np.roll(v, -int(p.sum()), axis=0) for v, p in zip(x[name], pad)])
    np.testing.assert_allclose(ops.convert_to_numpy(model(right)), base, atol=1e-5)


def test_ctr_without_modalities():
    model = compiled_ctr(data_spec=BARE, tables=testing.make_tables(BARE))
    x, y = batch(32, data_spec=BARE)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert model.predict(x, verbose=0).shape == (32,)


def test_restore_pretrained_copies_weights():
    psu, _ = fitted_psu()
    model = build_model(SPEC, {**CTR, "search": "exact"}, TABLES)
    copied = model.restore_pretrained(psu)
    assert "pair_embedding/item_embeddings" in copied and "gsu/query_kernel" in copied
    src = {v.path.split("pair_embedding/", 1)[1]: v for v in psu.pair_embedding.weights}
    for v in model.pair_embedding.weights:
        name = v.path.split("pair_embedding/", 1)[1]
        if name in model.pair_embedding.table_names:
            continue
        np.testing.assert_array_equal(ops.convert_to_numpy(v), ops.convert_to_numpy(src[name]))
    psu_attention = {v.name: v for v in psu.attention.weights}
    for v in model.gsu.scorer.attention.weights:
        np.testing.assert_array_equal(
            ops.convert_to_numpy(v), ops.convert_to_numpy(psu_attention[v.name])
        )
    for m in model.gsu_modalities:  # G(j) stays the identity
        np.testing.assert_array_equal(
            ops.convert_to_numpy(getattr(model, f"gsu_projection_{m}").kernel), np.eye(8)
        )


def test_restore_pretrained_mismatch_raises_and_assigns_nothing():
    psu, _ = fitted_psu()
    wider = build_model(SPEC, {**CTR, "embedding_dim": 16}, TABLES)
    with pytest.raises(ValueError, match="item_embeddings"):
        wider.restore_pretrained(psu)
    no_text_spec = testing.make_data_spec(text_dim=0)
    no_text = build_model(no_text_spec, CTR, testing.make_tables(no_text_spec))
    no_text.build()
    before = weights_of(no_text.pair_embedding)
    with pytest.raises(ValueError, match="text_projection"):
        no_text.restore_pretrained(psu)
    for a, b in zip(before, weights_of(no_text.pair_embedding)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="PSU"):
        no_text.restore_pretrained(no_text)


def test_freeze_pretrained_really_freezes():
    psu, _ = fitted_psu()
    model = compiled_ctr({"search": "exact", "freeze_pretrained": True})
    model.restore_pretrained(psu)
    assert model.pair_embedding.trainable_weights == []
    assert model.gsu.trainable_weights == []
    frozen_before = weights_of(model.pair_embedding) + weights_of(model.gsu)
    esu_before = weights_of(model.esu)
    mlp_before = weights_of(model.logit_layer)
    x, y = batch(32)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    for a, b in zip(frozen_before, weights_of(model.pair_embedding) + weights_of(model.gsu)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(esu_before, weights_of(model.esu)))
    assert any(not np.array_equal(a, b) for a, b in zip(mlp_before, weights_of(model.logit_layer)))
    # Not frozen: the embeddings do train.
    free = compiled_ctr({"search": "exact"})
    free.restore_pretrained(psu)
    before = weights_of(free.pair_embedding)
    free.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert not np.array_equal(before[0], weights_of(free.pair_embedding)[0])


@pytest.mark.parametrize("search", ["exact", "simhash"])
def test_ctr_save_load_round_trip(tmp_path, search):
    model = compiled_ctr({"search": search})
    x, y = batch(32)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    path = str(tmp_path / "ctr.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, SeminarCTR)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6, atol=1e-7
    )
    for name, value in loaded.pair_embedding.get_tables().items():
        np.testing.assert_array_equal(value, TABLES[name].astype(value.dtype))
    assert loaded.get_config() == model.get_config()


def test_psu_save_load_round_trip(tmp_path):
    psu, _ = fitted_psu()
    path = str(tmp_path / "psu.keras")
    psu.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, PSU)
    x, _ = batch(16)
    a, b = psu.predict(x, verbose=0), loaded.predict(x, verbose=0)
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_allclose(np.asarray(b[key], float), np.asarray(a[key], float), atol=1e-6)
    for name, value in loaded.pair_embedding.get_tables().items():
        np.testing.assert_array_equal(value, TABLES[name].astype(value.dtype))


def test_model_config_round_trip_and_factory():
    model = build_model(SPEC, {**CTR, "preset": "eta"})
    assert model.search == "simhash" and model.search_config == {"num_bits": 16}
    config = model.get_config()
    assert "tables" not in config
    assert SeminarCTR.from_config(config).get_config() == config
    psu = build_psu(SPEC, PSU_CONFIG)
    assert PSU.from_config(psu.get_config()).get_config() == psu.get_config()
    assert build_model(SPEC, {"preset": "dnn"}).use_history is False
    assert set(PRESETS) >= {"seminar", "sim", "eta", "din", "twin", "dnn"}
    with pytest.raises(ValueError, match="toppk"):
        build_model(SPEC, {"toppk": 3})
    with pytest.raises(ValueError, match="num_items"):
        build_model(SPEC, {"num_items": 3})
    with pytest.raises(ValueError, match="preset"):
        build_model(SPEC, {"preset": "nope"})
    with pytest.raises(ValueError, match="search"):
        build_model(SPEC, {"search": "nope"})
    with pytest.raises(ValueError, match="hidden_units"):
        build_model(SPEC, {"hidden_units": [0]})


def test_planted_signal_is_learned():
    train = testing.make_planted_data(2000, seed=0)
    test = testing.make_planted_data(800, seed=1)
    aucs = {}
    for name, config in {"seminar": {"search": "exact"}, "dnn": {"use_history": False}}.items():
        keras.utils.set_random_seed(0)
        model = build_model(
            train.data_spec,
            {
                "embedding_dim": 16,
                "num_heads": 2,
                "top_k": 10,
                "hidden_units": [32],
                "dropout": 0.0,
                **config,
            },
            train.tables,
        )
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
        assert not model.run_eagerly  # the tf.function training step
        history = model.fit(train.features, train.labels, batch_size=64, epochs=5, verbose=0)
        assert np.isfinite(history.history["loss"]).all()
        aucs[name] = testing.roc_auc(test.labels, model.predict(test.features, verbose=0))
    assert aucs["seminar"] > 0.7, aucs
    assert aucs["seminar"] > aucs["dnn"] + 0.15, aucs


# --------------------------------------------------------------------------- other processes
TRAIN_SCRIPT = """
import os
import keras, numpy as np
assert keras.backend.backend() == os.environ["KERAS_BACKEND"]
from seminar_tf import testing
from seminar_tf.models import build_model, build_psu
ds = testing.make_data_spec()
tables = testing.make_tables(ds)
x, y = testing.make_batch(ds, 32, seed=1, min_history=1, padding="mixed")
psu = build_psu(ds, {"embedding_dim": 8, "num_heads": 2}, tables)
psu.compile(optimizer="adam")
h = psu.fit(x, y, batch_size=16, epochs=1, verbose=0).history
assert all(np.isfinite(h[k]).all() and h[k][0] > 0 for k in ("align_loss", "next_loss", "relevance_loss")), h
model = build_model(ds, {"embedding_dim": 8, "num_heads": 2, "top_k": 5, "hidden_units": [16]}, tables)
model.restore_pretrained(psu)
model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
before = [np.array(w) for w in model.esu.get_weights()]
h = model.fit(x, y, batch_size=16, epochs=1, verbose=0).history
assert np.isfinite(h["loss"]).all()
assert any(not np.array_equal(a, b) for a, b in zip(before, model.esu.get_weights()))
assert model.predict(x, verbose=0).shape == (32,)
print("TRAINED", keras.backend.backend())
"""


@pytest.mark.slow  # the JAX fit is also run by test_jax_trains_and_evaluates_without_tensorflow
def test_training_step_under_jax(run_script):
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed (pip install 'seminar-tf[jax]')")
    assert "TRAINED jax" in run_script(TRAIN_SCRIPT, "jax")


GRADIENT_SCRIPT = """
import keras, numpy as np
from seminar_tf import testing
from seminar_tf.models import build_model

backend = keras.backend.backend()
ds = testing.make_data_spec()
tables = testing.make_tables(ds)
x, y = testing.make_batch(ds, 24, seed=5, min_history=0, padding="mixed")


configs = [{"search": "exact"}, {"search": "exact", "gsu_projections": False},
           {"search": "soft"}, {"search": "simhash"}, {"search": "recent", "short_term_len": 0}]
for config in configs:
    config = {"embedding_dim": 8, "num_heads": 2, "top_k": 5, "short_term_len": 3,
              "hidden_units": [16], "dropout": 0.0, **config}
    cheap, full = (build_model(ds, {**config, "reembed_kept": f}, tables) for f in (True, False))
    rng = np.random.default_rng(0)
    # away from the initial values (identity G(j), zero score-bias weight) that hide paths
    for v in cheap.trainable_variables:
        v.assign(np.asarray(v.value) + rng.normal(0, 0.1, v.shape).astype("float32"))
    full.set_weights(cheap.get_weights())
    (l1, g1), (l2, g2) = testing.loss_and_gradients(cheap, x, y), testing.loss_and_gradients(full, x, y)
    assert abs(l1 - l2) < 1e-5, (config, l1, l2)
    names = [v.path for v in cheap.trainable_variables]
    for name, a, b in zip(names, g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=f"{config} {name}")
    moved = {n for n, g in zip(names, g1) if np.abs(g).max() > 0}
    assert any("item_embeddings" in n for n in moved), moved
    if cheap._use_gsu_bias:  # the CTR loss reaches the GSU scorer (and G(j)) through the bias
        assert any("/gsu/" in n for n in moved) == bool(cheap.gsu.trainable_weights), moved
        assert any("gsu_projection" in n for n in moved) == bool(cheap.gsu_modalities), moved
print("SAME", backend, len(configs))
"""


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_reembedding_the_kept_gives_the_full_graphs_loss_and_gradients(run_script, backend):
    """``reembed_kept`` (the default: no gradient through the L-wide search) gives the loss
    and the gradient of every trainable variable that backpropagating through all L gives,
    for every searching preset, with and without G(j), on TensorFlow and JAX."""
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    assert f"SAME {backend} 5" in run_script(GRADIENT_SCRIPT, backend)


MIRRORED_SCRIPT = """
import tensorflow as tf
cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)
import keras, numpy as np
from seminar_tf import testing
from seminar_tf.models import build_model
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert strategy.num_replicas_in_sync == 2
ds = testing.make_data_spec()
tables = testing.make_tables(ds)
x, y = testing.make_batch(ds, 64, seed=1, min_history=1, padding="mixed")
with strategy.scope():
    model = build_model(ds, {"embedding_dim": 8, "num_heads": 2, "top_k": 5, "hidden_units": [16]}, tables)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
before = [np.array(w) for w in model.logit_layer.get_weights()]
h = model.fit(x, y, batch_size=32, epochs=1, verbose=0).history
assert np.isfinite(h["loss"]).all(), h
assert any(not np.array_equal(a, b) for a, b in zip(before, model.logit_layer.get_weights()))
got = model.pair_embedding.get_tables()["item_attributes"]
assert (got == tables["item_attributes"]).all()
assert model.predict(x, verbose=0).shape == (64,)
print("MIRRORED", strategy.num_replicas_in_sync)
"""


@pytest.mark.slow  # superseded by test_training.py::test_data_parallel_over_two_virtual_devices
def test_mirrored_strategy_fit_step_on_two_logical_cpus(run_script):
    assert "MIRRORED 2" in run_script(MIRRORED_SCRIPT, "tensorflow")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_history_preset_has_the_short_term_branch(preset):
    """The presets compare long-term searches on equal terms: each one with a history gets
    the same short-term branch (the last SHORT_TERM_LEN behaviours) in its MLP input, which
    for a two-stage model reaches the ranking as the ``short_term`` retrieval output;
    ``dnn`` has no history and no branch."""
    from seminar_tf.models.factory import SHORT_TERM_LEN

    model = build_model(SPEC, {"preset": preset, **SMALL, "top_k": 5}, tables=TABLES)
    if preset == "dnn":
        assert not model.use_history and model.short_term_len == 0
        return
    assert model.short_term_len == SHORT_TERM_LEN
    if model.gsu is None:  # full_attention: one stage, no retrieval output
        return
    x, _ = batch(8)
    base = ops.convert_to_numpy(model.retrieve(x)["short_term"])
    assert base.shape == (8, SMALL["embedding_dim"])
    # The newest behaviour is inside the window: changing it moves the branch's vector.
    row = int(np.argmax((np.asarray(x["hist_item"]) > 0).sum(1)))
    changed = {k: np.array(v) for k, v in x.items()}
    changed["hist_item"][row, -1] = 2 + (changed["hist_item"][row, -1] - 1) % (SPEC.num_items - 3)
    moved = ops.convert_to_numpy(model.retrieve(changed)["short_term"])
    assert not np.allclose(moved[row], base[row])
    np.testing.assert_allclose(np.delete(moved, row, 0), np.delete(base, row, 0), rtol=1e-5)


@pytest.mark.parametrize(
    "config",
    [
        {"preset": "seminar"},
        {"preset": "seminar", "gsu_projections": False, "reembed_kept": False},
        {"preset": "sim"},
        {"preset": "eta"},
        {"preset": "din"},
        {"preset": "dnn"},
        {"preset": "full_attention"},
    ],
    ids=lambda c: "-".join(str(v) for v in c.values()),
)
def test_score_candidates_equals_the_call_on_repeated_rows(config):
    """One history against C candidates gives what ``call`` gives on the row repeated once
    per candidate, for every preset (users table included), with perturbed weights."""
    ds = testing.make_data_spec(num_user_attributes=5, max_user_attributes=2)
    tables = testing.make_tables(ds)
    model = build_model(
        ds, {"embedding_dim": 8, "num_heads": 2, "top_k": 4, "hidden_units": [16], **config},
        tables,
    )  # fmt: skip
    model.build()
    rng = np.random.default_rng(3)
    for v in model.trainable_weights:
        v.assign(np.asarray(v.value) + rng.normal(0, 0.2, v.shape).astype("float32"))
    x, _ = testing.make_batch(ds, 6, seed=2, min_history=0, padding="mixed")
    c = 7
    candidates = rng.integers(spec.NUM_RESERVED_IDS, ds.num_items, size=(6, c))
    got = ops.convert_to_numpy(model.score_candidates(x, candidates))
    tiled = {k: np.repeat(v, c, axis=0) for k, v in x.items()}
    tiled["target_item"] = candidates.reshape(-1).astype(x["target_item"].dtype)
    want = ops.convert_to_numpy(model(tiled, training=False)).reshape(6, c)
    assert got.shape == (6, c)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.ptp(got, axis=1).max() > 1e-4  # the candidates are told apart


def test_reembed_by_default_only_where_the_history_is_long():
    """``reembed_kept=None`` re-embeds the kept for long or unknown-length histories and
    backpropagates through short ones (where re-embedding K of L costs more than it saves);
    an explicit True/False always wins; anything else is refused."""
    ds = testing.make_data_spec()
    config = {"embedding_dim": 8, "num_heads": 2, "top_k": 5, "short_term_len": 3}
    model = build_model(ds, config, testing.make_tables(ds))
    assert model.reembed_kept is None
    threshold = SeminarCTR.REEMBED_MIN_RATIO * (5 + 3)
    assert model._reembeds(np.zeros((2, threshold))) is True
    assert model._reembeds(np.zeros((2, threshold - 1))) is False
    assert model._reembeds(keras.KerasTensor((None, None))) is True
    forced = build_model(ds, {**config, "reembed_kept": True}, testing.make_tables(ds))
    assert forced._reembeds(np.zeros((2, 4))) is True
    assert SeminarCTR.from_config(model.get_config()).reembed_kept is None
    with pytest.raises(ValueError, match="reembed_kept"):
        build_model(ds, {**config, "reembed_kept": "yes"}, testing.make_tables(ds))
