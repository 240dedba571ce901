"""SEMINAR's losses (``keras.ops`` only): the pretraining tasks and the CTR loss."""

from seminar_tf.losses.alignment import alignment_pair_losses, multimodal_alignment_loss
from seminar_tf.losses.click import click_crossentropy
from seminar_tf.losses.info_nce import info_nce_loss, symmetric_info_nce_loss
from seminar_tf.losses.next_pair import next_pair_loss
from seminar_tf.losses.relevance import query_item_relevance_loss

__all__ = [
    "alignment_pair_losses",
    "click_crossentropy",
    "info_nce_loss",
    "multimodal_alignment_loss",
    "next_pair_loss",
    "query_item_relevance_loss",
    "symmetric_info_nce_loss",
]
