"""The CTR loss: binary cross-entropy of click probabilities, one value per example."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="seminar_tf")
def click_crossentropy(y_true, y_pred):
    """Binary cross-entropy ``[B]`` of labels ``[B]`` against click probabilities ``[B]``.

    ``keras.losses.binary_crossentropy`` averages over the last axis, so on ``[B]`` inputs it
    returns one scalar, which Keras then neither reduces nor scales for ``tf.distribute``:
    under a MirroredStrategy of N replicas each step would apply N times the gradient. One
    value per example keeps the reduction (and its ``1 / N``) where Keras puts it.
    """
    return keras.losses.binary_crossentropy(
        ops.expand_dims(ops.cast(y_true, "float32"), -1), ops.expand_dims(y_pred, -1)
    )
