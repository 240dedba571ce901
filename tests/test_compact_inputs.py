"""Compact inputs: int32 ids and a history of query ids without per-behaviour query tokens,
which the model's ``query_tokens`` table (derived from the vocabularies) gives instead. The
windows, the model's outputs and its gradients must be what the full inputs give."""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from keras import ops  # noqa: E402

from seminar_tf import spec, testing, text, training  # noqa: E402
from seminar_tf.data.numpy_reader import WindowDataset, load_records  # noqa: E402
from seminar_tf.layers import MultiModalPairEmbedding  # noqa: E402
from seminar_tf.models import build_model  # noqa: E402
from seminar_tf.models.factory import data_kwargs  # noqa: E402
from seminar_tf.train_config import ConfigError, TrainConfig  # noqa: E402


def test_query_token_table_tokenises_like_preprocessing():
    table = text.query_token_table(["red shoes", "blue", "x y z w v"], ["red", "shoes", "y"], 3)
    assert table.shape == (5, 3) and not table[:2].any()
    np.testing.assert_array_equal(table[2], [2, 3, 0])
    np.testing.assert_array_equal(table[3], [1, 0, 0])  # a token not in the vocabulary: OOV
    np.testing.assert_array_equal(table[4], [1, 4, 1])  # the first max_tokens tokens only


def test_the_table_holds_every_events_tokens_of_a_preprocessing_output(tiny):
    data = tiny["data"]
    data_spec = spec.DataSpec.load(data)
    assert data_spec.min_query_count == 1 and spec.compact_inputs_exact(data_spec)
    table = training.load_tables(data)["query_tokens"]
    assert table.shape == (data_spec.num_queries, data_spec.max_query_tokens)
    events = with_query = 0
    for record in load_records(data):
        tokens = record[spec.SEQ_QUERY_TOKENS].reshape(-1, data_spec.max_query_tokens)
        np.testing.assert_array_equal(tokens, table[record["query"]])
        events += len(tokens)
        with_query += int((record["query"] > 0).sum())
    assert events and 0 < with_query < events


@pytest.mark.parametrize("per_row", [True, False])
def test_the_layer_reads_query_tokens_from_its_table(per_row):
    ds = testing.make_data_spec(query_text_dim=4)
    tables = testing.make_tables(ds)
    layer = MultiModalPairEmbedding(
        **data_kwargs(ds), embedding_dim=8, tables=tables, project_tables_first=per_row
    )
    rng = np.random.default_rng(0)
    items = rng.integers(0, ds.num_items, size=(3, 7))
    queries = np.where(rng.random((3, 7)) < 0.6, rng.integers(0, ds.num_queries, (3, 7)), 0)
    given, given_masks = layer.encode(items, queries, tables["query_tokens"][queries])
    looked_up, masks = layer.encode(items, queries.astype("int32"))
    for name in given:
        np.testing.assert_allclose(
            ops.convert_to_numpy(looked_up[name]), ops.convert_to_numpy(given[name]), atol=1e-6
        )
        np.testing.assert_array_equal(
            ops.convert_to_numpy(masks[name]), ops.convert_to_numpy(given_masks[name])
        )
    assert np.asarray(ops.convert_to_numpy(masks["query"])).any()


def test_a_model_without_the_table_needs_the_tokens():
    import dataclasses

    ds = dataclasses.replace(testing.make_data_spec(), max_query_tokens=0)
    model = build_model(ds, {"embedding_dim": 8, "num_heads": 2, "top_k": 3, "hidden_units": [8]},
                        testing.make_tables(ds))  # fmt: skip
    x, _ = testing.make_batch(testing.make_data_spec(), 4, seed=1, min_history=2)
    x.pop("hist_query_tokens")
    with pytest.raises(ValueError, match="hist_query_tokens"):
        model(x)


SCRIPT = """
import keras, numpy as np
from seminar_tf import testing
from seminar_tf.models import build_model

backend = keras.backend.backend()
ds = testing.make_data_spec()
tables = testing.make_tables(ds)
x, y = testing.make_batch(ds, 24, seed=5, min_history=0, padding="mixed")
compact = {k: v.astype("int32") for k, v in x.items() if k != "hist_query_tokens"}
assert any((x["hist_query_tokens"] != 0).ravel())


configs = [{"preset": "seminar", "reembed_kept": True}, {"preset": "seminar", "reembed_kept": False},
           {"preset": "sim"}, {"preset": "din"}, {"preset": "full_attention"}]
for config in configs:
    config = {"embedding_dim": 8, "num_heads": 2, "top_k": 5, "hidden_units": [16],
              "dropout": 0.0, **config}
    model = build_model(ds, config, tables)
    rng = np.random.default_rng(0)
    for v in model.trainable_variables:
        v.assign(np.asarray(v.value) + rng.normal(0, 0.1, v.shape).astype("float32"))
    np.testing.assert_allclose(np.asarray(model.predict(compact, verbose=0)),
                               np.asarray(model.predict(x, verbose=0)), rtol=1e-5, atol=1e-6)
    l1, g1 = testing.loss_and_gradients(model, compact, y)
    l2, g2 = testing.loss_and_gradients(model, x, y)
    assert abs(l1 - l2) < 1e-5, (config, l1, l2)
    for v, a, b in zip(model.trainable_variables, g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=f"{config} {v.path}")
    if model.gsu is not None:
        kept = [model.gather_kept(i, model.retrieve(i)) for i in (compact, x)]
        for name in ("kept_query_tokens", "kept_item", "kept_query"):
            np.testing.assert_array_equal(np.asarray(kept[0][name]), np.asarray(kept[1][name]))
print("SAME", backend, len(configs))
"""


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_compact_inputs_give_the_same_outputs_and_gradients(run_script, backend):
    """Every history preset, with and without re-embedding the kept: predictions, loss,
    gradients and the retrieval's kept behaviours (their tokens included) from compact inputs
    equal those from the full inputs, on TensorFlow and JAX."""
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    assert f"SAME {backend} 5" in run_script(SCRIPT, backend)


@pytest.mark.parametrize("reader", ["numpy", "tf.data"])
def test_readers_yield_compact_windows_equal_to_the_full_ones(tiny, reader):
    data = tiny["data"]
    cfg = TrainConfig(batch_size=16, reader=reader)
    assert training.compact_of(cfg, data)
    assert not training.compact_of(TrainConfig(compact_inputs="off"), data)
    full = training.windows(data, "valid", cfg, reader, compact=False)
    compact = training.windows(data, "valid", cfg, reader)
    if reader == "numpy":
        assert isinstance(compact, WindowDataset)
    pairs = list(zip(iter(full), iter(compact)))
    assert pairs
    for (f, y1), (c, y2) in pairs:
        assert set(c) == set(f) - set(spec.COMPACT_DROPPED)
        for name, value in c.items():
            assert np.asarray(value).dtype == np.int32, name
            np.testing.assert_array_equal(np.asarray(value), np.asarray(f[name]))
        np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))


def test_compact_on_refuses_an_output_that_would_lose_tokens(tiny, tmp_path):
    import json
    import shutil

    data = str(tmp_path / "data")
    shutil.copytree(tiny["data"], data)
    path = os.path.join(data, spec.SCHEMA_FILE)
    with open(path) as f:
        schema = json.load(f)
    schema["min_query_count"] = 2
    with open(path, "w") as f:
        json.dump(schema, f)
    assert not training.compact_of(TrainConfig(), data)  # auto: the full inputs
    with pytest.raises(ConfigError, match="compact_inputs 'on'"):
        training.compact_of(TrainConfig(compact_inputs="on"), data)
    with pytest.raises(ConfigError, match="compact_inputs"):
        TrainConfig(compact_inputs="yes")
