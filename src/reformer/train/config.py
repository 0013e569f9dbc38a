"""The settings of a training run (``train_config.json``), the presets, and the learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..config import ReformerConfig, dataclass_from_dict, default_axial_shape
from ..models.heads import POOLINGS
from .loggers import check_logger_names

TRAIN_CONFIG_FILE = "train_config.json"
TASKS = ("lm", "copy", "mlm", "classify", "listops", "reverse", "sort", "pairs")
SEQ2SEQ_TASKS = ("reverse", "sort", "pairs")  # encoder-decoder tasks: train/seq2seq.py
SCHEDULES = ("rsqrt", "cosine")
PRECISIONS = ("auto", "fp32", "bf16")
COPY_VOCAB = 128  # symbols 0..127
ENCODER_VOCAB = {"mlm": 257, "classify": 257, "listops": 15}  # bytes + the mask id; ListOps' 15 symbols

# Model settings and run settings per preset; command-line flags override them.
# fmt: off
PRESETS: dict[str, dict[str, Any]] = {
    # About 3 minutes on 2 CPU cores: the first run (make run) and the tests.
    # Not reversible: at 512 tokens memory is no constraint and the recomputing backward costs ~1.46x
    # the time. One sequence per step, a narrow feed-forward and a moderate learning rate learn the most
    # per second at this budget (docs/quality.md, "make run"); 32 held-out windows per evaluation.
    "tiny": dict(
        model=dict(d_model=128, n_heads=4, n_layers=4, d_ff=256, bucket_size=32, n_hashes=2,
                   attn_layers=("local", "lsh", "local", "lsh"), local_chunk_size=64, reversible=False),
        seq_len=512, batch_size=1, steps=3400, lr=1.4e-3, warmup=100, schedule="cosine", eval_every=850,
        eval_batches=32, save_every=850,
    ),
    # The duplication task at a CPU size: one LSH layer over 256 tokens, learned positions; the copy presets
    # keep the paper's (trax/HF) LSH rule, the one its Table 2 measured.
    "copy": dict(
        task="copy",
        model=dict(vocab_size=COPY_VOCAB, d_model=256, n_heads=4, n_layers=1, d_ff=512, bucket_size=32,
                   n_hashes=4, attn_layers=("lsh",), lsh_key_rule="chunks", axial_pos_shape=(256,),
                   axial_pos_dims=(256,)),
        seq_len=256, batch_size=32, steps=600, lr=3e-3, warmup=100, eval_every=100, save_every=200,
    ),
    # The paper's duplication setting (section 5): length 1024, one layer, d_model 256, 4 heads.
    "copy-paper": dict(
        task="copy",
        model=dict(vocab_size=COPY_VOCAB, d_model=256, n_heads=4, n_layers=1, d_ff=512, bucket_size=64,
                   n_hashes=4, attn_layers=("lsh",), lsh_key_rule="chunks", axial_pos_shape=(1024,),
                   axial_pos_dims=(256,)),
        seq_len=1024, batch_size=32, steps=3000, lr=2e-3, warmup=200, eval_every=250, save_every=500,
    ),
    # Encoder-decoder (train/seq2seq.py): 2 + 2 layers, exact cross-attention, learned positions.
    "seq2seq": dict(
        task="reverse",
        model=dict(d_model=128, n_heads=4, n_layers=2, d_ff=256, attn_layers=("full", "full"),
                   axial_pos_shape=(128,), axial_pos_dims=(128,), cross_attention="full"),
        seq_len=128, batch_size=16, steps=1000, lr=2e-3, warmup=100, eval_every=100, save_every=200,
        eval_batches=4,
    ),
    # ListOps (train/encoder_tasks.py) at a CPU size: lengths 129-512, a small local/LSH encoder
    # (docs/encoders.md; LRA's lengths: --seq-len 2000 --min-len 500).
    "listops": dict(
        task="listops", min_len=128,
        model=dict(d_model=64, n_heads=4, n_layers=2, d_ff=128, bucket_size=32, n_hashes=2,
                   attn_layers=("local", "lsh"), local_chunk_size=64),
        seq_len=512, batch_size=16, steps=2000, lr=2e-3, warmup=30, eval_every=50, save_every=50,
        eval_batches=16,
    ),
    # The paper's enwik8 model: 12 layers, d_model 1024, d_ff 4096, 8 heads, 64K tokens.
    "enwik8": dict(
        model=dict(d_model=1024, n_heads=8, n_layers=12, d_ff=4096, bucket_size=64, n_hashes=2,
                   attn_layers=("local", "lsh") * 6, local_chunk_size=128, dropout=0.1),
        seq_len=65536, batch_size=1, steps=100000, lr=2e-4, warmup=2000, eval_every=1000, save_every=500,
        eval_batches=2,
    ),
}
# fmt: on


class TrainingError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``train_config.json``)."""

    model: dict[str, Any]
    task: str = "lm"
    data: list[str] = field(default_factory=list)
    seq_len: int = 512
    batch_size: int = 8  # sequences per optimiser step, over all processes and accumulation steps
    grad_accum: int = 1
    steps: int = 300
    lr: float = 6e-3
    warmup: int = 50
    schedule: str = "rsqrt"
    cosine_steps: int | None = None  # None: the run's steps, so --resume --steps N stretches the curve
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.98
    clip: float | None = 1.0
    precision: str = "auto"
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    log: list[str] = field(default_factory=list)  # loggers beside metrics.jsonl (train/loggers.py)
    max_minutes: float | None = None
    seed: int = 0
    progress: bool = True
    # Encoder tasks (train/encoder_tasks.py): the held-out set and pretrained encoder of `classify`,
    # cutting over-long texts, the classes (recorded at the start), ListOps' shortest length (training;
    # held out: eval_min_len, default min_len) and what the classification head reads (models/heads.py).
    valid: list[str] = field(default_factory=list)
    init: str | None = None
    truncate: bool = False
    labels: list[str] = field(default_factory=list)
    min_len: int | None = None
    # reverse / sort (train/seq2seq.py): a length curriculum of short examples centred in the position range,
    # from this length, doubling when the training loss falls below curriculum_loss.
    curriculum_start: int | None = None
    curriculum_loss: float = 0.3
    eval_min_len: int | None = None
    pooling: str = "first"

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} is unknown; use one of {TASKS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is unknown; use one of {SCHEDULES}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is unknown; use one of {PRECISIONS}")
        for name in ("seq_len", "batch_size", "grad_accum", "eval_batches", "eval_every", "save_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        for name in ("steps", "warmup"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a non-negative integer")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be positive")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"clip={self.clip} must be positive (or None for no clipping)")
        if self.cosine_steps is not None and (
            not isinstance(self.cosine_steps, int) or self.cosine_steps < 1
        ):
            raise ValueError(
                f"cosine_steps={self.cosine_steps!r} must be a positive integer or None (--steps)"
            )
        if self.task == "copy" and (self.seq_len % 2 or self.seq_len < 4):
            raise ValueError(f"the copy task needs an even --seq-len of at least 4, got {self.seq_len}")
        if self.curriculum_start is not None:
            if self.task not in ("reverse", "sort"):
                raise ValueError(f"--curriculum-start is for --task reverse / sort, not --task {self.task}")
            if not isinstance(self.curriculum_start, int) or not 1 <= self.curriculum_start <= self.seq_len:
                raise ValueError(f"--curriculum-start {self.curriculum_start!r} must lie in [1, --seq-len]")
            if not self.curriculum_loss > 0:
                raise ValueError(f"--curriculum-loss {self.curriculum_loss} must be positive")
        for name in ("min_len", "eval_min_len"):
            value = getattr(self, name)
            if self.task == "listops" and value is not None and not 0 <= value < self.seq_len:
                raise ValueError(
                    f"--{name.replace('_', '-')} {value} must lie in [0, --seq-len {self.seq_len})"
                )
        if self.eval_min_len is not None and self.task != "listops":
            raise ValueError("--eval-min-len sets the held-out ListOps lengths; use it with --task listops")
        check_logger_names(self.log)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} is unknown; use one of {POOLINGS}")
        if self.pooling != "first" and self.task not in ("classify", "listops"):
            raise ValueError(
                "--pooling is a classification head's setting; use it with --task classify or listops"
            )

    def model_config(self) -> ReformerConfig:
        if self.task in SEQ2SEQ_TASKS:
            from .seq2seq import model_config

            return model_config(self)
        settings = dict(self.model)
        settings.setdefault("max_seq_len", self.seq_len)
        if "axial_pos_shape" not in settings:
            settings["axial_pos_shape"] = default_axial_shape(settings["max_seq_len"])
        settings.setdefault(
            "vocab_size", COPY_VOCAB if self.task == "copy" else ENCODER_VOCAB.get(self.task, 256)
        )
        if self.task in ENCODER_VOCAB:
            settings.setdefault("causal", False)
        return ReformerConfig(**settings)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["model"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.model.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The saved run ``data``; a run saved before ``lsh_key_rule`` existed keeps ``"chunks"``."""
        if isinstance(data.get("model"), dict):
            data = {**data, "model": {"lsh_key_rule": "chunks", **data["model"]}}
        return dataclass_from_dict(cls, data, "train_config")


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based).

    ``rsqrt``: linear warm-up to ``lr`` then ``lr * sqrt(warmup / step)``, as in the paper's
    configurations; it does not depend on ``steps``, so extending a run follows the same curve.
    ``cosine``: warm-up then a cosine from ``lr`` to ``lr * min_lr_ratio`` over ``cosine_steps`` (None:
    over ``steps``, so a run resumed with more steps stretches the rest of its curve to the new end);
    steps past the horizon train at the floor ``lr * min_lr_ratio``.
    """
    step = step + 1
    warm = min(1.0, step / cfg.warmup) if cfg.warmup else 1.0
    if cfg.schedule == "rsqrt":
        return cfg.lr * warm * math.sqrt(max(cfg.warmup, 1) / max(step, cfg.warmup, 1))
    horizon = cfg.cosine_steps or cfg.steps
    progress = min(1.0, max(0, step - cfg.warmup) / max(1, horizon - cfg.warmup))
    floor = cfg.lr * cfg.min_lr_ratio
    return warm * (floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def schedule_change(saved: TrainConfig, resumed: TrainConfig, step: int) -> str | None:
    """What resuming ``saved`` at ``step`` as ``resumed`` does to a cosine schedule, in words (None when
    nothing changes): a stretched horizon raises the learning rate, a fixed one that ends before the
    new ``steps`` leaves the extra steps at the floor."""
    if resumed.schedule != "cosine" or step >= resumed.steps:
        return None
    before, after = saved.cosine_steps or saved.steps, resumed.cosine_steps or resumed.steps
    lr_before, lr_after = learning_rate(saved, step), learning_rate(resumed, step)
    if after != before:
        keep = (
            f"--cosine-steps {before}"
            if saved.cosine_steps is None
            else f"--cosine-steps {saved.cosine_steps}"
        )
        return (
            f"cosine schedule: its horizon moves from step {before} to {after}, so the learning rate at "
            f"step {step + 1} is {lr_after:.3g} instead of {lr_before:.3g} and decays to the floor at step "
            f"{after} (pass {keep} to keep the old curve)"
        )
    if after < resumed.steps:
        return (
            f"cosine schedule: its horizon is step {after} (--cosine-steps), so steps "
            f"{max(step, after) + 1} to {resumed.steps} train at the floor learning rate "
            f"{resumed.lr * resumed.min_lr_ratio:.3g} (pass --cosine-steps {resumed.steps} to stretch the "
            "curve to the new end)"
        )
    return None
