"""What a causal language model gains from generation: :meth:`GenerationMixin.generate`, as HF's
``GenerationMixin`` gives its models.

The model provides ``config`` (a :class:`~reformer.ReformerConfig`), ``embeddings``, ``layers.blocks``
(blocks with ``attn_norm``, ``attention`` and ``feed_forward``: see :mod:`reformer.block_decoding`),
``final_norm``, ``lm_head`` and ``_check_inputs``; generation drives those and holds no copy of their
arithmetic.
"""

from __future__ import annotations

import torch

from .streaming import generate


class GenerationMixin:
    """Adds :meth:`generate` to a causal language model (:class:`~reformer.ReformerLM`)."""

    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 100,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
        n_hashes: int | None = None,
        generator: torch.Generator | None = None,
        attention_mask: torch.Tensor | None = None,
        n_buckets: int | tuple[int, ...] | None = None,
        hf_compatible: bool = False,
        eos_token_id: int | list[int] | None = None,
        stop: list[list[int]] | None = None,
        pad_token_id: int | None = None,
        repetition_penalty: float = 1.0,
    ) -> torch.Tensor:
        """Sample up to ``max_new_tokens`` tokens after ``input_ids`` ``(batch, length)``; returns
        ``(batch, length + n)``, the prompt followed by the new ids (``n = max_new_tokens`` unless every
        row finished earlier).

        A row finishes with an id of ``eos_token_id`` (an int or a list) or when its new ids end with
        one of ``stop`` (lists of ids); the finishing ids are kept and later positions hold
        ``pad_token_id`` (default: the first ``eos_token_id``, else 0). ``repetition_penalty`` (HF's and
        CTRL's, 1.0 = none) divides the positive logits of ids already in the row, prompt included, by
        it and multiplies the negative ones, before temperature and top-k / top-p.

        ``temperature=0`` is greedy; otherwise ``top_k`` / ``top_p`` (nucleus) cut the distribution and
        ``generator`` draws. ``attention_mask`` ``(batch, length)`` (1 = real) allows left-padded prompts
        of different lengths. One run fixes the LSH bucket count (``n_buckets``, else the config's, else
        the automatic count for prompt + new tokens) and the rotations. ``use_cache=True`` keeps per-layer
        keys/values/buckets and costs one token's forward per step; ``use_cache=False`` recomputes the
        whole (trailing ``max_seq_len``) context per step. See :mod:`reformer.generation` for when the two
        are exactly equal. ``hf_compatible=True`` makes the cached LSH step follow HF transformers' rule
        (which differs from the chunked computation) so that converted models generate HF's tokens.
        """
        return generate(
            self, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            use_cache=use_cache, n_hashes=n_hashes, generator=generator, attention_mask=attention_mask,
            n_buckets=n_buckets, hf_compatible=hf_compatible, eos_token_id=eos_token_id, stop=stop,
            pad_token_id=pad_token_id, repetition_penalty=repetition_penalty,
        )  # fmt: skip
