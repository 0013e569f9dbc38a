"""Training and evaluation: presets, AdamW with warm-up + rsqrt decay, accumulation, AMP, DDP,
atomic and exactly resumable checkpoints, metrics (JSONL + PNG), and the ``train`` / ``eval`` commands.

A run folder holds ``train_config.json`` (everything that defines the run), ``metrics.jsonl``,
``loss.png``, the latest weights as a model folder (``config.json`` + ``model.safetensors``, so
``ReformerLM.from_pretrained(run)`` works) and ``checkpoints/step-NNNNNNNN/`` folders with weights,
optimiser state, RNG states and ``trainer_state.json``. A checkpoint folder is written under a
temporary name and renamed when complete, so an interrupted save never leaves a half checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from .config import ReformerConfig, dataclass_from_dict, default_axial_shape, read_json_object
from .data import (
    IGNORE_INDEX,
    Corpus,
    contiguous_windows,
    copy_task_batch,
    decode_bytes,
    encode_text,
    load_corpus,
    random_windows,
)
from .files import atomic_write, atomic_write_text
from .model import ReformerLM

TRAIN_CONFIG_FILE = "train_config.json"
TRAINER_STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
CHECKPOINTS_DIR = "checkpoints"
TASKS = ("lm", "copy")
SCHEDULES = ("rsqrt", "cosine")
PRECISIONS = ("auto", "fp32", "bf16")
# Seeds of the fixed held-out batches, apart from the training seed so evaluation never moves it.
EVAL_SEED = 12345
COPY_VOCAB = 128  # symbols 0..127

# Model settings and run settings per preset; command-line flags override them.
# fmt: off
PRESETS: dict[str, dict[str, Any]] = {
    # A couple of minutes on 2 CPU cores: the first run (make run) and the tests.
    "tiny": dict(
        model=dict(d_model=128, n_heads=4, n_layers=4, d_ff=512, bucket_size=32, n_hashes=2,
                   attn_layers=("local", "lsh", "local", "lsh"), local_chunk_size=64),
        seq_len=512, batch_size=8, steps=300, lr=6e-3, warmup=50, eval_every=100, save_every=100,
    ),
    # The duplication task at a CPU size: one LSH layer over 256 tokens, learned positions.
    "copy": dict(
        task="copy",
        model=dict(vocab_size=COPY_VOCAB, d_model=256, n_heads=4, n_layers=1, d_ff=512, bucket_size=32,
                   n_hashes=4, attn_layers=("lsh",), axial_pos_shape=(256,), axial_pos_dims=(256,)),
        seq_len=256, batch_size=32, steps=600, lr=3e-3, warmup=100, eval_every=100, save_every=200,
    ),
    # The paper's duplication setting (section 5): length 1024, one layer, d_model 256, 4 heads.
    "copy-paper": dict(
        task="copy",
        model=dict(vocab_size=COPY_VOCAB, d_model=256, n_heads=4, n_layers=1, d_ff=512, bucket_size=64,
                   n_hashes=4, attn_layers=("lsh",), axial_pos_shape=(1024,), axial_pos_dims=(256,)),
        seq_len=1024, batch_size=32, steps=3000, lr=2e-3, warmup=200, eval_every=250, save_every=500,
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

# Flags of `reformer train` that map onto ReformerConfig fields.
MODEL_FLAGS = ("d_model", "n_heads", "n_layers", "d_ff", "bucket_size", "n_hashes", "dropout", "hash_seed")
# Settings a resumed run may change; everything else must match the saved run.
RESUMABLE_OVERRIDES = ("steps", "eval_every", "save_every", "log_every", "max_minutes", "progress")


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
    cosine_steps: int | None = None
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
    max_minutes: float | None = None
    seed: int = 0
    progress: bool = True

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
        if self.schedule == "cosine" and not self.cosine_steps:
            raise ValueError("the cosine schedule needs its own horizon: pass --cosine-steps N")
        if self.task == "copy" and (self.seq_len % 2 or self.seq_len < 4):
            raise ValueError(f"the copy task needs an even --seq-len of at least 4, got {self.seq_len}")

    def model_config(self) -> ReformerConfig:
        settings = dict(self.model)
        settings.setdefault("max_seq_len", self.seq_len)
        if "axial_pos_shape" not in settings:
            settings["axial_pos_shape"] = default_axial_shape(settings["max_seq_len"])
        settings.setdefault("vocab_size", COPY_VOCAB if self.task == "copy" else 256)
        return ReformerConfig(**settings)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["model"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.model.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return dataclass_from_dict(cls, data, "train_config")


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based).

    ``rsqrt``: linear warm-up to ``lr`` then ``lr * sqrt(warmup / step)``, as in the paper's
    configurations; it does not depend on ``steps``, so extending a run follows the same curve.
    ``cosine``: warm-up then a cosine from ``lr`` to ``lr * min_lr_ratio`` over ``cosine_steps``.
    """
    step = step + 1
    warm = min(1.0, step / cfg.warmup) if cfg.warmup else 1.0
    if cfg.schedule == "rsqrt":
        return cfg.lr * warm * math.sqrt(max(cfg.warmup, 1) / max(step, cfg.warmup, 1))
    progress = min(1.0, max(0, step - cfg.warmup) / max(1, cfg.cosine_steps - cfg.warmup))
    floor = cfg.lr * cfg.min_lr_ratio
    return warm * (floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---- processes and devices -------------------------------------------------------------------------


@dataclass
class Distributed:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, device: str | None = None) -> Distributed:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if world_size == 1:
            return cls(device=torch.device(device))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "cuda":
            torch.cuda.set_device(local_rank)
            dev = torch.device("cuda", local_rank)
        else:
            dev = torch.device(device)
        if not torch_dist.is_initialized():
            torch_dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        return cls(rank=torch_dist.get_rank(), world_size=torch_dist.get_world_size(), device=dev)

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Sum (or max) of ``values`` over processes; one small collective."""
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX if op == "max" else torch_dist.ReduceOp.SUM)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()

    def shutdown(self) -> None:
        if self.world_size > 1 and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


# ---- batches ---------------------------------------------------------------------------------------


class Batches:
    """Training and held-out batches for a task; every process draws the same global batch from one
    generator and keeps its own slice, so the data a run sees does not depend on the process count."""

    def __init__(self, cfg: TrainConfig, corpus: Corpus | None) -> None:
        self.cfg, self.corpus = cfg, corpus
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def draw(self, size: int, generator: torch.Generator, split: str = "train"):
        if self.cfg.task == "copy":
            return copy_task_batch(size, self.cfg.seq_len, generator)
        return random_windows(getattr(self.corpus, split), self.cfg.seq_len, size, generator)

    def next(self, size: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.draw(size, self.generator)
        share = size // world_size
        return inputs[rank * share : (rank + 1) * share], targets[rank * share : (rank + 1) * share]

    def held_out(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same ``eval_batches`` batches at every evaluation, so the curve is comparable."""
        generator = torch.Generator().manual_seed(EVAL_SEED)
        size = min(self.cfg.batch_size, 8)
        return [self.draw(size, generator, "valid") for _ in range(self.cfg.eval_batches)]


# ---- evaluation ------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_batches(
    model: ReformerLM,
    batches,
    task: str,
    device: torch.device,
    n_hashes: int | None = None,
) -> dict[str, float]:
    """Mean loss in nats over next-token targets, plus ``bits_per_byte`` (language modelling) or
    ``accuracy`` (copy task: share of second-half tokens predicted right)."""
    was_training = model.training
    model.eval()
    total_loss, total_count, total_correct = 0.0, 0, 0
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        counted = targets != IGNORE_INDEX
        count = int(counted.sum())
        if task == "copy":
            logits = model(inputs, n_hashes=n_hashes).float()
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            total_correct += int(((logits.argmax(-1) == targets) & counted).sum())
            total_loss += float(loss)
        else:
            total_loss += float(model.loss(inputs, targets, n_hashes=n_hashes)) * count
        total_count += count
    model.train(was_training)
    loss = total_loss / max(total_count, 1)
    if task == "copy":
        return {"loss": loss, "accuracy": total_correct / max(total_count, 1)}
    return {"loss": loss, "bits_per_byte": loss / math.log(2)}


# ---- checkpoints -----------------------------------------------------------------------------------


def checkpoint_dirs(run: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = run / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def save_checkpoint(run: Path, state: dict[str, Any], model: ReformerLM, optimizer, rng: dict, keep: int):
    """Write ``checkpoints/step-N`` atomically (temporary folder + rename), refresh the run folder's
    model files, and drop all but the newest ``keep`` checkpoints. Returns the checkpoint folder."""
    root = run / CHECKPOINTS_DIR
    final = root / f"step-{state['step']:08d}"
    if final.is_dir():
        return final
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng, tmp / "rng.pt")
        (tmp / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    model.save_pretrained(run)  # the newest weights, loadable as a model folder
    for old in checkpoint_dirs(run)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(folder: Path, model: ReformerLM, optimizer, device: torch.device) -> tuple[dict, dict]:
    """Restore weights and optimiser state from ``folder``; returns (trainer state, RNG states)."""
    state = read_json_object(
        folder / TRAINER_STATE_FILE, "the checkpoint is damaged; delete it to resume from the one before"
    )
    loaded = ReformerLM.from_pretrained(folder, map_location=device)
    if loaded.config.to_dict() != model.config.to_dict():
        raise TrainingError(f"{folder}/config.json does not match the run's model settings")
    model.load_state_dict(loaded.state_dict())
    try:
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=device, weights_only=True))
        rng = torch.load(folder / "rng.pt", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise TrainingError(
            f"{folder} is damaged ({err}); delete it to resume from the checkpoint before"
        ) from err
    return state, rng


def rng_states(batches: Batches) -> dict[str, Any]:
    states = {"torch": torch.get_rng_state(), "data": batches.generator.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict[str, Any], batches: Batches) -> None:
    torch.set_rng_state(states["torch"])
    batches.generator.set_state(states["data"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---- the loop --------------------------------------------------------------------------------------


class StopRequest:
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint at the end of the step and stops.
    A second signal interrupts at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class TrainResult:
    step: int
    checkpoint: Path | None
    stopped_by_signal: int | None
    metrics: dict[str, float]


def train(cfg: TrainConfig, out: str | os.PathLike, resume: bool = False, device: str | None = None):
    """Run (or continue) training into the run folder ``out``; see the module docstring."""
    dist = Distributed.setup(device)
    try:
        return _train(cfg, Path(out), resume, dist)
    finally:
        dist.shutdown()


def _train(cfg: TrainConfig, run: Path, resume: bool, dist: Distributed) -> TrainResult:
    cfg.validate()
    micro, rest = divmod(cfg.batch_size, cfg.grad_accum * dist.world_size)
    if micro == 0 or rest:
        raise TrainingError(
            f"--batch-size {cfg.batch_size} must be a multiple of --grad-accum {cfg.grad_accum} x "
            f"{dist.world_size} process(es)"
        )
    existing = checkpoint_dirs(run)
    if resume and not existing:
        raise TrainingError(f"--resume: {run} holds no checkpoint to resume from; start without --resume")
    if not resume and (existing or (run / TRAIN_CONFIG_FILE).exists()):
        raise TrainingError(
            f"{run} already holds a run; pass --resume to continue it, or choose another --out"
        )

    torch.manual_seed(cfg.seed)
    corpus = load_corpus(cfg.data) if cfg.task == "lm" else None
    model = ReformerLM(cfg.model_config()).to(dist.device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay
    )
    batches = Batches(cfg, corpus)
    state: dict[str, Any] = {"step": 0, "tokens_seen": 0}
    if resume:
        state, rng = load_checkpoint(existing[-1], model, optimizer, dist.device)
        restore_rng(rng, batches)
        if dist.is_main:
            MetricsLog(run, cfg.task, enabled=True).truncate_after(state["step"])
            print(f"resumed {run} at step {state['step']} from {existing[-1]}", file=sys.stderr)
    elif dist.is_main:
        atomic_write_text(run / TRAIN_CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2) + "\n")
    if dist.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        source = corpus.describe() if corpus else f"copy task, length {cfg.seq_len}"
        print(
            f"data: {source}\nmodel: {n_params:,} parameters, {model.config.n_layers} layers", file=sys.stderr
        )

    net = model
    if dist.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None
        )
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and dist.device.type == "cuda")
    autocast = (
        torch.autocast(dist.device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    )
    held_out = batches.held_out()
    logger = MetricsLog(run, cfg.task, enabled=dist.is_main)
    checkpoint, last_eval = (existing[-1] if resume else None), {}
    tokens_per_step = cfg.batch_size * cfg.seq_len
    started, step_start = time.monotonic(), state["step"]
    bar = _progress(cfg, state["step"], dist.is_main)

    def save() -> Path | None:
        nonlocal checkpoint
        if dist.is_main:
            state["world_size"] = dist.world_size
            checkpoint = save_checkpoint(
                run, state, model, optimizer, rng_states(batches), cfg.keep_checkpoints
            )
        dist.barrier()
        return checkpoint

    model.train()
    with StopRequest() as stop:
        while state["step"] < cfg.steps:
            step = state["step"]
            lr = learning_rate(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            total = 0.0
            for micro_step in range(cfg.grad_accum):
                inputs, targets = batches.next(micro * dist.world_size, dist.rank, dist.world_size)
                inputs, targets = inputs.to(dist.device), targets.to(dist.device)
                sync = micro_step == cfg.grad_accum - 1 or dist.world_size == 1
                with contextlib.nullcontext() if sync else net.no_sync(), autocast:
                    # Through forward() (not model.loss), so that DDP's hooks see the step.
                    loss = net(inputs, targets=targets) / cfg.grad_accum
                loss.backward()
                total += float(loss.detach())
            total = dist.all_reduce([total])[0] / dist.world_size
            if not math.isfinite(total):
                where = f"; the last good checkpoint is {checkpoint}" if checkpoint else ""
                raise TrainingError(
                    f"loss became {total} at step {step + 1} (lr {lr:.3g}); stopped without saving{where}. "
                    "Lower --lr, raise --warmup or set --clip, then --resume"
                )
            if cfg.clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] = step = step + 1
            state["tokens_seen"] += tokens_per_step
            elapsed = time.monotonic() - started
            tokens_per_s = (step - step_start) * tokens_per_step / max(elapsed, 1e-9)
            if step % cfg.log_every == 0 or step == cfg.steps:
                logger.log(
                    {"step": step, "split": "train", "loss": total, "lr": lr, "tokens_per_s": tokens_per_s}
                )
            if step % cfg.eval_every == 0 or step == cfg.steps:
                last_eval = evaluate_batches(model, held_out, cfg.task, dist.device)
                logger.log({"step": step, "split": "eval", **last_eval})
                logger.plot()
            bar.update(1)
            bar.set_postfix(_postfix(cfg.task, total, last_eval, tokens_per_s), refresh=False)
            out_of_time = cfg.max_minutes is not None and elapsed > 60 * cfg.max_minutes
            stop_now = dist.all_reduce([float(stop.signal is not None), float(out_of_time)], op="max")
            if step % cfg.save_every == 0 or step == cfg.steps or any(stop_now):
                save()
            if any(stop_now):
                break
    bar.close()
    if dist.world_size > 1:
        _check_replicas(model, dist)
    if stop.signal is not None and dist.is_main:
        print(
            f"stopped by signal {stop.signal} at step {state['step']}; checkpoint {checkpoint}; "
            f"continue with: reformer train --out {run} --resume",
            file=sys.stderr,
        )
    logger.plot()
    # Finish together: a gloo rank that tears down while its peer is still busy (rank 0 plots) was seen
    # to abort with "terminate called without an active exception" (about 1 run in 6).
    dist.barrier()
    return TrainResult(state["step"], checkpoint, stop.signal, last_eval)


def _check_replicas(model: ReformerLM, dist: Distributed) -> None:
    """Fail loudly if DDP replicas drifted apart: they must stay bit-identical."""
    import hashlib

    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digests: list[str | None] = [None] * dist.world_size
    torch_dist.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) != 1:
        raise TrainingError("parameters differ across processes after training; this is a bug")
    if dist.is_main:
        print(f"parameters identical across {dist.world_size} processes", file=sys.stderr)


def _postfix(task: str, loss: float, last_eval: dict, tokens_per_s: float) -> dict[str, str]:
    post = {"loss": f"{loss:.3f}"}
    if task == "lm":
        post["bpb"] = f"{loss / math.log(2):.3f}"
    for key in ("bits_per_byte", "accuracy"):
        if key in last_eval:
            post["eval_" + key.split("_")[0]] = f"{last_eval[key]:.3f}"
    post["tok/s"] = f"{tokens_per_s:,.0f}"
    return post


def _progress(cfg: TrainConfig, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=cfg.steps, initial=initial, unit="step", desc="train", disable=not (enabled and cfg.progress),
        dynamic_ncols=True,
    )  # fmt: skip


class MetricsLog:
    """Appends JSON lines to ``metrics.jsonl`` and draws ``loss.png`` from them."""

    def __init__(self, run: Path, task: str, enabled: bool) -> None:
        self.path, self.plot_path, self.task, self.enabled = (
            run / METRICS_FILE,
            run / PLOT_FILE,
            task,
            enabled,
        )

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {**record, "time": time.time()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after ``step`` (a run killed after its last checkpoint logged them)."""
        if not self.path.is_file():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def plot(self) -> None:
        if not self.enabled or not self.path.is_file():
            return
        plot_metrics(self.path, self.plot_path, self.task)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut by a crash is skipped
            records.append(json.loads(line))
    return records


def plot_metrics(metrics: Path, out: Path, task: str) -> None:
    """Loss curves (train and held-out; bits per byte for language models) into a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics)
    scale = 1 / math.log(2) if task == "lm" else 1.0
    fig, ax = plt.subplots(figsize=(7, 4))
    for split, style in (("train", "-"), ("eval", "o-")):
        points = [(r["step"], r["loss"] * scale) for r in records if r.get("split") == split]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=split, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte" if task == "lm" else "loss (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


# ---- eval and sample -------------------------------------------------------------------------------


def load_run(run: str | os.PathLike) -> tuple[TrainConfig | None, ReformerLM]:
    """The run's settings (None for a plain model folder) and its newest weights."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"{run} is not a folder; give a run folder written by reformer train")
    cfg = None
    if (run / TRAIN_CONFIG_FILE).is_file():
        cfg = TrainConfig.from_dict(read_json_object(run / TRAIN_CONFIG_FILE, "the run folder is damaged"))
    return cfg, ReformerLM.from_pretrained(run)


def evaluate_run(
    run: str | os.PathLike,
    data: list[str] | None = None,
    n_hashes: int | None = None,
    max_tokens: int | None = None,
    batch_size: int | None = None,
    full_attention: bool = False,
    device: str | None = None,
) -> dict[str, float]:
    """Held-out bits per byte on the test split (or copy-task accuracy) of a trained run."""
    cfg, model = load_run(run)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    if cfg is None:
        cfg = TrainConfig(model=model.config.to_dict(), seq_len=model.config.max_seq_len)
    if full_attention:
        _use_full_attention(model)
    batch_size = batch_size or max(1, min(cfg.batch_size, 8))
    if cfg.task == "copy":
        generator = torch.Generator().manual_seed(EVAL_SEED + 1)
        n_batches = max(1, -(-(max_tokens or 32 * cfg.seq_len) // (batch_size * cfg.seq_len)))
        batches = [copy_task_batch(batch_size, cfg.seq_len, generator) for _ in range(n_batches)]
    else:
        corpus = load_corpus(data if data is not None else cfg.data)
        batches = contiguous_windows(corpus.test, cfg.seq_len, batch_size, max_tokens)
    return evaluate_batches(model, batches, cfg.task, device, n_hashes)


def _use_full_attention(model: ReformerLM) -> None:
    """Exact shared-QK attention in the LSH layers: one chunk covers the whole input."""
    from .attention import LSHSelfAttention

    for module in model.modules():
        if isinstance(module, LSHSelfAttention):
            module.bucket_size = model.config.max_seq_len


def sample_text(model: ReformerLM, prompt: str = "def main():\n    ", n: int = 200, seed: int = 0) -> str:
    ids = model.generate(
        encode_text(prompt)[None].to(next(model.parameters()).device), max_new_tokens=n, temperature=0.8,
        top_k=40, generator=torch.Generator(device=next(model.parameters()).device).manual_seed(seed),
    )  # fmt: skip
    return decode_bytes(ids[0].cpu())


# ---- command line ----------------------------------------------------------------------------------


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="+", metavar="PATH", help="text/binary files or folders, or enwik8[.zip] "
                   "(default: the Python standard library sources of this machine)")  # fmt: skip
    p.add_argument("--task", choices=TASKS, help="lm: next-byte prediction (default); copy: the paper's "
                   "duplication task 0w0w")  # fmt: skip
    p.add_argument(
        "--preset", choices=sorted(PRESETS), help="model and run settings to start from (default tiny)"
    )
    p.add_argument("--out", default=None, help="run folder (default runs/<preset>)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its newest checkpoint"
    )
    g = p.add_argument_group("run")
    g.add_argument("--seq-len", type=int, help="tokens per sequence")
    g.add_argument("--batch-size", type=int, help="sequences per optimiser step over all processes")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimiser step")
    g.add_argument("--steps", type=int, help="optimiser steps in total (a resumed run continues to this)")
    g.add_argument("--max-minutes", type=float, help="stop (and save) after this much wall time")
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    g.add_argument("--precision", choices=PRECISIONS, help="auto: bf16 autocast on GPU, fp32 on CPU")
    g.add_argument("--eval-every", type=int, help="steps between held-out evaluations")
    g.add_argument("--eval-batches", type=int, help="held-out batches per evaluation")
    g.add_argument("--save-every", type=int, help="steps between checkpoints")
    g.add_argument("--log-every", type=int, help="steps between metrics lines")
    g.add_argument(
        "--no-progress", dest="progress", action="store_false", default=None, help="no progress bar"
    )
    g.add_argument("--no-sample", action="store_true", help="do not print a sample / eval at the end")
    o = p.add_argument_group("optimiser (AdamW)")
    o.add_argument("--lr", type=float, help="peak learning rate")
    o.add_argument("--warmup", type=int, help="linear warm-up steps")
    o.add_argument("--schedule", choices=SCHEDULES, help="rsqrt (default; independent of --steps) or cosine")
    o.add_argument("--cosine-steps", type=int, help="horizon of the cosine schedule")
    o.add_argument("--weight-decay", type=float)
    o.add_argument("--clip", type=float, help="gradient-norm clipping (0: none)")
    m = p.add_argument_group("model")
    m.add_argument("--d-model", type=int)
    m.add_argument("--n-heads", type=int)
    m.add_argument("--n-layers", type=int)
    m.add_argument("--d-ff", type=int)
    m.add_argument("--attn-layers", help="comma-separated lsh/local/full per layer, or one kind for all")
    m.add_argument("--bucket-size", type=int, help="LSH chunk length")
    m.add_argument("--n-hashes", type=int, help="LSH hash rounds")
    m.add_argument("--dropout", type=float)
    m.add_argument("--hash-seed", type=int, help="fix the hash rotations (default: fresh every step)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Preset settings overridden by the flags given on the command line."""
    preset_name = args.preset or ("copy" if args.task == "copy" else "tiny")
    preset = {k: (dict(v) if isinstance(v, dict) else v) for k, v in PRESETS[preset_name].items()}
    if args.task == "lm" and preset.get("task") == "copy":
        raise ValueError(f"--preset {preset_name} is a copy-task preset; drop --task lm or pick tiny/enwik8")
    cfg = TrainConfig(**preset)
    given = {
        f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None
    }
    if "clip" in given and given["clip"] == 0:
        given["clip"] = None
    cfg = replace(cfg, **given)
    if args.data:
        cfg.data = [str(Path(d).resolve()) for d in args.data]
    model = dict(cfg.model)
    for name in MODEL_FLAGS:
        if getattr(args, name, None) is not None:
            model[name] = getattr(args, name)
    if args.attn_layers:
        kinds = tuple(k.strip() for k in args.attn_layers.split(","))
        model["attn_layers"] = kinds * model.get("n_layers", len(kinds)) if len(kinds) == 1 else kinds
        if len(kinds) > 1 and args.n_layers is None:
            model["n_layers"] = len(kinds)
    elif args.n_layers is not None and "attn_layers" in model:
        pattern = model["attn_layers"]
        model["attn_layers"] = tuple(pattern[i % len(pattern)] for i in range(args.n_layers))
    if model.get("axial_pos_shape") and len(model["axial_pos_shape"]) == 1:  # plain learned positions
        model["axial_pos_shape"], model["axial_pos_dims"] = (cfg.seq_len,), (model["d_model"],)
    elif args.seq_len is not None or args.d_model is not None:  # re-derive the axial factorisation
        model.pop("axial_pos_shape", None)
        model.pop("axial_pos_dims", None)
    if args.seq_len is not None:
        model.pop("max_seq_len", None)
    cfg.model = model
    return cfg


def resumed_config(args: argparse.Namespace, run: Path) -> TrainConfig:
    """The saved run's settings, with only the run-control flags allowed to change."""
    saved = TrainConfig.from_dict(read_json_object(run / TRAIN_CONFIG_FILE, "the run folder is damaged"))
    changes = {}
    for f in fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is None or f.name in ("model", "data"):
            continue
        if f.name in RESUMABLE_OVERRIDES:
            changes[f.name] = value
        elif value != getattr(saved, f.name):
            raise ValueError(
                f"--{f.name.replace('_', '-')} {value} differs from the resumed run's "
                f"{getattr(saved, f.name)}; a resumed run may only change "
                + ", ".join("--" + n.replace("_", "-") for n in RESUMABLE_OVERRIDES)
            )
    fixed = MODEL_FLAGS + ("attn_layers", "preset", "task")
    flags = ["--" + n.replace("_", "-") for n in fixed if getattr(args, n, None) is not None]
    if args.data or flags:
        raise ValueError(f"--resume keeps the run's model and data; drop {', '.join(flags or ['--data'])}")
    return replace(saved, **changes)


def run_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    out = Path(args.out or f"runs/{args.preset or ('copy' if args.task == 'copy' else 'tiny')}")
    try:
        cfg = resumed_config(args, out) if args.resume else config_from_args(args)
        cfg.validate()
        cfg.model_config()
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    try:
        result = train(cfg, out, resume=args.resume, device=args.device)
    except (TrainingError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if result.stopped_by_signal is not None:
        return 128 + result.stopped_by_signal
    print(
        f"saved {out} (step {result.step}): " + ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items())
    )
    if not args.no_sample:
        model = ReformerLM.from_pretrained(out)
        if cfg.task == "lm":
            print("sample:\n" + sample_text(model))
        else:
            acc = evaluate_run(out, n_hashes=8)["accuracy"]
            print(f"copy-task accuracy with 8 hashes: {acc:.4f}")
    return 0


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run folder written by reformer train (or a model folder)")
    p.add_argument("--data", nargs="+", metavar="PATH", help="evaluate on this corpus's test split instead")
    p.add_argument("--n-hashes", type=int, help="LSH hash rounds at evaluation (default: as trained)")
    p.add_argument("--full-attention", action="store_true", help="exact attention in the LSH layers")
    p.add_argument("--max-tokens", type=int, help="evaluate at most this many tokens")
    p.add_argument("--batch-size", type=int, help="sequences per forward pass")
    p.add_argument("--device", help="cpu or cuda")


def run_eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        metrics = evaluate_run(
            args.run, data=args.data, n_hashes=args.n_hashes, max_tokens=args.max_tokens,
            batch_size=args.batch_size, full_attention=args.full_attention, device=args.device,
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"loss={metrics['loss']:.4f} nats")
    key = "accuracy" if "accuracy" in metrics else "bits_per_byte"
    print(f"{key}={metrics[key]:.4f}")
    return 0
