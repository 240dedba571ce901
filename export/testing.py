"""A tiny trained model and its export, built once per test session (shared by the pytest-xdist
workers through a lock file) for the export, serving and scoring tests."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os

FAST_MODEL = {"embedding_dim": 16, "num_heads": 2, "top_k": 8, "hidden_units": [32]}
MAX_LEN = 20
PQ_SUBVECTORS = 4
PQ_CENTROIDS = 16


@contextlib.contextmanager
def _locked(path: str):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_tiny_export(root: str) -> dict:
    """``{"raw", "data", "model", "export", "pq_model", "pq_export"}`` directories under
    ``root``: synthetic events -> ``seminar preprocess`` (max_len 20) -> ``seminar train``
    (3 steps of a small exact-search model) -> ``seminar export`` (version 1), and the same
    model through ``seminar quantize`` (4 sub-vectors x 16 centroids) -> ``seminar export``.
    Built once; later calls (from any process) wait for it and reuse it."""
    os.makedirs(root, exist_ok=True)
    names = ("raw", "data", "model", "export", "pq_model", "pq_export")
    paths = {k: os.path.join(root, k) for k in names}
    done = os.path.join(root, "done.json")
    with _locked(os.path.join(root, ".lock")):
        if os.path.exists(done):
            return paths
        import keras

        from export.writer import export_models
        from preprocessing.pipeline import PreprocessConfig, run
        from seminar_tf import training
        from seminar_tf.data import synth

        cfg = synth.SynthConfig(num_users=60, num_items=300, min_events=20, max_events=200, seed=3)
        files = synth.write(synth.generate(cfg), paths["raw"])
        run(
            PreprocessConfig(
                events=[files["events"]], items=[files["items"]], queries=[files["queries"]],
                out_dir=paths["data"], max_len=MAX_LEN,
            )
        )  # fmt: skip
        train_cfg = training.TrainConfig(
            epochs=1, batch_size=64, steps_per_epoch=3, validation_steps=1, model=FAST_MODEL
        )
        os.environ.setdefault("SEMINAR_QUIET", "1")
        model, _ = training.train(paths["data"], paths["model"], train_cfg)
        if getattr(model, "gsu_bias_weight", None) is not None:
            # 3 steps barely move it from 0; make the GSU score bias visible in the ranking.
            model.gsu_bias_weight.assign(0.5)
            model.save(os.path.join(paths["model"], training.MODEL_FILE))
        keras.backend.clear_session()
        export_models(paths["model"], paths["export"], version=1)
        training.quantize(
            paths["data"], paths["model"], paths["pq_model"], num_subvectors=PQ_SUBVECTORS,
            num_centroids=PQ_CENTROIDS, recall_ks=(1, FAST_MODEL["top_k"]),
        )  # fmt: skip
        keras.backend.clear_session()
        export_models(paths["pq_model"], paths["pq_export"], version=1)
        with open(done, "w") as f:
            json.dump(paths, f)
    return paths
