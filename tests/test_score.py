"""``seminar score``: the Beam RunInference pipeline over the exported cascade."""

from __future__ import annotations

import glob
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from seminar_tf import spec  # noqa: E402
from serving import scoring  # noqa: E402


def _keras_scores(tiny, split, model_key="model"):
    import seminar_tf.models  # noqa: F401
    from seminar_tf.data.dataset import make_dataset
    from seminar_tf.training import load_model

    model = load_model(tiny[model_key])
    rows = []
    for features, labels in make_dataset(tiny["data"], split, 128, include_meta=True):
        p = model.predict_on_batch({k: features[k] for k in spec.MODEL_FEATURE_NAMES})
        for u, t, i, y, s in zip(features["user_id"].numpy(), features["timestamp"].numpy(),
                                 features["target_item"].numpy(), labels.numpy(), np.asarray(p)):  # fmt: skip
            rows.append((u.decode(), int(t), int(i), int(y), float(s)))
    return sorted(rows)


@pytest.mark.parametrize("kind", ["exact", "pq"])
def test_score_pipeline_equals_the_keras_model(tiny, tmp_path, kind):
    """The pq export's codes are computed in the pipeline by its pq_codes signature."""
    prefix = "pq_" if kind == "pq" else ""
    out = str(tmp_path / "scores")
    export = tiny[prefix + "export"]
    stats = scoring.score(tiny["data"], export, out, split="test", batch_size=64)
    files = glob.glob(os.path.join(out, "scores-*.parquet"))
    assert files
    table = pa.concat_tables([pq.read_table(f) for f in files])
    assert table.schema.names == ["user_id", "timestamp", "item_id", "item", "label", "probability"]
    got = sorted(zip(table["user_id"].to_pylist(), table["timestamp"].to_pylist(),
                     table["item"].to_pylist(), table["label"].to_pylist(),
                     table["probability"].to_pylist()))  # fmt: skip
    want = _keras_scores(tiny, "test", prefix + "model")
    assert stats["scored"] == len(got) == len(want) > 0
    assert [g[:4] for g in got] == [w[:4] for w in want]
    np.testing.assert_allclose([g[4] for g in got], [w[4] for w in want], rtol=1e-5, atol=1e-6)
    assert all(i.startswith("i") for i in table["item_id"].to_pylist())


def test_cli_score_errors_are_one_line(tiny, tmp_path, capsys):
    from seminar_tf.cli import main

    rc = main(["score", "--data", tiny["data"], "--export", str(tmp_path / "none"),
               "--out", str(tmp_path / "s")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "seminar score: error" in err[0]
