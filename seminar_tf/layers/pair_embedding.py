"""Multi-modal query-item pair embedding (SEMINAR's input representation)."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from seminar_tf import spec
from seminar_tf.layers import _ops

ITEM_MODALITIES = ("id", "attr", "text", "image")
QUERY_MODALITY = "query"

# table name -> (dtype stored in the model, config attribute giving the row count,
#               config attribute giving the column count or None for a vector, modality)
_TABLE_LAYOUT = {
    "item_attributes": ("int32", "num_items", "max_attributes", "attr"),
    "item_text_vectors": ("float32", "num_items", "text_dim", "text"),
    "item_has_text": ("float32", "num_items", None, "text"),
    "item_image_vectors": ("float32", "num_items", "image_dim", "image"),
    "item_has_image": ("float32", "num_items", None, "image"),
    "query_text_vectors": ("float32", "num_queries", "query_text_dim", "query_text"),
    "query_has_text": ("float32", "num_queries", None, "query_text"),
    "query_tokens": ("int32", "num_queries", "max_query_tokens", "query_token_table"),
}
assert set(_TABLE_LAYOUT) == set(spec.TABLE_ARRAYS + spec.DERIVED_TABLE_ARRAYS)
_PROJECT_FIRST_MAX_ROWS = 262_144


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return int(value)


class _ConstantArray:
    """Initializer returning a fixed array (table values known before the build)."""

    def __init__(self, value):
        self.value = value

    def __call__(self, shape, dtype=None):
        return ops.convert_to_tensor(self.value, dtype=dtype)


@keras.saving.register_keras_serializable(package="seminar_tf")
class MultiModalPairEmbedding(keras.layers.Layer):
    """Embeds query-item pairs from ids, fusing every available modality into one vector.

    For item ids of any leading shape ``[...]`` (0 = padding) and, optionally, query ids
    ``[...]`` and query token ids ``[..., Q]`` (0 = padding / no query), it computes one
    ``embedding_dim``-dimensional vector per modality:

    - ``"id"``: a learned item id embedding;
    - ``"attr"``: the masked mean of learned attribute embeddings, the attribute ids of an
      item read from the ``item_attributes`` table, or given with the item (``attribute_ids``
      of :meth:`encode`: a serving request's attributes of a target, e.g. a brand-new item);
    - ``"text"`` / ``"image"``: the item's precomputed text / image vector (from the tables)
      through a learned linear projection to ``embedding_dim``;
    - ``"query"``: the masked mean of learned query token embeddings, averaged with the
      projected query text vector where the data has one.

    The item vector fuses the item modalities with learned softmax weights
    ``w = softmax(modality_logits)``, renormalised per item over the modalities it has (an
    item without text has its text weight moved to the others; a padded item gives zeros).
    The pair vector is ``query_weight * query + (1 - query_weight) * item`` when the pair has
    a query, and ``item`` when it has none (query id 0 and no tokens), so a pure
    recommendation event is not pulled towards zero. Shapes: ``call`` returns ``[..., d]``.

    The side tables (``spec.TABLE_ARRAYS``) are non-trainable variables of this layer, so a
    saved model carries them and its inputs are ids only. Their values come from the
    ``tables`` argument or from :meth:`set_tables`; arrays of modalities this layer is not
    configured for (dimension 0) are ignored.

    Args:
        num_items: item vocabulary size, reserved ids included.
        num_attributes: attribute vocabulary size; 0 disables the ``"attr"`` modality.
        num_query_tokens: query token vocabulary size; 0 disables query tokens.
        num_queries: query vocabulary size (rows of ``query_text_vectors``).
        embedding_dim: ``d``, the size of every modality vector and of the pair vector.
        max_attributes: attribute ids per item (columns of ``item_attributes``); 0
            disables the ``"attr"`` modality.
        text_dim: size of the item text vectors; 0 disables the ``"text"`` modality.
        image_dim: size of the item image vectors; 0 disables the ``"image"`` modality.
        query_text_dim: size of the query text vectors; 0 means none.
        query_weight: ``lambda`` in ``pair = lambda * query + (1 - lambda) * item``, in
            ``[0, 1]``.
        embeddings_initializer: initializer of the id, attribute and token embeddings.
        embeddings_regularizer: optional regularizer of those embeddings.
        tables: optional ``{name: array}`` of table values (not part of ``get_config``).
        project_tables_first: compute per-item vectors once per catalog row and then gather
            (True): project a whole vector table, and average each item's attribute
            embeddings; or gather per lookup and compute there (False). Both give the same
            vectors; the first costs ``rows x (dim x d + A x d)`` per call, the second
            ``lookups x (dim x d + A x d)``, so it wins for the catalogs of a few hundred
            thousand items that a batch of long histories touches many times over. None
            (default) picks it for tables of <= 262,144 rows.
        max_query_tokens: ``Q``, the token ids per query of the ``query_tokens`` table
            (each query id's tokens): > 0 lets query ids alone stand for their tokens
            (:meth:`encode` with ``query_tokens=None`` reads them from the table, and the
            token embeddings are then averaged once per query row and gathered). 0 (default):
            no table; query tokens come with the inputs only.
        request_num_attributes, request_max_attributes: for serving copies whose
            ``attribute_embeddings`` hold precomputed per-item vectors
            (``SeminarCTR.serving_model``): the vocabulary size and the per-item count ``A``
            of the attribute ids a request gives (:meth:`encode`'s ``attribute_ids``), whose
            learned embeddings are then a second, non-trainable table
            ``request_attribute_embeddings``. 0 (default): the table's own
            (``num_attributes``, ``max_attributes``, ``attribute_embeddings``).
        **kwargs: other ``keras.layers.Layer`` arguments (``name``, ``dtype``, ...).

    Example:

    ```python
    layer = MultiModalPairEmbedding(
        num_items=1000, num_attributes=50, num_query_tokens=500, num_queries=300,
        embedding_dim=64, text_dim=512, tables=tables)
    pair = layer(item_ids, query_ids, query_tokens)         # [B, L, 64]
    vectors, masks = layer.encode(item_ids, query_ids, query_tokens)
    vectors["text"], masks["text"]                          # [B, L, 64], [B, L] bool
    ```
    """

    def __init__(
        self,
        num_items: int,
        num_attributes: int,
        num_query_tokens: int,
        num_queries: int,
        embedding_dim: int = 64,
        max_attributes: int = spec.DEFAULT_MAX_ATTRIBUTES,
        text_dim: int = 0,
        image_dim: int = 0,
        query_text_dim: int = 0,
        query_weight: float = 0.5,
        embeddings_initializer="uniform",
        embeddings_regularizer=None,
        tables: dict | None = None,
        project_tables_first: bool | None = None,
        max_query_tokens: int = 0,
        request_num_attributes: int = 0,
        request_max_attributes: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if project_tables_first is not None and not isinstance(project_tables_first, bool):
            raise ValueError(
                f"`project_tables_first` must be True, False or None, got {project_tables_first!r}."
            )
        self.project_tables_first = project_tables_first
        self.num_items = _check_int("num_items", num_items, spec.NUM_RESERVED_IDS)
        self.num_attributes = _check_int("num_attributes", num_attributes, 0)
        self.num_query_tokens = _check_int("num_query_tokens", num_query_tokens, 0)
        self.num_queries = _check_int("num_queries", num_queries, 0)
        self.embedding_dim = _check_int("embedding_dim", embedding_dim, 1)
        self.max_attributes = _check_int("max_attributes", max_attributes, 0)
        self.text_dim = _check_int("text_dim", text_dim, 0)
        self.image_dim = _check_int("image_dim", image_dim, 0)
        self.query_text_dim = _check_int("query_text_dim", query_text_dim, 0)
        self.max_query_tokens = _check_int("max_query_tokens", max_query_tokens, 0)
        self.request_num_attributes = _check_int(
            "request_num_attributes", request_num_attributes, 0
        )
        self.request_max_attributes = _check_int(
            "request_max_attributes", request_max_attributes, 0
        )
        if self.query_text_dim and not self.num_queries:
            raise ValueError("`num_queries` must be > 0 when `query_text_dim` > 0.")
        if not 0.0 <= float(query_weight) <= 1.0:
            raise ValueError(f"`query_weight` must be in [0, 1], got {query_weight!r}.")
        self.query_weight = float(query_weight)
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.embeddings_regularizer = keras.regularizers.get(embeddings_regularizer)

        self.use_attributes = self.num_attributes > 0 and self.max_attributes > 0
        self.use_query_tokens = self.num_query_tokens > 0
        self.use_query_text = self.query_text_dim > 0
        self.item_modalities = tuple(
            m
            for m, on in zip(
                ITEM_MODALITIES,
                (True, self.use_attributes, self.text_dim > 0, self.image_dim > 0),
            )
            if on
        )
        self.use_query = self.use_query_tokens or self.use_query_text
        enabled = {"attr": self.use_attributes, "text": self.text_dim > 0}
        enabled.update({"image": self.image_dim > 0, "query_text": self.use_query_text})
        self.use_query_token_table = (
            self.use_query_tokens and self.max_query_tokens > 0 and self.num_queries > 0
        )
        enabled["query_token_table"] = self.use_query_token_table
        self.table_names = tuple(n for n, lay in _TABLE_LAYOUT.items() if enabled[lay[3]])
        self._pending_tables = None
        if tables is not None:
            self._pending_tables = self._validate_tables(tables)

        d = self.embedding_dim
        self.text_projection = (
            keras.layers.Dense(d, name="text_projection") if self.text_dim else None
        )
        self.image_projection = (
            keras.layers.Dense(d, name="image_projection") if self.image_dim else None
        )
        self.query_text_projection = (
            keras.layers.Dense(d, name="query_text_projection") if self.use_query_text else None
        )

    # ------------------------------------------------------------------------------ state
    @property
    def attribute_vocabulary_size(self) -> int:
        """Ids of the attribute vocabulary that :meth:`encode`'s ``attribute_ids`` index
        (reserved ids included)."""
        return self.request_num_attributes or self.num_attributes

    @property
    def attribute_input_size(self) -> int:
        """``A``: the attribute ids a request gives per item (the training data's
        ``max_attributes``)."""
        return self.request_max_attributes or self.max_attributes

    def table_shape(self, name: str) -> tuple:
        """Shape of table ``name`` in this layer (from the config)."""
        _, rows, cols, _ = _TABLE_LAYOUT[name]
        shape = (getattr(self, rows),)
        return shape + (getattr(self, cols),) if cols else shape

    def build(self, input_shape=None):
        if self.built:
            return
        d = self.embedding_dim

        def embedding(name, rows):
            return self.add_weight(
                name=name,
                shape=(rows, d),
                initializer=self.embeddings_initializer,
                regularizer=self.embeddings_regularizer,
            )

        self.item_embeddings = embedding("item_embeddings", self.num_items)
        if self.use_attributes:
            self.attribute_embeddings = embedding("attribute_embeddings", self.num_attributes)
            if self.request_num_attributes:
                self.request_attribute_embeddings = self.add_weight(
                    name="request_attribute_embeddings",
                    shape=(self.request_num_attributes, d),
                    initializer="zeros",
                    trainable=False,
                )
        if self.use_query_tokens:
            self.query_token_embeddings = embedding("query_token_embeddings", self.num_query_tokens)
        if self.text_projection is not None:
            self.text_projection.build((None, self.text_dim))
        if self.image_projection is not None:
            self.image_projection.build((None, self.image_dim))
        if self.query_text_projection is not None:
            self.query_text_projection.build((None, self.query_text_dim))
        self.modality_logits = self.add_weight(
            name="modality_logits", shape=(len(self.item_modalities),), initializer="zeros"
        )
        # Table values given before the build become the variables' initial values (an
        # assign here could be lost: Keras may build inside a symbolic / stateless scope).
        pending = self._pending_tables or {}
        for name in self.table_names:
            var = self.add_weight(
                name=name,
                shape=self.table_shape(name),
                dtype=_TABLE_LAYOUT[name][0],
                initializer=_ConstantArray(pending[name]) if name in pending else "zeros",
                trainable=False,
            )
            setattr(self, name, var)
        self._pending_tables = None
        self.built = True

    def _validate_tables(self, tables: dict) -> dict:
        # The users table's arrays (spec.USER_TABLE_ARRAYS) belong to the model, not here.
        unknown = sorted(set(tables) - set(_TABLE_LAYOUT) - set(spec.USER_TABLE_ARRAYS))
        if unknown:
            raise ValueError(f"Unknown table(s) {unknown}; expected names in spec.TABLE_ARRAYS.")
        missing = [n for n in self.table_names if n not in tables]
        if missing:
            raise ValueError(
                f"`tables` is missing {missing}, required by this layer's configuration."
            )
        out = {}
        for name in self.table_names:
            value = np.asarray(tables[name])
            expected = self.table_shape(name)
            if value.shape != expected:
                raise ValueError(
                    f"Table `{name}` has shape {value.shape}, expected {expected} from the "
                    "layer configuration."
                )
            bounds = {"item_attributes": self.num_attributes, "query_tokens": self.num_query_tokens}
            if name in bounds and value.size:
                if value.min() < 0 or value.max() >= bounds[name]:
                    raise ValueError(f"Table `{name}` holds ids outside [0, {bounds[name]}).")
            out[name] = value.astype(_TABLE_LAYOUT[name][0])
        return out

    @property
    def _tables(self) -> dict:
        return {name: getattr(self, name) for name in self.table_names}

    def _assign_tables(self, tables: dict):
        for name, value in tables.items():
            self._tables[name].assign(value)

    def set_tables(self, tables: dict):
        """Assigns the side tables (``{name: array}`` as in ``spec.TABLE_ARRAYS``).

        Arrays of modalities this layer is not configured for, and the users table's
        (``spec.USER_TABLE_ARRAYS``, held by ``SeminarCTR``), are ignored; a configured one
        that is missing or of the wrong shape raises a ``ValueError`` naming it.
        """
        values = self._validate_tables(tables)
        if self.built:
            self._assign_tables(values)
        else:
            self._pending_tables = values

    def get_tables(self) -> dict:
        """The current table values as numpy arrays (only the configured ones)."""
        return {n: keras.ops.convert_to_numpy(v) for n, v in self._tables.items()}

    # ------------------------------------------------------------------------------ compute
    def modality_weights(self):
        """Softmax of the learned item-modality logits, ``[num_item_modalities]``."""
        return ops.softmax(self.modality_logits)

    def _take(self, table, ids):
        return ops.take(table, ids, axis=0)

    def _per_row(self, table) -> bool:
        """Whether to compute a per-item quantity once per row of ``table`` and gather it
        (``project_tables_first``; None: for tables of <= 262,144 rows)."""
        first = self.project_tables_first
        return table.shape[0] <= _PROJECT_FIRST_MAX_ROWS if first is None else first

    def _project_take(self, projection, table_name, ids):
        table = self._tables[table_name]
        if self._per_row(table):
            return self._take(projection(table), ids)
        return projection(self._take(table, ids))

    def request_attribute_table(self):
        """The learned attribute embeddings ``[attribute_vocabulary_size, d]`` that
        request-given attribute ids index (``attribute_embeddings`` unless this is a serving
        copy whose ``attribute_embeddings`` hold per-item vectors)."""
        if self.request_num_attributes:
            return self.request_attribute_embeddings
        return self.attribute_embeddings

    def attribute_vectors(self, item_ids, attribute_ids=None):
        """The ``"attr"`` modality: ``(vectors [..., d], present bool [...])``.

        An item's vector is the masked mean of the embeddings of its attribute ids: those of
        its ``item_attributes`` row, or, where ``attribute_ids`` (int ``[..., A]``, 0 =
        padding) holds any non-zero id for it, those given ids instead. ``present``: the
        used ids are not all padding (it does not look at ``item_ids`` being padding).
        """
        ids = ops.cast(item_ids, "int32")
        rows = self._tables["item_attributes"]
        if self._per_row(rows):
            # Once per catalog row, then gathered: a batch of long histories names each item
            # many times, and [..., A, d] per behaviour is most of the encoding's memory.
            row_mask = ops.not_equal(rows, 0)
            per_row = _ops.masked_mean(self._take(self.attribute_embeddings, rows), row_mask, -1)
            vectors = self._take(per_row, ids)
            present = self._take(ops.any(row_mask, axis=-1), ids)
        else:
            table_ids = self._take(rows, ids)
            table_mask = ops.not_equal(table_ids, 0)
            vectors = _ops.masked_mean(
                self._take(self.attribute_embeddings, table_ids), table_mask, -1
            )
            present = ops.any(table_mask, axis=-1)
        if attribute_ids is None:
            return vectors, present
        given_ids = ops.cast(attribute_ids, "int32")
        given_mask = ops.not_equal(given_ids, 0)
        given = ops.any(given_mask, axis=-1)
        given_vectors = _ops.masked_mean(
            self._take(self.request_attribute_table(), given_ids), given_mask, -1
        )
        vectors = ops.where(ops.expand_dims(given, -1), given_vectors, vectors)
        return vectors, ops.logical_or(given, present)

    def query_tokens_of(self, query_ids):
        """Token ids ``[..., Q]`` of query ids ``[...]`` from the ``query_tokens`` table."""
        return self._take(self._tables["query_tokens"], ops.cast(query_ids, "int32"))

    def query_token_vectors(self, query_ids):
        """The query tokens' part of the ``"query"`` modality from query ids alone (the
        ``query_tokens`` table, ``max_query_tokens`` > 0): ``(vectors [..., d], present bool
        [...])``, equal to :meth:`encode`'s with each id's table row as ``query_tokens``."""
        qids = ops.cast(query_ids, "int32")
        rows = self._tables["query_tokens"]
        if self._per_row(rows):
            # Once per query row, then gathered: a history names the same queries many times.
            row_mask = ops.not_equal(rows, 0)
            per_row = _ops.masked_mean(self._take(self.query_token_embeddings, rows), row_mask, -1)
            return self._take(per_row, qids), self._take(ops.any(row_mask, axis=-1), qids)
        tokens = self._take(rows, qids)
        mask = ops.not_equal(tokens, 0)
        vectors = _ops.masked_mean(self._take(self.query_token_embeddings, tokens), mask, -1)
        return vectors, ops.any(mask, axis=-1)

    def encode(self, item_ids, query_ids=None, query_tokens=None, attribute_ids=None):
        """Per-modality vectors and presence masks.

        Args:
            item_ids: int ``[...]`` item ids, 0 = padding.
            query_ids: optional int ``[...]`` query ids, 0 = no query.
            query_tokens: optional int ``[..., Q]`` query token ids, 0 = padding; None with
                a ``query_tokens`` table (``max_query_tokens`` > 0): each query id's row.
            attribute_ids: optional int ``[..., A]`` attribute ids given with the items (0 =
                padding): where a row holds any non-zero id, its ids replace the item's
                ``item_attributes`` row (see :meth:`attribute_vectors`); all-padding rows,
                or None, keep the table's.

        Returns:
            ``(vectors, masks)``: ``vectors[m]`` is ``[..., d]`` (zeros where absent) and
            ``masks[m]`` is bool ``[...]`` for every ``m`` in ``item_modalities`` and, when
            the layer has a query representation and query inputs are given, ``"query"``.
        """
        if not self.built:
            self.build()
        dtype = self.compute_dtype
        ids = ops.cast(item_ids, "int32")
        item_mask = ops.not_equal(ids, 0)
        vectors, masks = {}, {}

        def put(name, vector, present):
            vectors[name] = vector * ops.expand_dims(ops.cast(present, dtype), -1)
            masks[name] = present

        put("id", ops.cast(self._take(self.item_embeddings, ids), dtype), item_mask)
        if self.use_attributes:
            attr, attr_present = self.attribute_vectors(ids, attribute_ids)
            put("attr", attr, ops.logical_and(item_mask, attr_present))
        if self.text_dim:
            present = ops.logical_and(item_mask, self._take(self._tables["item_has_text"], ids) > 0)
            text = self._project_take(self.text_projection, "item_text_vectors", ids)
            put("text", text, present)
        if self.image_dim:
            has = self._take(self._tables["item_has_image"], ids) > 0
            image = self._project_take(self.image_projection, "item_image_vectors", ids)
            put("image", image, ops.logical_and(item_mask, has))

        if self.use_query and (query_ids is not None or query_tokens is not None):
            parts, present_parts = [], []
            if self.use_query_tokens and query_tokens is not None:
                tokens = ops.cast(query_tokens, "int32")
                token_mask = ops.not_equal(tokens, 0)
                parts.append(
                    _ops.masked_mean(
                        self._take(self.query_token_embeddings, tokens), token_mask, -1
                    )
                )
                present_parts.append(ops.any(token_mask, axis=-1))
            elif self.use_query_token_table and query_ids is not None:
                parts_tokens = self.query_token_vectors(query_ids)
                parts.append(parts_tokens[0])
                present_parts.append(parts_tokens[1])
            if self.use_query_text and query_ids is not None:
                qids = ops.cast(query_ids, "int32")
                has = ops.logical_and(
                    ops.not_equal(qids, 0), self._take(self._tables["query_has_text"], qids) > 0
                )
                parts.append(
                    self._project_take(self.query_text_projection, "query_text_vectors", qids)
                )
                present_parts.append(has)
            if parts:
                total, count = 0.0, 0.0
                for part, present in zip(parts, present_parts):
                    p = ops.expand_dims(ops.cast(present, dtype), -1)
                    total = total + part * p
                    count = count + p
                query_present = present_parts[0]
                for present in present_parts[1:]:
                    query_present = ops.logical_or(query_present, present)
                put(QUERY_MODALITY, total / ops.maximum(count, 1.0), query_present)
        return vectors, masks

    def fusion_weights(
        self, masks: dict, with_query: bool | None = None, item_present=None
    ) -> dict:
        """The weight of each modality in the fused pair vector, from the presence masks.

        ``fuse(vectors, masks) == sum_m weights[m][..., None] * vectors[m]``: the item
        modalities share ``1 - lambda`` (``1`` without a query) in proportion to the learned
        softmax weights of those present, the query gets ``lambda`` where present, and a
        padded behaviour (``masks["id"]`` false) gets 0 everywhere. A modality of
        ``item_modalities`` missing from ``masks`` counts as absent. The first-stage
        product-quantization scorer uses these weights to fuse its per-modality scores.

        Args:
            masks: ``{modality: bool [...]}`` as :meth:`encode` returns them.
            with_query: whether the pair has a query part; default: ``"query" in masks``.
            item_present: bool ``[...]``, false for padded behaviours; default
                ``masks["id"]`` (when there is one).

        Returns:
            ``{modality: float [...]}`` for the item modalities in ``masks`` and, with a
            query part, ``"query"``.
        """
        logits = self.modality_logits
        shift = ops.stop_gradient(ops.max(logits))
        raw, norm = {}, 0.0
        for i, name in enumerate(self.item_modalities):
            if name not in masks:
                continue
            raw[name] = ops.exp(logits[i] - shift) * ops.cast(masks[name], self.compute_dtype)
            norm = norm + raw[name]
        norm = ops.maximum(norm, 1e-12)
        weights = {name: w / norm for name, w in raw.items()}
        if with_query is None:
            with_query = QUERY_MODALITY in masks
        if not with_query:
            return weights
        lam = self.query_weight * ops.cast(masks[QUERY_MODALITY], self.compute_dtype)
        # A padded behaviour (item id 0) stays zero whatever its query.
        if item_present is None:
            item_present = masks.get("id")
        present = 1.0 if item_present is None else ops.cast(item_present, self.compute_dtype)
        weights = {name: w * (1.0 - lam) * present for name, w in weights.items()}
        weights[QUERY_MODALITY] = lam * present
        return weights

    def fuse_items(self, vectors: dict, masks: dict):
        """Fuses the item modalities of ``vectors`` with the learned weights.

        Only the modalities present for an item (``masks``) share the weight, so an item
        without text is not pulled towards zero. Any modality of ``item_modalities`` absent
        from ``vectors`` counts as missing. Returns the item vectors ``[..., d]``.
        """
        item_masks = {m: masks[m] for m in self.item_modalities if m in vectors}
        weights = self.fusion_weights(item_masks, with_query=False)
        return self._weighted_sum(vectors, weights)

    @staticmethod
    def _weighted_sum(vectors: dict, weights: dict):
        total = 0.0
        for name, w in weights.items():
            total = total + vectors[name] * ops.expand_dims(ops.cast(w, vectors[name].dtype), -1)
        return total

    def fuse_pair(self, item_vector, query_vector=None, query_mask=None):
        """``lambda * query + (1 - lambda) * item`` where a query is present, else ``item``."""
        if query_vector is None:
            return item_vector
        lam = self.query_weight * ops.cast(query_mask, item_vector.dtype)
        lam = ops.expand_dims(lam, -1)
        return item_vector + lam * (query_vector - item_vector)

    def fuse(self, vectors: dict, masks: dict, weights: dict | None = None):
        """Pair vectors ``[..., d]`` from :meth:`encode`'s (possibly transformed) outputs;
        zeros where the item is padding. ``weights``: :meth:`fusion_weights` of ``masks``
        when the caller already has them (the same masks fuse several sets of vectors)."""
        if weights is not None:
            return self._weighted_sum(vectors, weights)
        with_query = QUERY_MODALITY in vectors
        used = {m: masks[m] for m in self.item_modalities if m in vectors}
        if with_query:
            used[QUERY_MODALITY] = masks[QUERY_MODALITY]
        weights = self.fusion_weights(used, with_query=with_query, item_present=masks.get("id"))
        return self._weighted_sum(vectors, weights)

    def call(self, item_ids, query_ids=None, query_tokens=None, attribute_ids=None):
        vectors, masks = self.encode(item_ids, query_ids, query_tokens, attribute_ids)
        return self.fuse(vectors, masks)

    def compute_output_shape(
        self, item_ids_shape, query_ids_shape=None, query_tokens_shape=None,
        attribute_ids_shape=None,
    ):  # fmt: skip
        return tuple(item_ids_shape) + (self.embedding_dim,)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_items": self.num_items,
                "num_attributes": self.num_attributes,
                "num_query_tokens": self.num_query_tokens,
                "num_queries": self.num_queries,
                "embedding_dim": self.embedding_dim,
                "max_attributes": self.max_attributes,
                "text_dim": self.text_dim,
                "image_dim": self.image_dim,
                "query_text_dim": self.query_text_dim,
                "query_weight": self.query_weight,
                "project_tables_first": self.project_tables_first,
                "max_query_tokens": self.max_query_tokens,
                "request_num_attributes": self.request_num_attributes,
                "request_max_attributes": self.request_max_attributes,
                "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
                "embeddings_regularizer": keras.regularizers.serialize(self.embeddings_regularizer),
            }
        )
        return config
