"""``seminar export``: a trained model directory -> two versioned SavedModels for TF Serving.

Layout of the output directory::

    OUT/retrieval/<version>/   saved_model.pb, variables/, assets/ (vocabularies),
                               assets.extra/tf_serving_warmup_requests,
                               assets.extra/seminar_export.json
    OUT/ranking/<version>/     the same for the ranking model
    OUT/models.config          TF Serving --model_config_file naming both models
    OUT/batching_parameters.txt  TF Serving --batching_parameters_file
    OUT/export.json            what the last export wrote (versions, sizes, signatures)

A version is written under a hidden temporary name in its model directory and renamed into
place, so a server polling the base path never sees half a version.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import tempfile

from seminar_tf import spec

METADATA_FILE = "seminar_export.json"
MODELS_CONFIG_FILE = "models.config"
BATCHING_FILE = "batching_parameters.txt"
EXPORT_FILE = "export.json"
FORMAT_VERSION = 1

BATCHING_NOTE = """\
# TF Serving batching for the seminar-tf models (--enable_batching
# --batching_parameters_file=THIS). Histories are variable-length [B, L] inputs, so requests
# of different L can only share a batch when the server pads them: it pads each request on the
# right, up to the longest L in the batch, with that request's FIRST element. The exported
# models mask padding wherever it sits, so this is exact provided the first history slot of
# every request is padding ("" / 0). The seminar client always sends one leading padding slot;
# other callers must do the same (or send equal L). Ranking inputs have a fixed K: no padding.
"""


@dataclasses.dataclass
class ExportResult:
    out_dir: str
    version: int
    paths: dict  # model name -> version directory
    models_config: str
    batching_parameters: str
    metadata: dict  # model name -> seminar_export.json contents


def _integer_versions(path: str) -> list:
    if not os.path.isdir(path):
        return []
    return sorted(int(n) for n in os.listdir(path) if n.isdigit())


def next_version(out_dir: str) -> int:
    """One more than the highest version of either model under ``out_dir`` (1 if none)."""
    found = [v for m in spec.SERVING_MODELS for v in _integer_versions(os.path.join(out_dir, m))]
    return max(found, default=0) + 1


def latest_version(model_base: str) -> int:
    versions = _integer_versions(model_base)
    if not versions:
        raise FileNotFoundError(f"{model_base}: no integer version directory (run seminar export)")
    return versions[-1]


def version_dir(export_dir: str, model: str, version: int | None = None) -> str:
    """The directory of ``model`` (``"retrieval"`` / ``"ranking"``) at ``version`` (latest
    when None) under an export directory."""
    base = os.path.join(export_dir, model)
    return os.path.join(base, str(latest_version(base) if version is None else version))


def read_metadata(saved_model_dir: str) -> dict:
    path = os.path.join(saved_model_dir, "assets.extra", METADATA_FILE)
    with open(path) as f:
        return json.load(f)


def _feature_json(f: spec.FeatureSpec, sizes: dict) -> dict:
    return {
        "name": f.name,
        "dtype": f.dtype,
        "shape": [None] + [d for d in spec.resolve_serving_shape(f.shape, sizes)],
        "padding": f.padding,
        "description": f.description,
        # required by the signature all the same; a caller without it sends padding
        "optional": f.optional,
    }


def _models_config(base_paths: dict) -> str:
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2 as pb

    config = pb.ModelServerConfig()
    for name, path in base_paths.items():
        config.model_config_list.config.add(name=name, base_path=path, model_platform="tensorflow")
    return text_format.MessageToString(config)


def batching_parameters(
    max_batch_size: int = 64, batch_timeout_micros: int = 1000, num_batch_threads: int = 0
) -> str:
    """The text of ``batching_parameters.txt`` (TF Serving's ``BatchingParameters`` proto)."""
    threads = num_batch_threads or max(1, os.cpu_count() or 1)
    sizes = [s for s in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if s < max_batch_size]
    lines = [
        f"max_batch_size {{ value: {max_batch_size} }}",
        f"batch_timeout_micros {{ value: {batch_timeout_micros} }}",
        "max_enqueued_batches { value: 1000 }",
        f"num_batch_threads {{ value: {threads} }}",
        *[f"allowed_batch_sizes: {s}" for s in sizes + [max_batch_size]],
        "pad_variable_length_inputs: true",
    ]
    return BATCHING_NOTE + "\n".join(lines) + "\n"


def _write_text_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _vocab_values(data_dir: str, limit: int = 64) -> dict:
    out = {}
    for kind, file in spec.VOCAB_FILES.items():
        if not os.path.exists(os.path.join(data_dir, spec.VOCAB_DIR, file)):
            continue  # users.txt of an output written before user features
        with open(os.path.join(data_dir, spec.VOCAB_DIR, file), encoding="utf-8") as f:
            out[kind] = [line.rstrip("\n") for _, line in zip(range(limit), f)]
    return out


def _run_config(model_dir: str) -> dict:
    from seminar_tf import training

    path = os.path.join(model_dir, training.CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{model_dir}: no {training.CONFIG_FILE}; train a model first")
    with open(path) as f:
        cfg = json.load(f)
    if cfg.get("kind") != "ctr":
        raise ValueError(f"{model_dir}: not a CTR model directory (kind={cfg.get('kind')!r})")
    return cfg


def _write_saved_model(
    model, graphs, vocabularies, name, path, version, warmup_batch_sizes, vocab_values,
    max_len, history, created, source,
) -> dict:  # fmt: skip
    """Writes one model's SavedModel, warmup requests and metadata at ``path``."""
    import keras
    import tensorflow as tf

    from export.warmup import WARMUP_FILE, example_inputs, write_warmup

    signatures = [graphs.signature(n) for n in graphs.signature_names(name)]
    archive = keras.export.ExportArchive()
    archive.track(model)
    for lookup in vocabularies.lookups.values():
        archive.track(lookup)
    for sig in signatures:
        archive.add_endpoint(sig.name, graphs.function(sig.name))
    archive.write_out(path, verbose=False)
    extra = os.path.join(path, "assets.extra")
    os.makedirs(extra, exist_ok=True)
    requests = []
    for sig in signatures:
        full = graphs.signature(sig.name)
        for i, batch in enumerate(warmup_batch_sizes):
            length = max_len + 1 if i % 2 else min(8, max_len) + 1
            inputs = example_inputs(
                full, graphs.sizes, vocab_values, graphs.vocab_sizes, batch, length, seed=i
            )
            requests.append((sig.name, inputs))
    write_warmup(os.path.join(extra, WARMUP_FILE), name, requests)
    meta = {
        "format": FORMAT_VERSION,
        "model": name,
        "version": version,
        "created": created,
        "default_signature": spec.DEFAULT_SIGNATURES[name],
        "signatures": {
            sig.name: {
                "encoded": sig.encoded,
                "inputs": [_feature_json(f, graphs.sizes) for f in graphs.signature(sig.name).inputs],
                "outputs": [_feature_json(f, graphs.sizes) for f in graphs.signature(sig.name).outputs],
            }
            for sig in signatures
        },
        "max_len": max_len,
        "top_k": model.top_k,
        "max_query_tokens": graphs.q,
        "max_attributes": graphs.sizes["A"],
        "embedding_dim": model.embedding_dim,
        "user_features": graphs.user_features,
        "history": history,
        "search": model.search,
        "pq": (
            {k: v for k, v in graphs.model.gsu.scorer.get_config().items()
             if k in ("modalities", "num_subvectors", "num_centroids")}
            if graphs.pq else None
        ),
        "vocab_sizes": graphs.vocab_sizes,
        "warmup_requests": len(requests),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "source": source or {},
    }  # fmt: skip
    with open(os.path.join(extra, METADATA_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def export_model(
    model,
    data_dir: str,
    out_dir: str,
    max_len: int,
    history: str = "positive",
    version: int | None = None,
    serving_base_path: str | None = None,
    warmup_batch_sizes: tuple = (1, 4),
    source: dict | None = None,
    preproject_tables: bool = True,
) -> ExportResult:
    """Exports a built two-stage :class:`SeminarCTR` as ``OUT/retrieval/<version>`` and
    ``OUT/ranking/<version>``, plus ``models.config`` and ``batching_parameters.txt``.

    Args:
        model: the trained model (TensorFlow backend).
        data_dir: the preprocessing output it was trained on (vocabularies, ``schema.json``).
        out_dir: the export base directory (created).
        max_len: the longest history the retrieval searches; longer ones keep the most
            recent ``max_len`` real behaviours.
        history: the history the model was trained with (``"positive"``: clicks only, or
            ``"all"``), recorded for clients and batch scoring.
        version: integer version of both models; default one more than any existing.
        serving_base_path: the directory ``out_dir`` will be at on the server (e.g.
            ``/models`` in a container); default the absolute ``out_dir``.
        warmup_batch_sizes: batch sizes of the warmup requests.
        source: provenance written into the metadata.
        preproject_tables: export :meth:`SeminarCTR.serving_model` (vector tables stored
            already projected: per-request cost independent of the catalog size) rather than
            the model as trained. Same outputs up to float rounding.

    Raises:
        ValueError: a one-stage model, a non-TensorFlow backend, vocabularies that do not
            fit the model, or a version that exists.
    """
    import keras

    from export.graph import ServingGraphs, Vocabularies

    if keras.backend.backend() != "tensorflow":
        raise ValueError("export needs KERAS_BACKEND=tensorflow (a SavedModel is TF graphs)")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
    data_spec = spec.DataSpec.load(data_dir)
    vocabularies = Vocabularies(data_dir, users=bool(getattr(model, "use_user_features", False)))
    model._require_cascade("export")
    if preproject_tables:
        model = model.serving_model()
    graphs = ServingGraphs(model, vocabularies, max_len, data_spec.max_query_tokens)
    os.makedirs(out_dir, exist_ok=True)
    if version is None:
        version = next_version(out_dir)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be a positive integer, got {version!r}")
    for name in spec.SERVING_MODELS:
        if os.path.exists(os.path.join(out_dir, name, str(version))):
            raise ValueError(f"{out_dir}/{name}/{version} exists; pick another --version")

    vocab_values = _vocab_values(data_dir)
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    paths, metadata, staged = {}, {}, {}
    try:
        # Both models are written under hidden temporary names first, then renamed into
        # place: a failure leaves no version of either, and no reader sees half a version.
        for name in spec.SERVING_MODELS:
            base = os.path.join(out_dir, name)
            os.makedirs(base, exist_ok=True)
            tmp = staged[name] = tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=base)
            metadata[name] = _write_saved_model(
                model, graphs, vocabularies, name, os.path.join(tmp, "model"), version,
                warmup_batch_sizes, vocab_values, max_len, history, created, source,
            )  # fmt: skip
        for name, tmp in staged.items():
            final = os.path.join(out_dir, name, str(version))
            os.rename(os.path.join(tmp, "model"), final)  # atomic; fails if it appeared
            paths[name] = final
    finally:
        for tmp in staged.values():
            shutil.rmtree(tmp, ignore_errors=True)

    root = serving_base_path or os.path.abspath(out_dir)
    models_config = os.path.join(out_dir, MODELS_CONFIG_FILE)
    _write_text_atomically(
        models_config, _models_config({m: f"{root.rstrip('/')}/{m}" for m in spec.SERVING_MODELS})
    )
    batching = os.path.join(out_dir, BATCHING_FILE)
    _write_text_atomically(batching, batching_parameters())
    summary = {
        "version": version,
        "created": created,
        "models": {m: os.path.relpath(p, out_dir) for m, p in paths.items()},
        "models_config": MODELS_CONFIG_FILE,
        "batching_parameters": BATCHING_FILE,
        **{k: metadata[spec.RETRIEVAL_MODEL][k] for k in ("max_len", "top_k", "history")},
    }
    _write_text_atomically(os.path.join(out_dir, EXPORT_FILE), json.dumps(summary, indent=2))
    return ExportResult(out_dir, version, paths, models_config, batching, metadata)


def export_models(
    model_dir: str,
    out_dir: str,
    version: int | None = None,
    max_len: int | None = None,
    data_dir: str | None = None,
    serving_base_path: str | None = None,
) -> ExportResult:
    """``seminar export``: loads ``model_dir`` (``model.keras`` + ``config.json``) and calls
    :func:`export_model` with the training's data directory, ``max_len`` and history mode
    (each overridable)."""
    import seminar_tf.models  # noqa: F401  (registers the model classes for loading)
    from seminar_tf import training

    cfg = _run_config(model_dir)
    data_dir = data_dir or cfg["data_dir"]
    if not os.path.exists(os.path.join(data_dir, spec.SCHEMA_FILE)):
        raise FileNotFoundError(
            f"{data_dir}: the model's preprocessing output is not there (pass --data)"
        )
    from seminar_tf.data.manifest import verify_output

    verify_output(data_dir)  # one complete preprocess run (DataError, one line, otherwise)
    train_cfg = cfg.get("train", {})
    max_len = max_len or train_cfg.get("max_len") or spec.DataSpec.load(data_dir).max_len
    model = training.load_model(model_dir)
    return export_model(
        model, data_dir, out_dir, max_len=max_len, history=train_cfg.get("history", "positive"),
        version=version, serving_base_path=serving_base_path,
        source={"model_dir": os.path.abspath(model_dir), "data_dir": os.path.abspath(data_dir)},
    )  # fmt: skip
