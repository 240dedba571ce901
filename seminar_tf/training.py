"""Training, pretraining and evaluation over a ``seminar preprocess`` output.

A model directory holds:

| path | what |
| --- | --- |
| ``model.keras`` | the trained model (best validation AUC for CTR, best validation loss for PSU) |
| ``config.json`` | the run's config (data dir, data spec, model and training settings) |
| ``history.json`` | per-epoch losses and metrics (each PSU task loss separately) |
| ``backup/`` | ``keras.callbacks.BackupAndRestore`` state: rerun to resume after interruption |
| ``logs/`` | TensorBoard logs (TensorFlow backend) |
| ``quantization.json`` | ``seminar quantize`` / ``search="pq"``: codebook fit and GSU recall |
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time

import keras
import numpy as np

from seminar_tf import distribute, spec, text
from seminar_tf.losses import click_crossentropy
from seminar_tf.train_config import PQ_DEFAULTS, ConfigError, TrainConfig, check_model_config

log = logging.getLogger("seminar.train")

MODEL_FILE = "model.keras"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.json"
QUANTIZATION_FILE = "quantization.json"
CODE_TABLES_FILE = "code_tables.npz"


def _progress_verbose() -> int:
    """Keras ``verbose`` for fit: the live progress bar (1) in a terminal; one line per epoch
    (2) when stdout is a file or a pipe (no carriage returns in logs) or ``SEMINAR_QUIET``."""
    stdout = sys.stdout
    tty = bool(getattr(stdout, "isatty", None) and stdout.isatty())
    return 1 if tty and not os.environ.get("SEMINAR_QUIET") else 2


class Throughput(keras.callbacks.Callback):
    """Logs examples/s per epoch (into the history as ``examples_per_sec``)."""

    def __init__(self, batch_size: int):
        super().__init__()
        self.batch_size = batch_size

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = self._t1 = time.time()
        self._batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        self._t1 = time.time()  # validation, which follows, is not training throughput

    def on_epoch_end(self, epoch, logs=None):
        rate = self._batches * self.batch_size / max(self._t1 - self._t0, 1e-9)
        if logs is not None:
            logs["examples_per_sec"] = rate
        log.info("epoch %d: %.0f examples/s", epoch + 1, rate)


def _split_count(data_dir: str, split: str, positives: bool) -> int:
    with open(os.path.join(data_dir, spec.STATS_FILE)) as f:
        stats = json.load(f)
    key = "clicks_per_split" if positives else "targets_per_split"
    return int(stats[key][split])


def load_tables(data_dir: str) -> dict:
    """``tables.npz`` of a preprocessing output plus ``spec.DERIVED_TABLE_ARRAYS``."""
    with np.load(os.path.join(data_dir, spec.TABLES_FILE)) as t:
        tables = {k: t[k] for k in t.files}
    q = spec.DataSpec.load(data_dir).max_query_tokens
    tables["query_tokens"] = text.load_query_token_table(data_dir, q)
    return tables


def reader_of(cfg: TrainConfig) -> str:
    """The input pipeline a run uses: ``cfg.reader``, or for ``"auto"`` tf.data where
    TensorFlow imports and the numpy reader (``seminar_tf.data.numpy_reader``) where not."""
    if cfg.reader != "auto":
        return cfg.reader
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return "numpy"
    return "tf.data"


def compact_of(cfg: TrainConfig, data_dir: str, model=None) -> bool:
    """Whether a run reads compact inputs (``cfg.compact_inputs``): only where they lose
    nothing (``spec.compact_inputs_exact``) and ``model``, when given, has the
    ``query_tokens`` table (a model saved before it existed needs the tokens)."""
    if cfg.compact_inputs == "off":
        return False
    exact = spec.compact_inputs_exact(spec.DataSpec.load(data_dir))
    if cfg.compact_inputs == "on" and not exact:
        raise ConfigError(
            f"compact_inputs 'on': {data_dir} was preprocessed with a query minimum count "
            "above 1 (or before it was recorded), so query ids alone would lose the tokens of "
            "rare queries; preprocess again or use 'auto'"
        )
    if model is not None:
        emb = model.pair_embedding
        if emb.use_query_tokens and not emb.use_query_token_table:
            return False
    return exact


def windows(data_dir: str, split: str, cfg: TrainConfig, reader: str, records=None, **kwargs):
    """Batches of ``(features, label)`` of ``split`` through ``reader``: a ``tf.data.Dataset``
    (``dataset.make_dataset``) or a ``numpy_reader.WindowDataset``, the same windows either
    way. ``kwargs``: ``make_dataset``'s options (``repeat`` and ``shuffle_buffer`` only
    matter to tf.data: a WindowDataset runs epoch after epoch and shuffles whole epochs);
    ``compact`` defaults to :func:`compact_of` ``(cfg, data_dir)``."""
    if "compact" not in kwargs:
        kwargs["compact"] = compact_of(cfg, data_dir)
    if reader == "numpy":
        from seminar_tf.data.numpy_reader import WindowDataset

        kwargs.pop("repeat", None)
        kwargs.pop("shuffle_buffer", None)
        return WindowDataset(data_dir, split, cfg.batch_size, cfg.max_len, cfg.history,
                             records=records, **kwargs)  # fmt: skip
    from seminar_tf.data.dataset import make_dataset

    return make_dataset(data_dir, split, cfg.batch_size, cfg.max_len, cfg.history, **kwargs)


def _records(data_dir: str, reader: str):
    """The numpy reader's events (``numpy_reader.EventTable``), loaded once per command and
    shared by its splits (None for tf.data)."""
    if reader != "numpy":
        return None
    from seminar_tf.data.numpy_reader import EventTable, load_records

    return EventTable(load_records(data_dir), spec.DataSpec.load(data_dir).max_query_tokens)


def _datasets(data_dir, cfg: TrainConfig, positives: bool, drop_remainder: bool = False):
    targets = "positive" if positives else "all"
    reader = reader_of(cfg)
    records = _records(data_dir, reader)
    train = windows(
        data_dir, "train", cfg, reader, records, targets=targets, shuffle=True,
        shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, repeat=True,
        bucket_by_length=cfg.bucket_by_length, drop_remainder=drop_remainder,
    )  # fmt: skip
    valid = windows(data_dir, "valid", cfg, reader, records, targets=targets, repeat=True,
                    trim=True, drop_remainder=drop_remainder)  # fmt: skip
    n_train = _split_count(data_dir, "train", positives)
    n_valid = _split_count(data_dir, "valid", positives)
    if n_train == 0:
        raise ValueError(
            f"{data_dir}: the train split has no {'clicks' if positives else 'targets'} "
            f"(see {os.path.join(data_dir, spec.STATS_FILE)} and the dead letters in "
            f"{os.path.join(data_dir, spec.REJECTED_DIR)}/)"
        )
    if reader == "numpy":  # a PyDataset knows its epoch
        log.info("input: numpy reader (%d records, no TensorFlow)", len(records.records))
        return train, (valid if len(valid) else None), cfg.steps_per_epoch, cfg.validation_steps
    steps = cfg.steps_per_epoch or math.ceil(n_train / cfg.batch_size)
    vsteps = cfg.validation_steps or max(1, math.ceil(n_valid / cfg.batch_size))
    return train, (valid if n_valid else None), steps, vsteps


def _optimizer(cfg: TrainConfig):
    """Adam at ``cfg.learning_rate``, with decoupled weight decay when ``cfg.weight_decay``."""
    return keras.optimizers.Adam(cfg.learning_rate, weight_decay=cfg.weight_decay or None)


def _save_run(out_dir, cfg, data_dir, kind, history, extra=None):
    data_spec = spec.DataSpec.load(data_dir)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(
            {
                "kind": kind,
                "data_dir": os.path.abspath(data_dir),
                "data_spec": data_spec.to_json(),
                "train": dataclasses.asdict(cfg),
                "backend": keras.backend.backend(),
                **(extra or {}),
            },
            f,
            indent=2,
        )
    with open(os.path.join(out_dir, HISTORY_FILE), "w") as f:
        json.dump({k: [float(x) for x in v] for k, v in history.items()}, f, indent=2)


def _callbacks(out_dir, cfg, monitor=None, mode="max"):
    cbs = [
        keras.callbacks.BackupAndRestore(os.path.join(out_dir, "backup")),
        Throughput(cfg.batch_size),
    ]
    if keras.backend.backend() == "tensorflow":
        cbs.append(keras.callbacks.TensorBoard(os.path.join(out_dir, "logs")))
    if monitor:
        cbs.append(
            keras.callbacks.EarlyStopping(
                monitor=monitor, mode=mode, patience=cfg.patience, restore_best_weights=True
            )
        )
    return cbs


def pretrain(data_dir: str, out_dir: str, cfg: TrainConfig, callbacks: list | None = None):
    """Fits a PSU on the train split's clicked targets, early-stopping on the validation
    loss (best weights kept); saves ``model.keras``."""
    check_model_config(cfg.model, "psu")
    from seminar_tf.models.factory import build_psu

    os.makedirs(out_dir, exist_ok=True)
    keras.utils.set_random_seed(cfg.seed)
    data_spec = spec.DataSpec.load(data_dir)
    # The PSU's tasks model the click sequence (its attention ignores hist_label), so it
    # pretrains on click histories whatever window the CTR model will use.
    cfg = dataclasses.replace(cfg, history="positive")
    plan = distribute.plan(cfg)
    run = _per_run(cfg, plan)
    train, valid, steps, vsteps = _datasets(data_dir, run, True, plan.replicas > 1)
    with plan.scope():
        psu = build_psu(data_spec, cfg.model, tables=load_tables(data_dir))
        psu.compile(optimizer=_optimizer(run))
        log.info("pretrain: %d steps/epoch x %d epochs, batch %d", steps, cfg.epochs,
                 run.batch_size)  # fmt: skip
        hist = psu.fit(
            train, epochs=cfg.epochs, steps_per_epoch=steps, validation_data=valid,
            validation_steps=vsteps if valid is not None else None,
            # The PSU keeps its best validation loss: on MovieLens its next-pair loss keeps
            # falling on train while rising on the later validation period.
            callbacks=_callbacks(out_dir, run, "val_loss" if valid is not None else None, "min")
            + list(callbacks or []),
            verbose=_progress_verbose(),
        )  # fmt: skip
        psu.save(os.path.join(out_dir, MODEL_FILE))
    _save_run(out_dir, cfg, data_dir, "psu", hist.history, {"distribution": plan.describe()})
    return psu, hist.history


def _per_run(cfg: TrainConfig, plan) -> TrainConfig:
    """``cfg`` with the global batch and the scaled learning rate of ``plan``: what the
    datasets, the optimizer and the throughput see (the saved config keeps ``cfg``)."""
    return dataclasses.replace(cfg, batch_size=plan.global_batch, learning_rate=plan.learning_rate)


def train(
    data_dir: str,
    out_dir: str,
    cfg: TrainConfig,
    pretrained: str | None = None,
    callbacks: list | None = None,
):
    """Fits the CTR model (optionally restoring a PSU from ``pretrained``); early-stops on
    validation AUC and saves the best model."""
    check_model_config(cfg.model, "ctr")
    from seminar_tf.models.factory import build_model

    os.makedirs(out_dir, exist_ok=True)
    keras.utils.set_random_seed(cfg.seed)
    data_spec = spec.DataSpec.load(data_dir)
    plan = distribute.plan(cfg)
    run = _per_run(cfg, plan)
    train_ds, valid, steps, vsteps = _datasets(data_dir, run, False, plan.replicas > 1)
    restored = []
    with plan.scope():
        model = build_model(data_spec, cfg.model, tables=load_tables(data_dir))
        model.build()
        if pretrained:
            psu = load_model(pretrained)
            restored = model.restore_pretrained(psu, include_attention=cfg.restore_attention)
            log.info("train: restored %d pretrained variables from %s", len(restored), pretrained)
        model.compile(
            optimizer=_optimizer(run),
            loss=click_crossentropy,
            metrics=[
                keras.metrics.AUC(name="auc"),
                keras.metrics.BinaryCrossentropy(name="logloss"),
            ],
        )
        extra_callbacks = list(callbacks or [])
        fit_codes = None
        if getattr(model, "search", None) == "pq":
            from seminar_tf.quantization import FitCodebooks

            # The weights train with exact GSU scores; the codebooks follow them before each
            # validation, so early stopping sees the quantized first stage.
            fit_codes = FitCodebooks(
                _codebook_sample(
                    data_dir,
                    cfg,
                    records=getattr(train_ds, "events", None),
                    compact=compact_of(cfg, data_dir),
                )  # fmt: skip
            )
            extra_callbacks.append(fit_codes)
        log.info("train: %d steps/epoch x %d epochs, batch %d", steps, cfg.epochs,
                 run.batch_size)  # fmt: skip
        hist = model.fit(
            train_ds, epochs=cfg.epochs, steps_per_epoch=steps, validation_data=valid,
            validation_steps=vsteps if valid is not None else None,
            callbacks=_callbacks(out_dir, run, monitor="val_auc" if valid is not None else None)
            + extra_callbacks,
            verbose=_progress_verbose(),
        )  # fmt: skip
        model.save(os.path.join(out_dir, MODEL_FILE))
    if fit_codes is not None:
        _write_json(os.path.join(out_dir, QUANTIZATION_FILE), {"codebooks": fit_codes.report})
    _save_run(out_dir, cfg, data_dir, "ctr", hist.history,
              {"pretrained": os.path.abspath(pretrained) if pretrained else None,
               "restored_variables": restored, "distribution": plan.describe()})  # fmt: skip
    return model, hist.history


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def _codebook_sample(
    data_dir: str, cfg: TrainConfig, batches: int = 40, records=None, compact: bool = False
):
    """A fixed sample of training histories (features only) to fit codebooks on
    (``records``: the numpy reader's, when already loaded)."""
    ds = windows(data_dir, "train", cfg, reader_of(cfg), records, trim=True, compact=compact)
    if isinstance(ds, keras.utils.PyDataset):
        return [ds[i][0] for i in range(min(batches, len(ds)))]
    return ds.take(batches).map(lambda features, label: features)


def quantize(
    data_dir: str,
    model_dir: str,
    out_dir: str,
    num_subvectors: int | None = None,
    num_centroids: int = PQ_DEFAULTS["num_centroids"],
    max_vectors: int = 200_000,
    recall_ks: tuple | None = None,
    recall_batches: int = 8,
    seed: int = 0,
    layout: str = PQ_DEFAULTS["layout"],
    rotation: bool = PQ_DEFAULTS["rotation"],
    shortlist: int = PQ_DEFAULTS["shortlist"],
    score_aware: bool = PQ_DEFAULTS["score_aware"],
) -> dict:
    """``seminar quantize``: a trained ``search="exact"`` model -> the same model with a
    product-quantized first stage (codebooks by k-means on training histories, of what
    ``layout`` codes, after the score-aware transform with ``score_aware`` and an OPQ
    rotation with ``rotation``; the top ``shortlist x K``
    re-ranked exactly when ``shortlist > 1``), saved as a model directory
    ``out_dir`` that ``seminar evaluate`` and ``seminar export`` take. ``num_subvectors``
    defaults to ``PQ_DEFAULTS["num_subvectors"]`` (32), or the largest divisor of the
    embedding size below it that is a power of two (16 for d = 16 or 48). With
    ``layout="sides"`` it also writes ``code_tables.npz`` (``item``, ``query``: the codes of
    every item and query, ``seminar_tf.quantization.code_tables``).

    Writes ``quantization.json``: the codebook fit per modality and the share of the exact
    model's GSU top-k that the quantized one keeps on the validation split
    (``seminar_tf.quantization.gsu_recall``) for each k of ``recall_ks`` (default 10 and the
    model's ``top_k``). Returns that report.
    """
    from seminar_tf.quantization import gsu_recall, quantize_model

    model = load_model(model_dir)
    if num_subvectors is None:
        d = int(getattr(model, "embedding_dim", 0))
        num_subvectors = math.gcd(d, PQ_DEFAULTS["num_subvectors"]) or PQ_DEFAULTS["num_subvectors"]
    with open(os.path.join(model_dir, CONFIG_FILE)) as f:
        run_cfg = json.load(f)
    cfg = TrainConfig(**{**run_cfg.get("train", {}), "seed": seed})
    top_k = getattr(model, "top_k", 0)
    recall_ks = tuple(recall_ks or sorted({min(10, top_k), top_k}))
    if max(recall_ks) > top_k:
        raise ValueError(
            f"recall k={max(recall_ks)} exceeds the model's top_k={getattr(model, 'top_k', None)}"
        )
    reader = reader_of(cfg)
    records = _records(data_dir, reader)
    t0 = time.time()
    compact = compact_of(cfg, data_dir, model)
    sample = _codebook_sample(data_dir, cfg, records=records, compact=compact)
    pq_model, fit_report = quantize_model(
        model, sample, num_subvectors, num_centroids, max_vectors, seed, layout, rotation,
        shortlist, score_aware,
    )  # fmt: skip
    t1 = time.time()
    valid = windows(data_dir, "valid", cfg, reader, records, trim=True, compact=compact)
    recall = gsu_recall(model, pq_model, (f for f, _ in valid), recall_ks, recall_batches)
    log.info(
        "quantize: codebooks in %.1fs; GSU recall vs exact on %d validation examples: %s",
        t1 - t0, recall["examples"],
        ", ".join(f"{k} {v:.3f}" for k, v in recall.items() if k.startswith("recall")),
    )  # fmt: skip
    os.makedirs(out_dir, exist_ok=True)
    pq_model.save(os.path.join(out_dir, MODEL_FILE))
    report = {
        "source_model": os.path.abspath(model_dir),
        "layout": layout,
        "rotation": bool(rotation),
        "shortlist": int(shortlist),
        "score_aware": bool(score_aware),
        "num_subvectors": num_subvectors,
        "num_centroids": num_centroids,
        "code_bytes_per_behaviour": pq_model.gsu.scorer.code_bytes,
        "codebooks": fit_report,
        "valid_gsu_recall": recall,
        "seconds": round(time.time() - t0, 2),
    }
    if layout == "sides":
        from seminar_tf.quantization import code_tables

        np.savez(os.path.join(out_dir, CODE_TABLES_FILE), **code_tables(pq_model))
        report["code_tables"] = CODE_TABLES_FILE
    _write_json(os.path.join(out_dir, QUANTIZATION_FILE), report)
    run_cfg["train"]["model"] = {
        **run_cfg["train"].get("model", {}),
        "search": "pq",
        "search_config": pq_model.search_config,
    }
    run_cfg["quantized_from"] = os.path.abspath(model_dir)
    _write_json(os.path.join(out_dir, CONFIG_FILE), run_cfg)
    return report


def load_model(model_dir: str):
    """Loads ``model_dir/model.keras`` (a PSU or a SeminarCTR)."""
    import seminar_tf.models  # noqa: F401  (registers the custom classes for deserialisation)

    path = os.path.join(model_dir, MODEL_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{model_dir}: no {MODEL_FILE}; train a model first")
    return keras.saving.load_model(path)


def _compiled_score_candidates(model):
    """``model.score_candidates`` as one compiled function of the backend (a graph under
    TensorFlow, jit under JAX; eager elsewhere), returning numpy; None for a model without it."""
    if not hasattr(model, "score_candidates"):
        return None
    from seminar_tf.compiled import compiled

    fn = compiled(model.score_candidates)

    def score(features, candidates):
        features = {k: v for k, v in features.items() if k in spec.MODEL_FEATURE_NAMES}
        return np.asarray(keras.ops.convert_to_numpy(fn(features, candidates)))

    return score


def evaluate(
    data_dir: str,
    model_dir: str,
    split: str = "test",
    batch_size: int = 512,
    num_negatives: int = 99,
    max_ranked: int | None = None,
    seed: int = 0,
) -> dict:
    """The report of ``seminar evaluate``: CTR metrics and sampled-negatives ranking."""
    from seminar_tf import evaluation

    model = load_model(model_dir)
    with open(os.path.join(model_dir, CONFIG_FILE)) as f:
        run_cfg = json.load(f)
    tcfg = run_cfg.get("train", {})
    max_len, history = tcfg.get("max_len"), tcfg.get("history", "positive")
    data_spec = spec.DataSpec.load(data_dir)

    def predict(features):
        return np.asarray(model.predict_on_batch(features)).reshape(-1)

    score_candidates = _compiled_score_candidates(model)
    cfg = TrainConfig(batch_size=batch_size, max_len=max_len, history=history)
    reader = reader_of(cfg)
    records = _records(data_dir, reader)
    compact = compact_of(cfg, data_dir, model)
    ds = windows(
        data_dir, split, cfg, reader, records, include_meta=True, trim=True, compact=compact
    )
    # Each positive is scored with its negatives: keep about 2 x batch_size rows a call.
    rank_cfg = dataclasses.replace(cfg, batch_size=max(1, 2 * batch_size // (num_negatives + 1)))
    rank_ds = windows(data_dir, split, rank_cfg, reader, records, targets="positive", trim=True,
                      compact=compact)  # fmt: skip
    t0 = time.time()
    report = evaluation.evaluate_ctr(predict, ds)
    log.info("evaluate: CTR metrics on %d examples in %.1fs", report["examples"], time.time() - t0)
    t1 = time.time()
    report.update(
        evaluation.evaluate_ranking(
            predict, rank_ds, data_spec.num_items, num_negatives, seed=seed,
            max_positives=max_ranked, score_candidates=score_candidates,
        )
    )  # fmt: skip
    log.info("evaluate: ranking in %.1fs", time.time() - t1)
    report.update({"split": split, "model_dir": os.path.abspath(model_dir),
                   "data_dir": os.path.abspath(data_dir), "backend": keras.backend.backend()})  # fmt: skip
    return report
