"""Attention kinds: LSH (hashed chunks), local (neighbour chunks), full (exact, SDPA); cross-attention
(decoder over encoder): exact (blocked) and LSH."""

from .cross import CrossAttention, cross_attention
from .full import FullSelfAttention, full_attention
from .local import LocalSelfAttention, local_attention
from .lsh import LSHSelfAttention, lsh_attention, normalize_keys
from .lsh_cross import LSHCrossAttention, lsh_cross_attention

__all__ = [
    "CrossAttention",
    "LSHCrossAttention",
    "FullSelfAttention",
    "LSHSelfAttention",
    "LocalSelfAttention",
    "cross_attention",
    "full_attention",
    "local_attention",
    "lsh_attention",
    "lsh_cross_attention",
    "normalize_keys",
]
