"""Atomic preprocess outputs (temporary sibling, manifest, run ids), the checks that refuse a
mixed or unfinished output, and the one-line query normalisation shared with the export."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from preprocessing.pipeline import PreprocessConfig, run
from seminar_tf import spec
from seminar_tf.data import synth
from seminar_tf.data.manifest import MANIFEST_FILE, verify_output
from seminar_tf.data.readers import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("raw")
    cfg = synth.SynthConfig(num_users=12, num_items=40, min_events=5, max_events=40, seed=5)
    return synth.write(synth.generate(cfg), str(tmp), fmt="parquet")


def _config(raw, out, **kw):
    return PreprocessConfig(
        events=[raw["events"]], items=[raw["items"]], out_dir=str(out), max_len=8, **kw
    )


def _shards(out) -> list[str]:
    return sorted(os.listdir(os.path.join(out, spec.EXAMPLES_DIR)))


def _run_id(out) -> str:
    return json.load(open(os.path.join(out, MANIFEST_FILE)))["run_id"]


def test_rerun_replaces_the_output_whole(raw, tmp_path, capsys):
    out = tmp_path / "out"
    stats = run(_config(raw, out, num_shards=3))
    assert stats["accounting_ok"] and len(_shards(out)) == 3
    first = verify_output(str(out))["run_id"]
    for name in (spec.SCHEMA_FILE, spec.STATS_FILE):
        assert json.load(open(out / name))["run_id"] == first

    # An existing OUT is refused without --overwrite (one line), and left as it was.
    from seminar_tf.cli import main

    rc = main(["preprocess", "--events", raw["events"], "--items", raw["items"], "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "--overwrite" in err[0]
    assert _run_id(out) == first

    stats = run(_config(raw, out, num_shards=1, overwrite=True))
    assert stats["accounting_ok"] and stats["rejected_events"] == 0
    assert _shards(out) == ["part-00000-of-00001.tfrecord"]  # no shard of the old run left
    second = verify_output(str(out))["run_id"]
    assert second != first
    assert not glob.glob(str(tmp_path / "out.tmp-*")) and not glob.glob(
        str(tmp_path / "*.failed-*")
    )


def test_out_that_is_a_file_is_refused_in_one_line(raw, tmp_path, capsys):
    from seminar_tf.cli import main

    target = tmp_path / "a_file"
    target.write_text("x")
    rc = main(["preprocess", "--events", raw["events"], "--items", raw["items"],
               "--out", str(target), "--overwrite"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "is a file" in err[0]
    assert target.read_text() == "x"


@pytest.fixture(scope="module")
def good_output(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("good") / "out"
    run(_config(raw, out, num_shards=2))
    return out


def _copy(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage, message", [
    ("no_manifest", "no _MANIFEST.json"),
    ("missing_file", "listed in _MANIFEST.json but missing"),
    ("resized_file", "bytes"),
    ("stray_shard", "not in _MANIFEST.json"),
    ("other_run_schema", "from run"),
])  # fmt: skip
def test_verify_output_refuses_mixed_or_damaged_outputs(good_output, tmp_path, damage, message):
    out = _copy(good_output, tmp_path)
    verify_output(str(out))
    shard = out / spec.EXAMPLES_DIR / _shards(out)[0]
    if damage == "no_manifest":
        (out / MANIFEST_FILE).unlink()
    elif damage == "missing_file":
        (out / spec.VOCAB_DIR / "items.txt").unlink()
    elif damage == "resized_file":
        with open(out / spec.TABLES_FILE, "ab") as f:
            f.write(b"\0")
    elif damage == "stray_shard":
        shutil.copy(shard, out / spec.EXAMPLES_DIR / "part-00007-of-00009.tfrecord")
    else:
        schema = json.load(open(out / spec.SCHEMA_FILE))
        schema["run_id"] = "someone-else"
        text = json.dumps(schema)
        size = os.path.getsize(out / spec.SCHEMA_FILE)
        (out / spec.SCHEMA_FILE).write_text(text.ljust(size))  # same size: only the id differs
    with pytest.raises(DataError, match=message) as err:
        verify_output(str(out))
    assert "\n" not in str(err.value)
    from seminar_tf.cli import UsageError, check_data_dir

    with pytest.raises(UsageError):
        check_data_dir(str(out))


def test_killed_rerun_leaves_the_old_output_or_none_never_a_mix(raw, good_output, tmp_path):
    out = _copy(good_output, tmp_path)
    old = _run_id(out)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "seminar_tf.cli", "preprocess", "--events", raw["events"],
         "--items", raw["items"], "--out", str(out), "--overwrite", "--max-len", "8",
         "--num-shards", "1"],
        cwd=REPO, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline, started = time.time() + 120, False
    try:
        while time.time() < deadline and proc.poll() is None:
            tmps = glob.glob(str(out) + ".tmp-*")
            # Kill once the run has written its first file into its temporary directory.
            if tmps and any(files for _, _, files in os.walk(tmps[0])):
                started = True
                break
            time.sleep(0.005)
        assert started and proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # OUT is the old, complete output (or, had the kill hit between the two renames, absent).
    if out.exists():
        assert verify_output(str(out))["run_id"] == old
        assert _shards(out) == _shards(good_output)
    (left,) = glob.glob(str(out) + ".tmp-*")
    with pytest.raises(DataError, match="unfinished"):
        verify_output(left)
    from seminar_tf.cli import UsageError, check_data_dir

    with pytest.raises(UsageError):
        check_data_dir(left)


def test_python_and_tensorflow_query_normalisation_agree():
    import tensorflow as tf

    from export.graph import normalize_query as tf_normalize
    from seminar_tf.text import normalize_query

    queries = [
        " Red\rShoes ", "a\x85b", "x\u2028y\u2029z", "tab\tand\x0bvt\x0cff", "nb\xa0sp",
        "\x1c\x1d\x1e\x1f sep", "ÉCOLE  Straße", "   ", "", "line\r\nbreak\n",
        "em\u2003space\u3000ideo",
    ]  # fmt: skip
    got = [v.decode("utf-8") for v in tf_normalize(tf.constant(queries)).numpy()]
    want = [normalize_query(q) for q in queries]
    assert got == want
    assert all(len(w.splitlines()) <= 1 for w in want)


def test_vocabulary_writer_refuses_a_value_with_a_line_break(tmp_path):
    from preprocessing.vocab import _WriteVocabularyFiles

    writer = _WriteVocabularyFiles(str(tmp_path))
    with pytest.raises(ValueError, match="line break"):
        list(writer.process({"item": ["ok", "bad\u2028id"]}))


def test_verify_output_needs_neither_tensorflow_nor_beam_nor_pyarrow():
    code = (
        "import sys; from seminar_tf.data.manifest import verify_output; "
        "print(sorted(m for m in ('tensorflow', 'apache_beam', 'pyarrow', 'keras') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
