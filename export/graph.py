"""The serving graphs: flat named ``tf.function`` signatures around SeminarCTR's two stages.

Every signature takes the flat named inputs of ``spec.SERVING_SIGNATURES`` with a leading
batch dimension and returns a dict of outputs that all keep it. The raw signatures run the
preprocessing's encoding inside the graph: item ids and attribute strings are stripped and
looked up, query text is normalised (strip + lower-case, ``seminar_tf.text.normalize_query``),
looked up as a whole in the query vocabulary and split into at most ``Q`` tokens
(``seminar_tf.text.tokenize_query``) looked up in the token vocabulary; every lookup is a
``keras.layers.StringLookup`` over the preprocessing's ``vocab/*.txt`` (carried into the
SavedModel as assets), so an unknown value maps to the OOV id 1 and "" to the padding id 0.
A vocabulary a data set left empty (no query in any event, no attribute on any item) is an
:class:`EmptyVocabularyLookup` with the same rule: such values are still accepted, as OOV.

Every signature takes the target's ``target_attributes`` ``[B, A]`` (``spec.TARGET_ATTRIBUTES``;
"" / 0 padding): a row of padding only keeps the item table's attributes of the target, a row
with any attribute replaces them. It is a required input padded by callers that have none, not
an optional one: TF Serving signatures have fixed inputs, and a default value (SignatureDef
``defaults``) is one fixed tensor whose batch dimension would not match other request sizes
(TF Serving's batching needs every input of a request to share it).

Histories are ``[B, L]`` for any ``L``, padded with "" / 0, most recent last. Padding may sit
anywhere (it is masked), which is what TF Serving's batching needs: it pads shorter requests
on the right with each request's first element (see ``export.writer.BATCHING_NOTE``). A
history with more than ``max_len`` real behaviours keeps the ``max_len`` most recent ones;
``kept_position`` always indexes the request's own history. An empty history keeps nothing
and ranks from the target alone.

A model with user features (``SeminarCTR.use_user_features``) also has the retrieval output
``history_stats`` (statistics of the whole searched history, which the ranking sees only
through its K kept behaviours, and of the retrieval's optional input ``user_counts``: the
user's whole earlier history as counts, ``spec.USER_COUNTS``, negative counts rejected) and
the ranking inputs ``history_stats`` and the user:
``user_id`` (raw: a ``StringLookup`` over ``vocab/users.txt``; "" = unknown user, the padding
id 0; an unseen id is OOV; for data preprocessed with ``--user-hash-buckets N``, a
:class:`UserHashLookup` computing the preprocessing's hash instead) or ``user`` (encoded,
range-checked). A model trained with a users table looks the user's attributes and vector up
inside itself from that id (its side tables are variables of the SavedModel), so requests
carry only the user id.
"""

from __future__ import annotations

import inspect
import os

import keras
import tensorflow as tf

from seminar_tf import spec
from seminar_tf.text import TF_SPLIT_PATTERN

# Python's str.strip() removes the characters for which str.isspace() holds: ASCII
# whitespace, \x1c-\x1f, \x85 and the Unicode separators (Z*). RE2's \s is ASCII only.
_SPACE_CLASS = r"[\t\n\x0b\f\r\x1c-\x1f \x{85}\p{Z}]"
STRIP_PATTERN = rf"^{_SPACE_CLASS}+|{_SPACE_CLASS}+$"


def strip_text(x):
    """In-graph ``str.strip()``."""
    return tf.strings.regex_replace(x, STRIP_PATTERN, "")


def normalize_query(x):
    """In-graph ``seminar_tf.text.normalize_query``: every whitespace run (line breaks
    included) to one space, strip, then Unicode lower-case."""
    collapsed = tf.strings.regex_replace(x, _SPACE_CLASS + "+", " ")
    return tf.strings.lower(strip_text(collapsed), encoding="utf-8")


def tokenize_query(x, max_tokens: int):
    """In-graph ``seminar_tf.text.tokenize_query``: ``[...]`` strings -> ``[..., Q]`` tokens
    (the first ``max_tokens`` runs of letters, digits and underscores; "" pads)."""
    words = tf.strings.split(tf.strings.regex_replace(normalize_query(x), TF_SPLIT_PATTERN, " "))
    shape = tf.concat([tf.shape(x, out_type=tf.int64), [max_tokens]], axis=0)
    return words.to_tensor(default_value="", shape=shape)


def _tf_dtype(name: str):
    return tf.string if name == "string" else tf.as_dtype(name)


def tensor_specs(features: tuple, sizes: dict) -> list:
    """``tf.TensorSpec``s with a leading batch dimension, named as the features."""
    return [
        tf.TensorSpec(
            (None,) + spec.resolve_serving_shape(f.shape, sizes), _tf_dtype(f.dtype), name=f.name
        )
        for f in features
    ]


def named_function(name: str, features: tuple, body):
    """A ``tf.function`` whose positional parameters are the feature names, so the SavedModel
    signature's inputs are named after the features (``body`` takes one dict)."""
    names = [f.name for f in features]

    def fn(*args):
        return body(dict(zip(names, args)))

    fn.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    )
    fn.__name__ = name
    return fn


class EmptyVocabularyLookup(keras.layers.Layer):
    """The lookup of a vocabulary with no entries (``StringLookup`` refuses an empty
    vocabulary): a data set that lacks that part (no query in any event, no attribute on
    any item) or whose values all fell below the preprocessing's minimum count. "" is the
    padding id 0 and every other string the OOV id 1, exactly as the preprocessing encodes a
    value missing from its vocabulary, so a request that gives a query to a model trained
    without any (or attributes to one without attributes) is answered, never refused. Its
    size is the 2 reserved ids, as the model's."""

    def call(self, inputs):
        return tf.where(
            tf.equal(inputs, ""), tf.constant(spec.PAD_ID, tf.int64),
            tf.constant(spec.OOV_ID, tf.int64),
        )  # fmt: skip

    def vocabulary_size(self) -> int:
        return spec.NUM_RESERVED_IDS


class UserHashLookup(keras.layers.Layer):
    """The user lookup of data preprocessed with ``--user-hash-buckets N``: ``2 + hash % N``
    (``seminar_tf.user_hash.hash_user_ids``, the function the preprocessing stored ids
    with), "" the padding id 0. No vocabulary file: nothing travels as an asset, and the
    model's user table has ``N + 2`` rows."""

    def __init__(self, num_buckets: int, **kwargs):
        super().__init__(**kwargs)
        self.num_buckets = int(num_buckets)

    def call(self, inputs):
        from seminar_tf.user_hash import hash_user_ids

        return hash_user_ids(inputs, self.num_buckets)

    def vocabulary_size(self) -> int:
        return self.num_buckets + spec.NUM_RESERVED_IDS


class Vocabularies:
    """The preprocessing vocabularies the serving inputs need, as ``StringLookup`` layers
    (``spec`` id convention): items, queries, query tokens and attributes, and with
    ``users`` the users (a :class:`UserHashLookup` when the data's ``schema.json`` has
    ``user_hash_buckets``). An empty vocabulary file (a part the data set lacks) becomes an
    :class:`EmptyVocabularyLookup`: requests may still send such values; they are OOV."""

    KINDS = ("item", "query", "query_token", "attribute")

    def __init__(self, data_dir: str, users: bool = False):
        self.lookups = {}
        buckets = 0
        if users and os.path.exists(os.path.join(data_dir, spec.SCHEMA_FILE)):
            buckets = spec.DataSpec.load(data_dir).user_hash_buckets
        for kind in self.KINDS + (("user",) if users else ()):
            if kind == "user" and buckets:
                layer = self.lookups[kind] = UserHashLookup(buckets, name="user_lookup")
                layer(tf.constant([""]))
                continue
            file = spec.VOCAB_FILES[kind]
            path = os.path.join(data_dir, spec.VOCAB_DIR, file)
            if not os.path.exists(path):
                hint = " (written by `seminar preprocess` since user features)" * (kind == "user")
                raise FileNotFoundError(f"{data_dir}: no vocabulary {spec.VOCAB_DIR}/{file}{hint}")
            with open(path, encoding="utf-8") as f:
                empty = not f.read(1)
            if empty:
                # StringLookup refuses an empty vocabulary: every non-empty value is OOV.
                layer = EmptyVocabularyLookup(name=f"{kind}_lookup")
            else:
                layer = keras.layers.StringLookup(
                    vocabulary=path, mask_token="", num_oov_indices=1, name=f"{kind}_lookup"
                )
            layer(tf.constant([""]))  # builds it (an export needs built layers)
            self.lookups[kind] = layer

    def size(self, kind: str) -> int:
        return int(self.lookups[kind].vocabulary_size())

    def lookup(self, kind: str, values):
        return tf.cast(self.lookups[kind](values), tf.int64)


class ServingGraphs:
    """Builds the four signature functions of one :class:`SeminarCTR`.

    Args:
        model: a built two-stage SeminarCTR.
        vocabularies: :class:`Vocabularies` of the model's preprocessing output.
        max_len: the longest history the retrieval uses (more keeps the most recent).
        max_query_tokens: ``Q`` of the model's data.
    """

    def __init__(self, model, vocabularies: Vocabularies, max_len: int, max_query_tokens: int):
        model._require_cascade("export")
        self.model = model
        self.vocabularies = vocabularies
        self.max_len = int(max_len)
        self.q = int(max_query_tokens)
        self.short_term = bool(model.short_term_len)
        self.user_features = bool(getattr(model, "use_user_features", False))
        scorer = model.gsu.scorer
        self.extra_inputs = tuple(getattr(scorer, "serving_features", ()))
        self.pq = spec.PQ_CODES in self.extra_inputs
        emb = model.pair_embedding
        self.sizes = {
            **dict(getattr(scorer, "serving_sizes", {})),
            "L": None, "K": model.top_k, "Q": self.q, "D": model.embedding_dim,
            "A": emb.attribute_input_size,
        }  # fmt: skip
        self.vocab_sizes = {
            "item": emb.num_items,
            "query": emb.num_queries,
            "query_token": emb.num_query_tokens,
            # of a serving copy: the vocabulary of request attributes, not its per-item table
            "attribute": emb.attribute_vocabulary_size,
        }
        if self.user_features:
            if "user" not in vocabularies.lookups:
                raise ValueError("a model with user features needs Vocabularies(users=True)")
            self.vocab_sizes["user"] = model.num_users
        for kind, size in self.vocab_sizes.items():
            have = vocabularies.size(kind)
            if have != size and not (kind != "item" and size == 0):
                raise ValueError(
                    f"The {spec.VOCAB_FILES[kind]} vocabulary gives {have} ids (2 reserved) "
                    f"but the model was built for {size}: export with the preprocessing "
                    "output the model was trained on."
                )

    def signature(self, name: str) -> spec.SignatureSpec:
        return spec.serving_signature(
            name, self.short_term, self.extra_inputs, user_features=self.user_features
        )

    def signature_names(self, model_name: str) -> list:
        """The signatures of one SavedModel, its default first (``PQ_SIGNATURES`` too for a
        retrieval model whose scorer reads stored codes)."""
        names = [n for n, s in spec.SERVING_SIGNATURES.items() if s.model == model_name]
        if self.pq and model_name == spec.RETRIEVAL_MODEL:
            names += list(spec.PQ_SIGNATURES)
        return sorted(names, key=lambda n: n != spec.DEFAULT_SIGNATURES[model_name])

    # --------------------------------------------------------------------- checks
    @staticmethod
    def _check_batch(features: dict, names):
        first = names[0]
        batch = tf.shape(features[first])[0]
        return [
            tf.debugging.assert_equal(
                tf.shape(features[n])[0], batch,
                message=f"{n} and {first} must have the same batch size",
            )
            for n in names[1:]
        ]  # fmt: skip

    @staticmethod
    def _check_same_length(features: dict, names, what: str):
        first = names[0]
        return [
            tf.debugging.assert_equal(
                tf.shape(features[n])[:2], tf.shape(features[first])[:2],
                message=f"{n} must have the shape [B, {what}] of {first}",
            )
            for n in names[1:]
        ]  # fmt: skip

    def _check_attributes(self, features: dict):
        """The width of ``target_attributes`` is the model's ``A``: the signature declares it,
        but a SavedModel signature does not enforce a static dimension at run time (and the
        attribute pooling would accept any width)."""
        name = spec.TARGET_ATTRIBUTES.name
        x = features[name]
        # Padding the runtime shape keeps the check defined (and failing) for a rank-1 input.
        width = tf.concat([tf.shape(x, out_type=tf.int64), [-1, -1]], axis=0)[1]
        a = self.sizes["A"]
        return [
            tf.debugging.assert_equal(
                width, tf.constant(a, tf.int64),
                message=f"{name} must have the shape [B, A] = [B, {a}] (A: max_attributes of "
                "the model)",
            )
        ]  # fmt: skip

    def _check_codes(self, features: dict):
        if not self.pq or spec.PQ_CODES.name not in features:
            return []
        codes = features[spec.PQ_CODES.name]
        centroids = self.model.gsu.scorer.num_centroids
        return [
            tf.debugging.assert_greater_equal(
                codes, tf.constant(-1, codes.dtype),
                message=f"{spec.PQ_CODES.name}: a code below -1 (-1 marks an absent modality)",
            ),
            tf.debugging.assert_less(
                codes, tf.constant(centroids, codes.dtype),
                message=f"{spec.PQ_CODES.name}: a code out of range (codebooks have "
                f"{centroids} centroids)",
            ),
        ]  # fmt: skip

    def _check_ids(self, features: dict, names):
        checks = []
        for n in names:
            kind = spec.vocab_kind(n)
            if kind is None:
                continue
            size = self.vocab_sizes[kind]
            x = features[n]
            checks.append(tf.debugging.assert_non_negative(x, message=f"{n}: negative id"))
            checks.append(
                tf.debugging.assert_less(
                    x, tf.constant(max(size, 1), tf.int64),
                    message=f"{n}: id out of range (the {kind} vocabulary has {size} ids)",
                )
            )  # fmt: skip
        return checks

    # --------------------------------------------------------------------- encoding
    def _encode_raw(self, features: dict, prefix: str) -> dict:
        """Raw ``<prefix>_item`` / ``<prefix>_query`` (and ``<prefix>_attributes`` when
        given) strings -> the encoded model features.

        Each distinct string is normalised, tokenised and looked up once (a history repeats
        items and queries, and most of its query slots are ""), then gathered back."""
        voc = self.vocabularies

        def per_unique(values, fn):
            shape = tf.shape(values, out_type=tf.int64)
            unique, index = tf.unique(tf.reshape(values, [-1]), out_idx=tf.int64)
            encoded = tf.gather(fn(unique), index)
            return tf.reshape(encoded, tf.concat([shape, tf.shape(encoded, tf.int64)[1:]], 0))

        def items(values):
            return voc.lookup("item", strip_text(values))

        def queries(values):
            return voc.lookup("query", normalize_query(values))

        def tokens(values):
            return voc.lookup("query_token", tokenize_query(values, self.q))

        item, text = features[f"{prefix}_item"], features[f"{prefix}_query"]
        encoded = {
            f"{prefix}_item": per_unique(item, items),
            f"{prefix}_query": per_unique(text, queries),
            f"{prefix}_query_tokens": per_unique(text, tokens),
        }
        attributes = features.get(f"{prefix}_attributes")
        if attributes is not None:  # [B, A], few: looked up as they are
            encoded[f"{prefix}_attributes"] = voc.lookup("attribute", strip_text(attributes))
        return encoded

    def _keep_recent(self, history: dict, real):
        """``history`` (``[B, L, ...]`` tensors) cut to the ``max_len`` most recent real
        behaviours when ``L > max_len`` (real ones keep their order, padding goes first),
        plus one padding column; returns it with ``order [B, L']``: the request position of
        each column (-1 for the added one). ``real(history)`` gives the ``[B, L]`` mask of
        real behaviours (only computed when the history is too long)."""
        item = history["hist_item"]
        length = tf.shape(item)[1]
        batch = tf.shape(item)[0]
        positions = tf.range(length)

        def compact():
            mask = real(history)
            key = tf.where(mask, length + positions[None, :], positions[None, :])
            order = tf.argsort(key, axis=1, stable=True)[:, -self.max_len :]
            return {n: tf.gather(v, order, batch_dims=1) for n, v in history.items()}, order

        def keep():
            return dict(history), tf.broadcast_to(positions[None, :], [batch, length])

        history, order = tf.cond(length > self.max_len, compact, keep)
        # One padding column on the right: gathers stay in range even when L is 0 (it is
        # masked, so it is never kept and changes no score).
        padded = {}
        for name, value in history.items():
            widths = [[0, 0], [0, 1]] + [[0, 0]] * (len(value.shape) - 2)
            empty = "" if value.dtype == tf.string else 0
            padded[name] = tf.pad(value, widths, constant_values=empty)
        return padded, tf.pad(order, [[0, 0], [0, 1]], constant_values=-1)

    def _mask_only_history(self, history: dict) -> dict:
        """Stand-in encoded history for a retrieval scored from stored codes: the codes carry
        every vector, the raw outputs are gathered from the request's own strings, so only
        "is this slot real" is needed (id 1 for a real behaviour, 0 for padding), and the
        L lookups and query tokenisations of the history are skipped."""
        real = tf.cast(tf.not_equal(strip_text(history["hist_item"]), ""), tf.int64)
        zeros = tf.zeros_like(real)
        tokens = tf.zeros(tf.concat([tf.shape(real, tf.int64), [self.q]], 0), tf.int64)
        return {"hist_item": real, "hist_query": zeros, "hist_query_tokens": tokens}

    @staticmethod
    def _gather_raw(x, indices, kept, empty):
        value = tf.gather(x, indices, batch_dims=1)
        return tf.where(kept, value, tf.cast(empty, value.dtype))

    def _retrieval_outputs(self, target: dict, history: dict, order, extra: dict, raw: dict):
        model = self.model
        inputs = {**target, **history}
        out = model.retrieve(inputs, extra_key_parts=extra or None)
        kept = model.gather_kept(inputs, out)
        indices, kept_mask = out["indices"], out["kept_mask"]
        position = tf.gather(order, indices, batch_dims=1)
        result = {spec.KEPT_POSITION.name: tf.cast(tf.where(kept_mask, position, -1), tf.int64)}
        for f in spec.KEPT_FEATURES:
            result[f.name] = tf.cast(kept[f.name], _tf_dtype(f.dtype))
        for name, value in raw.items():  # raw strings of the kept behaviours
            result[name] = self._gather_raw(value, indices, kept_mask, "")
        if self.short_term:
            result[spec.SHORT_TERM.name] = tf.cast(out["short_term"], tf.float32)
        if self.user_features:
            stats = out[spec.HISTORY_STATS.name]
            result[spec.HISTORY_STATS.name] = tf.cast(stats, tf.float32)
        return result

    # --------------------------------------------------------------------- signatures
    def _retrieve(self, features: dict, encoded: bool) -> dict:
        sig = self.signature("retrieve_encoded" if encoded else "retrieve")
        names = [f.name for f in sig.inputs]
        hist_names = [f.name for f in spec.HISTORY_FEATURES if f.name in features]
        extra_names = [f.name for f in self.extra_inputs]
        checks = self._check_batch(features, names)
        checks += self._check_same_length(features, hist_names + extra_names, "L")
        checks += self._check_attributes(features)
        checks += self._check_codes(features)
        if spec.USER_COUNTS.name in features:
            checks.append(tf.debugging.assert_non_negative(
                features[spec.USER_COUNTS.name],
                message=f"{spec.USER_COUNTS.name}: negative count",
            ))  # fmt: skip
        if encoded:
            checks += self._check_ids(features, names)
        with tf.control_dependencies(checks):
            features = {n: tf.identity(v) for n, v in features.items()}
        history = {n: features[n] for n in hist_names + extra_names}
        if encoded:
            history, order = self._keep_recent(history, lambda h: tf.not_equal(h["hist_item"], 0))
        else:
            history, order = self._keep_recent(
                history, lambda h: tf.not_equal(strip_text(h["hist_item"]), "")
            )
        extra = {n: history.pop(n) for n in extra_names}
        # The user's whole-history counts feed history_stats (absent: a model without users).
        counts = {n: features[n] for n in (spec.USER_COUNTS.name,) if n in features}
        if encoded:
            target = {f.name: features[f.name] for f in spec.SERVING_TARGET_FEATURES}
            result = self._retrieval_outputs(target, {**history, **counts}, order, extra, {})
        else:
            target = {**self._encode_raw(features, "target"), **counts}
            # A shortlist is embedded again from its ids (SeminarCTR._rerank).
            if self.pq and not self.short_term and self.model.shortlist <= 1:
                encoded_history = self._mask_only_history(history)
            else:
                encoded_history = self._encode_raw(history, "hist")
            encoded_history["hist_label"] = history["hist_label"]
            raw = {"kept_item": history["hist_item"], "kept_query": history["hist_query"]}
            result = self._retrieval_outputs(target, encoded_history, order, extra, raw)
        return {f.name: result[f.name] for f in sig.outputs}

    def _rank(self, features: dict, encoded: bool) -> dict:
        sig = self.signature("rank_encoded" if encoded else "rank")
        names = [f.name for f in sig.inputs]
        checks = self._check_batch(features, names)
        kept_names = [f.name for f in spec.KEPT_FEATURES if f.name in features]
        checks += self._check_same_length(features, kept_names, "K")
        checks += self._check_attributes(features)
        checks.append(
            tf.debugging.assert_all_finite(
                features["kept_score"], message="kept_score must be finite"
            )
        )
        for name in (spec.SHORT_TERM.name, spec.HISTORY_STATS.name):
            if name in features:
                checks.append(
                    tf.debugging.assert_all_finite(features[name], message=f"{name} must be finite")
                )
        if encoded:
            checks += self._check_ids(features, names)
        with tf.control_dependencies(checks):
            features = {n: tf.identity(v) for n, v in features.items()}
        inputs = dict(features)
        if not encoded:
            inputs.update(self._encode_raw(features, "target"))
            inputs.update(self._encode_raw(features, "kept"))
            raw_user = spec.raw_feature(spec.USER).name
            if raw_user in features:
                user = self.vocabularies.lookup("user", strip_text(inputs.pop(raw_user)))
                inputs[spec.USER.name] = user
        probability = self.model.rank(inputs)
        return {spec.PROBABILITY.name: tf.cast(probability, tf.float32)}

    def _pq_codes(self, features: dict, encoded: bool) -> dict:
        sig = self.signature("pq_codes_encoded" if encoded else "pq_codes")
        names = [f.name for f in sig.inputs]
        checks = self._check_batch(features, names)
        checks += self._check_same_length(features, names, "L")
        if encoded:
            checks += self._check_ids(features, names)
        with tf.control_dependencies(checks):
            features = {n: tf.identity(v) for n, v in features.items()}
        inputs = dict(features) if encoded else self._encode_raw(features, "hist")
        codes = self.model.pq_codes(inputs)
        return {spec.PQ_CODES.name: tf.cast(codes, _tf_dtype(spec.PQ_CODES.dtype))}

    def function(self, name: str):
        """The ``tf.function`` of signature ``name`` (input signature fixed)."""
        sig = self.signature(name)
        if name in spec.PQ_SIGNATURES:

            def body(features):
                return self._pq_codes(features, sig.encoded)
        elif sig.model == spec.RETRIEVAL_MODEL:

            def body(features):
                return self._retrieve(features, sig.encoded)
        else:

            def body(features):
                return self._rank(features, sig.encoded)

        return tf.function(
            named_function(name, sig.inputs, body),
            input_signature=tensor_specs(sig.inputs, self.sizes),
            autograph=False,
        )
