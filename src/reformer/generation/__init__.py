"""Autoregressive generation: the run's settings, prompt prefill and the token-by-token loop over the
model's own blocks, sampling and stopping. It sits below the models: :class:`GenerationMixin` gives
:class:`~reformer.ReformerLM` its ``generate``, and nothing here imports a model class.

Modules: ``decoding`` (the run's LSH settings, prefill and the model-level decode step, which drive
:mod:`reformer.block_decoding`), ``sampling``, ``stopping``, ``streaming`` (:func:`stream`,
:func:`generate`), ``mixin`` (:class:`GenerationMixin`), ``images`` (whole images from image models)
and ``seq2seq`` (encoder-decoder decoding). Each attention kind's cache and decode step live with the
kind in :mod:`reformer.attention` (:mod:`reformer.attention.decode` describes the protocol); the
``reformer generate`` command is :mod:`reformer.generate_command`.

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

from .decoding import GenerationCache, RunSettings, decode_step, prefill, run_settings
from .mixin import GenerationMixin
from .sampling import sample_next
from .streaming import generate, stream

__all__ = [
    "GenerationCache",
    "GenerationMixin",
    "RunSettings",
    "decode_step",
    "generate",
    "prefill",
    "run_settings",
    "sample_next",
    "stream",
]
