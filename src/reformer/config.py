"""Model configuration: one validated dataclass with a JSON round-trip."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .files import atomic_write_text

ATTENTION_KINDS = ("lsh", "local", "full")
ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu")
# Which keys a query sees in an LSH round: "chunks" (trax/HF: its sorted chunk and the neighbour chunks)
# or "own_bucket" (truly causal: the last W earlier keys of its own bucket); see lsh_attention.
KEY_RULES = ("chunks", "own_bucket")
# How a model knows positions: learned axial embeddings, fixed sinusoidal ones, rotary positions in the
# local and exact layers (nothing added to the embeddings), or none at all.
POSITION_KINDS = ("axial", "sinusoidal", "rotary", "none")
# The schemes without a table of positions: they serve any length up to max_seq_len, which costs nothing.
LENGTH_FREE_POSITIONS = ("rotary", "none")


def _is_even_positive(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 2 and n % 2 == 0


@dataclass
class ReformerConfig:
    """Everything that defines a Reformer language model.

    Attention layers are mixed per layer through ``attn_layers`` ("lsh", "local" or "full").
    ``bucket_size`` is the LSH chunk length; ``n_buckets`` is chosen from the length when ``None``
    (about two buckets per chunk, as in the paper) or may be an even integer or a list of even
    factors (factorised hashing for very long inputs). ``hash_seed`` fixes the hash rotations for
    every call, training included (as HF transformers does); when ``None`` they are fresh on every
    training step and deterministic in eval mode.

    ``lsh_key_rule`` picks which keys an LSH query sees: ``"own_bucket"`` (truly causal: the last
    ``lsh_chunks_before * bucket_size`` earlier keys of its own bucket, so outputs at positions < n never
    depend on tokens after n) or ``"chunks"`` (trax/HF, where the keys of position i also depend on the
    buckets of later tokens). ``None`` (default) picks ``"own_bucket"`` for causal models and
    ``"chunks"`` for bidirectional ones; HF conversions and configs saved without the field keep
    ``"chunks"``, the rule they were made with. With ``"own_bucket"`` and ``n_buckets=None`` the bucket
    count is chosen from ``max_seq_len`` (about two buckets per chunk at that length), not from the
    length of the input, which would make it depend on later tokens.

    ``position_embedding`` is ``"axial"`` (learned axial position embeddings of shape ``axial_pos_shape``
    and dims ``axial_pos_dims``, the paper's and HF's) or ``"sinusoidal"`` (fixed sines and cosines, no
    parameters; see :class:`~reformer.embeddings.SinusoidalPositionEmbedding`). Sinusoidal positions make
    relations between positions (an offset, a mirror image) one linear map shared by every position: the
    encoder-decoder learns the reversal of 1,024 tokens with them and not with learned ones
    (docs/seq2seq.md). HF's Reformer has only axial positions, so ``to_hf`` refuses sinusoidal models.
    """

    vocab_size: int = 256
    d_model: int = 256
    n_heads: int = 4
    d_head: int | None = None
    n_layers: int = 6
    d_ff: int = 1024
    attn_layers: tuple[str, ...] | None = None
    causal: bool = True
    max_seq_len: int = 65536
    # LSH attention
    bucket_size: int = 64
    n_buckets: int | tuple[int, ...] | None = None
    n_hashes: int = 2
    lsh_chunks_before: int = 1
    lsh_chunks_after: int = 0
    lsh_key_rule: str | None = None
    hash_seed: int | None = None
    # local attention
    local_chunk_size: int = 128
    local_chunks_before: int = 1
    local_chunks_after: int = 0
    # position embeddings: axial shape (prod >= max_seq_len) and per-axis dims (sum == d_model)
    axial_pos_shape: tuple[int, ...] | None = None
    axial_pos_dims: tuple[int, ...] | None = None
    # "axial" (learned, the above), "sinusoidal" (fixed), "rotary" or "none" (the axial settings unused)
    position_embedding: str = "axial"
    rotary_base: float = 10000.0
    token_shift: bool = False
    # regularisation and numerics
    dropout: float = 0.0
    attn_dropout: float = 0.0
    local_attn_dropout: float | None = None  # None: the same as attn_dropout
    activation: str = "relu"
    layer_norm_eps: float = 1e-12
    ff_chunk_size: int | None = 4096
    reversible: bool = True
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.attn_layers is None:
            self.attn_layers = ("lsh",) * self.n_layers
        self.attn_layers = tuple(self.attn_layers)
        if self.lsh_key_rule is None:
            self.lsh_key_rule = default_key_rule(self.causal)
        if isinstance(self.n_buckets, list):
            self.n_buckets = tuple(self.n_buckets)
        if self.d_head is None and isinstance(self.d_model, int) and isinstance(self.n_heads, int):
            if self.n_heads > 0 and self.d_model % self.n_heads != 0:
                raise ValueError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                    "choose n_heads dividing d_model or set d_head explicitly"
                )
            self.d_head = self.d_model // max(self.n_heads, 1)
        if self.axial_pos_shape is None:
            self.axial_pos_shape = default_axial_shape(self.max_seq_len)
        self.axial_pos_shape = tuple(self.axial_pos_shape)
        if self.axial_pos_dims is None:
            half = self.d_model // 2
            self.axial_pos_dims = (half, self.d_model - half)
        self.axial_pos_dims = tuple(self.axial_pos_dims)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the setting and the fix for any inconsistent value."""
        for name in ("vocab_size", "d_model", "n_heads", "d_head", "n_layers", "d_ff", "max_seq_len"):
            _require_positive_int(name, getattr(self, name))
        for name in ("bucket_size", "n_hashes", "local_chunk_size"):
            _require_positive_int(name, getattr(self, name))
        for name in ("lsh_chunks_before", "lsh_chunks_after", "local_chunks_before", "local_chunks_after"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be a non-negative integer")
        if len(self.attn_layers) != self.n_layers:
            raise ValueError(
                f"attn_layers has {len(self.attn_layers)} entries but n_layers={self.n_layers}; "
                "give one attention kind per layer"
            )
        for kind in self.attn_layers:
            if kind not in ATTENTION_KINDS:
                raise ValueError(f"attn_layers entry {kind!r} is unknown; use one of {ATTENTION_KINDS}")
        validate_n_buckets(self.n_buckets)
        validate_key_rule(self.lsh_key_rule, self.causal)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} is unknown; use one of {ACTIVATIONS}")
        for name in ("dropout", "attn_dropout", "local_attn_dropout"):
            p = getattr(self, name)
            if p is None and name == "local_attn_dropout":
                continue
            if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
                raise ValueError(f"{name}={p!r} must be a probability in [0, 1)")
        if self.ff_chunk_size is not None:
            _require_positive_int("ff_chunk_size", self.ff_chunk_size)
        if self.hash_seed is not None and not isinstance(self.hash_seed, int):
            raise ValueError(f"hash_seed={self.hash_seed!r} must be an integer or None")
        for n in self.axial_pos_shape:
            _require_positive_int("axial_pos_shape entries", n)
        if self.position_embedding not in POSITION_KINDS:
            raise ValueError(
                f"position_embedding={self.position_embedding!r} is unknown; use one of {POSITION_KINDS}"
            )
        if self.position_embedding == "rotary" and self.d_head % 2:
            raise ValueError(f"position_embedding='rotary' needs an even d_head, got {self.d_head}")
        if not isinstance(self.token_shift, bool):
            raise ValueError(f"token_shift={self.token_shift!r} must be True or False")
        if not (isinstance(self.rotary_base, (int, float)) and self.rotary_base > 1):
            raise ValueError(f"rotary_base={self.rotary_base!r} must be a number above 1")
        if math.prod(self.axial_pos_shape) < self.max_seq_len:
            raise ValueError(
                f"axial_pos_shape={self.axial_pos_shape} covers {math.prod(self.axial_pos_shape)} positions "
                f"but max_seq_len={self.max_seq_len}; make its product at least max_seq_len "
                "(or leave it None to choose it automatically)"
            )
        if len(self.axial_pos_dims) != len(self.axial_pos_shape) or sum(self.axial_pos_dims) != self.d_model:
            raise ValueError(
                f"axial_pos_dims={self.axial_pos_dims} must have one entry per axis of "
                f"axial_pos_shape={self.axial_pos_shape} and sum to d_model={self.d_model}"
            )

    def local_dropout(self) -> float:
        """Attention-probability dropout of the local layers."""
        return self.attn_dropout if self.local_attn_dropout is None else self.local_attn_dropout

    # ---- JSON round-trip -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReformerConfig:
        """The config saved as ``data``; one saved before ``lsh_key_rule`` existed keeps ``"chunks"``."""
        return dataclass_from_dict(cls, {"lsh_key_rule": "chunks", **data}, "config")

    def to_json(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> ReformerConfig:
        return cls.from_dict(read_json_object(Path(path), "re-save the model"))


def dataclass_from_dict(cls, data: dict[str, Any], what: str):
    """``cls(**data)``, refusing keys that are not fields of ``cls`` with a message naming them."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what} keys {unknown}; known keys are {sorted(known)}")
    return cls(**data)


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """The JSON object in ``path``; ``FileNotFoundError`` / ``ValueError`` that end with ``fix``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; {fix}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); {fix}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}; {fix}")
    return data


def _require_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def validate_n_buckets(n_buckets: int | tuple[int, ...] | list[int] | None) -> None:
    """Check an ``n_buckets`` setting: ``None``, an even integer >= 2, or a list of such factors."""
    if n_buckets is None:
        return
    factors = n_buckets if isinstance(n_buckets, (tuple, list)) else (n_buckets,)
    if len(factors) == 0 or not all(_is_even_positive(f) for f in factors):
        raise ValueError(
            f"n_buckets={n_buckets!r} must be None (automatic), an even integer >= 2, "
            "or a list of even integers >= 2 (factorised buckets)"
        )


def default_key_rule(causal: bool) -> str:
    """The LSH key rule of a new model: truly causal ``"own_bucket"`` when ``causal``, else ``"chunks"``."""
    return "own_bucket" if causal else "chunks"


def validate_key_rule(key_rule: str, causal: bool, n_buckets: Any = 0) -> None:
    """Check an LSH ``key_rule`` (see ``KEY_RULES``): ``"own_bucket"`` needs ``causal`` and, where
    ``n_buckets`` is given as None (functional level), an explicit count."""
    if key_rule not in KEY_RULES:
        raise ValueError(f"key_rule={key_rule!r} is unknown; use one of {KEY_RULES}")
    if key_rule == "own_bucket" and not causal:
        raise ValueError("key_rule='own_bucket' is a causal rule; set causal=True or use key_rule='chunks'")
    if key_rule == "own_bucket" and n_buckets is None:
        raise ValueError(
            "key_rule='own_bucket' (the default when causal=True) needs a fixed n_buckets: the automatic "
            "count depends on the length, so later tokens would change earlier outputs; pass e.g. "
            "n_buckets=reformer.hashing.auto_n_buckets(max_length, bucket_size), or key_rule='chunks' for "
            "trax/HF's rule"
        )


def default_axial_shape(max_seq_len: int) -> tuple[int, int]:
    """Two axes close to sqrt(max_seq_len) whose product covers it, e.g. 65536 -> (256, 256)."""
    first = 1 << max(0, math.ceil(math.log2(max(max_seq_len, 1))) // 2)
    return first, -(-max_seq_len // first)
