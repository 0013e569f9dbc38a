"""The shared trunk of every Reformer model: embeddings -> reversible stack -> final LayerNorm over
``2 * d_model``, the input checks, and the checkpoint format (``save_pretrained`` / ``from_pretrained``).

The trunk's parameters live at the top level of each model (``embeddings.*``, ``layers.*``,
``final_norm.*``) and each head adds its own names, so any model's trunk weights load into any other.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..attention import FullSelfAttention, LocalSelfAttention, LSHSelfAttention
from ..config import LENGTH_FREE_POSITIONS, ReformerConfig, read_json_object
from ..embeddings import AxialPositionEmbedding, ReformerEmbeddings, position_ids
from ..feedforward import FeedForward
from ..files import atomic_write, atomic_write_text
from ..reversible import ReformerBlock, ReversibleSequence

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Which head a checkpoint holds and its settings; absent in ReformerLM checkpoints (the original format).
HEAD_FILE = "head.json"
# Seeds for the eval-mode rotations of layer i when no hash_seed is configured.
EVAL_HASH_SEED_BASE = 1_000_003
TRUNK_PREFIXES = ("embeddings.", "layers.", "final_norm.")

logger = logging.getLogger("reformer")


def build_embeddings(cfg: ReformerConfig) -> ReformerEmbeddings:
    """Token and position embeddings of a stack configured by ``cfg``."""
    return ReformerEmbeddings(
        cfg.vocab_size, cfg.d_model, cfg.axial_pos_shape, cfg.axial_pos_dims, cfg.dropout,
        cfg.position_embedding, cfg.initializer_range, cfg.token_shift,
    )  # fmt: skip


def build_feed_forward(cfg: ReformerConfig) -> FeedForward:
    """The chunked feed-forward of every layer of a stack configured by ``cfg``."""
    return FeedForward(
        cfg.d_model, cfg.d_ff, activation=cfg.activation, dropout=cfg.dropout, chunk_size=cfg.ff_chunk_size,
        layer_norm_eps=cfg.layer_norm_eps,
    )  # fmt: skip


def build_attention(cfg: ReformerConfig, kind: str, layer: int) -> nn.Module:
    common = dict(d_head=cfg.d_head, causal=cfg.causal, attn_dropout=cfg.attn_dropout, dropout=cfg.dropout)
    if kind == "lsh":
        return LSHSelfAttention(
            cfg.d_model, cfg.n_heads, bucket_size=cfg.bucket_size, n_hashes=cfg.n_hashes,
            n_buckets=cfg.n_buckets, key_rule=cfg.lsh_key_rule, max_seq_len=cfg.max_seq_len,
            n_chunks_before=cfg.lsh_chunks_before,
            n_chunks_after=cfg.lsh_chunks_after, hash_seed=cfg.hash_seed,
            eval_hash_seed=EVAL_HASH_SEED_BASE + layer, **common,
        )  # fmt: skip
    if cfg.position_embedding == "rotary":  # LSH layers hash content alone: no positions there
        common["rotary_base"] = cfg.rotary_base
    if kind == "local":
        common["attn_dropout"] = cfg.local_dropout()
        return LocalSelfAttention(
            cfg.d_model, cfg.n_heads, chunk_size=cfg.local_chunk_size,
            n_chunks_before=cfg.local_chunks_before, n_chunks_after=cfg.local_chunks_after, **common,
        )  # fmt: skip
    return FullSelfAttention(cfg.d_model, cfg.n_heads, **common)


def build_block(cfg: ReformerConfig, kind: str, layer: int) -> ReformerBlock:
    """Layer ``layer`` of an encoder or language-model stack: attention of ``kind`` and the feed-forward."""
    return ReformerBlock(
        build_attention(cfg, kind, layer), build_feed_forward(cfg), cfg.d_model, cfg.layer_norm_eps
    )


def too_long_message(length: int, cfg: ReformerConfig) -> str:
    """Why ``length`` tokens do not fit a model configured by ``cfg``, and what would."""
    message = f"input length {length} exceeds max_seq_len={cfg.max_seq_len}; shorten the input"
    if cfg.position_embedding in LENGTH_FREE_POSITIONS:
        return message + " or raise max_seq_len (no parameters depend on it with these positions)"
    return (
        message + f": position_embedding={cfg.position_embedding!r} has no positions beyond it. "
        "Models with position_embedding='rotary' (or 'none') run at any length; their max_seq_len is "
        "only a limit"
    )


def write_weights(directory: Path, state: dict[str, torch.Tensor], format: str) -> None:
    """``directory/model.safetensors`` (atomically) holding ``state`` on the CPU; ``format`` goes into the
    file's metadata."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(
        directory / WEIGHTS_FILE, lambda path: save_file(state, str(path), metadata={"format": format})
    )


def read_weights(weights: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``weights`` on ``map_location``; ``ValueError`` naming the file
    when it cannot be read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights} is not a readable safetensors file ({err}); re-save the model") from err


def _real_first_order(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(batch, length)`` int64 permutation per row listing its real positions first, each group in order."""
    return torch.sort((~attention_mask).to(torch.uint8), dim=1, stable=True).indices


class ReformerTrunk(nn.Module):
    """Embeddings, the reversible stack and the final norm, shared by :class:`~reformer.ReformerLM`, the
    encoder family and both halves of the encoder-decoder. Subclasses add a head and set ``head_kind``;
    heads with settings (label counts) return them from :meth:`head_settings` and accept them as keyword
    arguments. ``build_layer(config, kind, i)`` makes layer ``i`` of the stack (attention ``kind`` from
    ``config.attn_layers``); the decoder's adds cross-attention."""

    head_kind = "trunk"
    bidirectional = False  # True: the model needs causal=False (the encoder family)

    def __init__(
        self,
        config: ReformerConfig,
        build_layer: Callable[[ReformerConfig, str, int], nn.Module] = build_block,
    ) -> None:
        super().__init__()
        if not isinstance(config, ReformerConfig):
            raise TypeError(f"config must be a ReformerConfig, got {type(config).__name__}")
        config.validate()
        if self.bidirectional and config.causal:
            raise ValueError(
                f"{type(self).__name__} is a bidirectional encoder model but the config has causal=True; "
                "build it with ReformerConfig(..., causal=False)"
            )
        self.config = config
        c = config
        self.embeddings = build_embeddings(c)
        blocks = [build_layer(c, kind, i) for i, kind in enumerate(c.attn_layers)]
        self.layers = ReversibleSequence(blocks, reversible=c.reversible)
        self.final_norm = nn.LayerNorm(2 * c.d_model, eps=c.layer_norm_eps)

    def head_settings(self) -> dict[str, Any]:
        """The head's constructor settings, recorded in ``head.json``."""
        return {}

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, AxialPositionEmbedding):
            # Same scale as the token embeddings: at HF's std 1 the positions drown the tokens at first.
            for weight in module.weights:
                nn.init.normal_(weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ---- forward ---------------------------------------------------------------------------------

    def _check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        length = input_ids.shape[1]
        if length == 0:
            raise ValueError("input_ids is empty along the length axis; give at least one token")
        if length > self.config.max_seq_len:
            raise ValueError(too_long_message(length, self.config))
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                f"{tuple(input_ids.shape)}; they must match"
            )
        # On accelerators the range check must not sync with the host: assert on the device instead.
        if torch.compiler.is_compiling():
            return
        if input_ids.device.type != "cpu":
            in_range = ((input_ids >= 0) & (input_ids < self.config.vocab_size)).all()
            torch._assert_async(in_range, f"token ids must lie in [0, vocab_size={self.config.vocab_size})")
            return
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(
                f"token ids must lie in [0, vocab_size={self.config.vocab_size}); "
                f"found ids in [{low}, {high}]"
            )

    def real_tokens_first(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Checked ``input_ids`` and ``attention_mask`` ``(batch, length)`` with each row's real tokens
        moved to the front (in order), and the ``order`` ``(batch, length)`` that did it (None without a
        mask): ``moved = original.gather(1, order)``."""
        self._check_inputs(input_ids, attention_mask)
        if attention_mask is None:
            return input_ids, None, None
        attention_mask = attention_mask.to(input_ids.device)
        order = _real_first_order(attention_mask != 0)
        return input_ids.gather(1, order), attention_mask.gather(1, order), order

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        n_hashes: int | None = None,
        position_offset: int = 0,
    ) -> torch.Tensor:
        """Final normalised hidden states ``(batch, length, 2 * d_model)``.

        With ``attention_mask`` each row's real tokens are moved to the front (in order) before the
        layers and their outputs moved back after, so a real token's output depends on its own row's real
        tokens only, wherever the padding is (left, right or holes): positions, local-attention chunks
        and LSH buckets are those of the row alone. Outputs at padding positions are unspecified.

        ``position_offset`` o: the (real) tokens take the position embeddings of ``o, o + 1, ...`` instead of
        ``0, 1, ...`` (``o + length <= max_seq_len``); only the embeddings move, local-attention chunks and
        LSH buckets are those of the given sequence.
        """
        input_ids, attention_mask, order = self.real_tokens_first(input_ids, attention_mask)
        positions = position_ids(
            input_ids.shape[1], position_offset, self.config.max_seq_len, input_ids.device
        )
        x = self.embeddings(input_ids.long(), positions)
        y1, y2 = self.layers(x, x, attention_mask, n_hashes)
        hidden = self.final_norm(torch.cat([y1, y2], dim=-1))
        if order is None:
            return hidden
        back = torch.empty_like(order).scatter_(
            1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
        )
        return hidden.gather(1, back[..., None].expand_as(hidden))

    # ---- HF transformers interoperability ----------------------------------------------------------

    @classmethod
    def from_hf(cls, model_or_dir):
        """Convert the matching HF model (object or local folder; ``ReformerModelWithLMHead`` for
        ReformerLM, ``ReformerForMaskedLM`` etc. for the heads); see :mod:`reformer.hf`."""
        from ..hf import from_hf

        return from_hf(model_or_dir, cls)

    def to_hf(self):
        """This model as the matching HF transformers model (needs the ``[hf]`` extra)."""
        from ..hf import to_hf

        return to_hf(self)

    # ---- checkpoints -------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json``, ``model.safetensors`` and (except for ReformerLM) ``head.json`` into
        ``directory``, each atomically."""
        directory = Path(directory)
        write_weights(directory, self.state_dict(), "pt")
        atomic_write_text(directory / CONFIG_FILE, json.dumps(self.config.to_dict(), indent=2) + "\n")
        head_file = directory / HEAD_FILE
        if self.head_kind == "lm":
            head_file.unlink(missing_ok=True)  # a stale one would describe another model
        else:
            head = {"head": self.head_kind, **self.head_settings()}
            atomic_write_text(head_file, json.dumps(head, indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        map_location: str | torch.device = "cpu",
        allow_causal: bool = False,
        **head_settings: Any,
    ):
        """Load a model written by :meth:`save_pretrained` of any model of the family.

        A checkpoint of the same head with the same settings loads whole. Otherwise (another head, or
        other ``head_settings`` such as a new ``n_labels``) the trunk is loaded, the head is initialised
        fresh and one log line names its parameters. The encoder family refuses a causal checkpoint (its
        attention was trained one-directional) unless ``allow_causal=True``, which loads it bidirectional
        with a warning.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing; was the model saved with save_pretrained?")
        config = ReformerConfig.from_json(directory / CONFIG_FILE)
        saved = {"head": "lm"}
        if (directory / HEAD_FILE).is_file():
            saved = read_json_object(directory / HEAD_FILE, "re-save the model")
        saved_kind = saved.pop("head", None)
        if cls.bidirectional and config.causal:
            if not allow_causal:
                raise ValueError(
                    f"{directory} holds a causal model ({saved_kind}); {cls.__name__} attends both ways, "
                    "which its weights were not trained for. Pass allow_causal=True to load it anyway"
                )
            logger.warning(
                "%s: loading the causal checkpoint %s with bidirectional attention (causal=False, "
                "lsh_key_rule='chunks'); its attention was trained one-directional",
                cls.__name__, directory,
            )  # fmt: skip
            config = dataclasses.replace(config, causal=False, lsh_key_rule="chunks")
        if saved_kind == cls.head_kind:
            head_settings = {**saved, **head_settings}
        model = cls(config, **head_settings)
        state = read_weights(weights, map_location)
        expected = model.state_dict()
        whole = saved_kind == cls.head_kind and saved == model.head_settings()
        if not whole:  # the trunk only
            expected = {k: v for k, v in expected.items() if k.startswith(TRUNK_PREFIXES)}
            state = {k: v for k, v in state.items() if k.startswith(TRUNK_PREFIXES)}
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{weights} does not match config.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise ValueError(
                    f"{weights}: {name} has shape {tuple(tensor.shape)}, config.json implies "
                    f"{tuple(expected[name].shape)}"
                )
        model.load_state_dict(state, strict=whole)
        if not whole:
            fresh = sorted(k for k in model.state_dict() if not k.startswith(TRUNK_PREFIXES))
            logger.warning(
                "%s: loaded the trunk of a %s checkpoint from %s; initialised fresh: %s",
                cls.__name__, saved_kind, directory, ", ".join(fresh) or "(no head parameters)",
            )  # fmt: skip
        return model.to(map_location)
