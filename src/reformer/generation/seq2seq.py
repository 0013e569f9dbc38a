"""Decoding with an encoder-decoder Reformer: the encoder runs once, every decoder layer keeps the
projected keys and values of the encoder output, and (for exact self-attention) of its own past.

With ``use_cache`` and a decoder whose self-attention layers are all ``"full"``, each new token runs
through the decoder alone: its self-attention reads the layer's key/value cache, its cross-attention
the layer's precomputed encoder keys/values. With exact cross-attention that is exactly the uncached
recomputation (the decoder is causal, and a query's output does not depend on the other queries).
LSH cross-attention layers keep each round's key order and sorted buckets, and a new query attends by
the rule of :mod:`reformer.attention.lsh_cross` for a query chunk holding only itself; recomputation
groups the queries into chunks, so the two can differ. Decoders with LSH or local self-attention decode
by recomputing the decoder over the prefix at each step (the encoder still runs once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..attention import FullSelfAttention, LSHCrossAttention
from ..attention.cross import cross_attention
from ..embeddings import position_ids
from ..hashing import auto_n_buckets, draw_rotations, hash_vectors, total_buckets
from ..reversible_decoder import STEPS
from .sampling import check_sampling, sample_next

if TYPE_CHECKING:
    from ..models.seq2seq import ReformerEncoderDecoder


def can_cache(model: ReformerEncoderDecoder) -> bool:
    """Whether the step-by-step cached path applies (exact self-attention in every decoder layer)."""
    return all(isinstance(block.self_attention, FullSelfAttention) for block in model.decoder.blocks)


@dataclass
class LSHCrossCache:
    """An LSH cross-attention layer's encoder side for decoding: keys/values ``(batch, heads, L_enc, d)``,
    each round's key order and sorted buckets ``(batch, heads, rounds, L_enc)``, the rotations."""

    keys: torch.Tensor
    values: torch.Tensor
    order: torch.Tensor
    sorted_buckets: torch.Tensor
    n_real: torch.Tensor  # (batch, 1, 1, 1)
    rotations: torch.Tensor
    n_buckets: int | tuple[int, ...]
    window: int

    @classmethod
    def build(cls, layer: LSHCrossAttention, memory, memory_mask, n_hashes: int | None) -> LSHCrossCache:
        k, v = layer.project_memory(memory)
        batch, heads, length, head_dim = k.shape
        n_buckets = layer.n_buckets or auto_n_buckets(length, layer.chunk_size)
        seed = layer.eval_hash_seed if layer.hash_seed is None else layer.hash_seed
        rotations = draw_rotations(
            heads, head_dim, n_hashes or layer.n_hashes, n_buckets, seed=seed, device=k.device
        )
        buckets = hash_vectors(k, rotations, n_buckets)
        if memory_mask is not None:
            buckets.masked_fill_(~memory_mask[:, None, None, :], total_buckets(n_buckets))
        sorted_buckets, order = torch.sort(buckets, dim=-1, stable=True)
        n_real = (
            memory_mask.sum(-1) if memory_mask is not None else torch.full((batch,), length, device=k.device)
        )
        window = min(layer.window or 2 * layer.chunk_size * length, length)  # a query chunk of one
        return cls(k, v, order, sorted_buckets, n_real.view(batch, 1, 1, 1), rotations, n_buckets, window)

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        """One query per row ``(batch, heads, 1, d)``: the LSH cross-attention rule for a chunk holding only
        this query (its bucket's keys, centred in ``window`` sorted keys, every round in one softmax)."""
        bucket = hash_vectors(q, self.rotations, self.n_buckets)  # (batch, heads, rounds, 1)
        start = torch.searchsorted(self.sorted_buckets, bucket, right=False)
        end = torch.searchsorted(self.sorted_buckets, bucket, right=True)
        first = torch.minimum(
            ((start + end - self.window) // 2).clamp(min=0), (self.n_real - self.window).clamp(min=0)
        )
        places = first + torch.arange(self.window, device=q.device)  # (batch, heads, rounds, window)
        positions = self.order.gather(-1, places.clamp(max=self.order.shape[-1] - 1)).flatten(2)
        index = positions[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        k, v = self.keys.gather(2, index), self.values.gather(2, index)
        acc = torch.promote_types(q.dtype, torch.float32)
        scores = torch.matmul(q, k.transpose(-1, -2)).to(acc) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~(places < self.n_real).flatten(2)[:, :, None, :], float("-inf"))
        return torch.matmul(scores.softmax(-1).to(v.dtype), v)


class _DecoderCache:
    """Per layer: self-attention keys/values ``(batch, heads, t, head_dim)`` so far, and the encoder's
    projected keys/values (for LSH cross-attention also sorted per round: :class:`LSHCrossCache`)."""

    def __init__(self, model: ReformerEncoderDecoder, memory, memory_mask, n_hashes=None) -> None:
        self.memory_kv, self.lsh = [], []
        for block in model.decoder.blocks:
            layer = block.cross_attention
            is_lsh = isinstance(layer, LSHCrossAttention)
            self.lsh.append(LSHCrossCache.build(layer, memory, memory_mask, n_hashes) if is_lsh else None)
            self.memory_kv.append(None if is_lsh else layer.project_memory(memory))
        self.keys: list[torch.Tensor | None] = [None] * len(model.decoder.blocks)
        self.values: list[torch.Tensor | None] = [None] * len(model.decoder.blocks)


def _self_step(block, layer: int, cache: _DecoderCache, b: torch.Tensor, position: int) -> torch.Tensor:
    """Causal exact self-attention of the newest position ``b`` ``(batch, 1, d_model)`` (at ``position``)
    over the cache."""
    attn = block.self_attention
    h = block.self_norm(b)
    q, k, v = (attn.split_heads(proj(h)) for proj in (attn.to_q, attn.to_k, attn.to_v))
    q, k = attn.rotate(q, k, torch.tensor([position], device=b.device))
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
                out = _self_step(block, layer, cache, b, position)
            elif kind == "cross" and cache.lsh[layer] is not None:
                cross = block.cross_attention
                q = cross.split_heads(cross.to_q(block.cross_norm(b)))
                out = cross.output(cache.lsh[layer].attend(q))
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
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    n_hashes: int | None = None,
    source_offset: int = 0,
    target_offset: int = 0,
) -> torch.Tensor:
    """Targets ``(batch, n)`` int64 decoded for ``source_ids`` ``(batch, L_enc)``: sampled at
    ``temperature`` (default 1.0, as every generate path; 0 is greedy), cut by ``top_k`` / ``top_p``.

    ``max_new_tokens`` defaults to the decoder's ``max_seq_len``. With the config's ``eos_id`` set,
    decoding stops once every row has produced it (rows that finished early repeat ``eos_id``).
    ``n_hashes`` sets the LSH rounds of the encoder, decoder and cross-attention. ``source_offset`` /
    ``target_offset``: the first source / decoder position (see :class:`ReformerEncoderDecoder`); the
    decoder's positions ``target_offset ..`` must fit its ``max_seq_len``.
    """
    position_ids(0, target_offset, model.config.decoder.max_seq_len)  # a non-negative integer that fits
    limit = model.config.decoder.max_seq_len - target_offset
    max_new_tokens = limit if max_new_tokens is None else max_new_tokens
    check_sampling(max_new_tokens, temperature, top_k, top_p, n_hashes)
    if max_new_tokens > limit:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} exceeds the decoder's max_seq_len={limit + target_offset} "
            f"less target_offset={target_offset}"
        )
    was_training = model.training
    model.eval()
    try:
        memory, memory_mask = model.encode(source_ids, source_mask, n_hashes, source_offset)
        batch, device = source_ids.shape[0], source_ids.device
        inputs = torch.full((batch, 1), model.config.decoder_start_id, dtype=torch.long, device=device)
        cache = (
            _DecoderCache(model, memory, memory_mask, n_hashes) if use_cache and can_cache(model) else None
        )
        eos, done = model.config.eos_id, torch.zeros(batch, dtype=torch.bool, device=device)
        out = []
        for t in range(max_new_tokens):
            if cache is not None:
                logits = _cached_step(model, cache, inputs[:, -1:], target_offset + t, memory_mask)
            else:
                hidden = model.decode(memory, memory_mask, inputs, None, n_hashes, target_offset)
                logits = model.lm_head(hidden[:, -1])
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
