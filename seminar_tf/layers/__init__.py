"""SEMINAR's Keras layers (``keras.ops`` only: they run under the TensorFlow and JAX backends)."""

from seminar_tf.layers.pair_embedding import MultiModalPairEmbedding
from seminar_tf.layers.scorers import (
    ExactScorer,
    PQScorer,
    RecentScorer,
    SearchScorer,
    SimHashScorer,
    SoftScorer,
    available_scorers,
    get_scorer_class,
    register_scorer,
)
from seminar_tf.layers.target_attention import MultiHeadTargetAttention
from seminar_tf.layers.topk_search import TopKSearch

__all__ = [
    "ExactScorer",
    "MultiHeadTargetAttention",
    "MultiModalPairEmbedding",
    "PQScorer",
    "RecentScorer",
    "SearchScorer",
    "SimHashScorer",
    "SoftScorer",
    "TopKSearch",
    "available_scorers",
    "get_scorer_class",
    "register_scorer",
]
