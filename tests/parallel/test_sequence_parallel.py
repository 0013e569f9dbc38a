"""Sequence parallelism over gloo processes equals one process on the same batch.

Oracle: the same model (same weights, same RNG state) run in one process. Each spawned rank runs both
and compares every public differentiable output (the logits and the loss) and every parameter's gradient
through each of them (fp32, 1e-5): the model's loss, and a user's own loss on the logits.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from reformer import ReformerConfig, ReformerLM
from reformer.parallel import SequenceParallelLM
from reformer.train.checkpoints import checkpoint_dirs

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
    # A user's own loss on the logits: its gradient flows back through the all-gather of the logits
    # (and the real-tokens-first reordering), which the model's loss below never takes.
    weights = torch.randn(logits_one.shape, generator=gen)
    if mask is not None:
        weights = weights * mask[..., None]  # padding positions' logits are not compared either

    def user_loss(logits):
        return (logits * weights).mean() + (logits.logsumexp(-1) * weights[..., 0]).square().mean()

    user_loss(logits_one).backward()
    user_loss(logits_sp).backward()
    sp.sum_gradients()
    _assert_same_gradients(single, parallel, "user loss on the logits")
    for model in (single, sp):
        model.zero_grad()
    torch.manual_seed(6)
    loss_one = single.loss(ids, targets, mask)
    loss_one.backward()
    torch.manual_seed(6)
    loss_sp = sp(ids, mask, targets=targets)
    loss_sp.backward()
    sp.sum_gradients()
    torch.testing.assert_close(loss_sp, loss_one, rtol=1e-5, atol=1e-5)
    _assert_same_gradients(single, parallel, "the model's loss")


def _assert_same_gradients(single, parallel, what) -> None:
    for (name, p_one), p_sp in zip(single.named_parameters(), parallel.parameters(), strict=True):
        assert p_one.grad is not None, name
        torch.testing.assert_close(
            p_sp.grad, p_one.grad, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{what}, {n}: {m}"
        )


def _sgd_step(net, model, ids) -> None:
    """One plain SGD step on ``loss(ids, ids.roll(-1, 1))``, so that saved weights are not the seed's."""
    model.zero_grad()
    net.loss(ids, ids.roll(-1, 1)).backward()
    if isinstance(net, SequenceParallelLM):
        net.sum_gradients()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad


def _check_checkpoints(folder: str) -> None:
    """A checkpoint written from a sequence-parallel model loads in one process and gives its logits,
    and one written by a single process loads into a sequence-parallel model."""
    cfg = _config(("lsh", "local", "full"), True, True)
    ids = torch.randint(0, 50, (2, 45), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(11)
    sp = SequenceParallelLM(ReformerLM(cfg))
    assert sp.state_dict().keys() == ReformerLM(cfg).state_dict().keys()
    _sgd_step(sp, sp.model, ids)
    if dist.get_rank() == 0:
        sp.model.save_pretrained(f"{folder}/from_sp")
        torch.manual_seed(12)
        single = ReformerLM(cfg)
        _sgd_step(single, single, ids)
        single.save_pretrained(f"{folder}/from_one")
    dist.barrier()
    for saved_by in ("from_sp", "from_one"):
        one = ReformerLM.from_pretrained(f"{folder}/{saved_by}").eval()
        split = SequenceParallelLM(ReformerLM.from_pretrained(f"{folder}/{saved_by}")).eval()
        if saved_by == "from_sp":
            for name, p in one.named_parameters():
                torch.testing.assert_close(p, dict(sp.model.named_parameters())[name], rtol=0, atol=0)
        with torch.no_grad():
            torch.testing.assert_close(split(ids), one(ids), rtol=1e-5, atol=1e-5)


def _worker(rank: int, world: int, port: int, cases, errors, folder=None) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for case in cases:
            _run_case(case, None)
        if folder is not None:
            _check_checkpoints(folder)
        with pytest.raises(
            ValueError, match=f"n_heads=3 is not divisible by the sequence-parallel size {world}"
        ):
            SequenceParallelLM(ReformerLM(_config(("lsh",), True, True, n_heads=3, d_model=24)))
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()
    # Passed: leave without the interpreter's teardown, where torch's exit-time destructors after gloo
    # occasionally abort the process (SIGABRT, seen in the bench's rank workers; see bench/sequence_parallel).
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, cases, folder=None) -> None:
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.spawn(_worker, args=(world, _free_port(), cases, errors, folder), nprocs=world)
    except Exception:
        messages = []
        while not errors.empty():
            messages.append(errors.get())
        pytest.fail("\n".join(messages) or "a sequence-parallel worker failed")


def test_two_gloo_ranks_equal_one_process_and_share_checkpoints(tmp_path):
    _spawn(2, CASES, str(tmp_path))


@pytest.mark.slow
def test_four_gloo_ranks_equal_one_process():
    _spawn(4, CASES[:2])


FLAGS = [
    "--d-model", "32", "--n-heads", "2", "--n-layers", "2", "--d-ff", "64", "--bucket-size", "8",
    "--attn-layers", "local,lsh", "--seq-len", "63", "--batch-size", "2", "--no-progress", "--no-sample",
    "--device", "cpu", "--eval-every", "1", "--eval-batches", "1",
]  # fmt: skip


def _reformer(*args: str, processes: int = 1, env=None) -> None:
    launcher = [sys.executable, "-m", "reformer"]
    if processes > 1:
        port = str(_free_port())
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                    "--master-addr", "127.0.0.1", "--master-port", port, "-m", "reformer"]  # fmt: skip
    done = subprocess.run([*launcher, "train", *args, *FLAGS], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow  # four launches, about 90 s on two busy cores
def test_train_sequence_parallel_equals_one_process_and_resumes_across_layouts(tmp_path):
    """`reformer train --sequence-parallel 2` trains the weights one process trains, and a run resumes in
    the other layout: 2 steps in one layout + 1 step in the other agree both ways round."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    env = {**os.environ, "REFORMER_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(sys.path)}  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    _reformer("--data", str(corpus), "--steps", "2", "--out", str(one), env=env)
    sp = ["--sequence-parallel", "2"]
    _reformer("--data", str(corpus), "--steps", "2", "--out", str(two), *sp, processes=2, env=env)
    first, second = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=0, atol=2e-6, msg=name)
    _reformer("--out", str(one), "--resume", "--steps", "3", *sp, processes=2, env=env)
    _reformer("--out", str(two), "--resume", "--steps", "3", env=env)
    first, second = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    state = json.loads((checkpoint_dirs(one)[-1] / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["sequence_parallel"] == 2
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=0, atol=2e-6, msg=name)


def test_torchrun_on_cuda_takes_the_local_rank_gpu_and_nccl(monkeypatch):
    """Under torchrun with CUDA present each process takes GPU LOCAL_RANK and NCCL (no GPU here: the
    CUDA and process-group calls are recorded, not made)."""
    from reformer.train import distributed
    from reformer.train.config import TrainingError

    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.setdefault("set_device", index))
    monkeypatch.setattr(distributed.torch_dist, "is_initialized", lambda: False)
    monkeypatch.setattr(
        distributed.torch_dist, "init_process_group", lambda backend: calls.setdefault("backend", backend)
    )
    monkeypatch.setattr(distributed.torch_dist, "get_rank", lambda: 3)
    monkeypatch.setattr(distributed.torch_dist, "get_world_size", lambda: 4)
    for device in (None, "cuda"):
        calls.clear()
        place = distributed.Distributed.setup(device)
        assert place.device == torch.device("cuda", 3) and (place.rank, place.world_size) == (3, 4)
        assert calls == {"set_device": 3, "backend": "nccl"}
    with pytest.raises(TrainingError, match="--device cuda:0 names one GPU for all 4 processes"):
        distributed.Distributed.setup("cuda:0")
    calls.clear()
    assert distributed.Distributed.setup("cpu").device == torch.device("cpu")
    assert calls == {"backend": "gloo"}


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--sequence-parallel", "2"], "add --what model"),
        (
            ["--what", "model", "--sequence-parallel", "3"],
            "--sequence-parallel 3 must be 2 or more and divide",
        ),
        (
            ["--what", "model", "--sequence-parallel", "2", "--lengths", "1001"],
            "--lengths 1001 is not divisible",
        ),
        (["--what", "model", "--sequence-parallel", "2", "--device", "cuda"], "runs CPU processes over gloo"),
    ],
)
def test_bench_sequence_parallel_bad_arguments_name_the_value(argv, needle, capsys):
    from reformer import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", *argv])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.slow  # three spawned processes
def test_bench_sequence_parallel_reports_every_rank(tmp_path, capsys):
    from reformer import cli

    path = tmp_path / "rows.json"
    argv = ["bench", "--what", "model", "--sequence-parallel", "2", "--lengths", "512", "--layers", "1"]
    assert cli.main([*argv, "--repeats", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "per-rank process peak, P=2 / P=1:" in out and "per-rank live tensors, P=2 / P=1:" in out
    rows = json.loads(path.read_text())["rows"]
    assert [(r["size"], r["rank"]) for r in rows] == [(1, 0), (2, 0), (2, 1)]
    for r in rows:
        assert r["length"] == 512 and r["peak_mib"] >= r["before_mib"] > 0 and r["step_s"] > 0
        assert 0 < r["tensor_peak_mib"] < r["peak_mib"]
        assert (r["comm_s"] > 0) == (r["size"] == 2)
