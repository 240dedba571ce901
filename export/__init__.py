"""Model -> SavedModels for TF Serving: ``retrieval`` (GSU top-K) and ``ranking`` (ESU + MLP).

``export_models(model_dir, out_dir)`` is ``seminar export``; the signatures are declared in
``seminar_tf.spec.SERVING_SIGNATURES`` and built in :mod:`export.graph`.
"""

from export.writer import (
    BATCHING_FILE,
    EXPORT_FILE,
    METADATA_FILE,
    MODELS_CONFIG_FILE,
    ExportResult,
    export_model,
    export_models,
    latest_version,
    next_version,
    read_metadata,
    version_dir,
)

__all__ = [
    "BATCHING_FILE",
    "EXPORT_FILE",
    "METADATA_FILE",
    "MODELS_CONFIG_FILE",
    "ExportResult",
    "export_model",
    "export_models",
    "latest_version",
    "next_version",
    "read_metadata",
    "version_dir",
]
