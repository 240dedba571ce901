"""First-stage (GSU) scorers, registered by name for :class:`TopKSearch`.

Built in: ``"exact"`` (SEMINAR / TWIN: multi-head attention logits), ``"soft"`` (SIM inner
product), ``"recent"`` (DIN: last K), ``"simhash"`` (ETA: Hamming of 16-bit SimHash), ``"pq"``
(SEMINAR's multi-modal product quantization of the exact scores). A new scorer subclasses :class:`SearchScorer` and registers itself with
``@register_scorer(name)``.
"""

from seminar_tf.layers.scorers.base import (
    SearchScorer,
    available_scorers,
    get_scorer_class,
    register_scorer,
)
from seminar_tf.layers.scorers.exact import ExactScorer
from seminar_tf.layers.scorers.pq import PQScorer
from seminar_tf.layers.scorers.recent import RecentScorer
from seminar_tf.layers.scorers.simhash import SimHashScorer
from seminar_tf.layers.scorers.soft import SoftScorer

__all__ = [
    "ExactScorer",
    "PQScorer",
    "RecentScorer",
    "SearchScorer",
    "SimHashScorer",
    "SoftScorer",
    "available_scorers",
    "get_scorer_class",
    "register_scorer",
]
