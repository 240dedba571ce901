"""A function of a model compiled by the backend in use (outside layers, which stay
``keras.ops`` only): a TensorFlow graph, a JAX jit, or the function itself elsewhere."""

from __future__ import annotations

import keras


def compiled(fn):
    """``fn`` traced once per input shape: ``tf.function`` under TensorFlow (retracing
    reduced), ``jax.jit`` under JAX; eager on other backends. Eager TensorFlow pays a kernel
    launch per op: a pq model's first stage ran 5-10x slower that way."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, reduce_retracing=True)
    if backend == "jax":
        import jax

        return jax.jit(fn)
    return fn
