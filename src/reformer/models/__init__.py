"""The Reformer model family: one trunk (embeddings -> reversible stack -> final norm) and its heads."""

from .base import ReformerTrunk
from .heads import (
    ReformerEncoder,
    ReformerForMaskedLM,
    ReformerForQuestionAnswering,
    ReformerForSequenceClassification,
    ReformerForTokenClassification,
)
from .lm import ReformerLM

__all__ = [
    "ReformerEncoder",
    "ReformerForMaskedLM",
    "ReformerForQuestionAnswering",
    "ReformerForSequenceClassification",
    "ReformerForTokenClassification",
    "ReformerLM",
    "ReformerTrunk",
]
