"""The training loop: AdamW on the schedule, gradient accumulation, AMP, DDP and sequence parallelism
around the task's objective, held-out evaluation, checkpoints and stopping on signals. Everything that
differs between tasks is a method of the run's :class:`~reformer.tasks.Task`."""

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

from ..files import atomic_write_text
from ..parallel import SequenceParallelLM
from ..tasks import Batch, Task
from .best import BestKeeper
from .checkpoints import (
    checkpoint_dirs,
    load_checkpoint,
    restore_rng,
    resume_checkpoint,
    rng_states,
    save_checkpoint,
)
from .config import (
    TRAIN_CONFIG_FILE,
    TrainConfig,
    TrainingError,
    learning_rate,
    read_train_config,
    schedule_change,
)
from .distributed import Distributed, Mesh, check_replicas, peer_failures
from .loggers import RunLog
from .metrics import MetricsLog, postfix, progress_bar
from .precision import training_autocast
from .run_lock import hold_run_lock


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
    objective: torch.nn.Module,
    micro_batches: list[Batch],
    counts: list[int],
    dist: Distributed,
    autocast: contextlib.AbstractContextManager,
    sequence_parallel: int = 1,
) -> float:
    """Backward passes over this process's ``micro_batches`` whose summed gradient is that of the step's
    whole batch, over all processes: the mean loss over every counted target of the step (``counts``:
    each micro-batch's, :meth:`~reformer.tasks.Task.target_count`). Returns that loss (the same on
    every process).

    ``objective(*batch)`` is a micro-batch's mean loss; it is weighted by the micro-batch's share of the
    step's targets, so micro-batches and processes that count different numbers of targets still add up
    to the full batch; DDP averages gradients over the data-parallel replicas, hence the factor
    ``replicas``. With ``sequence_parallel`` P the P ranks of a sequence group share their micro-batches
    (each sums its tokens' share of the gradient; the caller sums those over the group).
    """
    replicas = dist.world_size // sequence_parallel
    step_count = max(dist.all_reduce([float(sum(counts))])[0] / sequence_parallel, 1.0)
    total = 0.0
    for i, (batch, count) in enumerate(zip(micro_batches, counts, strict=True)):
        batch = tuple(t.to(dist.device) for t in batch)
        sync = i == len(micro_batches) - 1 or replicas == 1
        with contextlib.nullcontext() if sync else objective.no_sync(), autocast:
            loss = objective(*batch) * (count * replicas / step_count)
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
    cfg.validate()  # before the lock, which makes the run folder: bad settings leave nothing behind
    dist = Distributed.setup(device)
    try:
        with peer_failures(dist, out), hold_run_lock(out, dist):
            return _train(cfg, Path(out), resume, dist, sequence_parallel)
    finally:
        dist.shutdown()


def _train(
    cfg: TrainConfig, run: Path, resume: bool, dist: Distributed, sequence_parallel: int
) -> TrainResult:
    task = cfg.make_task()
    if sequence_parallel > 1 and not task.sequence_parallel:
        raise TrainingError(f"--task {cfg.task} does not support --sequence-parallel; use data parallelism")
    mesh = dist.mesh(sequence_parallel)
    micro = micro_batch_size(cfg, mesh)
    resume_from = check_run_folder(run, resume, dist.is_main)
    torch.manual_seed(cfg.seed)
    task.prepare()  # before the model: a task may record settings (its classes, a pretrained model's)
    model = task.build_model().to(dist.device)
    optimizer = adamw(cfg, model, dist.device)
    sampler = torch.Generator().manual_seed(cfg.seed)  # the training batches' generator
    state: dict[str, Any] = {"step": 0, "tokens_seen": 0}
    if resume_from is not None:
        state, rng = load_checkpoint(resume_from, model, optimizer, dist.device)
        restore_rng(rng, sampler)
        task.restore(state)
    announce(cfg, task, model, run, resume, resume_from, state["step"], dist)
    net = SequenceParallelLM(model, mesh.sequence_group) if sequence_parallel > 1 else model
    objective = data_parallel(task.objective(net), dist, mesh)
    autocast = training_autocast(cfg.precision, dist.device)
    held_out = task.held_out()
    logger = RunLog(MetricsLog(run, task.loss_in_bits, enabled=dist.is_main), cfg.log, state["step"])
    checkpoint, last_eval = resume_from, {}
    best = BestKeeper(run, task) if cfg.keep_best and dist.is_main else None
    tokens_per_step = cfg.batch_size * cfg.seq_len
    started, step_start = time.monotonic(), state["step"]
    bar = progress_bar(cfg, state["step"], dist.is_main)

    def save() -> Path | None:
        nonlocal checkpoint
        if dist.is_main:
            state["world_size"] = dist.world_size
            state["sequence_parallel"] = sequence_parallel
            checkpoint = save_checkpoint(
                run, state, model, optimizer, rng_states(sampler), cfg.keep_checkpoints
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
                slice_batch(task.batch(micro * mesh.replicas, sampler), mesh.replica, mesh.replicas)
                for _ in range(cfg.grad_accum)
            ]
            counts = [task.target_count(batch) for batch in micro_batches]
            total = accumulate_gradients(objective, micro_batches, counts, dist, autocast, sequence_parallel)
            if sequence_parallel > 1:
                net.sum_gradients()
            skipped = skip_nonfinite(total, step, lr, checkpoint, state, cfg.skip_nonfinite)
            if not skipped:
                if cfg.clip is not None:
                    clip_gradients(model, cfg.clip)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] = step = step + 1
            message = None if skipped else task.after_step(total, step)
            if skipped:
                message = (
                    f"step {step}: loss {total}; skipped without an update ({state['skipped_steps']} of "
                    f"--skip-nonfinite {cfg.skip_nonfinite})"
                )
                logger.log({"step": step, "split": "skipped", "loss": str(total), **skipped})
            if message and dist.is_main:
                print(message, file=sys.stderr)
            state.update(task.state())
            state["tokens_seen"] += tokens_per_step
            elapsed = time.monotonic() - started
            tokens_per_s = (step - step_start) * tokens_per_step / max(elapsed, 1e-9)
            if not skipped and (step % cfg.log_every == 0 or step == cfg.steps):
                logger.log(
                    {"step": step, "split": "train", "loss": total, "lr": lr, "tokens_per_s": tokens_per_s}
                )
            if step % cfg.eval_every == 0 or step == cfg.steps:
                last_eval = task.evaluate(net, held_out, dist.device)
                logger.log({"step": step, "split": "eval", **last_eval})
                if best is not None:
                    best.offer(last_eval, step, model)
                logger.plot()
            bar.update(1)
            bar.set_postfix(postfix(total, last_eval, tokens_per_s, task.loss_in_bits), refresh=False)
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


def adamw(cfg: TrainConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the fused kernel: one pass per parameter instead of several elementwise ops (on CPU
    with 2 threads, 0.5 against 4.5 ms a step for the tiny preset). A resumed checkpoint keeps the
    variant it was saved with (the setting is part of the optimiser's state)."""
    return torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
        fused=device.type in ("cpu", "cuda"),
    )  # fmt: skip


def skip_nonfinite(
    loss: float, step: int, lr: float, checkpoint: Path | None, state: dict[str, Any], budget: int
) -> dict[str, int] | None:
    """None for a finite loss. A NaN or infinite one (the same on every process) skips the optimiser
    step while fewer than ``budget`` steps were skipped (``state["skipped_steps"]`` counts them; returns
    the count for the metrics), else stops the run before the update, naming the last good checkpoint."""
    if math.isfinite(loss):
        return None
    skipped = state.get("skipped_steps", 0)
    if skipped < budget:
        state["skipped_steps"] = skipped + 1
        return {"skipped_steps": skipped + 1}
    where = f"; the last good checkpoint is {checkpoint}" if checkpoint else ""
    after = f" after {skipped} skipped step(s) (--skip-nonfinite {budget})" if budget else ""
    raise TrainingError(
        f"loss became {loss} at step {step + 1} (lr {lr:.3g}){after}; stopped without saving{where}. "
        "Lower --lr, raise --warmup or set --clip, then --resume (--skip-nonfinite N skips up to N such "
        "steps)"
    )


def micro_batch_size(cfg: TrainConfig, mesh: Mesh) -> int:
    """Sequences per micro-batch of one data-parallel replica."""
    micro, rest = divmod(cfg.batch_size, cfg.grad_accum * mesh.replicas)
    if micro == 0 or rest:
        raise TrainingError(
            f"--batch-size {cfg.batch_size} must be a multiple of --grad-accum {cfg.grad_accum} x "
            f"{mesh.replicas} data-parallel replica(s)"
        )
    return micro


def check_run_folder(run: Path, resume: bool, is_main: bool) -> Path | None:
    """The checkpoint a resumed run starts from (the newest that verifies; None when the run stopped
    before its first one); a new run needs an empty folder."""
    if resume:
        resume_from = resume_checkpoint(run, is_main)
        if resume_from is None and not (run / TRAIN_CONFIG_FILE).is_file():
            raise TrainingError(f"--resume: {run} holds no checkpoint to resume from; start without --resume")
        return resume_from
    if checkpoint_dirs(run) or (run / TRAIN_CONFIG_FILE).exists():
        raise TrainingError(
            f"{run} already holds a run; pass --resume to continue it, or choose another --out"
        )
    return None


def announce(
    cfg: TrainConfig, task: Task, model: torch.nn.Module, run: Path, resume: bool, resumed: Path | None,
    step: int, dist: Distributed,
) -> None:  # fmt: skip
    """On the main process: drop the metrics a resumed run logged after its checkpoint and say what the
    resume does to a cosine schedule, write ``train_config.json`` (the run's settings now: a resumed
    run's new ``steps`` ...), the task's files (:meth:`Task.save_files`), and print the data and the
    model."""
    if not dist.is_main:
        return
    if resume:
        MetricsLog(run, task.loss_in_bits, enabled=True).truncate_after(step)
        where = resumed or "its start (it stopped before its first checkpoint)"
        print(f"resumed {run} at step {step} from {where}", file=sys.stderr)
        try:
            note = schedule_change(read_train_config(run), cfg, step)
        except (ValueError, FileNotFoundError):  # no readable settings saved: nothing to compare with
            note = None
        if note:
            print(note, file=sys.stderr)
    atomic_write_text(run / TRAIN_CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2) + "\n")
    task.save_files(run)
    print(f"data: {task.describe()}\nmodel: {task.describe_model(model)}", file=sys.stderr)


def data_parallel(objective: torch.nn.Module, dist: Distributed, mesh: Mesh) -> torch.nn.Module:
    """``objective`` under DDP over the data-parallel replicas (itself with one replica)."""
    if mesh.replicas == 1:
        return objective
    return torch.nn.parallel.DistributedDataParallel(
        objective,
        device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
        process_group=mesh.data_group,
    )


def slice_batch(batch: Batch, rank: int, world_size: int) -> Batch:
    """Replica ``rank``'s share of a global batch (every process draws the same global batch, so the
    data a run sees does not depend on the process count)."""
    share = len(batch[0]) // world_size
    return tuple(t[rank * share : (rank + 1) * share] for t in batch)
