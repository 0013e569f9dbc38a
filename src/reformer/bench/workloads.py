"""What ``reformer bench`` measures: the configurations (attention layers and whole models by length) and
the forward+backward step each one builds."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

D_MODEL = 256
N_HEADS = 4
BUCKET = 64
LOCAL_CHUNK = 128
D_FF = 1024
VOCAB = 256
MODEL_HASHES = 2
PAPER_TOKENS = 32768
INPUT_SEED = 1234

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_ATTENTION_LENGTHS = (1024, 4096, 16384, 65536)
DEFAULT_MODEL_LENGTHS = (4096, 16384)
DEFAULT_HASHES = (1, 2, 4, 8)
DEFAULT_LAYERS = (2, 6, 12)
PAPER_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)


@dataclass(frozen=True)
class BenchConfig:
    """One configuration to measure. ``kind`` is ``lsh``, ``local``, ``full`` or ``model``."""

    kind: str
    length: int
    batch: int = 1
    hashes: int | None = None
    layers: int = 1
    reversible: bool | None = None
    device: str = "cpu"
    dtype: str = "float32"
    repeats: int = 3
    threads: int = 0

    @property
    def impl(self) -> str:
        """The line this configuration belongs to: ``lsh-4``, ``local``, ``full``, ``model-rev-6``..."""
        if self.kind == "lsh":
            return f"lsh-{self.hashes}"
        if self.kind == "model":
            return f"model-{'rev' if self.reversible else 'plain'}-{self.layers}"
        return self.kind

    @property
    def what(self) -> str:
        return "model" if self.kind == "model" else "attention"


def attention_configs(
    lengths: Iterable[int],
    hashes: Iterable[int],
    *,
    kinds: Sequence[str] = ("lsh", "local", "full"),
    tokens_per_batch: int | None = None,
    **common: Any,
) -> list[BenchConfig]:
    """Attention configurations, shortest length first; batch = ``tokens_per_batch // L`` when given."""
    out: list[BenchConfig] = []
    for length in lengths:
        batch = 1 if tokens_per_batch is None else tokens_per_batch // length
        for kind in kinds:
            if kind == "lsh":
                out += [BenchConfig("lsh", length, batch, hashes=h, **common) for h in hashes]
            else:
                out.append(BenchConfig(kind, length, batch, **common))
    return out


def model_configs(lengths: Iterable[int], layers: Iterable[int], **common: Any) -> list[BenchConfig]:
    """Reversible and plain ReformerLM configurations at every length and depth."""
    return [
        BenchConfig("model", length, 1, hashes=MODEL_HASHES, layers=n, reversible=rev, **common)
        for length in lengths
        for n in layers
        for rev in (True, False)
    ]


# ---- building one configuration ---------------------------------------------------------------------


def build_step(cfg: BenchConfig) -> Callable[[], None]:
    """Build the module and inputs of ``cfg``; return one forward+backward step (gradients cleared)."""
    from ..attention import FullSelfAttention, LocalSelfAttention, LSHSelfAttention
    from ..config import ReformerConfig
    from ..models import ReformerLM

    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    gen = torch.Generator().manual_seed(INPUT_SEED)
    torch.manual_seed(0)
    if cfg.kind == "model":
        config = ReformerConfig(
            vocab_size=VOCAB,
            d_model=D_MODEL,
            n_heads=N_HEADS,
            n_layers=cfg.layers,
            d_ff=D_FF,
            bucket_size=BUCKET,
            n_hashes=cfg.hashes or MODEL_HASHES,
            max_seq_len=cfg.length,
            reversible=bool(cfg.reversible),
        )
        model = ReformerLM(config).to(device=device, dtype=dtype).train()
        ids = torch.randint(0, VOCAB, (cfg.batch, cfg.length), generator=gen).to(device)
        grads: list[torch.Tensor] = list(model.parameters())

        def loss() -> torch.Tensor:
            return model.loss(ids, ids.roll(-1, 1))

    else:
        if cfg.kind == "lsh":
            layer: torch.nn.Module = LSHSelfAttention(
                d_model=D_MODEL,
                n_heads=N_HEADS,
                bucket_size=BUCKET,
                n_hashes=cfg.hashes,
                causal=True,
                key_rule="chunks",  # the automatic bucket count of each length, as HF's layer
            )
        elif cfg.kind == "local":
            layer = LocalSelfAttention(D_MODEL, N_HEADS, chunk_size=LOCAL_CHUNK, causal=True)
        elif cfg.kind == "full":
            layer = FullSelfAttention(D_MODEL, N_HEADS, causal=True)
        else:
            raise ValueError(f"unknown kind {cfg.kind!r}; use lsh, local, full or model")
        layer = layer.to(device=device, dtype=dtype).train()
        shape = (cfg.batch, cfg.length, D_MODEL)
        x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
        g = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        grads = [x, *layer.parameters()]

        def loss() -> torch.Tensor:
            return (layer(x) * g).sum()

    def step() -> None:
        for t in grads:
            t.grad = None
        loss().backward()

    return step
