"""The CLI checks everything up front, answers every error with one line, shows defaults in
--help, and is quiet by default. Most cases run in a subprocess (the real entry point, its
real stderr) and finish before TensorFlow would be imported."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from seminar_tf import cli
from seminar_tf.cli import commands
from seminar_tf.train_config import ConfigError, TrainConfig, check_model_config, model_arguments

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("KERAS_BACKEND", "tensorflow")
    return {**env, **extra}


def _seminar(*args, timeout=120, **kw):
    """Runs ``seminar ARGS`` and reports which heavy modules it imported."""
    script = (
        "import sys\n"
        "from seminar_tf.cli import main\n"
        "try:\n"
        f"    rc = main({list(args)!r})\n"
        "except SystemExit as e:\n"
        "    rc = e.code\n"
        "print('IMPORTED', 'tensorflow' in sys.modules, 'keras' in sys.modules)\n"
        "sys.exit(rc)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", script], env=_env(), cwd=REPO, capture_output=True, text=True,
        timeout=timeout, **kw,
    )  # fmt: skip


def _one_error_line(result, *needles):
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "error:" in lines[0] and "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- TrainConfig
def test_config_file_with_a_bad_value_fails_at_once(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"epochs": "three"}))
    result = _seminar("train", "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "m"),
                      "--config", str(cfg))  # fmt: skip
    assert result.returncode == 2
    line = _one_error_line(result, "seminar train: error:", "epochs", "'three'", str(cfg))
    assert "run with -v" not in line
    assert "IMPORTED False False" in result.stdout  # refused before TensorFlow / Keras load


@pytest.mark.parametrize("epochs", ["0", "-1", "two"])
def test_epochs_below_one_refused(tmp_path, epochs):
    result = _seminar("train", "--data", str(tmp_path), "--out", str(tmp_path / "m"),
                      "--epochs", epochs)  # fmt: skip
    assert result.returncode == 2
    _one_error_line(result, "--epochs", "integer >= 1", repr(epochs))
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "field, value",
    [
        ("epochs", 0), ("epochs", "3"), ("epochs", 2.0), ("epochs", True), ("batch_size", 0),
        ("patience", -1), ("learning_rate", 0), ("learning_rate", "1e-3"),
        ("learning_rate", float("nan")), ("history", "positives"), ("max_len", 0),
        ("steps_per_epoch", 0), ("validation_steps", -2), ("seed", -1), ("shuffle_buffer", 0),
        ("distribute", "mirror"), ("bucket_by_length", "yes"), ("model", []),
    ],
)  # fmt: skip
def test_train_config_names_field_and_value(field, value):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**{field: value})
    assert field in str(e.value) and repr(value) in str(e.value)


def test_train_config_accepts_valid_values():
    cfg = TrainConfig(epochs=np.int64(3), patience=0, max_len=None, steps_per_epoch=None,
                      learning_rate=1, history="all")  # fmt: skip
    assert cfg.epochs == 3 and type(cfg.epochs) is int and cfg.learning_rate == 1.0
    json.dumps(cfg.__dict__)  # config.json stays writable


def test_config_file_unknown_key_suggests(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"epoch": 2}))
    with pytest.raises(ConfigError, match=r"unknown config key 'epoch' \(did you mean 'epochs'"):
        TrainConfig.from_file(str(path))
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        TrainConfig.from_file(str(path))


@pytest.mark.parametrize(
    "model, kind, message",
    [
        ({"topk": 5}, "ctr", "did you mean 'top_k'"),
        ({"top_k": "5"}, "ctr", "model.top_k must be an integer"),
        ({"hidden_units": 64}, "ctr", "model.hidden_units must be a list"),
        ({"dropout": "0.5"}, "ctr", "model.dropout must be a number"),
        ({"use_history": 1}, "ctr", "model.use_history must be true or false"),
        ({"search_config": [1]}, "ctr", "model.search_config must be an object or null"),
        ({"preset": "sin"}, "ctr", "did you mean 'sim'"),
        ({"preset": "seminar"}, "psu", "applies to `seminar train`"),
        ({"num_items": 5}, "ctr", "comes from the preprocessing output"),
        ({"align_wieght": 0.1}, "psu", "did you mean 'align_weight'"),
    ],
)
def test_model_settings_checked_before_building(model, kind, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        check_model_config(model, kind)


def test_model_settings_accepts_factory_configs():
    check_model_config({"preset": "eta", "top_k": 8, "hidden_units": [32], "dropout": 0,
                        "search_config": {"num_bits": 8}, "name": "m"}, "ctr")  # fmt: skip
    check_model_config({"embedding_dim": 16, "num_heads": 2, "temperature": 0.1}, "psu")


def test_model_arguments_match_the_constructors():
    """The source-read signatures (no Keras import) are the classes' real ones."""
    import inspect

    from seminar_tf.models import PSU, SeminarCTR

    for kind, cls in (("ctr", SeminarCTR), ("psu", PSU)):
        real = set(inspect.signature(cls.__init__).parameters) - {"self", "tables", "kwargs"}
        assert set(model_arguments(kind)) == real | {"name"}


# ------------------------------------------------------------------------ unknown options
def test_preprocess_refuses_an_option_neither_we_nor_beam_know(tmp_path):
    result = _seminar("preprocess", "--events", str(tmp_path), "--items", str(tmp_path),
                      "--out", str(tmp_path / "p"), "--maxlen", "200")  # fmt: skip
    assert result.returncode == 2
    _one_error_line(result, "seminar preprocess: error: unknown option --maxlen",
                    "(did you mean --max-len?)")  # fmt: skip
    assert not (tmp_path / "p").exists()


def test_beam_options_pass_and_bad_beam_values_refused():
    pre = cli._command_parser(cli.build_parser(), argparse.Namespace(command="preprocess"))
    ours = cli.option_strings(pre)
    cli.check_beam_options(
        ["--runner=DataflowRunner", "--project", "P", "--region", "R", "--temp_location",
         "gs://x", "--direct_num_workers=2", "--experiments=a", "--experiments=b"], ours,
    )  # fmt: skip
    with pytest.raises(cli.UsageError, match="direct_num_workers"):
        cli.check_beam_options(["--direct_num_workers=two"], ours)
    with pytest.raises(cli.UsageError, match=r"--temp_locaton \(did you mean --temp_location\?"):
        cli.check_beam_options(["--temp_locaton", "gs://x"], ours)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "--data", "d", "--out", "o", "--epohcs", "2"], "--epohcs (did you mean --epochs?)"),
        (["train", "--data", "d", "--out", "o", "--epoch", "2"], "--epoch (did you mean --epochs?)"),
        (["query", "--request", "r", "--timout", "1"], "--timout (did you mean --timeout?)"),
        (["tarin"], "(did you mean train?)"),
        (["serve", "--export", "e", "--grpc-port", "70000"], "--grpc-port"),
        (["query", "--request", "r", "--timeout", "0"], "a number > 0"),
        (["data", "synth", "--out", "o", "--users", "0"], "--users"),
        (["data", "synth", "--out", "o", "--min-events", "9", "--max-events", "3"], "--min-events"),
        (["evaluate", "--data", "d", "--model", "m", "--negatives", "0"], "--negatives"),
    ],
)  # fmt: skip
def test_every_user_error_is_one_line(capsys, args, needle):
    try:
        rc = cli.main(args)
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and needle in err, err


def test_unexpected_error_one_line_and_traceback_with_v(capsys, monkeypatch, tmp_path):
    def boom(args, extra):
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setattr(commands, "cmd_synth", boom)
    assert cli.main(["data", "synth", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "seminar data synth: error: RuntimeError: something broke [...] "
        "(run with -v for the traceback)"
    ]
    assert cli.main(["data", "synth", "--out", str(tmp_path), "-v"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "run with -v" not in err


# ------------------------------------------------------------------------------ help, version
def _all_parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def test_every_option_has_help_and_defaults_show():
    parser = cli.build_parser()
    for p in _all_parsers(parser):
        for action in p._actions:
            if action.option_strings:
                assert action.help, f"{p.prog} {action.option_strings} has no help"
    pre = cli._command_parser(parser, argparse.Namespace(command="preprocess"))
    text = pre.format_help()
    assert "(default: 1000)" in " ".join(text.split())  # --max-len
    assert "(default: None)" not in text


def test_version():
    result = subprocess.run([sys.executable, "-m", "seminar_tf.cli", "--version"], env=_env(),
                            cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0
    from importlib import metadata

    assert result.stdout.strip() == f"seminar {metadata.version('seminar-tf')}"


# --------------------------------------------------------------------- quiet, progress in pipes
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from preprocessing.pipeline import PreprocessConfig, run
    from seminar_tf.data import synth

    tmp = tmp_path_factory.mktemp("cli")
    cfg = synth.SynthConfig(num_users=20, num_items=100, min_events=5, max_events=40, seed=1)
    paths = synth.write(synth.generate(cfg), str(tmp / "raw"))
    out = str(tmp / "data")
    run(PreprocessConfig(events=[paths["events"]], items=[paths["items"]], out_dir=out,
                         max_len=16))  # fmt: skip
    return out


def test_train_is_quiet_and_pipes_get_no_progress_bar(data_dir, tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"batch_size": 32, "validation_steps": 1,
                               "model": {"embedding_dim": 8, "num_heads": 1, "top_k": 4,
                                         "hidden_units": [8]}}))  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "seminar_tf.cli", "train", "--data", data_dir, "--out",
         str(tmp_path / "m"), "--config", str(cfg), "--epochs", "2", "--steps-per-epoch", "2"],
        env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\r" not in result.stdout and "\r" not in result.stderr
    assert "\b" not in result.stdout
    epoch_lines = [line for line in result.stdout.splitlines() if "/step" in line]
    assert len(epoch_lines) == 2  # Keras verbose=2: one line per epoch
    # Only our stage lines on stderr: no TensorFlow C++ logs (cuInit, oneDNN), no warnings.
    err = result.stderr.splitlines()
    assert err and all(" seminar" in line.split(": ")[0] for line in err), result.stderr
    assert any("examples/s" in line for line in err)
    json.loads(result.stdout.splitlines()[-1])


# ------------------------------------------------------------------------ query without TF
_ECHO_SCRIPT = r"""
import sys
from concurrent import futures

import grpc
import numpy as np

from serving.client import GrpcTransport
from serving.tf_protos import make_ndarray, serving_apis

apis = serving_apis()
assert "tensorflow" not in sys.modules, "tensorflow/__init__ ran"


class Echo(apis.prediction_service_pb2_grpc.PredictionServiceServicer):
    def Predict(self, request, context):
        response = apis.predict_pb2.PredictResponse()
        for name, tensor in request.inputs.items():
            response.outputs[name].CopyFrom(tensor)
        return response


server = grpc.server(futures.ThreadPoolExecutor(2))
apis.prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Echo(), server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
values = {
    "s": np.array([[b"a", "b\u00e9".encode()], [b"", b"x"]], dtype=object),
    "i64": np.arange(6, dtype=np.int64).reshape(2, 3) - 3,
    "i32": np.array([1, -2], np.int32),
    "f32": np.array([[0.5, -1.25]], np.float32),
    "f64": np.array([1e-300], np.float64),
    "b": np.array([True, False]),
    "empty": np.zeros((0, 4), np.int64),
}
transport = GrpcTransport(f"127.0.0.1:{port}")
out = transport.predict("m", "sig", values, timeout=10)
for k, v in values.items():
    assert out[k].dtype == v.dtype and out[k].shape == v.shape, (k, out[k])
    assert (out[k] == v).all(), k
transport.close()
server.stop(None)
assert "tensorflow" not in sys.modules and "keras" not in sys.modules

# A process that needs real TensorFlow afterwards gets it, and the protos agree with it.
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

assert tf.reduce_sum(tf.constant([1, 2])).numpy() == 3 and hasattr(tf, "saved_model")
from serving.tf_protos import make_tensor_proto

for k, v in values.items():
    np.testing.assert_array_equal(tf.make_ndarray(make_tensor_proto(v)), v)
    np.testing.assert_array_equal(make_ndarray(tf.make_tensor_proto(v)), v)
request = predict_pb2.PredictRequest()
request.inputs["x"].CopyFrom(tf.make_tensor_proto(values["i64"]))
assert predict_pb2 is apis.predict_pb2
# TensorFlow's short forms: one value repeated, typed *_val fields.
np.testing.assert_array_equal(make_ndarray(tf.make_tensor_proto(7, shape=[2, 2])), np.full((2, 2), 7, np.int32))
print("OK")
"""


def test_grpc_client_without_tensorflow_then_tensorflow_works():
    result = subprocess.run([sys.executable, "-c", _ECHO_SCRIPT], env=_env(), cwd=REPO,
                            capture_output=True, text=True, timeout=180)  # fmt: skip
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr[-4000:]


@pytest.mark.parametrize(
    ("argv", "config", "preset"),
    [
        ([], None, "seminar"),  # no preset anywhere: the seminar preset, as --help says
        (["--preset", "din"], None, "din"),
        ([], {"model": {"preset": "sim"}}, "sim"),
        (["--preset", "eta"], {"model": {"preset": "sim"}}, "eta"),
    ],
)
def test_train_preset_defaults_to_seminar(tmp_path, argv, config, preset):
    if config is not None:
        path = tmp_path / "c.json"
        path.write_text(json.dumps(config))
        argv = argv + ["--config", str(path)]
    args = cli.build_parser().parse_args(["train", "--data", "d", "--out", "o", *argv])
    assert commands.train_config(args).model["preset"] == preset


def test_pretrain_config_gets_no_preset():
    args = cli.build_parser().parse_args(["pretrain", "--data", "d", "--out", "o"])
    assert "preset" not in commands.train_config(args).model
