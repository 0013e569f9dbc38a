"""ReformerLM: embeddings -> reversible stack of attention/feed-forward blocks -> LM head."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import FullSelfAttention, LocalSelfAttention, LSHSelfAttention
from .config import ReformerConfig
from .embeddings import AxialPositionEmbedding, ReformerEmbeddings
from .feedforward import FeedForward
from .files import atomic_write, atomic_write_text
from .hashing import auto_n_buckets
from .reversible import ReformerBlock, ReversibleSequence

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Seeds for the eval-mode rotations of layer i when no hash_seed is configured.
EVAL_HASH_SEED_BASE = 1_000_003


def build_attention(cfg: ReformerConfig, kind: str, layer: int) -> nn.Module:
    common = dict(d_head=cfg.d_head, causal=cfg.causal, attn_dropout=cfg.attn_dropout, dropout=cfg.dropout)
    if kind == "lsh":
        n_buckets = cfg.n_buckets
        if n_buckets is None and cfg.lsh_key_rule == "own_bucket":  # fixed: a prefix must not change it
            n_buckets = auto_n_buckets(cfg.max_seq_len, cfg.bucket_size)
        return LSHSelfAttention(
            cfg.d_model, cfg.n_heads, bucket_size=cfg.bucket_size, n_hashes=cfg.n_hashes,
            n_buckets=n_buckets, key_rule=cfg.lsh_key_rule, n_chunks_before=cfg.lsh_chunks_before,
            n_chunks_after=cfg.lsh_chunks_after, hash_seed=cfg.hash_seed,
            eval_hash_seed=EVAL_HASH_SEED_BASE + layer, **common,
        )  # fmt: skip
    if kind == "local":
        common["attn_dropout"] = cfg.local_dropout()
        return LocalSelfAttention(
            cfg.d_model, cfg.n_heads, chunk_size=cfg.local_chunk_size,
            n_chunks_before=cfg.local_chunks_before, n_chunks_after=cfg.local_chunks_after, **common,
        )  # fmt: skip
    return FullSelfAttention(cfg.d_model, cfg.n_heads, **common)


def _real_first_order(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(batch, length)`` int64 permutation per row listing its real positions first, each group in order."""
    return torch.sort((~attention_mask).to(torch.uint8), dim=1, stable=True).indices


class ReformerLM(nn.Module):
    """A Reformer language model.

    ``input_ids`` ``(batch, length)`` int64 in ``[0, vocab_size)`` -> logits
    ``(batch, length, vocab_size)``. Any length up to ``max_seq_len`` works: attention pads to its chunk
    multiples internally and masks the padding.
    """

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        if not isinstance(config, ReformerConfig):
            raise TypeError(f"config must be a ReformerConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        c = config
        self.embeddings = ReformerEmbeddings(
            c.vocab_size, c.d_model, c.axial_pos_shape, c.axial_pos_dims, c.dropout
        )
        blocks = [
            ReformerBlock(
                build_attention(c, kind, i),
                FeedForward(
                    c.d_model,
                    c.d_ff,
                    activation=c.activation,
                    dropout=c.dropout,
                    chunk_size=c.ff_chunk_size,
                    layer_norm_eps=c.layer_norm_eps,
                ),
                c.d_model,
                c.layer_norm_eps,
            )  # fmt: skip
            for i, kind in enumerate(c.attn_layers)
        ]
        self.layers = ReversibleSequence(blocks, reversible=c.reversible)
        self.final_norm = nn.LayerNorm(2 * c.d_model, eps=c.layer_norm_eps)
        self.lm_head = nn.Linear(2 * c.d_model, c.vocab_size)
        self.apply(self._init_weights)

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
            raise ValueError(
                f"input length {length} exceeds max_seq_len={self.config.max_seq_len}; "
                "shorten the input or build the model with a larger max_seq_len"
            )
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

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        n_hashes: int | None = None,
    ) -> torch.Tensor:
        """Final normalised hidden states ``(batch, length, 2 * d_model)``.

        With ``attention_mask`` each row's real tokens are moved to the front (in order) before the
        layers and their outputs moved back after, so a real token's output depends on its own row's real
        tokens only, wherever the padding is (left, right or holes): positions, local-attention chunks
        and LSH buckets are those of the row alone. Outputs at padding positions are unspecified.
        """
        self._check_inputs(input_ids, attention_mask)
        order = None
        if attention_mask is not None:
            attention_mask = attention_mask.to(input_ids.device)
            order = _real_first_order(attention_mask != 0)
            input_ids, attention_mask = input_ids.gather(1, order), attention_mask.gather(1, order)
        x = self.embeddings(input_ids.long())
        y1, y2 = self.layers(x, x, attention_mask, n_hashes)
        hidden = self.final_norm(torch.cat([y1, y2], dim=-1))
        if order is None:
            return hidden
        back = torch.empty_like(order).scatter_(
            1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
        )
        return hidden.gather(1, back[..., None].expand_as(hidden))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        n_hashes: int | None = None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(batch, length, vocab_size)``. ``attention_mask``: ``(batch, length)``, 1 = real token;
        ``n_hashes`` overrides the LSH rounds for this call. With ``targets`` ``(batch, length)`` it
        returns :meth:`loss` instead (so wrappers such as DistributedDataParallel see one forward)."""
        if targets is not None:
            return self.loss(input_ids, targets, attention_mask, n_hashes)
        return self.lm_head(self.hidden_states(input_ids, attention_mask, n_hashes))

    def loss(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        n_hashes: int | None = None,
        ignore_index: int = -100,
        chunk_size: int = 4096,
    ) -> torch.Tensor:
        """Mean cross-entropy in nats of ``targets`` ``(batch, length)`` int64 (``ignore_index`` skipped).

        The logits are made ``chunk_size`` positions at a time and recomputed in the backward pass, so
        ``length x vocab_size`` logits are never held at once.
        """
        if targets.shape != input_ids.shape:
            raise ValueError(
                f"targets shape {tuple(targets.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
            )
        hidden = self.hidden_states(input_ids, attention_mask, n_hashes)
        targets = targets.to(hidden.device).long()
        if attention_mask is not None:
            targets = targets.masked_fill(~attention_mask.bool(), ignore_index)
        total = hidden.new_zeros((), dtype=torch.float32)
        for h, t in zip(hidden.split(chunk_size, dim=1), targets.split(chunk_size, dim=1), strict=True):
            if torch.is_grad_enabled() and h.requires_grad:
                total = total + checkpoint(self._chunk_loss, h, t, ignore_index, use_reentrant=False)
            else:
                total = total + self._chunk_loss(h, t, ignore_index)
        count = (targets != ignore_index).sum().clamp(min=1)
        return total / count

    def _chunk_loss(self, hidden: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        return F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index, reduction="sum"
        )

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
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after ``input_ids`` ``(batch, length)``; returns
        ``(batch, length + max_new_tokens)``, the prompt followed by the new ids.

        ``temperature=0`` is greedy; otherwise ``top_k`` / ``top_p`` (nucleus) cut the distribution and
        ``generator`` draws. ``attention_mask`` ``(batch, length)`` (1 = real) allows left-padded prompts
        of different lengths. One run fixes the LSH bucket count (``n_buckets``, else the config's, else
        the automatic count for prompt + new tokens) and the rotations. ``use_cache=True`` keeps per-layer
        keys/values/buckets and costs one token's forward per step; ``use_cache=False`` recomputes the
        whole (trailing ``max_seq_len``) context per step. See :mod:`reformer.generation` for when the two
        are exactly equal. ``hf_compatible=True`` makes the cached LSH step follow HF transformers' rule
        (which differs from the chunked computation) so that converted models generate HF's tokens.
        """
        from .generation import generate

        return generate(
            self, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            use_cache=use_cache, n_hashes=n_hashes, generator=generator, attention_mask=attention_mask,
            n_buckets=n_buckets, hf_compatible=hf_compatible,
        )  # fmt: skip

    # ---- HF transformers interoperability ----------------------------------------------------------

    @classmethod
    def from_hf(cls, model_or_dir) -> ReformerLM:
        """Convert an HF ``ReformerModelWithLMHead`` (object or local folder); see :mod:`reformer.hf`."""
        from .hf import from_hf

        return from_hf(model_or_dir)

    def to_hf(self):
        """This model as an HF ``ReformerModelWithLMHead`` (needs the ``[hf]`` extra)."""
        from .hf import to_hf

        return to_hf(self)

    # ---- checkpoints -------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``, each atomically."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(
            directory / WEIGHTS_FILE, lambda path: save_file(state, str(path), metadata={"format": "pt"})
        )
        atomic_write_text(directory / CONFIG_FILE, json.dumps(self.config.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu"
    ) -> ReformerLM:
        """Load a model written by :meth:`save_pretrained`."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing; was the model saved with save_pretrained?")
        model = cls(ReformerConfig.from_json(directory / CONFIG_FILE))
        try:
            state = load_file(str(weights), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(
                f"{weights} is not a readable safetensors file ({err}); re-save the model"
            ) from err
        expected = model.state_dict()
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
        model.load_state_dict(state)
        return model.to(map_location)
