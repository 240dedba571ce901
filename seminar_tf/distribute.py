"""Data-parallel training through the backend's own engine, chosen by one option.

``TrainConfig.distribute``:

- ``"none"``: one device, as Keras places it.
- ``"data"``: every local device of the backend holds a replica and a slice of each batch:
  ``keras.distribution.DataParallel`` under JAX, ``tf.distribute.MirroredStrategy`` under
  TensorFlow. ``batch_size`` is then per device (the global batch is ``batch_size x
  replicas``) and the learning rate is scaled by ``sqrt(replicas)`` (``lr_scaling="sqrt"``,
  the rule for Adam-type optimizers; ``"linear"`` and ``"none"`` are the alternatives).
- ``"mirrored"``: the TensorFlow spelling of ``"data"`` (kept for existing configs).

The model is built, compiled, fitted and saved inside :meth:`Plan.scope`; checkpoints
(``BackupAndRestore``) and the saved model hold plain, unsharded weights, so a model trained
on N devices loads, evaluates and exports on one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math

import keras

from seminar_tf.train_config import LR_SCALING

log = logging.getLogger("seminar_tf")


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one training run spreads over devices.

    Attributes:
        mode: ``TrainConfig.distribute``.
        replicas: devices holding a replica (1 without data parallelism).
        global_batch: examples per step over all replicas.
        learning_rate: the optimizer's rate after scaling for ``replicas``.
        engine: what runs it (``"keras.distribution.DataParallel"``, ``"tf.distribute.
            MirroredStrategy"`` or ``"single device"``).
    """

    mode: str
    replicas: int
    global_batch: int
    learning_rate: float
    engine: str
    _context: object = None

    def scope(self):
        """Context in which to build, compile, fit and save the model."""
        return self._context() if self._context is not None else contextlib.nullcontext()

    def describe(self) -> dict:
        return {
            "distribute": self.mode, "replicas": self.replicas, "engine": self.engine,
            "global_batch": self.global_batch, "learning_rate": self.learning_rate,
        }  # fmt: skip


def scaled_learning_rate(rate: float, replicas: int, scaling: str) -> float:
    """``rate`` for a global batch ``replicas`` times larger."""
    if scaling not in LR_SCALING:
        raise ValueError(f"lr_scaling must be one of {LR_SCALING}, got {scaling!r}")
    factor = {"sqrt": math.sqrt(replicas), "linear": float(replicas), "none": 1.0}[scaling]
    return rate * factor


def plan(cfg) -> Plan:
    """The :class:`Plan` of a ``TrainConfig`` on this machine's devices and backend.

    Raises:
        ValueError: ``"mirrored"`` on a backend other than TensorFlow, or ``"data"`` on a
            backend with no data-parallel engine here (PyTorch).
    """
    mode = cfg.distribute
    backend = keras.backend.backend()
    single = Plan(mode, 1, cfg.batch_size, cfg.learning_rate, "single device")
    if mode == "none":
        return single
    if mode == "mirrored" and backend != "tensorflow":
        raise ValueError("distribute='mirrored' needs KERAS_BACKEND=tensorflow; use 'data'")
    if backend == "tensorflow":
        import tensorflow as tf

        # Every GPU, else every logical CPU (one, unless the process split it into several).
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        # NCCL across GPUs; the collective all-reduce otherwise fails on embedding gradients
        # (IndexedSlices) whose sizes differ between replicas, so CPUs reduce on one device.
        ops = None if devices[0].device_type == "GPU" else tf.distribute.ReductionToOneDevice()
        strategy = tf.distribute.MirroredStrategy([d.name for d in devices], cross_device_ops=ops)
        replicas, engine, context = strategy.num_replicas_in_sync, "tf.distribute.MirroredStrategy", strategy.scope  # fmt: skip
    elif backend == "jax":
        devices = keras.distribution.list_devices()
        distribution = keras.distribution.DataParallel(devices=devices)
        replicas, engine, context = len(devices), "keras.distribution.DataParallel", distribution.scope  # fmt: skip
    else:
        raise ValueError(
            f"distribute={mode!r} has no engine on the {backend} backend here; use the JAX or "
            "TensorFlow backend"
        )
    rate = scaled_learning_rate(cfg.learning_rate, replicas, cfg.lr_scaling)
    result = Plan(mode, replicas, cfg.batch_size * replicas, rate, engine, context)
    log.info(
        "distribute: %s over %d replicas, global batch %d (%d per device), learning rate %.3g",
        engine, replicas, result.global_batch, cfg.batch_size, rate,
    )  # fmt: skip
    return result


def replica_loss_scale() -> float:
    """``1 / N`` inside the step of a ``tf.distribute`` strategy of N replicas, which sums
    the replicas' gradients (a model that computes its own loss scales it by this), else 1.
    Under JAX the step is one program over the global batch: nothing to scale."""
    if keras.backend.backend() != "tensorflow":
        return 1.0
    import tensorflow as tf

    return 1.0 / tf.distribute.get_strategy().num_replicas_in_sync
