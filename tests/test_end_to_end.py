"""End to end on synthetic lifelong data: the history model must beat chance and no history.

Slow (a few minutes on 2 cores): run with ``pytest -m slow``.
"""

from __future__ import annotations

import pytest

from preprocessing.pipeline import PreprocessConfig, run
from seminar_tf import training
from seminar_tf.data import synth

pytestmark = pytest.mark.slow

MODEL = {"embedding_dim": 32, "num_heads": 2, "top_k": 32, "hidden_units": [64]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    paths = synth.write(synth.generate(synth.SynthConfig(num_users=150, seed=1)), str(tmp / "raw"))
    out = str(tmp / "data")
    run(PreprocessConfig(events=[paths["events"]], items=[paths["items"]],
                         queries=[paths["queries"]], out_dir=out, max_len=100))  # fmt: skip
    return out


def _fit_eval(data_dir, out, model):
    cfg = training.TrainConfig(epochs=2, batch_size=256, seed=0, model=model)
    training.train(data_dir, out, cfg)
    return training.evaluate(data_dir, out, max_ranked=500)


@pytest.fixture(scope="module")
def seminar_dir(data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("seminar"))
    return out, _fit_eval(data_dir, out, {**MODEL, "preset": "seminar"})


def test_lifelong_history_beats_chance_and_no_history(data_dir, seminar_dir, tmp_path):
    _, seminar = seminar_dir
    dnn = _fit_eval(data_dir, str(tmp_path / "dnn"), {**MODEL, "preset": "dnn"})
    assert seminar["auc"] > 0.6, seminar
    assert seminar["auc"] > dnn["auc"] + 0.03, (seminar["auc"], dnn["auc"])


def test_product_quantized_first_stage_keeps_the_auc(data_dir, seminar_dir, tmp_path):
    model_dir, exact = seminar_dir
    out = str(tmp_path / "pq")
    report = training.quantize(data_dir, model_dir, out, num_subvectors=8, num_centroids=256)
    assert report["valid_gsu_recall"]["recall@10"] > 0.9, report["valid_gsu_recall"]
    pq = training.evaluate(data_dir, out, max_ranked=500)
    assert abs(pq["auc"] - exact["auc"]) < 0.01, (pq["auc"], exact["auc"])
