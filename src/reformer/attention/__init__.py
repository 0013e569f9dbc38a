"""Attention kinds: LSH (hashed chunks), local (neighbour chunks), full (exact, SDPA)."""

from .full import FullSelfAttention, full_attention
from .local import LocalSelfAttention, local_attention
from .lsh import LSHSelfAttention, lsh_attention, normalize_keys

__all__ = [
    "FullSelfAttention",
    "LSHSelfAttention",
    "LocalSelfAttention",
    "full_attention",
    "local_attention",
    "lsh_attention",
    "normalize_keys",
]
