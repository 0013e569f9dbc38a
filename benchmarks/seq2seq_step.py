"""Peak tensor memory and time of one encoder-decoder training step (loss, forward + backward).

Memory: the peak of live CPU tensors (:class:`reformer.bench.tensor_memory.TensorMemory`, what
``torch.cuda.max_memory_allocated`` would report on a GPU; the weights are not counted) during the
forward pass and during ``loss.backward()``, for a source and a target of ``L`` tokens each: of the whole
step (``step_*``) and of the decoder alone on a fixed encoder output that requires grad (``decoder_*``).
The numbers are exact and do not depend on the machine's load. Time: the median of ``--repeats`` steps
after one warm-up step, at ``--time-length`` (0: no timing).

The model: an encoder and a decoder of ``--layers`` layers each with LSH self-attention, LSH
cross-attention, ``d_model`` 256, ``--d-ff`` (default 1024) and ``--ff-chunk-size`` (default 4096, the
library's), in training mode with dropout 0.1. Each length prints one JSON line.

    PYTHONPATH=src python benchmarks/seq2seq_step.py --lengths 4096 8192 --time-length 4096
    PYTHONPATH=src python benchmarks/seq2seq_step.py --lengths 2048 4096 --d-ff 4096 --ff-chunk-size 512
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

MIB = 2**20


def build(length: int, layers: int, ff_chunk_size: int | None, d_ff: int = 1024):
    """A seeded encoder-decoder for sources and targets of ``length`` tokens, and one random batch."""
    from reformer.config import ReformerConfig
    from reformer.models.seq2seq import ReformerEncoderDecoder, Seq2SeqConfig

    common = dict(
        vocab_size=256, d_model=256, n_heads=4, d_ff=d_ff, n_layers=layers, attn_layers=("lsh",) * layers,
        max_seq_len=length, axial_pos_shape=(length,), axial_pos_dims=(256,), bucket_size=64, n_hashes=2,
        ff_chunk_size=ff_chunk_size, dropout=0.1,
    )  # fmt: skip
    encoder = ReformerConfig(causal=False, **common)
    decoder = ReformerConfig(causal=True, **common)
    torch.manual_seed(0)
    model = ReformerEncoderDecoder(Seq2SeqConfig(encoder, decoder, cross_attention="lsh")).train()
    g = torch.Generator().manual_seed(1)
    source, target = (torch.randint(1, 256, (1, length), generator=g) for _ in range(2))
    return model, source, target


def _peaks(model, loss_fn) -> tuple[float, float, float]:
    """MiB: the forward's peak, the backward's peak, and what the backward adds to the forward's output."""
    from reformer.bench.tensor_memory import TensorMemory

    loss_fn().backward()  # warm-up: lazy buffers and caches exist before counting
    model.zero_grad(set_to_none=True)
    with TensorMemory(existing=[*model.parameters(), *model.buffers()]) as mem:
        loss = loss_fn()
        forward_peak, at_backward = mem.peak, mem.live
        mem.peak = mem.live
        loss.backward()
        backward_peak = mem.peak
    return (
        round(forward_peak / MIB, 2),
        round(backward_peak / MIB, 2),
        round((backward_peak - at_backward) / MIB, 2),
    )  # fmt: skip


def peak_memory(length: int, layers: int, ff_chunk_size: int | None, d_ff: int) -> dict:
    """Peak live tensor MiB of one training step (``step_*``) and of the decoder stack alone
    (``decoder_*``: the decoder's hidden states for a fixed encoder output that requires grad)."""
    model, source, target = build(length, layers, ff_chunk_size, d_ff)
    step = _peaks(model, lambda: model.loss(source, target))
    with torch.no_grad():
        memory, _ = model.encode(source)
    memory.requires_grad_(True)
    decoder = _peaks(model, lambda: model.decode(memory, None, target).float().pow(2).mean())
    names = ("forward_peak_mib", "backward_peak_mib", "backward_added_mib")
    return {
        **{f"step_{k}": v for k, v in zip(names, step, strict=True)},
        **{f"decoder_{k}": v for k, v in zip(names, decoder, strict=True)},
    }


def step_time(length: int, layers: int, ff_chunk_size: int | None, d_ff: int, repeats: int) -> float:
    """Median seconds of one training step (loss, backward) after a warm-up step."""
    model, source, target = build(length, layers, ff_chunk_size, d_ff)
    times = []
    for _ in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model.loss(source, target).backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lengths", type=int, nargs="*", default=[4096, 8192], help="lengths to measure memory at"
    )
    parser.add_argument("--layers", type=int, default=2, help="layers of the encoder and of the decoder")
    parser.add_argument("--ff-chunk-size", type=int, default=4096)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--time-length", type=int, default=0, help="length to time (0: no timing)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--label", default="", help="a name printed with every line")
    args = parser.parse_args()
    for length in args.lengths:
        row = {
            "label": args.label,
            "length": length,
            **peak_memory(length, args.layers, args.ff_chunk_size, args.d_ff),
        }
        print(json.dumps(row), flush=True)
    if args.time_length:
        seconds = step_time(args.time_length, args.layers, args.ff_chunk_size, args.d_ff, args.repeats)
        row = {"label": args.label, "time_length": args.time_length, "step_s": round(seconds, 4)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
