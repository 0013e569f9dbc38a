"""The training loop: AdamW on the schedule, gradient accumulation, AMP, DDP, held-out evaluation,
checkpoints and stopping on signals."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import IGNORE_INDEX, load_corpus
from ..files import atomic_write_text
from ..model import ReformerLM
from ..models.seq2seq import ReformerEncoderDecoder
from ..parallel import SequenceParallelLM
from .batches import Batches
from .checkpoints import checkpoint_dirs, load_checkpoint, restore_rng, rng_states, save_checkpoint
from .config import SEQ2SEQ_TASKS, TRAIN_CONFIG_FILE, TrainConfig, TrainingError, learning_rate
from .distributed import Distributed, check_replicas
from .encoder_tasks import TaskObjective, build_model
from .evaluation import evaluate_batches
from .loggers import RunLog
from .metrics import MetricsLog, postfix, progress_bar
from .seq2seq import Seq2SeqBatches, TeacherForced, evaluate_seq2seq


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


def accumulate_gradients(
    net: torch.nn.Module,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    dist: Distributed,
    autocast: contextlib.AbstractContextManager,
    sequence_parallel: int = 1,
) -> float:
    """Backward passes over this process's ``micro_batches`` (``(inputs, targets)`` pairs ``(micro,
    length)``) whose summed gradient is that of the step's whole batch, over all processes: the mean
    cross-entropy over every target token of the step. Returns that loss (the same on every process).

    Each micro-batch's mean is weighted by its share of the step's target tokens (``IGNORE_INDEX`` ones
    do not count), so micro-batches and processes that ignore different numbers of tokens still add up
    to the full batch; DDP averages gradients over the data-parallel replicas, hence the factor
    ``replicas``. With ``sequence_parallel`` P the P ranks of a sequence group share their micro-batches
    (each sums its tokens' share of the gradient; the caller sums those over the group).
    """
    replicas = dist.world_size // sequence_parallel
    counts = [int((targets != IGNORE_INDEX).sum()) for _, targets in micro_batches]
    step_count = max(dist.all_reduce([float(sum(counts))])[0] / sequence_parallel, 1.0)
    total = 0.0
    for i, ((inputs, targets), count) in enumerate(zip(micro_batches, counts, strict=True)):
        inputs, targets = inputs.to(dist.device), targets.to(dist.device)
        sync = i == len(micro_batches) - 1 or replicas == 1
        with contextlib.nullcontext() if sync else net.no_sync(), autocast:
            # Through forward() (not model.loss), so that DDP's hooks see the step.
            loss = net(inputs, targets=targets) * (count * replicas / step_count)
        loss.backward()
        total += float(loss.detach()) / replicas
    return dist.all_reduce([total])[0] / sequence_parallel


def clip_gradients(model: torch.nn.Module, max_norm: float) -> None:
    """Scale the gradients to total norm ``max_norm`` where it is larger (``clip_grad_norm_``'s rule).

    ``clip_grad_norm_`` multiplies every gradient by ``min(1, max_norm / (norm + 1e-6))`` even when that
    is 1: on CPU, with a small model's many small tensors, those multiplications cost 8-10 ms a step,
    about a sixth of a ``tiny`` step (docs/quality.md). They are skipped exactly where the factor is 1,
    so the gradients are bit-identical to ``clip_grad_norm_``'s.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    if total + 1e-6 > max_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)


@dataclass
class TrainResult:
    step: int
    checkpoint: Path | None
    stopped_by_signal: int | None
    metrics: dict[str, float]


def train(
    cfg: TrainConfig,
    out: str | os.PathLike,
    resume: bool = False,
    device: str | None = None,
    sequence_parallel: int = 1,
):
    """Run (or continue) training into the run folder ``out``; see :mod:`reformer.train` for its layout.

    ``sequence_parallel`` P splits every sequence over P processes (:mod:`reformer.parallel`); the
    ``world_size / P`` groups of P are data-parallel replicas. It is a property of the launch, not of the
    run: a run may be resumed with another P or process count.
    """
    dist = Distributed.setup(device)
    try:
        return _train(cfg, Path(out), resume, dist, sequence_parallel)
    finally:
        dist.shutdown()


def _train(
    cfg: TrainConfig, run: Path, resume: bool, dist: Distributed, sequence_parallel: int
) -> TrainResult:
    cfg.validate()
    mesh = dist.mesh(sequence_parallel)
    micro, rest = divmod(cfg.batch_size, cfg.grad_accum * mesh.replicas)
    if micro == 0 or rest:
        raise TrainingError(
            f"--batch-size {cfg.batch_size} must be a multiple of --grad-accum {cfg.grad_accum} x "
            f"{mesh.replicas} data-parallel replica(s)"
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
    seq2seq = cfg.task in SEQ2SEQ_TASKS
    if seq2seq and sequence_parallel > 1:
        raise TrainingError(f"--task {cfg.task} does not support --sequence-parallel; use data parallelism")
    if seq2seq:
        batches = Seq2SeqBatches(cfg)
        model = ReformerEncoderDecoder(cfg.model_config()).to(dist.device)
    else:
        batches = Batches(cfg, corpus)  # before the model: an encoder task may set cfg.labels / cfg.model
        model = (ReformerLM(cfg.model_config()) if batches.encoder is None else build_model(cfg)).to(
            dist.device
        )
    encoder_data = getattr(batches, "encoder", None)
    # The fused kernel: one pass per parameter instead of several elementwise ops (on CPU with 2 threads,
    # 0.5 against 4.5 ms a step for the tiny preset). A resumed checkpoint keeps the variant it was saved
    # with (the setting is part of the optimiser's state).
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
        fused=dist.device.type in ("cpu", "cuda"),
    )  # fmt: skip
    state: dict[str, Any] = {"step": 0, "tokens_seen": 0}
    if resume:
        state, rng = load_checkpoint(existing[-1], model, optimizer, dist.device)
        restore_rng(rng, batches)
        if seq2seq:
            batches.restore(state)
        if dist.is_main:
            MetricsLog(run, cfg.task, enabled=True).truncate_after(state["step"])
            print(f"resumed {run} at step {state['step']} from {existing[-1]}", file=sys.stderr)
    elif dist.is_main:
        atomic_write_text(run / TRAIN_CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2) + "\n")
    if dist.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        source = corpus.describe() if corpus else f"copy task, length {cfg.seq_len}"
        source = batches.describe() if seq2seq else source
        source = encoder_data.describe() if encoder_data is not None else source
        layers = f"{model.config.encoder.n_layers} + {model.config.decoder.n_layers}" if seq2seq else None
        print(
            f"data: {source}\nmodel: {n_params:,} parameters, {layers or model.config.n_layers} layers",
            file=sys.stderr,
        )

    net = evaluated = TeacherForced(model, centre=cfg.curriculum_start is not None) if seq2seq else model
    if encoder_data is not None:
        if sequence_parallel > 1:
            raise TrainingError(f"--sequence-parallel is for language models, not --task {cfg.task}")
        net = TaskObjective(model)
    if sequence_parallel > 1:
        net = evaluated = SequenceParallelLM(model, mesh.sequence_group)
    if mesh.replicas > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            net,
            device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
            process_group=mesh.data_group,
        )
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and dist.device.type == "cuda")
    autocast = (
        torch.autocast(dist.device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    )
    held_out = batches.held_out()
    logger = RunLog(MetricsLog(run, cfg.task, enabled=dist.is_main), cfg.log, state["step"])
    checkpoint, last_eval = (existing[-1] if resume else None), {}
    tokens_per_step = cfg.batch_size * cfg.seq_len
    started, step_start = time.monotonic(), state["step"]
    bar = progress_bar(cfg, state["step"], dist.is_main)

    def save() -> Path | None:
        nonlocal checkpoint
        if dist.is_main:
            state["world_size"] = dist.world_size
            state["sequence_parallel"] = sequence_parallel
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
            micro_batches = [
                batches.next(micro * mesh.replicas, mesh.replica, mesh.replicas)
                for _ in range(cfg.grad_accum)
            ]
            total = accumulate_gradients(net, micro_batches, dist, autocast, sequence_parallel)
            if sequence_parallel > 1:
                evaluated.sum_gradients()
            if not math.isfinite(total):
                where = f"; the last good checkpoint is {checkpoint}" if checkpoint else ""
                raise TrainingError(
                    f"loss became {total} at step {step + 1} (lr {lr:.3g}); stopped without saving{where}. "
                    "Lower --lr, raise --warmup or set --clip, then --resume"
                )
            if cfg.clip is not None:
                clip_gradients(model, cfg.clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] = step = step + 1
            if seq2seq and batches.after_step(total) and dist.is_main:
                print(f"curriculum: length {batches.length} from step {step + 1}", file=sys.stderr)
            if seq2seq and cfg.curriculum_start is not None:
                state.update(batches.curriculum_state())
            state["tokens_seen"] += tokens_per_step
            elapsed = time.monotonic() - started
            tokens_per_s = (step - step_start) * tokens_per_step / max(elapsed, 1e-9)
            if step % cfg.log_every == 0 or step == cfg.steps:
                logger.log(
                    {"step": step, "split": "train", "loss": total, "lr": lr, "tokens_per_s": tokens_per_s}
                )
            if step % cfg.eval_every == 0 or step == cfg.steps:
                evaluate = evaluate_seq2seq if seq2seq else evaluate_batches
                last_eval = evaluate(evaluated, held_out, cfg.task, dist.device)
                logger.log({"step": step, "split": "eval", **last_eval})
                logger.plot()
            bar.update(1)
            bar.set_postfix(postfix(cfg.task, total, last_eval, tokens_per_s), refresh=False)
            out_of_time = cfg.max_minutes is not None and elapsed > 60 * cfg.max_minutes
            stop_now = dist.all_reduce([float(stop.signal is not None), float(out_of_time)], op="max")
            if step % cfg.save_every == 0 or step == cfg.steps or any(stop_now):
                save()
            if any(stop_now):
                break
    bar.close()
    if dist.world_size > 1:
        check_replicas(model, dist)
    if stop.signal is not None and dist.is_main:
        print(
            f"stopped by signal {stop.signal} at step {state['step']}; checkpoint {checkpoint}; "
            f"continue with: reformer train --out {run} --resume",
            file=sys.stderr,
        )
    logger.close()
    # Finish together: a gloo rank that tears down while its peer is still busy (rank 0 plots) was seen
    # to abort with "terminate called without an active exception" (about 1 run in 6).
    dist.barrier()
    return TrainResult(state["step"], checkpoint, stop.signal, last_eval)
