"""Sequence parallelism over gloo processes equals one process on the same batch.

Oracle: the same model (same weights, same RNG state) run in one process. Each spawned rank runs both
and compares logits, loss and every parameter's gradient (fp32, 1e-5).
"""

from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from reformer import ReformerConfig, ReformerLM
from reformer.parallel import SequenceParallelLM

CASES = [
    # (attention layers, reversible, causal, length, padding holes, train mode)
    (("lsh", "local", "full", "lsh"), True, True, 37, False, True),
    (("lsh", "local", "full", "lsh"), False, True, 40, True, True),
    (("local", "lsh", "full", "lsh"), True, False, 51, True, False),
    (("lsh", "lsh", "local", "full"), False, False, 64, False, True),
]


def _config(layers, reversible, causal, n_heads=4, d_model=32) -> ReformerConfig:
    return ReformerConfig(
        vocab_size=50, d_model=d_model, n_heads=n_heads, n_layers=len(layers), d_ff=64, bucket_size=8,
        n_hashes=2, max_seq_len=128, local_chunk_size=8, attn_layers=layers, causal=causal,
        reversible=reversible, initializer_range=0.2, dropout=0.0, attn_dropout=0.0,
    )  # fmt: skip


def _run_case(case, group) -> None:
    layers, reversible, causal, length, holes, train = case
    torch.manual_seed(0)
    cfg = _config(layers, reversible, causal)
    single = ReformerLM(cfg)
    parallel = ReformerLM(cfg)
    parallel.load_state_dict(single.state_dict())
    sp = SequenceParallelLM(parallel, group)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (2, length), generator=gen)
    targets = torch.randint(0, 50, (2, length), generator=gen)
    mask = None
    if holes:
        mask = torch.ones(2, length, dtype=torch.long)
        mask[0, 3:7] = 0
        mask[1, -9:] = 0
    single.train(train)
    sp.train(train)
    for model in (single, sp):
        model.zero_grad()
    torch.manual_seed(5)
    logits_one = single(ids, mask)
    torch.manual_seed(5)
    logits_sp = sp(ids, mask)
    real = slice(None) if mask is None else mask.bool()
    torch.testing.assert_close(logits_sp[real], logits_one[real], rtol=1e-5, atol=1e-5)
    torch.manual_seed(6)
    loss_one = single.loss(ids, targets, mask)
    loss_one.backward()
    torch.manual_seed(6)
    loss_sp = sp(ids, mask, targets=targets)
    loss_sp.backward()
    sp.sum_gradients()
    torch.testing.assert_close(loss_sp, loss_one, rtol=1e-5, atol=1e-5)
    for (name, p_one), p_sp in zip(single.named_parameters(), parallel.parameters(), strict=True):
        assert p_one.grad is not None, name
        torch.testing.assert_close(
            p_sp.grad, p_one.grad, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )


def _worker(rank: int, world: int, port: int, cases, errors) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for case in cases:
            _run_case(case, None)
        with pytest.raises(
            ValueError, match=f"n_heads=3 is not divisible by the sequence-parallel size {world}"
        ):
            SequenceParallelLM(ReformerLM(_config(("lsh",), True, True, n_heads=3, d_model=24)))
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, cases) -> None:
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.spawn(_worker, args=(world, _free_port(), cases, errors), nprocs=world)
    except Exception:
        messages = []
        while not errors.empty():
            messages.append(errors.get())
        pytest.fail("\n".join(messages) or "a sequence-parallel worker failed")


def test_two_gloo_ranks_equal_one_process():
    _spawn(2, CASES)
