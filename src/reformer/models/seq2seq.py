"""The encoder-decoder Reformer: a bidirectional reversible encoder, and a reversible decoder whose layers
have causal self-attention, cross-attention to the encoder output (exact or LSH) and a feed-forward.

The encoder is :class:`~reformer.models.heads.ReformerEncoder` (its parameters under ``encoder.*``);
the decoder is :mod:`reformer.reversible_decoder`'s stack with its own embeddings, final norm over
``2 * d_model`` and a language-model head. Activation memory is flat in depth in both stacks.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..attention import CrossAttention, LSHCrossAttention
from ..data import IGNORE_INDEX
from ..embeddings import AxialPositionEmbedding, position_ids
from ..files import atomic_write
from ..reversible import ReversibleSequence
from ..reversible_decoder import DecoderBlock
from .base import (
    EVAL_HASH_SEED_BASE,
    WEIGHTS_FILE,
    build_attention,
    build_embeddings,
    build_feed_forward,
)
from .heads import ReformerEncoder
from .loss import chunked_cross_entropy
from .seq2seq_config import Seq2SeqConfig

CONFIG_FILE = "config.json"
HEAD_KIND = "encoder_decoder"
SHARED_KEY = "embeddings.tokens.weight"  # the decoder's token embedding when tied to the encoder's
CROSS_EVAL_SEED_BASE = EVAL_HASH_SEED_BASE + 10_007


def shift_right(target_ids: torch.Tensor, start_id: int) -> torch.Tensor:
    """Decoder inputs ``(batch, L)``: ``start_id`` then the targets without their last token."""
    start = torch.full_like(target_ids[:, :1], start_id)
    return torch.cat([start, target_ids[:, :-1]], dim=1)


class ReformerEncoderDecoder(nn.Module):
    """Sequence-to-sequence Reformer.

    ``forward(source_ids (batch, L_enc), decoder_input_ids (batch, L_dec))`` -> logits
    ``(batch, L_dec, decoder vocab_size)``; :meth:`loss` takes the targets and shifts them itself;
    :meth:`generate` runs the encoder once and decodes.

    ``source_offset`` / ``target_offset`` (default 0): the first position of the source / the decoder
    input, like HF's ``position_ids`` as a start: token ``j`` takes the position embedding of ``offset + j``
    (``offset + length`` at most the stack's ``max_seq_len``). A short example placed at the middle
    positions (``offset = (max_seq_len - length) // 2`` on both sides) keeps the position pairs of a
    full-length one: the reversal's mirror ``i -> max_seq_len - 1 - i`` is then the same at every length
    (the training tasks' ``--curriculum-start``, docs/seq2seq.md). Only the embeddings move: attention
    chunks and buckets are those of the given sequences.
    """

    head_kind = HEAD_KIND

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        if not isinstance(config, Seq2SeqConfig):
            raise TypeError(f"config must be a Seq2SeqConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        enc, dec = config.encoder, config.decoder
        self.encoder = ReformerEncoder(enc)
        self.embeddings = build_embeddings(dec)
        blocks = [
            DecoderBlock(
                build_attention(dec, kind, i),
                self._cross_attention(i),
                build_feed_forward(dec),
                dec.d_model,
                dec.layer_norm_eps,
            )  # fmt: skip
            for i, kind in enumerate(dec.attn_layers)
        ]
        self.decoder = ReversibleSequence(blocks, reversible=dec.reversible)
        self.final_norm = nn.LayerNorm(2 * dec.d_model, eps=dec.layer_norm_eps)
        self.lm_head = nn.Linear(2 * dec.d_model, dec.vocab_size)
        for module in (self.embeddings, self.decoder, self.final_norm, self.lm_head):
            module.apply(self._init_weights)
        if config.share_embeddings:
            self.embeddings.tokens = self.encoder.embeddings.tokens

    def _cross_attention(self, layer: int) -> nn.Module:
        c, dec = self.config, self.config.decoder
        d_memory = 2 * c.encoder.d_model
        if c.cross_attention == "full":
            return CrossAttention(dec.d_model, d_memory, c.cross_n_heads, dropout=dec.dropout)
        return LSHCrossAttention(
            dec.d_model, d_memory, c.cross_n_heads, dropout=dec.dropout, chunk_size=c.cross_chunk_size,
            window=c.cross_window, n_hashes=c.cross_n_hashes, n_buckets=c.cross_n_buckets,
            hash_seed=c.cross_hash_seed, eval_hash_seed=CROSS_EVAL_SEED_BASE + layer,
        )  # fmt: skip

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.decoder.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, AxialPositionEmbedding):
            for weight in module.weights:
                nn.init.normal_(weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ---- forward ---------------------------------------------------------------------------------

    def encode(
        self,
        source_ids: torch.Tensor,
        source_mask: torch.Tensor | None = None,
        n_hashes: int | None = None,
        position_offset: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The encoder output ``(batch, L_enc, 2 * encoder d_model)`` and the source mask as bool (None
        when every token is real); the source's real tokens take positions ``position_offset, ...``."""
        if isinstance(source_ids, torch.Tensor) and source_ids.dim() == 2:
            length, limit = source_ids.shape[1], self.config.encoder.max_seq_len
            if length == 0:
                raise ValueError("the source is empty (length 0); give at least one source token")
            if length > limit:
                raise ValueError(
                    f"source length {length} exceeds the encoder's max_seq_len={limit}; shorten the source "
                    "or build the model with a larger encoder max_seq_len"
                )
        if source_mask is not None:
            source_mask = source_mask.to(source_ids.device) != 0
            empty = ~source_mask.any(-1)
            if bool(empty.any()):
                raise ValueError(
                    f"source rows {empty.nonzero().flatten().tolist()} have no real token (all padding); "
                    "every row needs at least one source token"
                )
            if bool(source_mask.all()):
                source_mask = None
        return self.encoder(source_ids, source_mask, n_hashes, position_offset), source_mask

    def decode(
        self,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None,
        decoder_input_ids: torch.Tensor,
        decoder_mask: torch.Tensor | None = None,
        n_hashes: int | None = None,
        position_offset: int = 0,
    ) -> torch.Tensor:
        """Final decoder hidden states ``(batch, L_dec, 2 * d_model)``. ``decoder_mask`` marks real
        decoder positions (padding at the end of a row); outputs at padding positions are unspecified.
        The decoder inputs take positions ``position_offset, position_offset + 1, ...``."""
        self._check_decoder_ids(decoder_input_ids)
        if decoder_mask is not None:
            decoder_mask = decoder_mask.to(decoder_input_ids.device) != 0
        positions = position_ids(
            decoder_input_ids.shape[1],
            position_offset,
            self.config.decoder.max_seq_len,
            decoder_input_ids.device,
        )
        x = self.embeddings(decoder_input_ids.long(), positions)
        a, b = self.decoder(x, x, decoder_mask, n_hashes, memory=memory, memory_mask=memory_mask)
        return self.final_norm(torch.cat([a, b], dim=-1))

    def _check_decoder_ids(self, ids: torch.Tensor) -> None:
        dec = self.config.decoder
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
        source_ids: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        source_mask: torch.Tensor | None = None,
        decoder_mask: torch.Tensor | None = None,
        n_hashes: int | None = None,
        source_offset: int = 0,
        target_offset: int = 0,
    ) -> torch.Tensor:
        memory, memory_mask = self.encode(source_ids, source_mask, n_hashes, source_offset)
        hidden = self.decode(memory, memory_mask, decoder_input_ids, decoder_mask, n_hashes, target_offset)
        return self.lm_head(hidden)

    def loss(
        self,
        source_ids: torch.Tensor,
        target_ids: torch.Tensor,
        source_mask: torch.Tensor | None = None,
        target_mask: torch.Tensor | None = None,
        n_hashes: int | None = None,
        reduction: str = "mean",
        source_offset: int = 0,
        target_offset: int = 0,
    ) -> torch.Tensor:
        """Cross-entropy in nats of ``target_ids`` ``(batch, L_dec)`` given the source (teacher forcing:
        the decoder reads ``shift_right(targets)``); padding targets (``target_mask`` 0) and -100 labels
        are ignored. ``reduction``: ``"mean"`` over counted tokens or ``"sum"``. Offsets: see the class."""
        labels = target_ids.long()
        inputs = shift_right(labels.clamp(min=0), self.config.decoder_start_id)
        if target_mask is not None:
            labels = labels.masked_fill(target_mask.to(labels.device) == 0, IGNORE_INDEX)
        memory, memory_mask = self.encode(source_ids, source_mask, n_hashes, source_offset)
        hidden = self.decode(memory, memory_mask, inputs, target_mask, n_hashes, target_offset)
        total = chunked_cross_entropy(self.lm_head, hidden, labels, IGNORE_INDEX, 4096)
        if reduction == "sum":
            return total
        return total / (labels != IGNORE_INDEX).sum().clamp(min=1)

    def generate(
        self, source_ids: torch.Tensor, source_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        """Decode targets ``(batch, n)`` for a source; see :func:`reformer.generation.seq2seq.generate`."""
        from ..generation.seq2seq import generate

        return generate(self, source_ids, source_mask, **kwargs)

    # ---- checkpoints -------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` (the :class:`Seq2SeqConfig`) and ``model.safetensors`` atomically."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.config.share_embeddings:
            del state[SHARED_KEY]  # the same tensor as encoder.embeddings.tokens.weight
        atomic_write(
            directory / WEIGHTS_FILE, lambda path: save_file(state, str(path), metadata={"format": HEAD_KIND})
        )
        self.config.to_json(directory / CONFIG_FILE)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu"
    ) -> ReformerEncoderDecoder:
        """Load a model written by :meth:`save_pretrained`."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing; was the model saved with save_pretrained?")
        try:
            config = Seq2SeqConfig.from_json(directory / CONFIG_FILE)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{directory / CONFIG_FILE} is not an encoder-decoder config: {err}") from err
        model = cls(config)
        try:
            state = load_file(str(weights), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(
                f"{weights} is not a readable safetensors file ({err}); re-save the model"
            ) from err
        expected = set(model.state_dict()) - ({SHARED_KEY} if config.share_embeddings else set())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"{weights} does not match config.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        model.load_state_dict(state, strict=not config.share_embeddings)
        return model.to(map_location)


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, counted) argmax predictions over labels that are not -100."""
    counted = labels != IGNORE_INDEX
    return int(((logits.argmax(-1) == labels) & counted).sum()), int(counted.sum())


__all__ = ["ReformerEncoderDecoder", "Seq2SeqConfig", "shift_right", "token_accuracy"]
