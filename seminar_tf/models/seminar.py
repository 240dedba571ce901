"""SeminarCTR: GSU (top-K search over the lifelong history) -> ESU (target attention) -> MLP.

SEMINAR itself and its baselines are configurations of this one model:

| configuration | model |
| --- | --- |
| ``search="exact"`` + :meth:`SeminarCTR.restore_pretrained` from a :class:`PSU` | SEMINAR |
| ``search="exact"`` without pretraining | TWIN-like (GSU and ESU both attention) |
| ``search="pq"`` | SEMINAR with product-quantized first stage (``seminar_tf.quantization``) |
| ``search="soft"`` | SIM (soft search) |
| ``search="simhash"`` | ETA |
| ``search="recent"`` | DIN over the last K behaviours |
| ``search="all"`` | target attention over the whole history (no first stage) |
| ``use_history=False`` | a DNN on the target pair only |

Every configuration also has a user tower (``use_user_features``, default on): a user-id
embedding and statistics of the history window and of the user's whole earlier history
(``user_counts``; see :func:`history_statistics`), concatenated into the MLP input; with a users table in the data
(``seminar preprocess --users``) also the user's attributes and vector, looked up by the user
id in side tables the model holds (``spec.USER_TABLE_ARRAYS``).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from seminar_tf import spec
from seminar_tf.layers import _ops
from seminar_tf.layers.pair_embedding import (
    QUERY_MODALITY,
    MultiModalPairEmbedding,
    _ConstantArray,
)
from seminar_tf.layers.scorers import get_scorer_class
from seminar_tf.layers.target_attention import MultiHeadTargetAttention
from seminar_tf.layers.topk_search import TopKSearch
from seminar_tf.models.psu import PSU

NO_SEARCH = "all"
# Scorers built on the multi-head attention that a PSU pretrains (restorable from it).
ATTENTION_SCORERS = ("exact", "pq")


def _relative_name(variable, layer) -> str:
    """The path of ``variable`` below ``layer`` (e.g. ``text_projection/kernel``)."""
    path = variable.path
    prefix = layer.path + "/"
    if path.startswith(prefix):
        return path[len(prefix) :]
    marker = f"{layer.name}/"
    index = path.find("/" + marker)
    if index >= 0:
        return path[index + 1 + len(marker) :]
    if path.startswith(marker):
        return path[len(marker) :]
    return path


def copy_layer_weights(source, target, skip=(), check_extra=True, what="layer") -> list:
    """Copies the variables of ``source`` into ``target`` matched by their path below each
    layer (e.g. ``text_projection/kernel``).

    Every variable of ``target`` not named in ``skip`` must exist in ``source`` with the same
    shape; with ``check_extra``, a variable of ``source`` (not in ``skip``) that ``target``
    lacks is an error too. All checks run before anything is assigned. Returns the names
    copied.

    Raises:
        ValueError: naming the variable that is missing or has a different shape.
    """
    src = {_relative_name(v, source): v for v in source.weights}
    dst = {_relative_name(v, target): v for v in target.weights}
    missing = sorted(n for n in dst if n not in skip and n not in src)
    if missing:
        raise ValueError(
            f"Cannot restore {what}: variable(s) {missing} of `{target.path}` do not exist in "
            f"`{source.path}` (it has {sorted(src)})."
        )
    extra = sorted(n for n in src if n not in skip and n not in dst)
    if check_extra and extra:
        raise ValueError(
            f"Cannot restore {what}: variable(s) {extra} of `{source.path}` do not exist in "
            f"`{target.path}` (a modality or option present in only one of the models)."
        )
    pairs = []
    for name, var in dst.items():
        if name in skip:
            continue
        if tuple(src[name].shape) != tuple(var.shape):
            raise ValueError(
                f"Cannot restore {what}: variable `{name}` has shape {tuple(src[name].shape)} "
                f"in `{source.path}` but {tuple(var.shape)} in `{target.path}`."
            )
        pairs.append((name, src[name], var))
    for _, s, d in pairs:
        d.assign(ops.convert_to_numpy(s))
    return [n for n, _, _ in pairs]


# Width of the Dense layer the history statistics go through in the user tower.
USER_STATS_UNITS = 8
# The users-table side tables the model holds: (dtype, config attribute of the column count or
# None for a vector); rows: ``num_users``.
_USER_TABLE_LAYOUT = {
    "user_attributes": ("int32", "max_user_attributes"),
    "user_vectors": ("float32", "user_embedding_dim"),
    "user_has_vector": ("float32", None),
}
assert set(_USER_TABLE_LAYOUT) == set(spec.USER_TABLE_ARRAYS)


def history_statistics(hist_item, hist_label, user_counts=None):
    """``[B, 5]`` float32 (``spec.HISTORY_STATS``): of the history window, ``log1p`` of the
    number of real (non-padding) behaviours and their click rate (mean ``hist_label``); of
    the user's whole earlier history ``user_counts`` (``[B, 3]``: events, clicks, seconds
    since the latest; ``spec.USER_COUNTS``), ``log1p`` of the events, their click rate and
    ``log1p`` of the hours since the latest. Rates are 0 where there is nothing to count;
    without ``user_counts`` the last three are 0.

    Both come from events strictly earlier than the target (the window and the counts the
    tf.data reader cuts; a serving request's history and counts), so nothing at or after the
    target can leak, and training and serving compute it alike. With ``history="positive"``
    (clicks only) the window's rate is 1 for any non-empty history, while ``user_counts``
    still carries the user's overall click rate."""
    real = ops.cast(ops.not_equal(hist_item, 0), "float32")
    clicks = ops.cast(ops.clip(ops.cast(hist_label, "int32"), 0, 1), "float32") * real
    count = ops.sum(real, axis=-1)
    rate = ops.sum(clicks, axis=-1) / ops.maximum(count, 1.0)
    if user_counts is None:
        zeros = ops.zeros_like(count)
        return ops.stack([ops.log1p(count), rate, zeros, zeros, zeros], axis=-1)
    counts = ops.maximum(ops.cast(user_counts, "float32"), 0.0)
    events, user_clicks, seconds = counts[:, 0], counts[:, 1], counts[:, 2]
    user_rate = ops.minimum(user_clicks, events) / ops.maximum(events, 1.0)
    hours = ops.log1p(seconds / 3600.0)
    return ops.stack([ops.log1p(count), rate, ops.log1p(events), user_rate, hours], axis=-1)


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return int(value)


@keras.saving.register_keras_serializable(package="seminar_tf")
class SeminarCTR(keras.Model):
    """SEMINAR's click-through-rate model: a General Search Unit keeps the top K of the
    lifelong history, an Exact Search Unit attends over them, an MLP predicts the click.

    For a batch of ``spec.MODEL_FEATURES`` it computes:

    1. pair vectors of the target ``[B, d]`` and of the history ``[B, L, d]`` with a
       :class:`MultiModalPairEmbedding` (layer ``pair_embedding``: the layer restored from a
       :class:`PSU` by :meth:`restore_pretrained`);
    2. GSU (layer ``gsu``, a :class:`TopKSearch` with scorer ``search``): the per-modality
       vectors go through a d x d projection ``G(j)`` (identity-initialised Dense layers
       ``gsu_projection_<modality>``; only when the scorer is differentiable), are fused
       again, and every real behaviour is scored against the target; the top ``top_k`` are
       kept (``search="all"`` keeps all L and skips this stage);
    3. ESU (layer ``esu``, a :class:`MultiHeadTargetAttention`): the target pair attends over
       the kept behaviours' full pair vectors (plus a learned click/no-click embedding of
       ``hist_label`` when ``use_history_labels``). With ``gsu_score_bias`` and a
       differentiable scorer, the kept GSU scores times a learned scalar (initially 0) are
       added to the ESU logits (as in TWIN), which is how the CTR loss reaches ``G(j)`` and the
       GSU weights; otherwise the GSU is not trained by the CTR loss (its layer is marked
       non-trainable);
    4. an MLP (ReLU, dropout) on ``[target, esu, target * esu]`` (plus the mean pair of the
       last ``short_term_len`` behaviours when > 0; plus, with ``use_user_features``, the
       user tower: the embedding of ``user`` (``[B]``, 0 = unknown user: a zero vector) and
       :func:`history_statistics` through a small Dense ``user_stats``; with a users table,
       also the mean of the user's attribute embeddings ``user_attribute_embeddings`` and
       its vector through the Dense ``user_vector_projection``, both zero for a user
       without them), then a sigmoid. A call without ``user`` treats every user as unknown
       (padding).

    ``call`` returns the click probability, shape ``[B]`` (float32). Compile with
    ``loss=seminar_tf.losses.click_crossentropy`` (one value per example; plain
    ``"binary_crossentropy"`` on ``[B]`` gives one scalar, which ``tf.distribute`` does not
    scale) and labels ``[B]``. ``call``, :meth:`retrieve` and
    :meth:`rank` also take the serving input ``target_attributes`` ``[B, A]``
    (``spec.TARGET_ATTRIBUTES``: rows with any non-zero id replace the table's attributes of
    the target); training never feeds it.

    Args:
        num_items, num_attributes, num_query_tokens, num_queries, max_attributes, text_dim,
            image_dim, query_text_dim, max_query_tokens: data sizes (``spec.DataSpec``;
            ``max_query_tokens`` > 0 gives the ``query_tokens`` table, so the history may
            carry query ids without ``hist_query_tokens``).
        embedding_dim: ``d`` (64 in SEMINAR).
        num_heads: heads of the ESU and of the ``"exact"`` GSU scorer (4 in SEMINAR).
        query_weight: ``lambda`` of the pair fusion.
        use_history: False gives a DNN on the target pair alone (no GSU/ESU).
        search: GSU scorer name (``"exact"``, ``"soft"``, ``"recent"``, ``"simhash"``, or any
            registered scorer) or ``"all"`` for no first stage.
        top_k: behaviours kept by the GSU (50 in SEMINAR on Amazon, 200 on KuaiSAR).
        search_config: keyword arguments of the scorer; default ``{"num_heads": num_heads}``
            for ``"exact"``.
        gsu_score_bias: add the kept GSU scores to the ESU logits (differentiable scorers).
        gsu_projections: with the score bias, pass each modality through its ``G(j)`` before
            the GSU scores it (SEMINAR); False scores the pair vectors as they are (the
            ablation "without G(j)").
        reembed_kept: with a GSU, score the whole history on values without gradient (the
            top-K selection has none), then embed the kept K (and the short-term branch's
            last ``short_term_len``) again with gradient: the same outputs and gradients as
            backpropagating through all L behaviours (False), for a backward pass that costs
            K behaviours instead of L. None (default) re-embeds where it pays: histories of
            unknown length or ``L >= REEMBED_MIN_RATIO x (top_k + short_term_len)`` (2-core
            CPU, K = 50 + 20: 2.8x the training examples/s at L = 1,000, 0.77x at L = 100;
            ``benchmarks/results/train_throughput.json``).
        use_history_labels: add a click/no-click embedding of ``hist_label`` to the ESU keys.
        short_term_len: also feed the mean pair vector of the last N behaviours (0 = off).
        hidden_units: MLP layer sizes.
        dropout: MLP dropout rate (0.5 in SEMINAR's code).
        freeze_pretrained: mark the layers that :meth:`restore_pretrained` fills
            (``pair_embedding`` and, for ``search="exact"``, the GSU scorer) non-trainable
            from construction on; ``G(j)``, the ESU and the MLP still train.
        request_num_attributes, request_max_attributes: set by :meth:`serving_model` (see
            ``MultiModalPairEmbedding``); 0 otherwise.
        num_users: user vocabulary size (``spec.DataSpec.num_users``, 2 reserved ids
            included); needed with ``use_user_features``.
        use_user_features: add the user tower (every preset, ``dnn`` included). False gives
            the model without it; a model saved before the option existed loads as False.
        user_embedding_l2: L2 regularisation factor of the user-id embedding table (0: off).
        num_user_attributes, max_user_attributes, user_embedding_dim: sizes of the users
            table (``spec.DataSpec``; 0: none, as without ``--users``): the user attribute
            vocabulary (reserved ids included), attribute ids per user, and the user vector
            width. With ``use_user_features``, a non-zero size adds that part to the tower
            and its table (``spec.USER_TABLE_ARRAYS``, indexed by ``user``) to ``tables``.
        tables: optional side tables (``spec.TABLE_ARRAYS``, plus ``spec.USER_TABLE_ARRAYS``
            for a model with a users table), not part of ``get_config``.
        **kwargs: ``keras.Model`` arguments.

    Example:

    ```python
    from seminar_tf.losses import click_crossentropy

    model = build_model(data_spec, {"search": "exact", "top_k": 50}, tables)
    model.restore_pretrained(psu)
    model.compile(optimizer="adam", loss=click_crossentropy,
                  metrics=[keras.metrics.AUC(name="auc")])
    model.fit(features, labels, batch_size=256)
    probabilities = model.predict(features)  # [N]
    ```
    """

    def __init__(
        self,
        num_items: int,
        num_attributes: int,
        num_query_tokens: int,
        num_queries: int,
        max_attributes: int = spec.DEFAULT_MAX_ATTRIBUTES,
        text_dim: int = 0,
        image_dim: int = 0,
        query_text_dim: int = 0,
        max_query_tokens: int = 0,
        embedding_dim: int = 64,
        num_heads: int = 4,
        query_weight: float = 0.5,
        use_history: bool = True,
        search: str = "exact",
        top_k: int = 50,
        search_config: dict | None = None,
        gsu_score_bias: bool = True,
        gsu_projections: bool = True,
        reembed_kept: bool | None = None,
        use_history_labels: bool = True,
        short_term_len: int = 0,
        hidden_units: tuple | list = (256, 128),
        dropout: float = 0.5,
        freeze_pretrained: bool = False,
        request_num_attributes: int = 0,
        request_max_attributes: int = 0,
        num_users: int = 0,
        use_user_features: bool = True,
        user_embedding_l2: float = 0.0,
        num_user_attributes: int = 0,
        max_user_attributes: int = 0,
        user_embedding_dim: int = 0,
        tables: dict | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.use_user_features = bool(use_user_features)
        if isinstance(num_users, bool) or not isinstance(num_users, (int, np.integer)):
            raise ValueError(f"`num_users` must be an integer, got {num_users!r}.")
        self.num_users = int(num_users)
        if self.use_user_features and self.num_users < spec.NUM_RESERVED_IDS:
            raise ValueError(
                "`use_user_features` needs the user vocabulary size `num_users` (>= 2) from "
                f"the data, got {num_users!r}: a preprocessing output written before user "
                "features has no `num_users` in its schema.json; re-run `seminar preprocess`, "
                'or set "use_user_features": false.'
            )
        if not 0.0 <= float(user_embedding_l2):
            raise ValueError(f"`user_embedding_l2` must be >= 0, got {user_embedding_l2!r}.")
        self.user_embedding_l2 = float(user_embedding_l2)
        for name, value in (
            ("num_user_attributes", num_user_attributes),
            ("max_user_attributes", max_user_attributes),
            ("user_embedding_dim", user_embedding_dim),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}.")
            setattr(self, name, int(value))
        # The users-table parts of the tower (only with the tower itself).
        self.use_user_attributes = self.use_user_features and bool(
            self.num_user_attributes and self.max_user_attributes
        )
        self.use_user_vectors = self.use_user_features and self.user_embedding_dim > 0
        self._pending_user_tables = None
        if tables is not None:
            self._pending_user_tables = self._validate_user_tables(tables)
        self.num_heads = _positive_int("num_heads", num_heads)
        self.top_k = _positive_int("top_k", top_k)
        if search != NO_SEARCH:
            get_scorer_class(search)  # raises ValueError naming the registered scorers
        self.search = search
        if search_config is not None and not isinstance(search_config, dict):
            raise ValueError(f"`search_config` must be a dict or None, got {search_config!r}.")
        self.search_config = dict(search_config) if search_config is not None else None
        if (
            isinstance(short_term_len, bool)
            or not isinstance(short_term_len, int)
            or short_term_len < 0
        ):
            raise ValueError(f"`short_term_len` must be an integer >= 0, got {short_term_len!r}.")
        self.short_term_len = short_term_len
        if isinstance(hidden_units, int) or not all(
            isinstance(u, (int, np.integer)) and u > 0 for u in hidden_units
        ):
            raise ValueError(
                f"`hidden_units` must be a sequence of positive integers, got {hidden_units!r}."
            )
        self.hidden_units = tuple(int(u) for u in hidden_units)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}.")
        self.dropout = float(dropout)
        self.use_history = bool(use_history)
        self.gsu_score_bias = bool(gsu_score_bias)
        self.gsu_projections = bool(gsu_projections)
        if reembed_kept is not None and not isinstance(reembed_kept, bool):
            raise ValueError(f"`reembed_kept` must be True, False or None, got {reembed_kept!r}.")
        self.reembed_kept = reembed_kept
        self.use_history_labels = bool(use_history_labels)
        self.freeze_pretrained = bool(freeze_pretrained)

        self.pair_embedding = MultiModalPairEmbedding(
            num_items=num_items,
            num_attributes=num_attributes,
            num_query_tokens=num_query_tokens,
            num_queries=num_queries,
            embedding_dim=embedding_dim,
            max_attributes=max_attributes,
            text_dim=text_dim,
            image_dim=image_dim,
            query_text_dim=query_text_dim,
            max_query_tokens=max_query_tokens,
            query_weight=query_weight,
            tables=tables,
            request_num_attributes=request_num_attributes,
            request_max_attributes=request_max_attributes,
            name="pair_embedding",
        )
        d = self.embedding_dim = self.pair_embedding.embedding_dim
        self.gsu = None
        self.gsu_modalities = ()
        self._use_gsu_bias = False
        if self.use_history and search != NO_SEARCH:
            config = self.search_config
            if config is None:
                config = {"num_heads": self.num_heads} if search in ATTENTION_SCORERS else {}
            if search == "pq" and "modalities" not in config:
                emb = self.pair_embedding
                config = {
                    **config,
                    "modalities": list(
                        emb.item_modalities + ((QUERY_MODALITY,) if emb.use_query else ())
                    ),
                }
            self.gsu = TopKSearch(k=self.top_k, scorer=search, scorer_config=config, name="gsu")
            self._use_gsu_bias = self.gsu_score_bias and self.gsu.differentiable
            if self._use_gsu_bias and self.gsu_projections:
                self.gsu_modalities = self.pair_embedding.item_modalities + (
                    (QUERY_MODALITY,) if self.pair_embedding.use_query else ()
                )
            elif not self._use_gsu_bias:
                self.gsu.trainable = False  # no gradient reaches it
            for m in self.gsu_modalities:
                setattr(
                    self,
                    f"gsu_projection_{m}",
                    keras.layers.Dense(
                        d, use_bias=False, kernel_initializer="identity", name=f"gsu_projection_{m}"
                    ),
                )
        self.esu = (
            MultiHeadTargetAttention(num_heads=self.num_heads, name="esu")
            if self.use_history
            else None
        )
        self.mlp_layers = []
        for i, units in enumerate(self.hidden_units):
            self.mlp_layers.append(keras.layers.Dense(units, activation="relu", name=f"mlp_{i}"))
            if self.dropout:
                self.mlp_layers.append(keras.layers.Dropout(self.dropout, name=f"mlp_dropout_{i}"))
        self.logit_layer = keras.layers.Dense(1, name="logit")
        self.user_stats = (
            keras.layers.Dense(USER_STATS_UNITS, activation="relu", name="user_stats")
            if self.use_user_features
            else None
        )
        self.user_vector_projection = (
            keras.layers.Dense(d, name="user_vector_projection") if self.use_user_vectors else None
        )
        if self.freeze_pretrained:
            self.pair_embedding.trainable = False
            if self.gsu is not None and search in ATTENTION_SCORERS:
                self.gsu.trainable = False

    # ----------------------------------------------------------------------------- build
    def _mlp_input_dim(self) -> int:
        d = self.embedding_dim
        dim = d
        if self.use_history:
            dim += 2 * d + (d if self.short_term_len else 0)
        if self.use_user_features:
            dim += d + USER_STATS_UNITS
        dim += d * (int(self.use_user_attributes) + int(self.use_user_vectors))
        return dim

    def build(self, input_shape=None):
        if self.built:
            return
        d = self.embedding_dim
        self.pair_embedding.build()
        if self.use_history:
            if self.gsu is not None:
                self.gsu.build((None, d), (None, None, d), (None, None))
                for m in self.gsu_modalities:
                    getattr(self, f"gsu_projection_{m}").build((None, d))
                if self._use_gsu_bias:
                    self.gsu_bias_weight = self.add_weight(
                        name="gsu_bias_weight", shape=(), initializer="zeros"
                    )
            if self.use_history_labels:
                self.history_label_embeddings = self.add_weight(
                    name="history_label_embeddings", shape=(2, d), initializer="zeros"
                )
            self.esu.build((None, d), (None, None, d))
        if self.use_user_features:
            regularizer = (
                keras.regularizers.L2(self.user_embedding_l2) if self.user_embedding_l2 else None
            )
            self.user_embeddings = self.add_weight(
                name="user_embeddings", shape=(self.num_users, d),
                initializer=keras.initializers.RandomUniform(-0.05, 0.05),
                regularizer=regularizer,
            )  # fmt: skip
            self.user_stats.build((None, spec.HISTORY_STATS.shape[0]))
        if self.use_user_attributes:
            self.user_attribute_embeddings = self.add_weight(
                name="user_attribute_embeddings", shape=(self.num_user_attributes, d),
                initializer=keras.initializers.RandomUniform(-0.05, 0.05),
            )  # fmt: skip
        if self.user_vector_projection is not None:
            self.user_vector_projection.build((None, self.user_embedding_dim))
        # The users table's side tables: data, not learned (initial values as the pair
        # embedding's tables: an assign during the build could be lost).
        pending = self._pending_user_tables or {}
        for name in self.user_table_names:
            value = pending.get(name)
            setattr(self, name, self.add_weight(
                name=name, shape=self._user_table_shape(name),
                dtype=_USER_TABLE_LAYOUT[name][0],
                initializer=_ConstantArray(value) if value is not None else "zeros",
                trainable=False,
            ))  # fmt: skip
        self._pending_user_tables = None
        dim = self._mlp_input_dim()
        for layer in self.mlp_layers:
            if isinstance(layer, keras.layers.Dense):
                layer.build((None, dim))
                dim = layer.units
        self.logit_layer.build((None, dim))
        self.built = True

    def build_from_config(self, config):
        self.build()

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        # Saved before user features existed: no user tower (and no `user` input).
        config.setdefault("use_user_features", False)
        return super().from_config(config, custom_objects=custom_objects)

    def set_tables(self, tables: dict):
        """Assigns the side tables (see ``MultiModalPairEmbedding.set_tables``), and, for a
        model with a users table, its ``spec.USER_TABLE_ARRAYS`` (required then)."""
        user_tables = self._validate_user_tables(tables)
        self.pair_embedding.set_tables(tables)
        if not self.built:
            self._pending_user_tables = user_tables
            return
        for name, value in user_tables.items():
            getattr(self, name).assign(value)

    @property
    def user_table_names(self) -> tuple:
        """The ``spec.USER_TABLE_ARRAYS`` this model holds (none without a users table)."""
        names = ("user_attributes",) if self.use_user_attributes else ()
        if self.use_user_vectors:
            names += ("user_vectors", "user_has_vector")
        return names

    def _user_table_shape(self, name: str) -> tuple:
        cols = _USER_TABLE_LAYOUT[name][1]
        return (self.num_users,) + ((getattr(self, cols),) if cols else ())

    def _validate_user_tables(self, tables: dict) -> dict:
        """The user tables of ``tables`` this model needs, checked and cast (a missing or
        misshapen one raises a ``ValueError`` naming it)."""
        out = {}
        for name in self.user_table_names:
            if name not in tables:
                raise ValueError(
                    f"`tables` is missing `{name}`, required by a model with a users table "
                    "(written by `seminar preprocess --users`)."
                )
            value = np.asarray(tables[name])
            if value.shape != self._user_table_shape(name):
                raise ValueError(
                    f"Table `{name}` has shape {value.shape}, expected "
                    f"{self._user_table_shape(name)} from the model configuration."
                )
            if name == "user_attributes" and value.size:
                if value.min() < 0 or value.max() >= self.num_user_attributes:
                    raise ValueError(
                        "Table `user_attributes` holds ids outside "
                        f"[0, {self.num_user_attributes})."
                    )
            out[name] = value.astype(_USER_TABLE_LAYOUT[name][0])
        return out

    def get_user_tables(self) -> dict:
        """The users-table side tables as numpy arrays (only those this model holds)."""
        return {n: ops.convert_to_numpy(getattr(self, n)) for n in self.user_table_names}

    # ----------------------------------------------------------------------------- restore
    def restore_pretrained(
        self, psu, include_attention: bool = True, include_tables: bool = False
    ) -> list:
        """Copies the pretrained weights of a :class:`PSU` into this model.

        Copies every variable of ``psu.pair_embedding`` into ``self.pair_embedding`` by its
        path below the layer (``item_embeddings``, ``text_projection/kernel``, ...); the
        side tables are data, not learned, and are copied only with ``include_tables``. With
        ``include_attention`` and ``search="exact"``, the query/key projections of the PSU's
        ``attention`` also go to the GSU scorer (SEMINAR's GSU shares the PSU's attention
        structure; also for ``"pq"``). ``G(j)`` stays at the identity. Both models are built first if needed.

        Returns:
            The names of the copied variables (``pair_embedding/...``, ``gsu/...``).

        Raises:
            ValueError: a variable is missing on either side or has a different shape (e.g.
                a different ``embedding_dim`` or a modality present in only one model); the
                message names it. Nothing is assigned then.
        """
        if not isinstance(psu, PSU):
            raise ValueError(f"`psu` must be a PSU model, got {type(psu).__name__}.")
        if not psu.built:
            psu.build()
        if not self.built:
            self.build()
        tables = set(self.pair_embedding.table_names) | set(psu.pair_embedding.table_names)
        skip = () if include_tables else tuple(tables)
        copied = [
            f"pair_embedding/{n}"
            for n in copy_layer_weights(
                psu.pair_embedding, self.pair_embedding, skip=skip, what="pair_embedding"
            )
        ]
        if include_attention and self.gsu is not None and self.search in ATTENTION_SCORERS:
            target = self.gsu.scorer.attention
            copied += [
                f"gsu/{n}"
                for n in copy_layer_weights(
                    psu.attention, target, check_extra=False, what="GSU attention"
                )
            ]
        return copied

    # ----------------------------------------------------------------------------- forward
    @staticmethod
    def _recent(mask, n: int):
        """bool ``[B, L]``: the last ``n`` real behaviours of each history, wherever the
        padding sits."""
        mask_f = ops.cast(mask, "float32")
        from_end = ops.flip(ops.cumsum(ops.flip(mask_f, axis=1), axis=1), axis=1)
        return ops.logical_and(ops.cast(mask, "bool"), from_end <= n)

    def _short_term(self, hist_pair, mask):
        return _ops.masked_mean(hist_pair, self._recent(mask, self.short_term_len), axis=1)

    def call(self, inputs, training=None):
        t_vec, t_mask, target_pair = self._encode_target(inputs)
        features = [target_pair]
        if self.use_history and self.gsu is not None and self._reembeds(inputs["hist_item"]):
            features += self._search_then_reembed(inputs, t_vec, t_mask, target_pair, training)
        elif self.use_history:
            mask, h_vec, h_mask, h_weights = self._encode_history(inputs)
            hist_pair = self.pair_embedding.fuse(h_vec, h_mask, h_weights)
            keys = hist_pair
            if self.use_history_labels:
                labels = ops.clip(ops.cast(inputs["hist_label"], "int32"), 0, 1)
                keys = keys + ops.take(self.history_label_embeddings, labels, axis=0)
            bias = None
            if self.gsu is None:
                kept_keys, kept_mask = keys, mask
            else:
                gsu_target, gsu_keys, t_parts, h_parts = self._gsu_inputs(
                    t_vec, t_mask, target_pair, h_vec, h_mask, h_weights, hist_pair
                )
                indices, kept_mask, kept_scores = self._search(
                    inputs, (t_vec, t_mask, target_pair), gsu_target, gsu_keys, mask,
                    t_parts, h_parts, h_weights, training,
                )  # fmt: skip
                gather = ops.broadcast_to(
                    ops.expand_dims(indices, -1),
                    (ops.shape(indices)[0], self.top_k, self.embedding_dim),
                )
                kept_keys = ops.take_along_axis(keys, gather, axis=1)
                if self._use_gsu_bias:
                    bias = self.gsu_bias_weight * kept_scores
            pooled, _ = self.esu(
                target_pair, kept_keys, kept_mask, score_bias=bias, training=training
            )
            features += [pooled, target_pair * pooled]
            if self.short_term_len:
                features.append(self._short_term(hist_pair, mask))
        if self.use_user_features:
            features += self._user_tower(inputs, self.history_stats(inputs))
        return self._mlp_head(features, training=training)

    REEMBED_MIN_RATIO = 4

    def _reembeds(self, hist_item) -> bool:
        """Whether ``call`` searches without gradient and re-embeds the kept (see
        ``reembed_kept``) for a history of this (static or unknown) length."""
        if self.reembed_kept is not None:
            return self.reembed_kept
        length = hist_item.shape[1]
        return length is None or length >= self.REEMBED_MIN_RATIO * (
            self.top_k + self.short_term_len
        )

    def _search_then_reembed(self, inputs, t_vec, t_mask, target_pair, training=None) -> list:
        """``[pooled, target * pooled]`` (plus the short-term vector) as the graph through
        all L computes them, with a backward pass over K (+ ``short_term_len``) behaviours:
        the GSU ranks the whole history on values without gradient, the kept K are embedded
        again with gradient (their GSU scores, the ESU's score bias, recomputed on those
        K), as :meth:`rank` embeds them at serving."""
        sg = ops.stop_gradient
        mask, h_vec, h_mask, h_weights = self._encode_history(inputs)
        h_vec = {m: sg(v) for m, v in h_vec.items()}
        h_weights = {m: sg(w) for m, w in h_weights.items()}
        gsu_target, gsu_keys, t_parts, h_parts = self._gsu_inputs(
            {m: sg(v) for m, v in t_vec.items()}, t_mask, sg(target_pair), h_vec, h_mask,
            h_weights,
        )  # fmt: skip
        indices, kept_mask, _ = self._search(
            inputs, (t_vec, t_mask, target_pair), sg(gsu_target), sg(gsu_keys), mask, t_parts,
            h_parts, h_weights, training,
        )  # fmt: skip
        return self._second_stage(
            inputs, mask, sg(indices), sg(kept_mask), t_vec, t_mask, target_pair, 1, training
        )

    @property
    def shortlist(self) -> int:
        """``r`` of a ``"pq"`` first stage that re-ranks its top ``r x K`` exactly
        (``PQScorer.shortlist``); 1 for every other model."""
        if self.search != "pq" or self.gsu is None:
            return 1
        return self.gsu.scorer.shortlist

    def _search(
        self, inputs, target, gsu_target, gsu_keys, mask, t_parts=None, h_parts=None,
        h_weights=None, training=None,
    ):  # fmt: skip
        """The GSU's ``(indices, kept_mask, scores)`` ``[B, K]`` over the history of
        ``inputs``; with a shortlist (outside training), the top ``r x K`` by the codes
        re-ranked by :meth:`_rerank` (``target`` = the target's ``(vectors, masks, pair)``)."""
        r = self.shortlist
        if training or r <= 1:
            return self.gsu(
                gsu_target, gsu_keys, mask, target_parts=t_parts, key_parts=h_parts,
                key_weights=h_weights, training=training,
            )  # fmt: skip
        scores = self.gsu.score_all(gsu_target, gsu_keys, mask, t_parts, h_parts, h_weights)
        indices, kept_mask, _ = self.gsu.select(scores, mask, r * self.top_k)
        return self._rerank(inputs, indices, kept_mask, *target)

    def _rerank(self, inputs, indices, kept_mask, t_vec, t_mask, target_pair, per: int = 1):
        """The ``K`` best of a shortlist by exact GSU score: ``indices`` / ``kept_mask``
        ``[B, per * N]`` index the history of ``inputs`` ``[B, L]`` (``N`` per target,
        ``per`` targets a history; the target's ``t_vec`` / ``target_pair`` ``[B * per,
        ...]``). Those behaviours are embedded again from their ids and scored as the
        ``"exact"`` scorer would. Returns ``(indices, kept_mask, scores)`` ``[B * per, K]``,
        the indices into the history, best first."""
        k_vec, k_mask, k_weights, kept_pair = self._reembed(inputs, indices, kept_mask)
        n = ops.shape(indices)[1] // per

        def unfold(x):  # [B, per * N, ...] -> [B * per, N, ...]
            return x if per == 1 else ops.reshape(x, (-1, n) + tuple(x.shape[2:]))

        k_vec, k_mask, k_weights = (
            {m: unfold(v) for m, v in d.items()} for d in (k_vec, k_mask, k_weights)
        )
        indices, kept_mask, kept_pair = unfold(indices), unfold(kept_mask), unfold(kept_pair)
        g_target, g_keys, _, _ = self._gsu_inputs(
            t_vec, t_mask, target_pair, k_vec, k_mask, k_weights, kept_pair
        )
        exact = self.gsu.scorer.exact_scores(g_target, g_keys, kept_mask)
        best, best_mask, best_scores = self.gsu.select(exact, kept_mask)
        chosen = ops.take_along_axis(ops.cast(indices, "int32"), best, axis=1)
        return ops.where(best_mask, chosen, 0), best_mask, best_scores

    def _hist_tokens(self, inputs):
        """``hist_query_tokens``, or None where the ``query_tokens`` table stands in for it."""
        tokens = inputs.get("hist_query_tokens")
        emb = self.pair_embedding
        if tokens is None and emb.use_query_tokens and not emb.use_query_token_table:
            raise ValueError(
                "`hist_query_tokens` is missing: this model has no `query_tokens` table "
                "(max_query_tokens=0), so the history must carry its query tokens."
            )
        return tokens

    def _encode_history(self, inputs) -> tuple:
        """``(mask [B, L], vectors, masks, fusion weights)`` of the whole history."""
        emb = self.pair_embedding
        hist_item = inputs["hist_item"]
        h_vec, h_mask = emb.encode(hist_item, inputs["hist_query"], self._hist_tokens(inputs))
        return ops.not_equal(hist_item, 0), h_vec, h_mask, emb.fusion_weights(h_mask)

    def _second_stage(
        self, inputs, mask, indices, kept_mask, t_vec, t_mask, target_pair, per, training=None
    ) -> list:
        """The ESU (and short-term) features ``[B * per, ...]`` from the GSU's choice:
        ``indices`` / ``kept_mask`` ``[B, per * K]`` index the history of ``inputs`` (``[B,
        L]``) for ``per`` targets each (``t_vec``, ``target_pair``: ``[B * per, ...]``, row
        ``b * per + j`` the ``j``-th target of history ``b``); the kept behaviours are
        embedded here, with gradient."""
        history = dict(inputs)
        if history.get("hist_label") is None:
            history["hist_label"] = ops.zeros_like(history["hist_item"])
        k = self.top_k

        def unfold(x):  # [B, per * K, ...] -> [B * per, K, ...]
            return x if per == 1 else ops.reshape(x, (-1, k) + tuple(x.shape[2:]))

        k_vec, k_mask, k_weights, kept_pair = self._reembed(history, indices, kept_mask)
        k_vec, k_mask, k_weights = (
            {m: unfold(v) for m, v in d.items()} for d in (k_vec, k_mask, k_weights)
        )
        kept_pair, kept_mask = unfold(kept_pair), unfold(kept_mask)
        keys = kept_pair
        if self.use_history_labels:
            labels = ops.take_along_axis(ops.cast(history["hist_label"], "int32"), indices, axis=1)
            labels = ops.clip(unfold(labels), 0, 1) * ops.cast(kept_mask, "int32")
            keys = keys + ops.take(self.history_label_embeddings, labels, axis=0)
        bias = None
        if self._use_gsu_bias:
            g_target, g_keys, g_t_parts, g_k_parts = self._gsu_inputs(
                t_vec, t_mask, target_pair, k_vec, k_mask, k_weights, kept_pair
            )
            if self.shortlist > 1 and not training:  # the kept were chosen by exact scores
                scores = self.gsu.scorer.exact_scores(g_target, g_keys, kept_mask)
            else:
                scores = self.gsu.score_all(
                    g_target, g_keys, kept_mask, target_parts=g_t_parts, key_parts=g_k_parts,
                    key_weights=k_weights, training=training,
                )  # fmt: skip
            bias = self.gsu_bias_weight * ops.where(kept_mask, ops.cast(scores, "float32"), 0.0)
        pooled, _ = self.esu(target_pair, keys, kept_mask, score_bias=bias, training=training)
        out = [pooled, target_pair * pooled]
        if self.short_term_len:
            recent, valid = self._last_positions(mask, self.short_term_len)
            pair = self._reembed(history, recent, valid)[3]
            short = _ops.masked_mean(pair, valid, axis=1)
            out.append(short if per == 1 else ops.repeat(short, per, axis=0))
        return out

    def score_candidates(self, inputs, candidates):
        """Click probabilities ``[B, C]`` of ``C`` candidate items per row: row ``b``'s
        history, query and user against each item of ``candidates [B, C]`` (int ids), equal
        to ``call`` on the row repeated with ``target_item`` set to each candidate, with
        the history encoded and transformed for the search once per row instead of once
        per candidate (``TopKSearch.search_many``). The sampled-negatives evaluation and
        many-candidate ranking use it."""
        candidates = ops.convert_to_tensor(candidates)
        c = candidates.shape[1]
        inputs = {k: ops.convert_to_tensor(v) for k, v in inputs.items()}

        def rep(x):
            return ops.repeat(x, c, axis=0)

        target = {
            "target_item": ops.reshape(ops.cast(candidates, inputs["target_item"].dtype), (-1,)),
            "target_query": rep(inputs["target_query"]),
            "target_query_tokens": rep(inputs["target_query_tokens"]),
        }
        if not self.use_history or self.gsu is None:
            tiled = {k: rep(v) for k, v in inputs.items()}
            tiled.update(target)
            return ops.reshape(self(tiled, training=False), (-1, c))
        t_vec, t_mask, target_pair = self._encode_target(target)
        mask, h_vec, h_mask, h_weights = self._encode_history(inputs)
        gsu_target, gsu_keys, t_parts, h_parts = self._gsu_inputs(
            t_vec, t_mask, target_pair, h_vec, h_mask, h_weights
        )

        def fold(x):  # [B * C, ...] -> [B, C, ...]
            return ops.reshape(x, (-1, c) + tuple(x.shape[1:]))

        r = self.shortlist
        indices, kept_mask, _ = self.gsu.search_many(
            fold(gsu_target), gsu_keys, mask, target_parts={m: fold(v) for m, v in t_parts.items()},
            key_parts=h_parts, key_weights=h_weights, k=r * self.top_k,
        )  # fmt: skip
        if r > 1:
            short = (-1, c * r * self.top_k)
            indices, kept_mask, _ = self._rerank(
                inputs, ops.reshape(indices, short), ops.reshape(kept_mask, short), t_vec,
                t_mask, target_pair, per=c,
            )  # fmt: skip
        flat = (-1, c * self.top_k)
        features = [target_pair] + self._second_stage(
            inputs, mask, ops.reshape(indices, flat), ops.reshape(kept_mask, flat), t_vec,
            t_mask, target_pair, c,
        )  # fmt: skip
        if self.use_user_features:
            features += [rep(f) for f in self._user_tower(inputs, self.history_stats(inputs))]
        return ops.reshape(self._mlp_head(features, training=False), (-1, c))

    def _reembed(self, inputs, indices, present) -> tuple:
        """``(vectors, masks, fusion weights, pair [B, N, d])`` of the history behaviours at
        ``indices`` ``[B, N]`` (padding where ``present`` is false), with gradient."""
        emb = self.pair_embedding
        kept = self.gather_kept(
            inputs, {"indices": indices, "kept_mask": present, "scores": ops.zeros_like(present)}
        )
        vec, masks = emb.encode(kept["kept_item"], kept["kept_query"], kept["kept_query_tokens"])
        weights = emb.fusion_weights(masks)
        return vec, masks, weights, emb.fuse(vec, masks, weights)

    @staticmethod
    def _last_positions(mask, n: int) -> tuple:
        """``(indices [B, n] int32, present [B, n] bool)``: the positions of the last ``n``
        real behaviours of each history (wherever the padding sits), as :meth:`_short_term`
        selects them."""
        chosen = SeminarCTR._recent(mask, n)
        position = ops.cast(ops.arange(ops.shape(mask)[1]), "float32")
        rank = ops.where(chosen, ops.expand_dims(position, 0), -1.0)
        # n extra columns so top_k has n candidates when L < n
        rank = ops.pad(rank, [[0, 0], [0, n]], constant_values=-1.0)
        values, indices = ops.top_k(rank, k=n, sorted=True)
        present = values >= 0
        return ops.where(present, ops.cast(indices, "int32"), 0), present

    # ----------------------------------------------------------------------------- user tower
    @staticmethod
    def history_stats(inputs):
        """:func:`history_statistics` of ``inputs["hist_item"]`` / ``["hist_label"]`` /
        ``["user_counts"]`` ``[B, 5]``; zeros for the parts the inputs lack."""
        hist_item = inputs.get("hist_item")
        counts = inputs.get(spec.USER_COUNTS.name)
        if hist_item is None:
            hist_item = ops.zeros((ops.shape(inputs["target_item"])[0], 1), "int32")
        hist_label = inputs.get("hist_label")
        if hist_label is None:
            hist_label = ops.zeros_like(hist_item)
        return history_statistics(hist_item, hist_label, counts)

    def _user_tower(self, inputs, stats) -> list:
        """``[user vector [B, d], stats vector [B, USER_STATS_UNITS]]``: the embedding of
        ``inputs["user"]`` (a missing input or id 0 -> a zero vector) and ``stats``
        (``[B, 5]``, :func:`history_statistics`) through the ``user_stats`` Dense; with a
        users table also the user's attribute vector (the mean embedding of its
        ``user_attributes`` row, ``[B, d]``) and its projected ``user_vectors`` row
        (``[B, d]``), each zero for a user without them (unknown, OOV, or not in the
        table)."""
        user = inputs.get(spec.USER.name)
        if user is None:
            user = ops.zeros_like(inputs["target_item"])
        user = ops.reshape(ops.cast(user, "int32"), (-1,))
        present = ops.cast(ops.not_equal(user, spec.PAD_ID), "float32")
        vector = ops.take(self.user_embeddings, user, axis=0) * ops.expand_dims(present, -1)
        out = [vector, self.user_stats(ops.cast(stats, "float32"))]
        if self.use_user_attributes:
            ids = ops.take(self.user_attributes, user, axis=0)  # [B, max_user_attributes]
            embedded = ops.take(self.user_attribute_embeddings, ids, axis=0)
            out.append(_ops.masked_mean(embedded, ops.not_equal(ids, 0), axis=1))
        if self.use_user_vectors:
            has = ops.expand_dims(ops.take(self.user_has_vector, user, axis=0), -1)
            projected = self.user_vector_projection(ops.take(self.user_vectors, user, axis=0))
            out.append(projected * has)
        return out

    def _gsu_inputs(self, t_vec, t_mask, target_pair, h_vec, h_mask, h_weights, hist_pair=None):
        """``(gsu_target, gsu_keys, target_parts, key_parts)``: with per-modality projections
        G(j), the parts go through them and are fused again (with the history's fusion
        weights ``h_weights``); without, the pair vectors serve (``hist_pair`` is fused here
        when not given)."""
        emb = self.pair_embedding
        if not self.gsu_modalities:
            if hist_pair is None:
                hist_pair = emb.fuse(h_vec, h_mask, h_weights)
            return target_pair, hist_pair, t_vec, h_vec
        t_parts, h_parts = self._project_gsu(t_vec), self._project_gsu(h_vec)
        return emb.fuse(t_parts, t_mask), emb.fuse(h_parts, h_mask, h_weights), t_parts, h_parts

    def _project_gsu(self, vectors: dict) -> dict:
        """``G(j)`` of each modality that has one."""
        return {
            m: getattr(self, f"gsu_projection_{m}")(v) if m in self.gsu_modalities else v
            for m, v in vectors.items()
        }

    # ----------------------------------------------------------------------------- serving
    # The two stages of ``call`` as separate methods, for the exported retrieval and ranking
    # models: ``rank(target + gather_kept(inputs, retrieve(inputs)))`` equals ``call(inputs)``.
    def _require_cascade(self, what: str) -> None:
        if not self.use_history or self.gsu is None:
            raise ValueError(
                f"`{what}` needs a two-stage model (use_history=True and a GSU scorer); this "
                f"model has use_history={self.use_history}, search={self.search!r}."
            )

    def _encode_target(self, inputs):
        """``(vectors, masks, pair [B, d])`` of the target; a serving request's
        ``target_attributes`` ``[B, A]`` (``spec.TARGET_ATTRIBUTES``), when given, replace the
        table's attributes of the rows where any is non-zero (training never feeds it)."""
        emb = self.pair_embedding
        t_vec, t_mask = emb.encode(
            inputs["target_item"], inputs["target_query"], inputs["target_query_tokens"],
            attribute_ids=inputs.get(spec.TARGET_ATTRIBUTES.name),
        )  # fmt: skip
        return t_vec, t_mask, emb.fuse(t_vec, t_mask)

    def _mlp_head(self, features, training=None):
        x = ops.concatenate(features, axis=-1)
        for layer in self.mlp_layers:
            x = layer(x, training=training) if isinstance(layer, keras.layers.Dropout) else layer(x)
        return ops.squeeze(ops.sigmoid(self.logit_layer(x)), axis=-1)

    def retrieve(self, inputs, extra_key_parts: dict | None = None):
        """The first stage alone: the GSU's top-K search over the history.

        Args:
            inputs: ``spec.TARGET_FEATURES`` and ``spec.HISTORY_FEATURES`` (``hist_label`` is
                not needed) with a batch dimension, history ``[B, L]`` of any ``L``;
                optionally ``target_attributes`` ``[B, A]`` (see :meth:`_encode_target`).
            extra_key_parts: optional ``{name: tensor}`` passed to the scorer inside
                ``key_parts`` (inputs a scorer declares in ``serving_features``). For the
                ``"pq"`` scorer, the stored codes ``{"hist_pq_codes": [B, L, M, S]}`` (as
                :meth:`pq_codes` computes them): the history is then scored from the codes
                alone (its vectors are not computed; only its item ids mark the padding).

        Returns:
            ``{"indices": [B, K] int32, "kept_mask": [B, K] bool, "scores": [B, K] float32}``
            as :class:`TopKSearch` returns them (index 0 and score 0 where nothing is kept),
            plus ``"short_term": [B, d]`` when ``short_term_len > 0`` and ``"history_stats":
            [B, 5]`` (:func:`history_statistics` of the searched history, which the ranking
            cannot see whole, and of the optional ``user_counts``) with
            ``use_user_features`` (``hist_label`` is needed then).
        """
        self._require_cascade("retrieve")
        emb = self.pair_embedding
        t_vec, t_mask, target_pair = self._encode_target(inputs)
        hist_item = inputs["hist_item"]
        mask = ops.not_equal(hist_item, 0)
        extra = dict(extra_key_parts or {})
        codes = extra.get(spec.PQ_CODES.name)
        h_vec = h_mask = hist_pair = None
        if codes is not None and self.search == "pq":
            gsu_target = self._gsu_target(t_vec, t_mask, target_pair)
            h_mask = self.gsu.scorer.presence(codes)
            weights = emb.fusion_weights(h_mask, item_present=mask)
            # The codes replace the key vectors, which are never computed: the scorer reads
            # only key_parts/key_weights outside training, so the target stands in for keys.
            indices, kept_mask, scores = self._search(
                inputs, (t_vec, t_mask, target_pair), gsu_target, gsu_target, mask,
                h_parts=extra, h_weights=weights,
            )  # fmt: skip
        else:
            h_vec, h_mask = emb.encode(hist_item, inputs["hist_query"], self._hist_tokens(inputs))
            weights = emb.fusion_weights(h_mask)
            gsu_target, gsu_keys, t_parts, h_parts = self._gsu_inputs(
                t_vec, t_mask, target_pair, h_vec, h_mask, weights
            )
            hist_pair = None if self.gsu_modalities else gsu_keys
            indices, kept_mask, scores = self._search(
                inputs, (t_vec, t_mask, target_pair), gsu_target, gsu_keys, mask, t_parts,
                {**h_parts, **extra}, weights,
            )  # fmt: skip
        out = {"indices": indices, "kept_mask": kept_mask, "scores": scores}
        if self.short_term_len:
            if hist_pair is None:
                if h_vec is None:  # scored from codes: the vectors are needed here only
                    h_vec, h_mask = emb.encode(
                        hist_item, inputs["hist_query"], self._hist_tokens(inputs)
                    )
                    weights = emb.fusion_weights(h_mask)
                hist_pair = emb.fuse(h_vec, h_mask, weights)
            out["short_term"] = self._short_term(hist_pair, mask)
        if self.use_user_features:
            out[spec.HISTORY_STATS.name] = history_statistics(
                hist_item, inputs["hist_label"], inputs.get(spec.USER_COUNTS.name)
            )
        return out

    def _gsu_target(self, t_vec, t_mask, target_pair):
        """The target vector the GSU scores with (through ``G(j)`` when the model has it)."""
        if not self.gsu_modalities:
            return target_pair
        return self.pair_embedding.fuse(self._project_gsu(t_vec), t_mask)

    def gsu_parts(self, inputs) -> tuple:
        """The history's per-modality GSU vectors (after ``G(j)``) and presence masks:
        ``({modality: [B, L, d]}, {modality: bool [B, L]})``: what a ``"pq"`` scorer
        quantizes (``seminar_tf.quantization`` fits its codebooks on them)."""
        emb = self.pair_embedding
        h_vec, h_mask = emb.encode(
            inputs["hist_item"], inputs["hist_query"], self._hist_tokens(inputs)
        )
        return self._project_gsu(h_vec), h_mask

    def pq_codes(self, inputs):
        """The stored form of a history for a ``"pq"`` model: codes ``int32 [B, L, M, S]``
        (``spec.PQ_CODES``; -1 where a behaviour lacks a modality, and in padding), which
        :meth:`retrieve` takes as ``extra_key_parts={"hist_pq_codes": codes}``."""
        vectors, masks = self.pq_vectors(inputs)
        return self.gsu.scorer.encode_codes(vectors, masks)

    def pq_vectors(self, inputs) -> tuple:
        """What a ``"pq"`` model's codes stand for: ``({group: [B, L, d]}, {group: bool
        [B, L]})``, the history's GSU vectors grouped by the scorer's ``layout`` (per modality,
        item side and query side, or the fused key; ``PQScorer.group_vectors``)."""
        if self.search != "pq" or self.gsu is None:
            raise ValueError(f"needs a model with search='pq', not {self.search!r}.")
        parts, masks = self.gsu_parts(inputs)
        weights = self.pair_embedding.fusion_weights(masks)
        vectors, totals = self.gsu.scorer.group_vectors(parts, weights)
        return vectors, {g: ops.greater(w, 0) for g, w in totals.items()}

    def gather_kept(self, inputs, retrieved) -> dict:
        """The ranking inputs ``spec.KEPT_FEATURES`` (``kept_item``, ``kept_query``,
        ``kept_query_tokens``, ``kept_label``, ``kept_score``, each ``[B, K...]``) gathered
        from the history ``inputs`` at :meth:`retrieve`'s indices; 0 where nothing is kept
        (so a kept item id of 0 marks an empty slot)."""
        indices, kept = retrieved["indices"], retrieved["kept_mask"]

        def take(x):
            x = ops.convert_to_tensor(x)
            idx = indices
            for _ in range(len(x.shape) - 2):
                idx = ops.expand_dims(idx, -1)
            if len(x.shape) > 2:
                idx = ops.broadcast_to(idx, tuple(ops.shape(idx)[:2]) + tuple(ops.shape(x)[2:]))
            value = ops.take_along_axis(x, idx, axis=1)
            keep = ops.cast(kept, value.dtype)
            for _ in range(len(x.shape) - 2):
                keep = ops.expand_dims(keep, -1)
            return value * keep

        emb, tokens = self.pair_embedding, self._hist_tokens(inputs)
        return {
            "kept_item": take(inputs["hist_item"]),
            "kept_query": take(inputs["hist_query"]),
            "kept_query_tokens": (
                take(tokens)
                if tokens is not None
                else emb.query_tokens_of(take(inputs["hist_query"]))
            ),
            "kept_label": take(inputs["hist_label"]),
            "kept_score": ops.where(kept, ops.cast(retrieved["scores"], "float32"), 0.0),
        }

    def rank(self, inputs, training=None):
        """The second stage alone: ESU attention over the kept behaviours, then the MLP.

        Args:
            inputs: ``spec.TARGET_FEATURES`` and ``spec.KEPT_FEATURES`` ``[B, K...]`` (a kept
                item id of 0 is an empty slot), plus ``short_term`` ``[B, d]`` when
                ``short_term_len > 0``; optionally ``target_attributes`` ``[B, A]``. With
                ``use_user_features`` also ``history_stats`` ``[B, 5]`` (from
                :meth:`retrieve`) and ``user`` ``[B]`` (optional: missing = unknown user).

        Returns:
            The click probability ``[B]`` (float32), as ``call``.
        """
        self._require_cascade("rank")
        emb = self.pair_embedding
        _, _, target_pair = self._encode_target(inputs)
        kept_item = inputs["kept_item"]
        kept_mask = ops.not_equal(kept_item, 0)
        k_vec, k_mask = emb.encode(kept_item, inputs["kept_query"], inputs["kept_query_tokens"])
        keys = emb.fuse(k_vec, k_mask)
        if self.use_history_labels:
            labels = ops.clip(ops.cast(inputs["kept_label"], "int32"), 0, 1)
            keys = keys + ops.take(self.history_label_embeddings, labels, axis=0)
        bias = None
        if self._use_gsu_bias:
            bias = self.gsu_bias_weight * ops.cast(inputs["kept_score"], keys.dtype)
        pooled, _ = self.esu(target_pair, keys, kept_mask, score_bias=bias, training=training)
        features = [target_pair, pooled, target_pair * pooled]
        if self.short_term_len:
            features.append(ops.cast(inputs["short_term"], target_pair.dtype))
        if self.use_user_features:
            features += self._user_tower(inputs, inputs[spec.HISTORY_STATS.name])
        return self._mlp_head(features, training=training)

    # Vector tables and the config argument giving their width, per projection layer.
    _PROJECTED_TABLES = (
        ("text_projection", "item_text_vectors", "text_dim"),
        ("image_projection", "item_image_vectors", "image_dim"),
        ("query_text_projection", "query_text_vectors", "query_text_dim"),
    )

    def serving_model(self) -> SeminarCTR:
        """An equivalent copy for serving, with what is constant after training precomputed.

        ``projection(table)`` of each vector table (item text, item image, query text) is a
        constant: the copy stores it as the table (width ``d``), with an identity
        projection, and gathers rows before projecting them, so a request costs
        ``lookups x d x d`` per vector modality instead of projecting whole tables
        (``rows x dim x d``) or wide rows (``lookups x dim x d``). Each item's attribute
        vector (the mean of its attribute embeddings) is a constant too: the copy has one
        "attribute" per item carrying it (``max_attributes=1``), and keeps the learned
        attribute embeddings as ``request_attribute_embeddings`` for the attribute ids that
        a request gives (``target_attributes``). Every other weight is copied as is, so the
        outputs equal this model's up to float rounding, with or without request attributes.
        """
        self._require_cascade("serving_model")
        if not self.built:
            self.build()
        emb = self.pair_embedding
        d = self.embedding_dim
        config = self.get_config()
        tables = emb.get_tables()
        skip = []
        identities = []
        for layer_name, table, dim_key in self._PROJECTED_TABLES:
            projection = getattr(emb, layer_name, None)
            if projection is None or table not in tables:
                continue
            kernel, bias = (ops.convert_to_numpy(w) for w in projection.weights)
            tables[table] = (tables[table].astype(np.float32) @ kernel + bias).astype(np.float32)
            config[dim_key] = d
            skip += [f"pair_embedding/{layer_name}/kernel", f"pair_embedding/{layer_name}/bias"]
            identities.append(layer_name)
        attribute_vectors = None
        if emb.use_attributes:
            # An item's attribute vector (the masked mean of its attributes' embeddings) is a
            # constant too: store it as the one "attribute" of the item, with the item's id.
            ids = tables["item_attributes"].astype(np.int64)
            present = ids != 0
            vectors = ops.convert_to_numpy(emb.attribute_embeddings)[ids] * present[..., None]
            count = np.maximum(present.sum(axis=1, keepdims=True), 1).astype(np.float32)
            attribute_vectors = (vectors.sum(axis=1) / count).astype(np.float32)
            rows = np.arange(len(ids))
            tables["item_attributes"] = np.where(present.any(axis=1), rows, 0)[:, None]
            # Attribute ids given by a request still need the learned embeddings.
            request_table = ops.convert_to_numpy(emb.request_attribute_table())
            config.update(
                num_attributes=len(ids), max_attributes=1,
                request_num_attributes=emb.attribute_vocabulary_size,
                request_max_attributes=emb.attribute_input_size,
            )  # fmt: skip
            skip += ["pair_embedding/attribute_embeddings",
                     "pair_embedding/request_attribute_embeddings"]  # fmt: skip
        skip += [f"pair_embedding/{name}" for name in emb.table_names]
        config["name"] = f"{self.name}_serving"
        copy = type(self).from_config(config)
        copy.build()
        copy.set_tables({**tables, **self.get_user_tables()})
        copy_layer_weights(self, copy, skip=tuple(skip), what="serving model")
        if attribute_vectors is not None:
            copy.pair_embedding.attribute_embeddings.assign(attribute_vectors)
            copy.pair_embedding.request_attribute_embeddings.assign(request_table)
        for layer_name in identities:
            kernel, bias = getattr(copy.pair_embedding, layer_name).weights
            kernel.assign(np.eye(d, dtype="float32"))
            bias.assign(np.zeros((d,), dtype="float32"))
        copy.pair_embedding.project_tables_first = False  # gather d-wide rows, then identity
        return copy

    def get_config(self):
        emb = self.pair_embedding
        config = super().get_config()
        config.update(
            {
                "num_items": emb.num_items,
                "num_attributes": emb.num_attributes,
                "num_query_tokens": emb.num_query_tokens,
                "num_queries": emb.num_queries,
                "max_attributes": emb.max_attributes,
                "text_dim": emb.text_dim,
                "image_dim": emb.image_dim,
                "query_text_dim": emb.query_text_dim,
                "max_query_tokens": emb.max_query_tokens,
                "embedding_dim": emb.embedding_dim,
                "num_heads": self.num_heads,
                "query_weight": emb.query_weight,
                "use_history": self.use_history,
                "search": self.search,
                "top_k": self.top_k,
                "search_config": (
                    dict(self.search_config) if self.search_config is not None else None
                ),
                "gsu_score_bias": self.gsu_score_bias,
                "gsu_projections": self.gsu_projections,
                "reembed_kept": self.reembed_kept,
                "use_history_labels": self.use_history_labels,
                "short_term_len": self.short_term_len,
                "hidden_units": list(self.hidden_units),
                "dropout": self.dropout,
                "freeze_pretrained": self.freeze_pretrained,
                "request_num_attributes": emb.request_num_attributes,
                "request_max_attributes": emb.request_max_attributes,
                "num_users": self.num_users,
                "use_user_features": self.use_user_features,
                "user_embedding_l2": self.user_embedding_l2,
                "num_user_attributes": self.num_user_attributes,
                "max_user_attributes": self.max_user_attributes,
                "user_embedding_dim": self.user_embedding_dim,
            }
        )
        return config
