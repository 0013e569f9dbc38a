"""Autoregressive generation with per-layer caches, sampling, and the ``reformer generate`` command.

Modules: one per cache kind with its decode step (``lsh_cache``, ``own_bucket_cache``, ``local_cache``,
``kv_cache``, on the shared ``buffers``), ``decoding`` (the run's LSH settings, prefill and the
model-level decode step), ``sampling``, ``streaming`` (:func:`stream`, :func:`generate`) and ``command``
(``reformer generate``).

Semantics (docs/generation.md has the long form). A generation run fixes the LSH bucket count (the
config's, or the automatic count for the run's final length; under ``own_bucket`` the layers' fixed
count) and so the rotations, and uses them with and without the cache. With the cache, each token's
per-layer states are computed once, when the token enters the sequence (the prompt's in one forward pass
over the prompt), and kept:

* LSH layers keep the normalised keys, the values and the bucket id of every position in every round,
  plus each round's positions sorted by (bucket, position) and a per-bucket count. A new token's rank
  in a round is the number of kept positions with a bucket id not above its own; the chunks it attends
  to (its own chunk and ``n_chunks_before`` before it, wrapping as the chunked computation wraps, and
  the exact single-chunk path while the sequence fits one chunk) are read off the sorted positions. So
  the new token gathers exactly the keys that the chunked computation over [kept states + new token]
  gives it (tested against :func:`~reformer.attention.lsh.lsh_attention` to 1e-12 in float64).
* Local layers keep a ring of the last ``(n_chunks_before + 1) * chunk_size`` keys/values; full layers
  keep every key/value. Reversible layers need no stored activations: a decode step only runs forward.

Caveat, by construction of trax's and HF's causal LSH rule (``lsh_key_rule="chunks"``): which keys
position ``i`` sees depends on where later tokens sort, so in full recomputation the states of earlier
tokens change as the sequence grows. A cache that keeps them therefore equals full recomputation exactly
only where no LSH layer feeds another layer with chunked (longer than one chunk) attention: local/full-only
models, models whose only LSH layer is the last, and sequences within one LSH chunk. Elsewhere it is the
approximation HF transformers' cache also makes (it keeps the prefix's per-layer inputs);
docs/generation.md measures how often greedy tokens agree with recomputation.

Under ``lsh_key_rule="own_bucket"`` (truly causal LSH, the default of causal models; docs/causal_lsh.md)
LSH layers keep their keys and values by position and, per round and bucket, a ring of the last
``W = n_chunks_before * bucket_size`` positions (``own_bucket_cache``); a step scores at most
``rounds * W`` keys. No state depends on later tokens under that rule, so cached decoding equals
recomputation for every stack of layers.

HF's cached LSH step gathers other keys than the chunked computation once the sequence passes one chunk
(it wraps within the round modulo the unpadded length, and its sort keys depend on its padding);
``hf_compatible=True`` follows HF's rule instead, so that a model converted with ``from_hf`` generates
HF's tokens.
"""

from .command import add_arguments, run
from .decoding import GenerationCache, RunSettings, decode_step, prefill, run_settings
from .kv_cache import KVCache, full_decode_step
from .local_cache import LocalCache, local_decode_step
from .lsh_cache import LSHCache, lsh_decode_step
from .own_bucket_cache import OwnBucketCache, own_bucket_decode_step
from .sampling import sample_next
from .streaming import generate, stream

__all__ = [
    "GenerationCache",
    "KVCache",
    "LSHCache",
    "LocalCache",
    "OwnBucketCache",
    "RunSettings",
    "add_arguments",
    "decode_step",
    "full_decode_step",
    "generate",
    "local_decode_step",
    "lsh_decode_step",
    "own_bucket_decode_step",
    "prefill",
    "run",
    "run_settings",
    "sample_next",
    "stream",
]
