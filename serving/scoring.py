"""``seminar score``: offline scoring of a preprocessing output with the exported cascade, as a
Beam pipeline (``apache_beam.ml.inference`` RunInference), so batch scoring runs on the same
engines as preprocessing (FnApiRunner here; Dataflow, Flink or Spark elsewhere).

The graph reads as the job diagram::

    ListFiles -> ReadRecords -> CutWindows -> Score (RunInference: [pq_codes_encoded ->]
    retrieve_encoded -> rank_encoded) -> ToRows -> WriteScores (OUT/scores-*.parquet)

``CutWindows`` cuts each target's history exactly as the tf.data reader does
(``seminar_tf.data.dataset.cut_windows``) with the export's ``max_len`` and history mode, and
``Score`` runs the exported SavedModels (not the Keras model), so the scores are what the
served cascade would answer for the same examples.
"""

from __future__ import annotations

import json
import os
import time

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import (
    KeyedModelHandler,
    ModelHandler,
    PredictionResult,
    RunInference,
)

from seminar_tf import spec

SCORES_PREFIX = "scores"


def _arrow_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("user_id", pa.string()),
            ("timestamp", pa.int64()),
            ("item_id", pa.string()),
            ("item", pa.int64()),
            ("label", pa.int64()),
            ("probability", pa.float32()),
        ]
    )


class _Cascade:
    """The two exported signatures (``retrieve_encoded`` -> ``rank_encoded``) as one callable
    on a batch ``{feature: array}``; a plain object so RunInference can share it."""

    def __init__(self, export_dir: str):
        import tensorflow as tf

        from export.writer import version_dir

        self.loaded = {
            m: tf.saved_model.load(version_dir(export_dir, m)) for m in spec.SERVING_MODELS
        }
        retrieval = self.loaded[spec.RETRIEVAL_MODEL].signatures
        self.retrieve = retrieval["retrieve_encoded"]
        self.rank = self.loaded[spec.RANKING_MODEL].signatures["rank_encoded"]
        # A "pq" export's retrieval reads the history's stored codes; offline they are
        # computed from the history by its pq_codes signature.
        self.codes = retrieval["pq_codes_encoded"] if "pq_codes_encoded" in retrieval else None
        self.code_inputs = list(self.codes.structured_input_signature[1]) if self.codes else []
        signature = self.retrieve.structured_input_signature[1]
        # Encoded examples carry no target attributes: padding keeps the item table's.
        self.attributes = signature.get(spec.TARGET_ATTRIBUTES.name)
        skip = (spec.PQ_CODES.name, spec.TARGET_ATTRIBUTES.name)
        self.inputs = [n for n in signature if n not in skip]  # the user too, when taken
        self.rank_inputs = list(self.rank.structured_input_signature[1])

    def __call__(self, batch: dict) -> np.ndarray:
        import tensorflow as tf

        features = {n: tf.constant(v) for n, v in batch.items()}
        if self.attributes is not None:
            size = len(batch["target_item"])
            features[spec.TARGET_ATTRIBUTES.name] = tf.zeros(
                [size, self.attributes.shape[1]], tf.int64
            )
        if self.codes is not None:
            codes = self.codes(**{n: features[n] for n in self.code_inputs})
            features[spec.PQ_CODES.name] = codes[spec.PQ_CODES.name]
        retrieved = self.retrieve(**features)
        ranking = {n: retrieved[n] if n in retrieved else features[n] for n in self.rank_inputs}
        return self.rank(**ranking)["probability"].numpy()


class CascadeModelHandler(ModelHandler):
    """RunInference handler over an export directory: ``load_model`` loads the two
    SavedModels with ``tf.saved_model.load`` (not Keras: TF Serving artifacts), and
    ``run_inference`` stacks a batch of encoded examples (``{feature: array}``, one
    history length), calls ``retrieve_encoded``, pipes its ``kept_*`` outputs into
    ``rank_encoded`` and returns one probability per example.

    Args:
        export_dir: a ``seminar export`` output (the latest version of each model is used).
        min_batch_size, max_batch_size: RunInference batching.
    """

    def __init__(self, export_dir: str, min_batch_size: int = 1, max_batch_size: int = 256):
        super().__init__()
        self._export_dir = export_dir
        self._batching = {"min_batch_size": min_batch_size, "max_batch_size": max_batch_size}

    def load_model(self):
        return _Cascade(self._export_dir)

    def run_inference(self, batch, model, inference_args=None):
        probability = model({n: np.stack([ex[n] for ex in batch]) for n in model.inputs})
        return [PredictionResult(ex, float(p)) for ex, p in zip(batch, probability)]

    def batch_elements_kwargs(self):
        return dict(self._batching)

    def get_metrics_namespace(self) -> str:
        return "seminar_score"


class _CutWindows(beam.DoFn):
    """A sequence record -> ``((user_id, timestamp, item, label), features)`` for each of its
    targets in ``split``, cut as the tf.data reader cuts them."""

    def __init__(self, split: str, max_len: int, max_query_tokens: int, history: str):
        self._split_id = spec.SPLIT_NAMES.index(split)
        self._max_len, self._q, self._history = max_len, max_query_tokens, history
        self._targets = beam.metrics.Metrics.counter("seminar_score", "targets")

    def setup(self):
        import tensorflow as tf

        from seminar_tf.data import dataset

        self._tf = tf
        self._dataset = dataset
        self._parse_spec = dataset.parse_spec()

    def process(self, serialized):
        tf = self._tf
        record = tf.io.parse_single_example(serialized, self._parse_spec)
        n = int(tf.size(record["item"]))
        start = int(record["num_prefix"])
        positions = np.arange(start, n, dtype=np.int64)
        positions = positions[record["split"].numpy()[start:] == self._split_id]
        if not len(positions):
            return
        windows = self._dataset.cut_windows(
            record, tf.constant(positions), self._max_len, self._q, self._history
        )
        windows = {k: v.numpy() for k, v in windows.items()}
        user = record["user_id"].numpy().decode("utf-8")
        for i in range(len(positions)):
            key = (user, int(windows["timestamp"][i]), int(windows["target_item"][i]),
                   int(windows["label"][i]))  # fmt: skip
            self._targets.inc()
            yield key, {name: windows[name][i] for name in spec.MODEL_FEATURE_NAMES}


class _ToRows(beam.DoFn):
    def __init__(self, items_vocab: str):
        self._items_vocab = items_vocab

    def setup(self):
        with open(self._items_vocab, encoding="utf-8") as f:
            self._items = [line.rstrip("\n") for line in f]

    def process(self, element):
        (user, timestamp, item, label), result = element
        index = item - spec.NUM_RESERVED_IDS
        item_id = self._items[index] if 0 <= index < len(self._items) else ""
        yield {
            "user_id": user, "timestamp": timestamp, "item_id": item_id, "item": item,
            "label": label, "probability": float(result.inference),
        }  # fmt: skip


class ScoreExamples(beam.PTransform):
    """Sequence-record files -> score rows, with the exported cascade.

    Args:
        data_dir: the preprocessing output (its ``vocab/items.txt`` names the items).
        export_dir: the ``seminar export`` output.
        split: which targets to score (``"train"``, ``"valid"``, ``"test"``).
        max_len, max_query_tokens, history: how histories are cut (from the export).
        batch_size: RunInference's largest batch.
    """

    def __init__(self, data_dir, export_dir, split, max_len, max_query_tokens, history, batch_size):
        super().__init__()
        self._args = (data_dir, export_dir, split, max_len, max_query_tokens, history, batch_size)

    def expand(self, files):
        data_dir, export_dir, split, max_len, q, history, batch_size = self._args
        handler = KeyedModelHandler(CascadeModelHandler(export_dir, max_batch_size=batch_size))
        items = os.path.join(data_dir, spec.VOCAB_DIR, spec.VOCAB_FILES["item"])
        return (
            files
            | "ReadRecords" >> beam.io.ReadAllFromTFRecord()
            | "CutWindows" >> beam.ParDo(_CutWindows(split, max_len, q, history))
            | "Score" >> RunInference(handler)
            | "ToRows" >> beam.ParDo(_ToRows(items))
        )


def score(
    data_dir: str,
    export_dir: str,
    out_dir: str,
    split: str = "test",
    batch_size: int = 256,
    beam_args: list | None = None,
) -> dict:
    """Runs the scoring pipeline; writes ``OUT/scores-*.parquet`` (``user_id``,
    ``timestamp``, ``item_id``, ``item``, ``label``, ``probability``) and returns counts."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from export.writer import read_metadata, version_dir
    from preprocessing.pipeline import FNAPI_RUNNER
    from seminar_tf.data.dataset import example_files

    if split not in spec.SPLIT_NAMES:
        raise ValueError(f"split must be one of {spec.SPLIT_NAMES}, got {split!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    meta = read_metadata(version_dir(export_dir, spec.RETRIEVAL_MODEL))
    data_spec = spec.DataSpec.load(data_dir)
    if meta["max_query_tokens"] != data_spec.max_query_tokens:
        raise ValueError(
            f"{data_dir} has max_query_tokens={data_spec.max_query_tokens} but the export "
            f"was built for {meta['max_query_tokens']}: score the data the model was trained on"
        )
    # Chunk prefixes hold data_spec.max_len of history: a longer export max_len cannot be cut.
    max_len = min(meta["max_len"], data_spec.max_len)
    files = example_files(data_dir)
    beam_args = list(beam_args or [])
    if not any(a.startswith("--runner") for a in beam_args):
        beam_args.append(f"--runner={FNAPI_RUNNER}")
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    with beam.Pipeline(options=PipelineOptions(beam_args)) as p:
        _ = (
            p
            | "ListFiles" >> beam.Create(files)
            | "ScoreExamples" >> ScoreExamples(
                data_dir, export_dir, split, max_len, data_spec.max_query_tokens,
                meta["history"], batch_size,
            )
            | "WriteScores" >> beam.io.WriteToParquet(
                os.path.join(out_dir, SCORES_PREFIX), _arrow_schema(),
                file_name_suffix=".parquet",
            )
        )  # fmt: skip
    result = p.result
    counters = result.metrics().query(beam.metrics.MetricsFilter().with_name("targets"))
    scored = sum(c.committed or c.attempted or 0 for c in counters["counters"])
    stats = {
        "split": split,
        "scored": scored,
        "max_len": max_len,
        "history": meta["history"],
        "export_version": meta["version"],
        "seconds": round(time.time() - t0, 2),
        "out": os.path.abspath(out_dir),
    }
    with open(os.path.join(out_dir, "score_stats.json"), "w") as f:
        json.dump(stats, f, indent=2)
    return stats
