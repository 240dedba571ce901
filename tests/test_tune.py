"""`seminar tune`: a seeded search on the validation split that writes a usable best config."""

from __future__ import annotations

import dataclasses
import json

import pytest

from preprocessing.pipeline import PreprocessConfig, run
from seminar_tf import tuning
from seminar_tf.data import synth
from seminar_tf.train_config import ConfigError, TrainConfig

TINY = {"num_heads": 2, "hidden_units": [16]}
BASE = {"batch_size": 64, "steps_per_epoch": 3, "validation_steps": 2, "patience": 0}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    cfg = synth.SynthConfig(num_users=40, num_items=200, min_events=20, max_events=120, seed=5)
    paths = synth.write(synth.generate(cfg), str(tmp / "raw"))
    out = str(tmp / "data")
    run(
        PreprocessConfig(
            events=[paths["events"]], items=[paths["items"]], queries=[paths["queries"]],
            out_dir=out, max_len=20,
        )
    )  # fmt: skip
    return out


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "base.json"
    path.write_text(json.dumps({**BASE, "model": TINY}))
    return str(path)


@pytest.fixture
def splits_read(monkeypatch):
    """The splits every dataset is built for during the test."""
    from seminar_tf.data import dataset

    seen, make = [], dataset.make_dataset

    def recording(data_dir, split="train", *args, **kwargs):
        seen.append(split)
        return make(data_dir, split, *args, **kwargs)

    monkeypatch.setattr(dataset, "make_dataset", recording)
    return seen


def _tune(*args) -> int:
    from seminar_tf.cli import main

    return main(["tune", *args])


def test_tune_writes_best_config_from_validation_only(
    data_dir, config_file, tmp_path, splits_read, monkeypatch, capsys
):
    monkeypatch.setenv("SEMINAR_QUIET", "1")
    out = tmp_path / "tune"
    args = ["--data", data_dir, "--out", str(out), "--config", config_file, "--epochs", "1"]
    assert _tune(*args, "--trials", "2", "--seed", "7", "--preset", "din") == 0
    assert splits_read and set(splits_read) == {"train", "valid"}  # never "test"

    report = json.loads((out / tuning.TRIALS_FILE).read_text())
    rows = report["trials"]
    assert [r["trial"] for r in rows] == [1, 2]
    assert all(0.0 <= r["val_auc"] <= 1.0 and r["epochs_run"] == 1 for r in rows)
    assert rows[0]["params"] != rows[1]["params"]
    best_row = max(rows, key=lambda r: r["val_auc"])
    assert report["best_trial"] == best_row["trial"]
    assert report["best_params"] == best_row["params"]
    assert (out / tuning.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    best = TrainConfig.from_file(str(out / tuning.BEST_FILE))  # usable as --config
    space = tuning.search_space({"preset": "din"}, max_len=20)
    assert set(space) == set(tuning.SEARCH_SPACE)  # din has a first stage: top_k searched
    searched = {"learning_rate": best.learning_rate, "weight_decay": best.weight_decay,
                **{k: best.model[k] for k in ("dropout", "embedding_dim", "top_k")}}  # fmt: skip
    assert searched == best_row["params"]
    for name, value in searched.items():
        assert tuning.in_space(name, value, space), (name, value)
    assert best.model["top_k"] <= 20  # cut to the history length
    assert best.model["preset"] == "din" and best.model["num_heads"] == 2
    assert (best.epochs, best.seed, best.steps_per_epoch) == (1, 7, 3)
    # The best trial keeps its model; the others' are removed.
    for r in rows:
        kept = (out / "trials" / r["id"] / "model.keras").exists()
        assert kept == (r is best_row)
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["best_trial"] == best_row["trial"]

    # Other settings into the same --out: one line, nothing run.
    assert _tune(*args, "--trials", "3", "--seed", "8", "--preset", "din") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0] and "seed" in err[0]
    assert json.loads((out / tuning.TRIALS_FILE).read_text())["trials"] == rows


def _params(out) -> list:
    return [r["params"] for r in json.loads((out / tuning.TRIALS_FILE).read_text())["trials"]]


def test_resume_and_same_seed_same_values(data_dir, tmp_path, monkeypatch):
    from seminar_tf import training

    calls = []
    scores = iter([0.61, 0.74, 0.66, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])

    def train(data_dir, run_dir, cfg, pretrained=None, callbacks=None):
        calls.append(cfg)
        return None, {"loss": [0.7], "val_auc": [0.4, next(scores)]}

    monkeypatch.setattr(training, "train", train)
    base = TrainConfig(epochs=2, seed=3, model={"preset": "eta", **TINY})
    resumed = tmp_path / "resumed"
    tuning.tune(data_dir, str(resumed), base, 2)
    report = tuning.tune(data_dir, str(resumed), base, 3)  # one more trial, not three
    assert len(calls) == 3
    assert report["best_trial"] == 2 and report["best_val_auc"] == 0.74  # the max, not the last
    assert [r["best_epoch"] for r in report["trials"]] == [2, 2, 2]
    best = TrainConfig.from_file(str(resumed / tuning.BEST_FILE))
    assert best == tuning.apply_params(base, report["trials"][1]["params"])
    assert best.learning_rate == calls[1].learning_rate and best.model == calls[1].model

    tuning.tune(data_dir, str(tmp_path / "again"), base, 3)
    tuning.tune(data_dir, str(tmp_path / "other"), dataclasses.replace(base, seed=4), 3)
    assert _params(tmp_path / "again") == _params(resumed)  # the seed fixes the values
    assert _params(tmp_path / "other") != _params(resumed)
    assert all(c.seed == 3 for c in calls[:6]) and calls[6].seed == 4  # one training seed


@pytest.mark.parametrize("trials", ["0", "-1", "two"])
def test_bad_trials_is_one_line(trials, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _tune("--data", str(tmp_path), "--out", str(tmp_path / "t"), "--trials", trials)
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--trials" in err[0] and "integer >= 1" in err[0]
    assert not (tmp_path / "t").exists()


def test_bad_preset_is_one_line(data_dir, tmp_path, capsys):
    assert _tune("--data", data_dir, "--out", str(tmp_path / "t"), "--preset", "semnar") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean 'seminar'" in err[0]


def test_search_space_per_model():
    assert "top_k" not in tuning.search_space({"preset": "dnn"})
    assert "top_k" not in tuning.search_space({"preset": "full_attention"})
    assert "top_k" in tuning.search_space({"preset": "seminar"})
    assert tuning.search_space({"preset": "sim"}, max_len=40)["top_k"][2] == (16, 32)
    assert tuning.search_space({}, max_len=8)["top_k"][2] == (16,)
    assert "embedding_dim" not in tuning.search_space({"preset": "seminar"}, pretrained=True)
    cfg = tuning.apply_params(
        TrainConfig(model={"preset": "sim"}),
        {"learning_rate": 2e-4, "weight_decay": 0.01, "dropout": 0.1, "top_k": 32},
    )
    assert (cfg.learning_rate, cfg.weight_decay) == (2e-4, 0.01)
    assert cfg.model == {"preset": "sim", "dropout": 0.1, "top_k": 32}


@pytest.mark.parametrize("value", [-0.1, float("nan"), "0.01", True])
def test_weight_decay_is_checked(value):
    with pytest.raises(ConfigError, match="weight_decay"):
        TrainConfig(weight_decay=value)
