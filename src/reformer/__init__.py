"""reformer: Transformers for very long sequences (LSH attention, reversible layers, chunking)."""

from .attention import (
    FullSelfAttention,
    LocalSelfAttention,
    LSHSelfAttention,
    full_attention,
    local_attention,
    lsh_attention,
)
from .config import ReformerConfig
from .models import (
    ReformerEncoder,
    ReformerEncoderDecoder,
    ReformerForMaskedLM,
    ReformerForQuestionAnswering,
    ReformerForSequenceClassification,
    ReformerForTokenClassification,
    ReformerLM,
    Seq2SeqConfig,
)
from .reversible import ReformerBlock, ReversibleSequence
from .version import __version__ as __version__

__all__ = [
    "FullSelfAttention",
    "LSHSelfAttention",
    "LocalSelfAttention",
    "ReformerBlock",
    "ReformerConfig",
    "ReformerEncoder",
    "ReformerEncoderDecoder",
    "ReformerForMaskedLM",
    "ReformerForQuestionAnswering",
    "ReformerForSequenceClassification",
    "ReformerForTokenClassification",
    "ReformerLM",
    "ReversibleSequence",
    "Seq2SeqConfig",
    "full_attention",
    "local_attention",
    "lsh_attention",
]
