"""``reformer bench --what model --sequence-parallel P``: one sequence split over ``P`` CPU processes (gloo)
against one process: per-rank peak memory, time per step and its communication share.

The model is ``--what model``'s (byte-level LM, reversible LSH layers, d_model 256, d_ff 1024, 4 heads,
bucket 64, 2 hashes, batch 1, fp32). Each layout runs in fresh processes, one per rank with one torch
thread each: ``warmup`` steps of ``loss`` forward+backward at a short length (they page in the
libraries' code without leaving a full-length heap behind), then ``steps`` measured ones at ``length``.
Per rank: the peak resident set of the process during the measured steps (kernel ``VmHWM``, reset before
them: the whole process, libraries, weights and gradients included), the resident set before them, the
peak of the live tensors (:class:`~reformer.bench.tensor_memory.TensorMemory`: what a GPU's allocator
would report, without the libraries and the C heap's slack), the median step time and the share of it
spent in collectives (the all-to-all exchanges, the loss all-reduces and the gradient sum; timed around
each call, so a rank's wait for a slower peer counts as communication). ``P = 1`` runs the plain model
and has no collectives.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from .memory import hwm_bytes, reset_hwm, rss_bytes
from .tensor_memory import TensorMemory
from .workloads import BUCKET, D_FF, D_MODEL, INPUT_SEED, MODEL_HASHES, N_HEADS, VOCAB

WARMUP_LENGTH = 1024


@contextmanager
def _timed_collectives(clock: dict[str, float]):
    """Add the seconds spent in the sequence-parallel collectives to ``clock["comm_s"]``."""
    import torch.distributed as dist

    from ..attention import sequence_shard

    def timed(fn: Callable) -> Callable:
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock["comm_s"] += time.perf_counter() - start

        return run

    saved = sequence_shard._exchange, dist.all_reduce, dist.all_gather
    sequence_shard._exchange = timed(saved[0])
    dist.all_reduce, dist.all_gather = timed(saved[1]), timed(saved[2])
    try:
        yield
    finally:
        sequence_shard._exchange, dist.all_reduce, dist.all_gather = saved


def _rank_main(rank: int, size: int, port: int, settings: dict[str, int], results) -> None:
    """One rank of one layout: build, warm up, measure; put its row on ``results``."""
    import torch.distributed as dist

    from ..config import ReformerConfig
    from ..models.lm import ReformerLM
    from ..parallel import SequenceParallelLM

    torch.set_num_threads(1)
    if size > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        torch.manual_seed(0)
        config = ReformerConfig(
            vocab_size=VOCAB, d_model=D_MODEL, n_heads=N_HEADS, n_layers=settings["layers"], d_ff=D_FF,
            bucket_size=BUCKET, n_hashes=MODEL_HASHES, max_seq_len=settings["length"], reversible=True,
        )  # fmt: skip
        model = ReformerLM(config).train()
        net = SequenceParallelLM(model) if size > 1 else model
        gen = torch.Generator().manual_seed(INPUT_SEED)
        ids = torch.randint(0, VOCAB, (1, settings["length"]), generator=gen)
        short = ids[:, : min(WARMUP_LENGTH, settings["length"])]

        def step(batch: torch.Tensor) -> None:
            model.zero_grad(set_to_none=True)
            net.loss(batch, batch.roll(-1, 1)).backward()
            if size > 1:
                net.sum_gradients()

        for _ in range(settings["warmup"]):
            step(short)
        clock = {"comm_s": 0.0}
        times, comm = [], []
        before = rss_bytes()
        reset_hwm()
        tensors = TensorMemory(existing=[*model.parameters(), ids, short])
        with _timed_collectives(clock), tensors:
            for _ in range(settings["steps"]):
                clock["comm_s"] = 0.0
                start = time.perf_counter()
                step(ids)
                times.append(time.perf_counter() - start)
                comm.append(clock["comm_s"])
        results.put(
            {
                "size": size,
                "rank": rank,
                "length": settings["length"],
                "layers": settings["layers"],
                "peak_mib": hwm_bytes() / 2**20,
                "before_mib": before / 2**20,
                "tensor_peak_mib": tensors.peak / 2**20,
                "step_s": statistics.median(times),
                "comm_s": statistics.median(comm),
            }  # fmt: skip
        )
    finally:
        if size > 1:
            dist.destroy_process_group()
    # The row is delivered (SimpleQueue writes it to the pipe before put returns). Skip the interpreter's
    # teardown: after gloo had run, torch's C++ exit-time destructors aborted the process ("terminate
    # called without an active exception", no Python frame) in about 1 run of 10-20.
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_layouts(
    length: int, layers: int = 6, sizes: Sequence[int] = (1, 2), steps: int = 1, warmup: int = 1
) -> list[dict[str, Any]]:
    """One row per rank of every layout in ``sizes`` (``1`` is the plain model in one process).

    Keys: ``size``, ``rank``, ``length``, ``layers``, ``peak_mib`` (the process's peak resident set over
    the measured steps), ``before_mib`` (its resident set before them), ``tensor_peak_mib`` (the peak of
    its live tensors over them), ``step_s`` and ``comm_s`` (medians over the measured steps; the
    live-tensor count runs during them, so they include its small per-operation cost).
    """
    import torch.multiprocessing as mp

    from ..attention.sequence_shard import check_heads

    for size in sizes:
        check_heads(N_HEADS, size)
        if length % size:
            raise ValueError(f"length {length} is not divisible by the sequence-parallel size {size}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = mp.get_context("spawn")
    settings = {"length": length, "layers": layers, "steps": steps, "warmup": warmup}
    rows: list[dict[str, Any]] = []
    for size in sizes:
        results = ctx.SimpleQueue()
        mp.spawn(_rank_main, args=(size, _free_port(), settings, results), nprocs=size)
        rows += sorted((results.get() for _ in range(size)), key=lambda r: r["rank"])
    return rows


def layout_table(rows: Sequence[dict[str, Any]]) -> str:
    """The per-rank rows and, per layout after the first, its worst rank's peaks over the first's: the
    process's resident set and the live tensors (the allocator's view, as on a GPU)."""
    lines = [
        f"{'P':>2} {'rank':>4} {'peak MiB':>9} {'before MiB':>10} {'tensors MiB':>11} {'step s':>8} "
        f"{'comm share':>10}"
    ]
    for r in rows:
        share = r["comm_s"] / r["step_s"] if r["step_s"] > 0 else 0.0
        lines.append(
            f"{r['size']:>2} {r['rank']:>4} {r['peak_mib']:>9.0f} {r['before_mib']:>10.0f} "
            f"{r['tensor_peak_mib']:>11.0f} {r['step_s']:>8.2f} {share:>10.1%}"
        )
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    for key, what in (("peak_mib", "process peak"), ("tensor_peak_mib", "live tensors")):
        worst = {s: max(r[key] for r in rows if r["size"] == s) for s in sizes}
        for size in sizes[1:]:
            lines.append(f"per-rank {what}, P={size} / P={sizes[0]}: {worst[size] / worst[sizes[0]]:.2f}")
    return "\n".join(lines)
