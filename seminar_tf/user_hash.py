"""The stable user-id hash of ``seminar preprocess --user-hash-buckets N`` (``spec.USER_HASH``).

A user id maps to ``2 + Fingerprint64(utf-8 bytes) % N``, Fingerprint64 being farmhash's
64-bit fingerprint as TensorFlow's ``tf.strings.to_hash_bucket_fast`` computes it (the
same function as ``keras.layers.Hashing``'s default); ``""`` (an unknown user) stays the
padding id 0. The ids 0 and 1 stay reserved as in every vocabulary, so the model's user table
has ``N + 2`` rows. Farmhash's fingerprints are fixed by design (unlike Python's ``hash``,
salted per process), and preprocessing and the exported serving graph call this one function
(through the same TensorFlow op), so training ids and served ids agree; a test pins a few
values so that a change of the op would be noticed.
"""

from __future__ import annotations

import numpy as np

from seminar_tf import spec


def hash_user_ids(user_ids, num_buckets: int):
    """``user_ids`` (a string tensor, or a list/array of ``str``) -> int64 ids of the same
    shape: ``2 + Fingerprint64 % num_buckets``, 0 for ``""``. A tensor gives a tensor (usable
    inside a ``tf.function``), anything else a numpy array. Ids are used as given: strip
    them first where the data contract strips them (preprocessing does, and the export
    graph)."""
    import tensorflow as tf

    if isinstance(num_buckets, bool) or not isinstance(num_buckets, (int, np.integer)):
        raise ValueError(f"num_buckets must be an integer, got {num_buckets!r}")
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    eager = not tf.is_tensor(user_ids)
    x = tf.convert_to_tensor(user_ids, tf.string) if eager else user_ids
    bucket = tf.strings.to_hash_bucket_fast(x, int(num_buckets)) + spec.NUM_RESERVED_IDS
    ids = tf.where(tf.equal(x, ""), tf.constant(spec.PAD_ID, tf.int64), bucket)
    return ids.numpy() if eager else ids
