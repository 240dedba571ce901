"""Training runners and the pretrain/train/evaluate commands on a small preprocessing output."""

from __future__ import annotations

import importlib.util
import json
import os

import keras
import numpy as np
import pytest

from preprocessing.pipeline import PreprocessConfig, run
from seminar_tf import spec, training
from seminar_tf.data import synth

FAST_MODEL = {"embedding_dim": 16, "num_heads": 2, "top_k": 8, "hidden_units": [32]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    cfg = synth.SynthConfig(num_users=60, num_items=300, min_events=20, max_events=200, seed=3)
    paths = synth.write(synth.generate(cfg), str(tmp / "raw"))
    out = str(tmp / "data")
    run(
        PreprocessConfig(
            events=[paths["events"]], items=[paths["items"]], queries=[paths["queries"]],
            out_dir=out, max_len=20,
        )
    )  # fmt: skip
    return out


def _cfg(**kw):
    base = dict(epochs=1, batch_size=64, steps_per_epoch=4, validation_steps=2, model=FAST_MODEL)
    return training.TrainConfig(**{**base, **kw})


def test_cli_pretrain_train_evaluate_report(data_dir, tmp_path, monkeypatch):
    from seminar_tf.cli import main

    monkeypatch.setenv("SEMINAR_QUIET", "1")
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({"batch_size": 64, "validation_steps": 2, "model": FAST_MODEL}))
    psu_cfg = tmp_path / "psu.json"
    psu_model = {"embedding_dim": 16, "num_heads": 2}
    psu_cfg.write_text(json.dumps({"batch_size": 64, "validation_steps": 2, "model": psu_model}))
    psu_dir, ctr_dir = tmp_path / "psu", tmp_path / "ctr"
    common = ["--epochs", "1", "--steps-per-epoch", "3"]
    assert main(["pretrain", "--data", data_dir, "--out", str(psu_dir), "--config",
                 str(psu_cfg), *common]) == 0  # fmt: skip
    history = json.load(open(psu_dir / training.HISTORY_FILE))
    for task in ("align_loss", "next_loss", "relevance_loss", "loss"):
        assert task in history and np.isfinite(history[task][0])
    assert main(["train", "--data", data_dir, "--out", str(ctr_dir), "--config", str(cfg_file),
                 "--pretrained", str(psu_dir), *common]) == 0  # fmt: skip
    run_cfg = json.load(open(ctr_dir / training.CONFIG_FILE))
    assert run_cfg["kind"] == "ctr" and run_cfg["restored_variables"]
    assert run_cfg["data_spec"]["num_items"] == spec.DataSpec.load(data_dir).num_items
    report_path = tmp_path / "report.json"
    assert main(["evaluate", "--data", data_dir, "--model", str(ctr_dir), "--report-json",
                 str(report_path), "--max-ranked", "64"]) == 0  # fmt: skip
    report = json.load(open(report_path))
    for key in ("auc", "gauc", "logloss", "examples"):
        assert key in report
    for k in (1, 5, 10, 50):
        assert 0.0 <= report[f"hr@{k}"] <= 1.0 and 0.0 <= report[f"ndcg@{k}"] <= 1.0
    assert report["hr@1"] <= report["hr@5"] <= report["hr@10"] <= report["hr@50"]
    assert (
        report["examples"]
        == json.load(open(os.path.join(data_dir, spec.STATS_FILE)))["targets_per_split"]["test"]
    )


def test_cli_rejects_a_folder_that_is_not_preprocessed(tmp_path, capsys):
    from seminar_tf.cli import main

    rc = main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "not a `seminar preprocess` output" in err[0]


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            raise KeyboardInterrupt("simulated preemption")


def test_training_resumes_after_interruption(data_dir, tmp_path):
    out = str(tmp_path / "m")
    cfg = _cfg(epochs=3)
    with pytest.raises(KeyboardInterrupt):
        training.train(data_dir, out, cfg, callbacks=[_Interrupt()])
    assert os.path.isdir(os.path.join(out, "backup"))
    _, history = training.train(data_dir, out, cfg)
    # Epoch 1 was done before the interruption: only epochs 2 and 3 run now.
    assert len(history["loss"]) == 2
    assert os.path.exists(os.path.join(out, training.MODEL_FILE))


def test_same_seed_same_weights(data_dir, tmp_path):
    a, _ = training.train(data_dir, str(tmp_path / "a"), _cfg(steps_per_epoch=2))
    b, _ = training.train(data_dir, str(tmp_path / "b"), _cfg(steps_per_epoch=2))
    for va, vb in zip(a.weights, b.weights):
        np.testing.assert_allclose(np.asarray(va), np.asarray(vb), rtol=1e-5, atol=1e-6)


def test_saved_model_predicts_like_the_trained_one(data_dir, tmp_path):
    from seminar_tf.data.dataset import make_dataset

    model, _ = training.train(data_dir, str(tmp_path / "m"), _cfg(steps_per_epoch=2))
    loaded = training.load_model(str(tmp_path / "m"))
    features, _ = next(iter(make_dataset(data_dir, "test", 32)))
    np.testing.assert_allclose(
        model.predict_on_batch(features), loaded.predict_on_batch(features), rtol=1e-5, atol=1e-6
    )


def test_config_file_errors_name_the_key(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"epochz": 3}))
    with pytest.raises(ValueError, match="epochz"):
        training.TrainConfig.from_file(str(bad))


def test_trimmed_history_gives_the_same_predictions(data_dir, tmp_path):
    from seminar_tf.data.dataset import make_dataset, trim_history

    model, _ = training.train(data_dir, str(tmp_path / "m"), _cfg(steps_per_epoch=2))
    features, _ = next(iter(make_dataset(data_dir, "test", 64)))
    # Keep only the 5 most recent behaviours, so the batch can be trimmed to width 8.
    features = {
        k: (v.numpy() * (np.arange(20) >= 15).reshape((1, 20) + (1,) * (v.ndim - 2)))
        if k.startswith("hist_") else v.numpy()
        for k, v in features.items()
    }  # fmt: skip
    trimmed = {k: np.asarray(v) for k, v in trim_history(features, 20).items()}
    assert trimmed["hist_item"].shape[1] < features["hist_item"].shape[1]
    np.testing.assert_allclose(
        model.predict_on_batch(features), model.predict_on_batch(trimmed), rtol=1e-5, atol=1e-6
    )


def test_a_fresh_process_loads_a_saved_model(data_dir, tmp_path):
    """`seminar evaluate` and `seminar export` load models in a new process, where nothing
    has imported the model classes yet."""
    import subprocess
    import sys

    training.train(data_dir, str(tmp_path / "m"), _cfg(steps_per_epoch=1))
    code = (
        "import sys; from seminar_tf import training; "
        "m = training.load_model(sys.argv[1]); print(type(m).__name__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("SeminarCTR")


def test_training_a_pq_model_fits_codebooks_and_writes_their_report(data_dir, tmp_path):
    pq = {**FAST_MODEL, "search": "pq", "search_config": {
        "num_heads": 2, "num_subvectors": 4, "num_centroids": 8}}  # fmt: skip
    model, history = training.train(data_dir, str(tmp_path / "pq"), _cfg(model=pq))
    assert "val_auc" in history
    books = np.asarray(keras.ops.convert_to_numpy(model.gsu.scorer.codebooks))
    assert np.abs(books).sum() > 0
    with open(tmp_path / "pq" / training.QUANTIZATION_FILE) as f:
        report = json.load(f)["codebooks"]
    assert report["id"]["vectors"] > 0 and report["id"]["relative_error"] < 1.0
    loaded = training.load_model(str(tmp_path / "pq"))
    np.testing.assert_array_equal(
        np.asarray(keras.ops.convert_to_numpy(loaded.gsu.scorer.codebooks)), books
    )


def test_cli_quantize_reports_recall_and_errors_in_one_line(data_dir, tmp_path, capsys):
    from seminar_tf.cli import main

    training.train(data_dir, str(tmp_path / "exact"), _cfg())
    args = ["quantize", "--data", data_dir, "--model", str(tmp_path / "exact"),
            "--out", str(tmp_path / "pq"), "--subvectors", "4", "--centroids", "16"]  # fmt: skip
    assert main(args) == 0
    recall = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(recall) == {"recall@8", "examples"}  # k = 10 capped at the model's top_k
    assert 0.0 < recall["recall@8"] <= 1.0 and recall["examples"] > 0
    assert main(args[:-2] + ["--subvectors", "5"]) == 1  # 5 does not divide d = 16
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "num_subvectors" in err[0]
    assert main(["quantize", "--data", data_dir, "--model", str(tmp_path / "none"),
                 "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    assert "no model.keras" in capsys.readouterr().err
    # The default codes each behaviour's fused key; "sides" writes the per-item and
    # per-query code tables a store keeps instead of per-behaviour codes.
    with open(tmp_path / "pq" / training.QUANTIZATION_FILE) as f:
        report = json.load(f)
    assert (report["layout"], report["rotation"], report["score_aware"]) == ("fused", True, True)
    assert report["shortlist"] == 2
    assert report["code_bytes_per_behaviour"] == 4
    # No --subvectors: 32 does not divide d = 16, so the default takes 16.
    sides = args[:-6] + ["--out", str(tmp_path / "sides"), "--layout", "sides", "--rotation",
                         "--centroids", "16", "--shortlist", "3"]  # fmt: skip
    assert main(sides) == 0
    shortlisted = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert shortlisted["recall@8"] >= recall["recall@8"]
    tables = np.load(tmp_path / "sides" / training.CODE_TABLES_FILE)
    model = training.load_model(str(tmp_path / "sides"))
    assert model.gsu.scorer.layout == "sides" and model.shortlist == 3
    with open(tmp_path / "sides" / training.QUANTIZATION_FILE) as f:
        assert json.load(f)["shortlist"] == 3
    assert tables["item"].shape == (model.pair_embedding.num_items, 16)
    assert (tables["item"][1:] >= 0).all() and (tables["item"][1:] < 16).all()


DATA_PARALLEL_SCRIPT = """
import json, os, sys
backend = os.environ["KERAS_BACKEND"]
if backend == "jax":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
else:
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np
from seminar_tf import distribute, testing, training
from seminar_tf.losses import click_crossentropy
from seminar_tf.models import build_model

# One data-parallel step equals one single-device step on the same global batch.
ds = testing.make_data_spec()
tables = testing.make_tables(ds)
x, y = testing.make_batch(ds, 8, seed=4, min_history=1, padding="mixed")
config = {"embedding_dim": 8, "num_heads": 2, "top_k": 4, "hidden_units": [16], "dropout": 0.0}
cfg = training.TrainConfig(distribute="data", batch_size=4, learning_rate=0.05, lr_scaling="none")
plan = distribute.plan(cfg)
assert plan.replicas == 2 and plan.global_batch == 8, plan
single = build_model(ds, config, tables)
single.build()
start = single.get_weights()
single.compile(optimizer=keras.optimizers.SGD(0.05), loss=click_crossentropy)
single.train_on_batch(x, y)
with plan.scope():
    spread = build_model(ds, config, tables)
    spread.build()
    spread.set_weights(start)
    spread.compile(optimizer=keras.optimizers.SGD(0.05), loss=click_crossentropy)
    spread.train_on_batch(x, y)
if backend == "jax":
    assert len(spread.trainable_variables[0].value.sharding.device_set) == 2
moved = 0
for a, b, w0 in zip(single.get_weights(), spread.get_weights(), start):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    moved += not np.allclose(a, w0)
assert moved > 5, moved

# seminar train --distribute data: per-device batch, scaled rate, a model that loads anywhere.
out = sys.argv[1] + "/dp_" + backend
cfg = training.TrainConfig(
    epochs=1, batch_size=8, steps_per_epoch=3, validation_steps=2, distribute="data",
    model={**config, "preset": "seminar"},
)
model, history = training.train(sys.argv[2], out, cfg)
run = json.load(open(out + "/config.json"))
dist = run["distribution"]
assert dist["replicas"] == 2 and dist["global_batch"] == 16, dist
assert abs(dist["learning_rate"] - 1e-3 * 2 ** 0.5) < 1e-12, dist
assert run["train"]["batch_size"] == 8
assert np.isfinite(history["val_auc"]).all(), history
loaded = training.load_model(out)
p = np.asarray(loaded.predict(x, verbose=0))
assert p.shape == (8,) and np.isfinite(p).all()
print("DATA PARALLEL", backend, plan.engine)
"""


@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_data_parallel_over_two_virtual_devices(run_script, data_dir, tmp_path, backend):
    """``distribute="data"`` on two CPU devices (keras.distribution under JAX,
    tf.distribute under TensorFlow): a step equals the single-device step on the same
    global batch, and ``training.train`` runs with the per-device batch and the scaled
    learning rate, saving a model that loads on one device."""
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    script = DATA_PARALLEL_SCRIPT.replace("sys.argv[1]", repr(str(tmp_path)))
    script = script.replace("sys.argv[2]", repr(data_dir))
    assert f"DATA PARALLEL {backend}" in run_script(script, backend, timeout=400)


NO_TENSORFLOW_SCRIPT = """
import sys
sys.modules["tensorflow"] = None  # as on the GPU machine: `import tensorflow` fails
import json, numpy as np
from seminar_tf import training
cfg = training.TrainConfig(
    epochs=2, batch_size=64, steps_per_epoch=4, bucket_by_length=False, validation_steps=2, model={"preset": "seminar", "embedding_dim": 8, "num_heads": 2,
                                    "top_k": 4, "hidden_units": [16]},
)
assert training.reader_of(cfg) == "numpy"
model, history = training.train(__DATA__, __OUT__, cfg)
assert len(history["loss"]) == 2 and np.isfinite(history["val_auc"]).all(), history
report = training.evaluate(__DATA__, __OUT__, max_ranked=20)
assert report["examples"] > 0 and 0 <= report["auc"] <= 1 and report["ranked_positives"] == 20
assert "tensorflow" not in {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
print("TRAINED WITHOUT TENSORFLOW", report["examples"])
"""


def test_jax_trains_and_evaluates_without_tensorflow(run_script, data_dir, tmp_path):
    """``KERAS_BACKEND=jax`` with TensorFlow unimportable (the GPU machine): the numpy reader
    feeds training and evaluation from the same preprocessing output."""
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed")
    script = NO_TENSORFLOW_SCRIPT.replace("__DATA__", repr(data_dir))
    script = script.replace("__OUT__", repr(str(tmp_path / "jax_run")))
    assert "TRAINED WITHOUT TENSORFLOW" in run_script(script, "jax", timeout=400)
