"""The Reformer model family: one trunk (embeddings -> reversible stack -> final norm) and its heads."""

from .base import ReformerTrunk
from .decoder import ReformerDecoder
from .heads import (
    ReformerEncoder,
    ReformerForMaskedLM,
    ReformerForQuestionAnswering,
    ReformerForSequenceClassification,
    ReformerForTokenClassification,
)
from .lm import ReformerLM
from .seq2seq import ReformerEncoderDecoder
from .seq2seq_config import Seq2SeqConfig

__all__ = [
    "ReformerDecoder",
    "ReformerEncoder",
    "ReformerEncoderDecoder",
    "ReformerForMaskedLM",
    "ReformerForQuestionAnswering",
    "ReformerForSequenceClassification",
    "ReformerForTokenClassification",
    "ReformerLM",
    "ReformerTrunk",
    "Seq2SeqConfig",
]
