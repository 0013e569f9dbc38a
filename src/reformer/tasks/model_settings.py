"""The model settings of a run: every :class:`~reformer.config.ReformerConfig` field, typed, with the
flags of ``reformer train``; :class:`Seq2SeqModelSettings` adds the cross-attention of the
encoder-decoder tasks. A task may subclass them to add settings of its own.

``None`` in ``vocab_size``, ``causal`` and ``max_seq_len`` means "the task decides" (its vocabulary,
decoder or encoder, the run's ``--seq-len``); ``axial_pos_shape`` / ``axial_pos_dims`` None are derived
from the length and width, as :class:`~reformer.config.ReformerConfig` does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..config import KEY_RULES, POSITION_KINDS, ReformerConfig, default_key_rule
from ..models.seq2seq_config import CROSS_KINDS, Seq2SeqConfig
from .settings import from_dict, setting, to_dict


def _default(source: type, name: str) -> dict[str, Any]:
    """``source``'s default of field ``name``, as ``setting`` keywords."""
    f = next(f for f in dataclasses.fields(source) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:
        return {"default_factory": f.default_factory}
    return {"default": f.default}


def model_setting(name: str, help: str = "", source: type = ReformerConfig, **options: Any) -> Any:
    """A field with the default of ``source``'s field ``name`` (so the two cannot drift apart)."""
    return setting(help=help, **_default(source, name), **options)


@dataclass
class ModelSettings:
    """The model of a run (fields and defaults of :class:`~reformer.config.ReformerConfig`)."""

    vocab_size: int | None = None
    d_model: int = model_setting("d_model", "model width (the size of each residual stream's half)")
    n_heads: int = model_setting("n_heads", "attention heads")
    d_head: int | None = model_setting("d_head")
    n_layers: int = model_setting("n_layers", "layers (--attn-layers repeats its pattern to fill them)")
    d_ff: int = model_setting("d_ff", "feed-forward width")
    attn_layers: tuple[str, ...] | None = model_setting(
        "attn_layers", "comma-separated lsh/local/full per layer, or one kind for all", unset="lsh",
        metavar="KINDS",
    )  # fmt: skip
    causal: bool | None = None
    max_seq_len: int | None = None
    bucket_size: int = model_setting("bucket_size", "LSH chunk length")
    n_buckets: int | tuple[int, ...] | None = model_setting("n_buckets")
    n_hashes: int = model_setting("n_hashes", "LSH hash rounds")
    lsh_chunks_before: int = model_setting("lsh_chunks_before")
    lsh_chunks_after: int = model_setting("lsh_chunks_after")
    lsh_key_rule: str | None = model_setting(
        "lsh_key_rule", "own_bucket: truly causal LSH (keys of the query's own bucket before it); chunks: "
        "trax/HF's sorted chunks (later tokens move earlier outputs)", choices=KEY_RULES,
        unset="own_bucket for decoders, chunks for encoders",
    )  # fmt: skip
    hash_seed: int | None = model_setting("hash_seed", "fix the hash rotations", unset="fresh every step")
    local_chunk_size: int = model_setting("local_chunk_size", "local attention chunk length")
    local_chunks_before: int = model_setting("local_chunks_before")
    local_chunks_after: int = model_setting("local_chunks_after")
    axial_pos_shape: tuple[int, ...] | None = model_setting("axial_pos_shape")
    axial_pos_dims: tuple[int, ...] | None = model_setting("axial_pos_dims")
    position_embedding: str = model_setting(
        "position_embedding", "learned axial, fixed sinusoidal, rotary (local and exact layers; any length) "
        "or none", choices=POSITION_KINDS,
    )  # fmt: skip
    rotary_base: float = model_setting("rotary_base")
    token_shift: bool = model_setting(
        "token_shift", "half of each embedding from the previous token (associative recall learns at once)"
    )
    dropout: float = model_setting(
        "dropout", "dropout of the embeddings and the attention and feed-forward outputs"
    )
    attn_dropout: float = model_setting("attn_dropout")
    local_attn_dropout: float | None = model_setting("local_attn_dropout")
    activation: str = model_setting("activation")
    layer_norm_eps: float = model_setting("layer_norm_eps")
    ff_chunk_size: int | None = model_setting("ff_chunk_size")
    reversible: bool = model_setting(
        "reversible", "reversible residual layers (memory flat in depth; the backward recomputes each layer)"
    )
    initializer_range: float = model_setting("initializer_range")
    extra: dict[str, Any] = model_setting("extra")

    def reformer_config(
        self, seq_len: int, vocab_size: int, causal: bool, forced: dict[str, Any] | None = None
    ) -> ReformerConfig:
        """The model's config: the task's ``vocab_size`` and ``causal`` and the run's ``seq_len`` where
        these settings are None, and the ``forced`` values whatever the settings say."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(ReformerConfig)}
        values["extra"] = dict(values["extra"])
        defaults = {"vocab_size": vocab_size, "causal": causal, "max_seq_len": seq_len}
        values.update({k: v for k, v in defaults.items() if values[k] is None})
        return ReformerConfig(**{**values, **(forced or {})})

    def with_changes(self, given: dict[str, Any], seq_len: int, seq_len_given: bool, causal: bool):
        """These settings with ``given`` (flags or a config file) applied as ``reformer train`` does:

        - ``attn_layers`` of one kind fills ``n_layers``; several kinds set ``n_layers`` unless it is
          given; a new ``n_layers`` alone repeats the attention pattern;
        - plain learned positions (a 1-D ``axial_pos_shape``) follow ``seq_len`` and ``d_model``; a 2-D
          factorisation is derived again when ``seq_len`` or ``d_model`` changes (unless given);
        - ``max_seq_len`` follows a given ``seq_len``;
        - ``lsh_key_rule`` is recorded (the default of a decoder when ``causal``, else of an encoder),
          so that a resumed run keeps the rule it started with.
        """
        values = {**to_dict(self), **given}
        kinds = given.get("attn_layers")
        if kinds is not None:
            kinds = tuple(kinds)
            values["attn_layers"] = kinds * values["n_layers"] if len(kinds) == 1 else kinds
            if len(kinds) > 1 and "n_layers" not in given:
                values["n_layers"] = len(kinds)
        elif "n_layers" in given and values["attn_layers"] is not None:
            pattern = values["attn_layers"]
            values["attn_layers"] = tuple(pattern[i % len(pattern)] for i in range(values["n_layers"]))
        shape = values["axial_pos_shape"]
        if shape and len(shape) == 1:  # plain learned positions
            values["axial_pos_shape"], values["axial_pos_dims"] = (seq_len,), (values["d_model"],)
        elif (seq_len_given or "d_model" in given) and "axial_pos_shape" not in given:
            values["axial_pos_shape"] = values["axial_pos_dims"] = None
        if seq_len_given and "max_seq_len" not in given:
            values["max_seq_len"] = None
        if values["lsh_key_rule"] is None:
            values["lsh_key_rule"] = default_key_rule(causal and values["causal"] is not False)
        return from_dict(type(self), values, "model")

    @classmethod
    def from_config(cls, config: ReformerConfig):
        """Settings that rebuild ``config`` exactly."""
        return from_dict(cls, config.to_dict(), "model")


@dataclass
class Seq2SeqModelSettings(ModelSettings):
    """Both stacks of an encoder-decoder (the encoder built with ``causal=False``) and the
    cross-attention of every decoder layer (:class:`~reformer.models.seq2seq_config.Seq2SeqConfig`)."""

    cross_attention: str = model_setting(
        "cross_attention", "exact or LSH cross-attention", Seq2SeqConfig, choices=CROSS_KINDS
    )
    cross_n_heads: int | None = model_setting(
        "cross_n_heads", "cross-attention heads", Seq2SeqConfig, unset="--n-heads"
    )
    cross_n_hashes: int = model_setting("cross_n_hashes", "LSH cross-attention hash rounds", Seq2SeqConfig)
    cross_chunk_size: int = model_setting(
        "cross_chunk_size", "LSH cross-attention query chunk length", Seq2SeqConfig
    )
    cross_n_buckets: int | tuple[int, ...] | None = model_setting(
        "cross_n_buckets", "LSH cross-attention buckets", Seq2SeqConfig, unset="2 per chunk"
    )
    cross_window: int | None = model_setting(
        "cross_window",
        "LSH cross-attention keys per query chunk",
        Seq2SeqConfig,
        unset="2 x --cross-chunk-size x source / target length",
    )

    def cross_settings(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in CROSS_FIELDS}


CROSS_FIELDS = ("cross_attention", "cross_n_heads", "cross_n_hashes", "cross_chunk_size", "cross_n_buckets",
                "cross_window")  # fmt: skip
