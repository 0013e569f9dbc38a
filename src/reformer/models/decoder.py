"""The decoder trunk of the encoder-decoder Reformer: :class:`~reformer.models.base.ReformerTrunk`'s
embeddings, reversible stack and final norm, with layers of causal self-attention, cross-attention to
the encoder output (exact or LSH) and the feed-forward
(:class:`~reformer.reversible_decoder.DecoderBlock`, run by the one reversible engine).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..attention import CrossAttention, LSHCrossAttention
from ..config import ReformerConfig
from ..embeddings import position_ids
from ..reversible_decoder import DecoderBlock
from .base import EVAL_HASH_SEED_BASE, ReformerTrunk, build_attention, build_feed_forward
from .seq2seq_config import Seq2SeqConfig

CROSS_EVAL_SEED_BASE = EVAL_HASH_SEED_BASE + 10_007  # eval-mode rotations of cross-attention layer i


def build_cross_attention(config: Seq2SeqConfig, layer: int) -> nn.Module:
    """The cross-attention of decoder layer ``layer``: queries ``(batch, L_dec, d_model)`` attend to the
    encoder output ``(batch, L_enc, 2 * encoder d_model)``."""
    dec, d_memory = config.decoder, 2 * config.encoder.d_model
    if config.cross_attention == "full":
        return CrossAttention(dec.d_model, d_memory, config.cross_n_heads, dropout=dec.dropout)
    return LSHCrossAttention(
        dec.d_model, d_memory, config.cross_n_heads, dropout=dec.dropout, chunk_size=config.cross_chunk_size,
        window=config.cross_window, n_hashes=config.cross_n_hashes, n_buckets=config.cross_n_buckets,
        hash_seed=config.cross_hash_seed, eval_hash_seed=CROSS_EVAL_SEED_BASE + layer,
    )  # fmt: skip


def build_decoder_block(config: Seq2SeqConfig, cfg: ReformerConfig, kind: str, layer: int) -> DecoderBlock:
    """Decoder layer ``layer``: self-attention of ``kind``, cross-attention and the feed-forward."""
    return DecoderBlock(
        build_attention(cfg, kind, layer), build_cross_attention(config, layer), build_feed_forward(cfg),
        cfg.d_model, cfg.layer_norm_eps,
    )  # fmt: skip


class ReformerDecoder(ReformerTrunk):
    """The decoder trunk configured by ``config.decoder`` (causal self-attention kinds in ``attn_layers``)
    and ``config``'s cross-attention settings. Its weights are initialised, saved and loaded by the
    :class:`~reformer.models.seq2seq.ReformerEncoderDecoder` that holds it.

    ``forward(input_ids (batch, L_dec), memory (batch, L_enc, 2 * encoder d_model))`` -> final hidden
    states ``(batch, L_dec, 2 * d_model)``.
    """

    head_kind = "decoder"

    def __init__(self, config: Seq2SeqConfig) -> None:
        if not isinstance(config, Seq2SeqConfig):
            raise TypeError(f"config must be a Seq2SeqConfig, got {type(config).__name__}")
        super().__init__(config.decoder, functools.partial(build_decoder_block, config))

    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder layers (:class:`~reformer.reversible_decoder.DecoderBlock`), first to last."""
        return self.layers.blocks

    def check_ids(self, ids: torch.Tensor) -> None:
        """``ValueError`` naming the problem when decoder inputs ``ids`` ``(batch, L_dec)`` do not fit."""
        dec = self.config
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"decoder_input_ids must be (batch, length >= 1), got shape {tuple(ids.shape)}")
        if ids.shape[1] > dec.max_seq_len:
            raise ValueError(
                f"decoder length {ids.shape[1]} exceeds the decoder's max_seq_len={dec.max_seq_len}; "
                "build the model with a larger decoder max_seq_len"
            )
        if ids.device.type == "cpu" and (int(ids.min()) < 0 or int(ids.max()) >= dec.vocab_size):
            raise ValueError(
                f"decoder token ids must lie in [0, vocab_size={dec.vocab_size}); found ids in "
                f"[{int(ids.min())}, {int(ids.max())}]"
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        n_hashes: int | None = None,
        position_offset: int = 0,
    ) -> torch.Tensor:
        """Final hidden states ``(batch, L_dec, 2 * d_model)``. ``memory_mask`` ``(batch, L_enc)`` bool marks
        the encoder output's real positions (None: all); ``attention_mask`` ``(batch, L_dec)`` the real
        decoder positions (padding at the end of a row; outputs there are unspecified). The inputs take
        positions ``position_offset, position_offset + 1, ...``."""
        self.check_ids(input_ids)
        if attention_mask is not None:
            attention_mask = attention_mask.to(input_ids.device) != 0
        positions = position_ids(
            input_ids.shape[1], position_offset, self.config.max_seq_len, input_ids.device
        )
        x = self.embeddings(input_ids.long(), positions)
        a, b = self.layers(x, x, attention_mask, n_hashes, memory=memory, memory_mask=memory_mask)
        return self.final_norm(torch.cat([a, b], dim=-1))
