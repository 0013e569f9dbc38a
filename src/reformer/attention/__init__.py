"""Attention kinds: LSH (hashed chunks), local (neighbour chunks), full (exact, SDPA); cross-attention
(decoder over encoder): exact (blocked) and LSH. Each kind decodes itself: ``prefill`` / ``step`` next to
its ``forward``, with its cache (:mod:`reformer.attention.decode`)."""

from .cross import CrossAttention, MemoryCache, cross_attention
from .decode import Prompt
from .full import FullSelfAttention, full_attention
from .kv_cache import KVCache, full_decode_step
from .local import LocalSelfAttention, local_attention
from .local_cache import LocalCache, local_decode_step
from .lsh import LSHSelfAttention, lsh_attention, normalize_keys
from .lsh_cache import LSHCache, lsh_decode_step
from .lsh_cross import LSHCrossAttention, lsh_cross_attention
from .lsh_cross_cache import LSHCrossCache
from .own_bucket_cache import OwnBucketCache, own_bucket_decode_step

__all__ = [
    "CrossAttention",
    "FullSelfAttention",
    "KVCache",
    "LSHCache",
    "LSHCrossAttention",
    "LSHCrossCache",
    "LSHSelfAttention",
    "LocalCache",
    "LocalSelfAttention",
    "MemoryCache",
    "OwnBucketCache",
    "Prompt",
    "cross_attention",
    "full_attention",
    "full_decode_step",
    "local_attention",
    "local_decode_step",
    "lsh_attention",
    "lsh_cross_attention",
    "lsh_decode_step",
    "normalize_keys",
    "own_bucket_decode_step",
]
