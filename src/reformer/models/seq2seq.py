"""The encoder-decoder Reformer, built from two trunks and a head: the bidirectional encoder
(:class:`~reformer.models.heads.ReformerEncoder`, parameters ``encoder.*``), the decoder
(:class:`~reformer.models.decoder.ReformerDecoder`: causal self-attention, cross-attention to the encoder
output and the feed-forward in every layer; ``decoder.*``) and a language-model head (``lm_head.*``).
Both stacks run on the one reversible engine, so activation memory is flat in depth in both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import IGNORE_INDEX
from .base import WEIGHTS_FILE, read_weights, write_weights
from .decoder import ReformerDecoder
from .heads import ReformerEncoder
from .loss import chunked_cross_entropy
from .seq2seq_config import Seq2SeqConfig

CONFIG_FILE = "config.json"
HEAD_KIND = "encoder_decoder"
SHARED_KEY = "decoder.embeddings.tokens.weight"  # the decoder's token embedding when tied to the encoder's
# Weights saved before the decoder was a trunk name its parts without the ``decoder.`` trunk prefix.
LEGACY_NAMES = {
    "embeddings.": "decoder.embeddings.",
    "decoder.blocks.": "decoder.layers.blocks.",
    "final_norm.": "decoder.final_norm.",
}


def from_legacy_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` under today's parameter names: a file whose decoder layers are ``decoder.blocks.*`` (the
    earlier layout, with ``embeddings.*`` and ``final_norm.*`` at the top) is renamed; others pass as they
    are."""
    if not any(name.startswith("decoder.blocks.") for name in state):
        return state
    renamed = {}
    for name, tensor in state.items():
        for old, new in LEGACY_NAMES.items():
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        renamed[name] = tensor
    return renamed


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
        self.decoder = ReformerDecoder(config)
        self.lm_head = nn.Linear(2 * dec.d_model, dec.vocab_size)
        for module in (self.decoder, self.lm_head):
            module.apply(self.decoder._init_weights)
        if config.share_embeddings:
            self.decoder.embeddings.tokens = self.encoder.embeddings.tokens

    @property
    def embeddings(self) -> nn.Module:
        """The decoder's embeddings (token and position)."""
        return self.decoder.embeddings

    @property
    def final_norm(self) -> nn.LayerNorm:
        """The decoder's final norm over ``2 * d_model``."""
        return self.decoder.final_norm

    def head_settings(self) -> dict[str, Any]:
        """The head's constructor settings: none (its vocabulary is the decoder config's)."""
        return {}

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
        return self.decoder(decoder_input_ids, memory, memory_mask, decoder_mask, n_hashes, position_offset)

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
        directory = Path(directory)
        state = self.state_dict()
        if self.config.share_embeddings:
            del state[SHARED_KEY]  # the same tensor as encoder.embeddings.tokens.weight
        write_weights(directory, state, HEAD_KIND)
        self.config.to_json(directory / CONFIG_FILE)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu", **head_settings: Any
    ) -> ReformerEncoderDecoder:
        """Load a model written by :meth:`save_pretrained` (also in the earlier parameter layout, see
        :func:`from_legacy_names`). ``head_settings``: none exist; given ones are an error."""
        if head_settings:
            raise TypeError(f"ReformerEncoderDecoder has no head settings; got {sorted(head_settings)}")
        directory = Path(directory)
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing; was the model saved with save_pretrained?")
        try:
            config = Seq2SeqConfig.from_json(directory / CONFIG_FILE)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{directory / CONFIG_FILE} is not an encoder-decoder config: {err}") from err
        model = cls(config)
        state = from_legacy_names(read_weights(weights, map_location))
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
