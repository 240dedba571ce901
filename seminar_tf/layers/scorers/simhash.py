"""GSU scorer ``"simhash"``: Hamming similarity of random-hyperplane signatures (ETA)."""

from __future__ import annotations

import keras
from keras import ops

from seminar_tf.layers.scorers.base import SearchScorer, register_scorer


@register_scorer("simhash")
@keras.saving.register_keras_serializable(package="seminar_tf")
class SimHashScorer(SearchScorer):
    """ETA's SimHash search: ``score[b, l] = num_bits - hamming(sig(target[b]), sig(keys[b, l]))``
    with ``sig(x) = [x . r_i > 0]_i`` over ``num_bits`` fixed random hyperplanes ``r_i``
    (a non-trainable variable drawn from ``seed``, saved with the model). Not differentiable.

    Shapes: target ``[B, d]``, keys ``[B, L, d]`` -> ``[B, L]`` (integers as floats).

    Args:
        num_bits: signature length (ETA uses 16).
        seed: seed of the hyperplanes.
        **kwargs: ``keras.layers.Layer`` arguments.

    Example:

    ```python
    scores = SimHashScorer(num_bits=16)(target, keys, mask)  # [B, L] in 0..16
    ```
    """

    def __init__(self, num_bits: int = 16, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(num_bits, int) or num_bits < 1:
            raise ValueError(f"`num_bits` must be a positive integer, got {num_bits!r}.")
        if not isinstance(seed, int):
            raise ValueError(f"`seed` must be an integer, got {seed!r}.")
        self.num_bits = num_bits
        self.seed = seed

    def build(self, target_shape, keys_shape=None, mask_shape=None):
        if self.built:
            return
        d = int(target_shape[-1])
        self.hyperplanes = self.add_weight(
            name="hyperplanes",
            shape=(d, self.num_bits),
            initializer=keras.initializers.RandomNormal(seed=self.seed),
            trainable=False,
        )
        self.built = True

    def _signature(self, x):
        return ops.cast(ops.matmul(x, self.hyperplanes) > 0, x.dtype)

    def call(self, target, keys, mask, target_parts=None, key_parts=None, key_weights=None):
        t = ops.stop_gradient(self._signature(target))  # [B, bits]
        k = ops.stop_gradient(self._signature(keys))  # [B, L, bits]
        # agreements = sum_i t_i k_i + (1 - t_i)(1 - k_i)
        agree = ops.einsum("bn,bln->bl", t, k) + ops.einsum("bn,bln->bl", 1.0 - t, 1.0 - k)
        return agree

    def get_config(self):
        config = super().get_config()
        config.update({"num_bits": self.num_bits, "seed": self.seed})
        return config
