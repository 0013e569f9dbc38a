"""Decoding with an encoder-decoder Reformer: the encoder runs once, every decoder layer keeps the
projected keys and values of the encoder output, and (for exact self-attention) of its own past.

With ``use_cache`` and a decoder whose self-attention layers are all ``"full"``, each new token runs
through the decoder alone: its self-attention reads the layer's key/value cache, its cross-attention
the layer's precomputed encoder keys/values. That is exactly the uncached recomputation (the decoder is
causal, and with exact cross-attention a query's output does not depend on the others). Decoders with
LSH or local self-attention, and LSH cross-attention (whose query chunks depend on every query), decode
by recomputing the decoder over the prefix at each step (the encoder output and its projections are
still computed once).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..attention import FullSelfAttention
from ..attention.cross import cross_attention
from ..reversible_decoder import STEPS
from .sampling import check_sampling, sample_next

if TYPE_CHECKING:
    from ..models.seq2seq import ReformerEncoderDecoder


def can_cache(model: ReformerEncoderDecoder) -> bool:
    """Whether the step-by-step cached path applies (exact self- and cross-attention in every layer)."""
    return model.config.cross_attention == "full" and all(
        isinstance(block.self_attention, FullSelfAttention) for block in model.decoder.blocks
    )


class _DecoderCache:
    """Per layer: self-attention keys/values ``(batch, heads, t, head_dim)`` so far, and the encoder's
    projected keys/values."""

    def __init__(self, model: ReformerEncoderDecoder, memory: torch.Tensor) -> None:
        self.memory_kv = [block.cross_attention.project_memory(memory) for block in model.decoder.blocks]
        self.keys: list[torch.Tensor | None] = [None] * len(model.decoder.blocks)
        self.values: list[torch.Tensor | None] = [None] * len(model.decoder.blocks)


def _self_step(block, layer: int, cache: _DecoderCache, b: torch.Tensor) -> torch.Tensor:
    """Causal exact self-attention of the newest position ``b`` ``(batch, 1, d_model)`` over the cache."""
    attn = block.self_attention
    h = block.self_norm(b)
    q, k, v = (attn.split_heads(proj(h)) for proj in (attn.to_q, attn.to_k, attn.to_v))
    if cache.keys[layer] is not None:
        k, v = torch.cat([cache.keys[layer], k], 2), torch.cat([cache.values[layer], v], 2)
    cache.keys[layer], cache.values[layer] = k, v
    return attn.output(cross_attention(q, k, v))  # one query over every past key: exact causal


def _cached_step(model, cache: _DecoderCache, ids: torch.Tensor, position: int, memory_mask) -> torch.Tensor:
    """Logits ``(batch, vocab)`` of the newest decoder input ``ids`` ``(batch, 1)`` at ``position``."""
    x = model.embeddings(ids, torch.tensor([position], device=ids.device))
    a, b = x, x
    for layer, block in enumerate(model.decoder.blocks):
        for kind in STEPS:
            if kind == "self":
                out = _self_step(block, layer, cache, b)
            else:
                ctx = {"memory_mask": memory_mask, "memory_kv": cache.memory_kv[layer]}
                out = block.step(kind, b, None, ctx, {})
            a, b = b, a + out
    return model.lm_head(model.final_norm(torch.cat([a, b], -1)))[:, -1]


@torch.no_grad()
def generate(
    model: ReformerEncoderDecoder,
    source_ids: torch.Tensor,
    source_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    n_hashes: int | None = None,
) -> torch.Tensor:
    """Targets ``(batch, n)`` int64 decoded for ``source_ids`` ``(batch, L_enc)`` (greedy by default).

    ``max_new_tokens`` defaults to the decoder's ``max_seq_len``. With the config's ``eos_id`` set,
    decoding stops once every row has produced it (rows that finished early repeat ``eos_id``).
    ``n_hashes`` sets the LSH rounds of the encoder, decoder and cross-attention.
    """
    limit = model.config.decoder.max_seq_len
    max_new_tokens = limit if max_new_tokens is None else max_new_tokens
    check_sampling(max_new_tokens, temperature, top_k, top_p, n_hashes)
    if max_new_tokens > limit:
        raise ValueError(f"max_new_tokens={max_new_tokens} exceeds the decoder's max_seq_len={limit}")
    was_training = model.training
    model.eval()
    try:
        memory, memory_mask = model.encode(source_ids, source_mask, n_hashes)
        batch, device = source_ids.shape[0], source_ids.device
        inputs = torch.full((batch, 1), model.config.decoder_start_id, dtype=torch.long, device=device)
        cache = _DecoderCache(model, memory) if use_cache and can_cache(model) else None
        eos, done = model.config.eos_id, torch.zeros(batch, dtype=torch.bool, device=device)
        out = []
        for t in range(max_new_tokens):
            if cache is not None:
                logits = _cached_step(model, cache, inputs[:, -1:], t, memory_mask)
            else:
                logits = model.lm_head(model.decode(memory, memory_mask, inputs, None, n_hashes)[:, -1])
            next_ids = sample_next(logits, temperature, top_k, top_p, generator)
            if eos is not None:
                next_ids = next_ids.masked_fill(done, eos)
                done |= next_ids == eos
            out.append(next_ids)
            inputs = torch.cat([inputs, next_ids[:, None]], 1)
            if eos is not None and bool(done.all()):
                break
        return torch.stack(out, 1) if out else inputs[:, :0]
    finally:
        model.train(was_training)


def run_source(args, parser) -> int:
    """``reformer generate DIR --source TEXT|--source-file F`` for an encoder-decoder byte model (source
    and target ids are bytes): prints the decoded target."""
    import sys
    import time

    from ..models.seq2seq import ReformerEncoderDecoder

    try:
        model = ReformerEncoderDecoder.from_pretrained(args.checkpoint, map_location=args.device)
        data = args.source.encode("utf-8") if args.source is not None else args.source_file.read_bytes()
    except (FileNotFoundError, ValueError, OSError) as err:
        parser.error(f"{err} (--source needs a model saved by ReformerEncoderDecoder)")
    if not data:
        parser.error("the source is empty; give at least one byte")
    if model.config.encoder.vocab_size < 256 or model.config.decoder.vocab_size < 256:
        parser.error(
            f"this model's vocabularies ({model.config.encoder.vocab_size} / "
            f"{model.config.decoder.vocab_size} ids) are not bytes; call model.generate(source_ids) "
            "from Python"
        )
    ids = torch.tensor([list(data)], dtype=torch.long, device=args.device)
    limit = model.config.decoder.max_seq_len
    if args.max_new_tokens > limit:
        print(
            f"[--max-new-tokens {args.max_new_tokens} > the decoder's max_seq_len: {limit}]", file=sys.stderr
        )
    generator = None if args.seed is None else torch.Generator(device=args.device).manual_seed(args.seed)
    start = time.perf_counter()
    try:
        out = model.generate(
            ids, max_new_tokens=min(args.max_new_tokens, limit), temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, generator=generator, use_cache=not args.no_cache,
            n_hashes=args.n_hashes,
        )  # fmt: skip
    except ValueError as err:
        parser.error(str(err))
    values = [int(i) for i in out[0] if int(i) < 256]
    print(bytes(values).decode("utf-8", errors="replace"))
    elapsed = time.perf_counter() - start
    print(f"[{out.shape[1]} tokens in {elapsed:.2f} s, source {len(data)} bytes]", file=sys.stderr)
    return 0
