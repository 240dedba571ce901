"""SEMINAR models: PSU pretraining and the GSU -> ESU CTR model (and its baselines)."""

from seminar_tf.models.factory import PRESETS, build_model, build_psu, data_kwargs
from seminar_tf.models.psu import PSU
from seminar_tf.models.seminar import SeminarCTR, copy_layer_weights

__all__ = [
    "PRESETS",
    "PSU",
    "SeminarCTR",
    "build_model",
    "build_psu",
    "copy_layer_weights",
    "data_kwargs",
]
