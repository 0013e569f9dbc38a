"""The configuration of :class:`~reformer.models.seq2seq.ReformerEncoderDecoder`: two ReformerConfigs and
the cross-attention settings, validated, with a JSON round-trip (``config.json`` of a saved model)."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..config import ReformerConfig, read_json_object, validate_n_buckets
from ..files import atomic_write_text

CROSS_KINDS = ("full", "lsh")


@dataclass
class Seq2SeqConfig:
    """An encoder (``causal=False``), a decoder (``causal=True``; its ``attn_layers`` are the decoder's
    self-attention kinds), and the cross-attention of every decoder layer.

    ``cross_attention`` is ``"full"`` (exact, blocked) or ``"lsh"`` (hashed chunks with ``cross_chunk_size``,
    ``cross_window``, ``cross_n_hashes`` rounds and ``cross_n_buckets``; see
    :mod:`reformer.attention.lsh_cross`). ``cross_n_heads`` defaults to the decoder's ``n_heads``.
    ``share_embeddings`` ties the source and target token embeddings (a shared vocabulary: both
    ``vocab_size`` and ``d_model`` must agree). ``decoder_start_id`` is the first decoder input, and
    ``eos_id`` (optional) ends generation.
    """

    encoder: ReformerConfig
    decoder: ReformerConfig
    cross_attention: str = "full"
    cross_n_heads: int | None = None
    cross_chunk_size: int = 64
    cross_window: int | None = None
    cross_n_hashes: int = 2
    cross_n_buckets: int | tuple[int, ...] | None = None
    cross_hash_seed: int | None = None
    share_embeddings: bool = False
    decoder_start_id: int = 0
    eos_id: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.encoder, dict):
            self.encoder = ReformerConfig.from_dict(self.encoder)
        if isinstance(self.decoder, dict):
            self.decoder = ReformerConfig.from_dict(self.decoder)
        if isinstance(self.cross_n_buckets, list):
            self.cross_n_buckets = tuple(self.cross_n_buckets)
        if self.cross_n_heads is None and isinstance(self.decoder, ReformerConfig):
            self.cross_n_heads = self.decoder.n_heads
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the setting and the fix for any inconsistent value."""
        if not isinstance(self.encoder, ReformerConfig) or not isinstance(self.decoder, ReformerConfig):
            raise TypeError("encoder and decoder must be ReformerConfig objects (or their dicts)")
        if self.encoder.causal:
            raise ValueError("the encoder attends both ways: build its ReformerConfig with causal=False")
        if not self.decoder.causal:
            raise ValueError(
                "the decoder's self-attention must be causal: build its ReformerConfig with causal=True"
            )
        if self.encoder.token_shift or self.decoder.token_shift:
            raise ValueError(
                "the encoder-decoder does not take token_shift yet; build it with token_shift=False"
            )
        if self.cross_attention not in CROSS_KINDS:
            raise ValueError(f"cross_attention={self.cross_attention!r} is unknown; use one of {CROSS_KINDS}")
        for name in ("cross_n_heads", "cross_chunk_size", "cross_n_hashes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.cross_window is not None and (
            not isinstance(self.cross_window, int) or self.cross_window < 1
        ):
            raise ValueError(f"cross_window={self.cross_window!r} must be a positive integer or None")
        if self.decoder.d_model % self.cross_n_heads != 0:
            raise ValueError(
                f"decoder d_model={self.decoder.d_model} is not divisible by "
                f"cross_n_heads={self.cross_n_heads}"
            )
        validate_n_buckets(self.cross_n_buckets)
        if self.share_embeddings and (
            self.encoder.vocab_size != self.decoder.vocab_size or self.encoder.d_model != self.decoder.d_model
        ):
            raise ValueError(
                f"share_embeddings=True needs one vocabulary: encoder vocab_size={self.encoder.vocab_size}, "
                f"d_model={self.encoder.d_model} vs decoder vocab_size={self.decoder.vocab_size}, "
                f"d_model={self.decoder.d_model}; make them equal or set share_embeddings=False"
            )
        for name in ("decoder_start_id", "eos_id"):
            value = getattr(self, name)
            if value is None and name == "eos_id":
                continue
            if not isinstance(value, int) or not 0 <= value < self.decoder.vocab_size:
                raise ValueError(
                    f"{name}={value!r} must be a token id of the decoder vocabulary "
                    f"[0, {self.decoder.vocab_size})"
                )

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["encoder"], out["decoder"] = self.encoder.to_dict(), self.decoder.to_dict()
        if isinstance(out["cross_n_buckets"], tuple):
            out["cross_n_buckets"] = list(out["cross_n_buckets"])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Seq2SeqConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown seq2seq config keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    def to_json(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> Seq2SeqConfig:
        return cls.from_dict(read_json_object(Path(path), "re-save the model"))
