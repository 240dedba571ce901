"""GSU scorer ``"pq"``: multi-modal product quantization of the behaviours (SEMINAR's online
first stage), scored asymmetrically from per-target lookup tables."""

from __future__ import annotations

import math

import keras
from keras import ops

from seminar_tf import spec
from seminar_tf.layers.pair_embedding import QUERY_MODALITY
from seminar_tf.layers.scorers.base import SearchScorer, register_scorer
from seminar_tf.layers.scorers.exact import ExactScorer

LAYOUTS = ("modality", "sides", "fused")
ITEM_SIDE, QUERY_SIDE, FUSED = "item", QUERY_MODALITY, "fused"


def code_groups(modalities: tuple, layout: str) -> tuple:
    """``((name, members), ...)``: the vectors a ``layout`` codes, in code order.

    ``"modality"``: one per modality (SEMINAR's multi-modal codes); ``"sides"``: the item
    modalities fused into one item-side vector (a function of the item alone) and the query
    (of the query alone), so codes can live in per-item and per-query tables; ``"fused"``:
    the whole fused key of each behaviour, which is what the GSU scores.
    """
    if layout == "modality":
        return tuple((m, (m,)) for m in modalities)
    if layout == "fused":
        return ((FUSED, tuple(modalities)),)
    items = tuple(m for m in modalities if m != QUERY_SIDE)
    groups = ((ITEM_SIDE, items),) if items else ()
    return groups + (((QUERY_SIDE, (QUERY_SIDE,)),) if QUERY_SIDE in modalities else ())


@register_scorer("pq")
@keras.saving.register_keras_serializable(package="seminar_tf")
class PQScorer(ExactScorer):
    """The ``"exact"`` scorer with the behaviours product-quantized per modality.

    The exact score is a bilinear form of the fused behaviour vector
    ``k = sum_m g_m k_m`` (``g`` the pair-fusion weights of its modalities,
    ``MultiModalPairEmbedding.fusion_weights``), so for a target ``t`` it is
    ``score = c(t) + sum_m g_m u(t) . k_m`` with ``u(t) = mean_h W_k^h q_h(t) / sqrt(e)``.
    Each modality vector ``k_m`` ``[d]`` is split into ``S`` sub-vectors of ``d / S`` and each
    sub-vector is replaced by its nearest centroid in the codebook of that (modality,
    sub-vector) (``C`` centroids, learned by k-means on trained vectors:
    ``seminar_tf.quantization``). A behaviour is then stored as ``M x S`` small integers, and
    its score is ``c(t) + sum_m g_m sum_s T[m, s, code[m, s]]`` with the lookup table
    ``T[m, s, c] = u(t)_s . centroid[m, s, c]`` computed once per target: ``M x S`` table
    lookups per behaviour instead of ``M`` d x d projections and a d-dimensional product.
    The target stays exact (asymmetric quantization).

    Shapes: target ``[B, d]``; ``key_parts`` ``{modality: [B, L, d]}`` with
    ``key_weights`` ``{modality: [B, L]}``, or the stored codes
    ``key_parts["hist_pq_codes"]`` int ``[B, L, M, S]`` (-1 where a modality is absent)
    with ``key_weights``; returns ``[B, L]``. With ``training=True`` it scores exactly (as
    ``"exact"``: quantization is not differentiable, and the codebooks are fitted after, or
    between, the epochs); otherwise from the codes.

    Weights: the attention of :class:`ExactScorer` (restorable from a PSU or an exact model)
    and the non-trainable ``codebooks`` ``[M, S, C, d / S]``.

    Args:
        modalities: names of the quantized modalities, in code order (``M`` of them).
        num_subvectors: ``S``, sub-vectors per modality vector (must divide ``d``).
        num_centroids: ``C``, centroids per codebook.
        layout: what is coded (:func:`code_groups`): ``"modality"`` (each modality vector,
            as above), ``"sides"`` (the item side and the query) or ``"fused"`` (the fused
            key); ``M`` is then the number of coded vectors. Each is turned by its
            ``rotations`` ``[M, d, d]`` (identity unless set: an OPQ rotation, or the
            score-aware transform of ``seminar_tf.quantization``) before it is split.
        shortlist: ``r``; with ``r > 1`` a ``SeminarCTR`` (outside training) keeps the top
            ``r x K`` behaviours by their codes, embeds those again from their ids and keeps
            the ``K`` best by the exact score (:meth:`exact_scores`): the quantization only
            has to bring the exact top K into the shortlist. 1 (default): no re-rank.
        num_heads, head_dim, reduction, initialization: as :class:`ExactScorer`.
        **kwargs: ``keras.layers.Layer`` arguments.

    Example:

    ```python
    scorer = PQScorer(modalities=("id", "text", "query"), num_subvectors=16)
    scorer.set_codebooks(codebooks)  # [3, 16, 512, d // 16], e.g. from k-means
    codes = scorer.encode_codes(parts, masks)  # [B, L, 3, 16]
    scores = scorer(target, keys, mask, key_parts={"hist_pq_codes": codes},
                    key_weights=weights)  # [B, L]
    ```
    """

    serving_features = (spec.PQ_CODES,)

    def __init__(
        self,
        modalities: tuple | list = ("id",),
        num_subvectors: int = 16,
        num_centroids: int = 512,
        layout: str = "modality",
        shortlist: int = 1,
        num_heads: int = 4,
        head_dim: int | None = None,
        reduction: str = "mean",
        initialization: str = "identity",
        **kwargs,
    ):
        super().__init__(
            num_heads=num_heads,
            head_dim=head_dim,
            reduction=reduction,
            initialization=initialization,
            **kwargs,
        )
        if isinstance(modalities, str) or not modalities:
            raise ValueError(f"`modalities` must be a non-empty list of names, got {modalities!r}.")
        if len(set(modalities)) != len(modalities):
            raise ValueError(f"`modalities` has duplicates: {modalities!r}.")
        for name, value in (
            ("num_subvectors", num_subvectors),
            ("num_centroids", num_centroids),
            ("shortlist", shortlist),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if layout not in LAYOUTS:
            raise ValueError(f"`layout` must be one of {LAYOUTS}, got {layout!r}.")
        self.modalities = tuple(modalities)
        self.num_subvectors = num_subvectors
        self.num_centroids = num_centroids
        self.layout = layout
        self.shortlist = shortlist
        self.groups = code_groups(self.modalities, layout)

    @property
    def code_bytes(self) -> int:
        """Bytes of one behaviour's codes: ``M x S`` codes of 1 byte (``C <= 256``) or 2."""
        return len(self.groups) * self.num_subvectors * (1 if self.num_centroids <= 256 else 2)

    @property
    def group_names(self) -> tuple:
        """The names of the coded vectors, in code order (``M`` of them)."""
        return tuple(name for name, _ in self.groups)

    @property
    def serving_sizes(self) -> dict:
        """Sizes of the symbols of ``serving_features``: ``M`` coded vectors, ``S`` sub-vectors."""
        return {"M": len(self.groups), "S": self.num_subvectors}

    def build(self, target_shape, keys_shape=None, mask_shape=None):
        if self.built:
            return
        d = int(target_shape[-1])
        if d % self.num_subvectors:
            raise ValueError(
                f"`num_subvectors`={self.num_subvectors} does not divide the vector size {d}."
            )
        super().build(target_shape, keys_shape, mask_shape)
        self.rotations = self.add_weight(
            name="rotations",
            shape=(len(self.groups), d, d),
            initializer=lambda shape, dtype=None: ops.broadcast_to(ops.eye(d, dtype=dtype), shape),
            trainable=False,
        )
        self.codebooks = self.add_weight(
            name="codebooks",
            shape=(
                len(self.groups),
                self.num_subvectors,
                self.num_centroids,
                d // self.num_subvectors,
            ),
            initializer="zeros",
            trainable=False,
        )

    def set_rotations(self, rotations) -> None:
        """Assigns the invertible transforms ``[M, d, d]`` applied to each coded vector before
        it is split into sub-vectors (identity by default): ``x -> x @ R``. An orthogonal
        ``R`` (OPQ) keeps distances; any other (the score-aware transform) changes which
        errors k-means minimizes, and the target is turned by ``inv(R)^T`` so that scores
        still approximate ``u . x``."""
        if tuple(rotations.shape) != tuple(self.rotations.shape):
            raise ValueError(
                f"Rotations of shape {tuple(rotations.shape)} do not fit this scorer "
                f"(needs {tuple(self.rotations.shape)})."
            )
        self.rotations.assign(ops.cast(rotations, self.rotations.dtype))

    def set_codebooks(self, codebooks) -> None:
        """Assigns the codebooks ``[M, S, C, d / S]`` (e.g. k-means centroids)."""
        if tuple(codebooks.shape) != tuple(self.codebooks.shape):
            raise ValueError(
                f"Codebooks of shape {tuple(codebooks.shape)} do not fit this scorer "
                f"(needs {tuple(self.codebooks.shape)}: coded vectors x sub-vectors x centroids x "
                "sub-vector size)."
            )
        self.codebooks.assign(ops.cast(codebooks, self.codebooks.dtype))

    # ----------------------------------------------------------------------- codes
    def group_vectors(self, parts: dict, weights: dict) -> tuple:
        """The vectors this scorer codes, from per-modality vectors ``{modality: [..., d]}``
        and their fusion weights ``{modality: [...]}``: ``({group: [..., d]}, {group:
        [...]})`` with each group's weight ``W_g = sum_{m in g} w_m`` and vector
        ``sum_{m in g} w_m k_m / W_g`` (0 where ``W_g`` is 0), so that
        ``sum_g W_g v_g = sum_m w_m k_m``. With ``layout="modality"`` these are the inputs."""
        vectors, totals = {}, {}
        for name, members in self.groups:
            members = [m for m in members if m in parts and m in weights]
            if not members:
                continue
            total = sum(ops.cast(weights[m], "float32") for m in members)
            fused = sum(
                ops.cast(parts[m], "float32") * ops.cast(weights[m], "float32")[..., None]
                for m in members
            )
            safe = ops.where(total > 0, total, ops.ones_like(total))
            vectors[name], totals[name] = fused / safe[..., None], total
        return vectors, totals

    def encode_codes(self, parts: dict, masks: dict | None = None):
        """Codes ``int32 [..., M, S]`` of the coded vectors ``{group: [..., d]}`` (see
        :meth:`group_vectors`; the modalities themselves with ``layout="modality"``): the
        nearest centroid of each sub-vector after the group's rotation; -1 where
        ``masks[g]`` is false or ``g`` is not in ``parts``."""
        first = next(iter(parts.values()))
        lead = ops.shape(first)[:-1]
        s = self.num_subvectors
        codes = []
        for i, m in enumerate(self.group_names):
            if m not in parts:
                codes.append(ops.full(tuple(lead) + (s,), -1, dtype="int32"))
                continue
            x = ops.matmul(
                ops.reshape(
                    ops.cast(parts[m], self.codebooks.dtype), (-1, self.rotations.shape[-1])
                ),
                self.rotations[i],
            )
            x = ops.reshape(x, (-1, s, self.codebooks.shape[-1]))
            # One sub-vector at a time: the distances of all N vectors to all C centroids
            # are [N, C], not [N, S, C] (a batch of 512 histories of 300 is 150k vectors).
            sub_codes = []
            for j in range(s):
                book = self.codebooks[i, j]  # [C, e]
                # argmin ||x - c||^2 = argmin (||c||^2 - 2 x.c)
                dist = ops.sum(book * book, axis=-1)[None, :] - 2.0 * ops.matmul(
                    x[:, j], ops.transpose(book)
                )
                sub_codes.append(ops.cast(ops.argmin(dist, axis=-1), "int32"))
            code = ops.reshape(ops.stack(sub_codes, axis=-1), tuple(lead) + (s,))
            if masks is not None and m in masks:
                present = ops.expand_dims(ops.cast(masks[m], "bool"), -1)
                code = ops.where(present, code, -1)
            codes.append(code)
        return ops.stack(codes, axis=-2)

    def presence(self, codes) -> dict:
        """``{modality: bool [...]}`` from the codes ``[..., M, S]``, as the pair embedding's
        ``fusion_weights`` takes them: each modality where ``layout="modality"``; otherwise
        a group stands for its first member (its weight is what the fusion gives the group:
        ``(1 - lambda)`` for the item side beside a query, ``lambda`` for the query, 1 for
        the fused vector)."""
        return {members[0]: codes[..., i, 0] >= 0 for i, (_, members) in enumerate(self.groups)}

    # ----------------------------------------------------------------------- scores
    def _linear_form(self, target):
        """``(u [B, d], c [B])`` with ``exact score(k) = u . k + c`` for this target."""
        att = self.attention
        # The attention's own query projection (the key side is folded into u below).
        q = att._project(target, att.query_kernel, getattr(att, "query_bias", None), "bd,dhe->bhe")
        scale = 1.0 / math.sqrt(att._head_dim)
        if self.reduction == "mean":
            scale /= att.num_heads
        u = ops.einsum("bhe,dhe->bd", q, att.key_kernel) * scale
        c = ops.einsum("bhe,he->b", q, att.key_bias) * scale if att.use_bias else 0.0 * u[:, 0]
        return u, c

    def lookup_tables(self, target):
        """``(T [B, M, S, C], c [B])``: ``T[b, m, s, j] = u_s . centroid[m, s, j]``."""
        u, c = self._linear_form(ops.cast(target, self.codebooks.dtype))
        e = self.codebooks.shape[-1]
        # (x R) . (u R^-T) = x . u: the target turns with the codes (R^-T = R when R is
        # orthogonal, as OPQ's is).
        u = ops.einsum("bd,mfd->bmf", u, ops.inv(self.rotations))
        u = ops.reshape(u, (-1, len(self.groups), self.num_subvectors, e))
        return ops.einsum("bmse,msce->bmsc", u, self.codebooks), c

    def exact_scores(self, target, keys, mask=None):
        """The exact (unquantized) scores ``[B, N]`` of fused keys ``[B, N, d]``, as the
        ``"exact"`` scorer gives them: what a shortlist is re-ranked by."""
        return ExactScorer.call(self, target, keys, mask)

    def score_codes(self, target, codes, weights):
        """Scores ``[B, L]`` of the behaviours stored as ``codes`` int ``[B, L, M, S]``,
        fused with ``weights`` ``[B, L, M]``."""
        tables, offset = self.lookup_tables(target)
        return self._score_tables(tables[:, None], offset[:, None], codes, weights)[:, 0]

    def _score_tables(self, tables, offset, codes, weights):
        """Scores ``[B, C, L]``: the lookup tables ``[B, C, M, S, K]`` (and offsets
        ``[B, C]``) of C targets per history against that history's ``codes [B, L, M, S]``
        fused with ``weights [B, L, M]``: the codes are read once for every target."""
        m, s, k = len(self.groups), self.num_subvectors, self.num_centroids
        codes = ops.cast(codes, "int32")
        shape = ops.shape(codes)  # [B, L, M, S]
        c = ops.shape(tables)[1]
        present = ops.cast(codes >= 0, tables.dtype)
        offsets = ops.reshape(ops.arange(m * s, dtype="int32") * k, (m, s))
        flat_index = ops.reshape(ops.maximum(codes, 0) + offsets, (shape[0], 1, -1))
        gathered = ops.take_along_axis(
            ops.reshape(tables, (shape[0], c, m * s * k)),
            ops.broadcast_to(flat_index, (shape[0], c, ops.shape(flat_index)[2])),
            axis=2,
        )
        gathered = ops.reshape(gathered, (shape[0], c, shape[1], m, s))
        partial = ops.sum(gathered * ops.expand_dims(present, 1), axis=-1)  # [B, C, L, M]
        weights = ops.expand_dims(ops.cast(weights, partial.dtype), 1)
        return ops.sum(partial * weights, axis=-1) + ops.expand_dims(offset, -1)

    def stack_weights(self, key_weights: dict):
        """``[B, L, M]``: each coded vector's weight, the sum of its members' in
        ``{modality: [B, L]}`` (0 for those not given)."""
        ref = ops.cast(next(iter(key_weights.values())), "float32")
        return ops.stack(
            [
                sum(
                    (ops.cast(key_weights[m], "float32") for m in members if m in key_weights),
                    ops.zeros_like(ref),
                )
                for _, members in self.groups
            ],
            axis=-1,
        )

    def _codes_of(self, key_parts: dict, key_weights: dict):
        """The stored codes in ``key_parts``, or those of its per-modality vectors."""
        codes = key_parts.get(spec.PQ_CODES.name)
        if codes is not None:
            return codes
        missing = [m for m in self.modalities if m in key_weights and m not in key_parts]
        if missing:
            raise ValueError(f"The 'pq' scorer got no vectors for modalities {missing}.")
        vectors, totals = self.group_vectors(key_parts, key_weights)
        return self.encode_codes(vectors, {g: w > 0 for g, w in totals.items()})

    def call(
        self, target, keys, mask, target_parts=None, key_parts=None, key_weights=None,
        training=None,
    ):  # fmt: skip
        if training:
            return super().call(target, keys, mask)
        if key_weights is None or not key_parts:
            raise ValueError(
                "The 'pq' scorer needs the per-modality `key_parts` (or the stored codes "
                f"`key_parts['{spec.PQ_CODES.name}']`) and the fusion `key_weights`."
            )
        codes = self._codes_of(key_parts, key_weights)
        return self.score_codes(target, codes, self.stack_weights(key_weights))

    def score_many(
        self, targets, keys, mask, target_parts=None, key_parts=None, key_weights=None,
        training=None,
    ):  # fmt: skip
        if training:
            return super().score_many(targets, keys, mask, target_parts, key_parts, key_weights)
        if key_weights is None or not key_parts:
            return SearchScorer.score_many(
                self, targets, keys, mask, target_parts, key_parts, key_weights, training
            )
        # The history is coded once; each target only brings its lookup tables.
        codes = self._codes_of(key_parts, key_weights)
        c = ops.shape(targets)[1]
        tables, offset = self.lookup_tables(ops.reshape(targets, (-1, targets.shape[-1])))
        batch = ops.shape(codes)[0]
        tables = ops.reshape(tables, (batch, c) + tuple(tables.shape[1:]))
        offset = ops.reshape(offset, (batch, c))
        return self._score_tables(tables, offset, codes, self.stack_weights(key_weights))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "modalities": list(self.modalities),
                "num_subvectors": self.num_subvectors,
                "num_centroids": self.num_centroids,
                "layout": self.layout,
                "shortlist": self.shortlist,
            }
        )
        return config
