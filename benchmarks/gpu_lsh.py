"""One-shot GPU check and benchmark of the fused LSH attention (issue #7).

Run on a CUDA machine (no network needed; nothing is installed)::

    PYTHONPATH=src python3 benchmarks/gpu_lsh.py --out "$OUT" --budget-s 420

It prints and writes, incrementally, so that a timeout keeps what was measured:

1. ``env.json``: torch / triton / transformers / reformer-pytorch versions and the device.
2. ``correctness.json``: the Triton path against the PyTorch path on CUDA (float32 outputs and
   gradients to 1e-4 with the same buckets, the fused hash's sort indices, bfloat16/float16 errors
   against a float32 reference compared with the PyTorch path's own half-precision errors).
3. ``results.jsonl`` + ``table.md``: forward+backward of one attention layer with its projections
   (batch 1, d_model 256, 4 heads of 64, bucket 64, 4 hashes, causal, bfloat16) at 4K..1M tokens for
   exact SDPA (flash), HF transformers' LSH, reformer-pytorch, ours on the PyTorch path and ours on the
   Triton path; then a 12-layer LM (d_model 1024, d_ff 4096, 8 heads, LSH in every layer, 2 hashes,
   bf16 autocast, AdamW step) at 64K/256K/1M: step time, tokens/s, peak memory.

Each implementation runs in its own process (a fresh CUDA allocator, and a hard time cap); inside it
every length is guarded against OOM and skipped when the last length predicts it would pass the cap.
Times are the median of a few steps after one warm-up (``torch.cuda.synchronize`` around each);
memory is ``torch.cuda.max_memory_allocated`` over the warm-up and timed steps, inputs and weights
included.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

D_MODEL, N_HEADS, D_HEAD, BUCKET, ATTN_HASHES = 256, 4, 64, 64, 4
LENGTHS = (4096, 16384, 65536, 262144, 1048576)
LM_LENGTHS = (65536, 262144, 1048576)
ATTN_IMPLS = ("sdpa", "hf", "reformer_pytorch", "ours_torch", "ours_triton")
# Time growth per 4x length, to skip a length that would pass the cap: exact attention is quadratic.
GROWTH = {"sdpa": 16.0, "lm": 4.5}
DEFAULT_GROWTH = 5.0
MIB = 2**20


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _record_failure(record: dict, err: Exception) -> None:
    """Mark ``record`` as out of memory or as an error (with its message, and the traceback printed)."""
    if _is_oom(err):
        record.update(status="OOM")
    else:
        record.update(status="error", error=f"{type(err).__name__}: {str(err)[:300]}")
        traceback.print_exc()


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


# ---- attention layers (bfloat16, CUDA) ------------------------------------------------------------


class _Sdpa(nn.Module):
    """Exact causal attention (SDPA, flash) with the same projections as the LSH layers."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL, bias=False)
        self.out = nn.Linear(D_MODEL, D_MODEL, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, N_HEADS, D_HEAD).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class _HFLayer(nn.Module):
    def __init__(self, length: int) -> None:
        super().__init__()
        from transformers import ReformerConfig
        from transformers.models.reformer.modeling_reformer import LSHSelfAttention, ReformerSelfOutput

        pow2 = (2 * (length // BUCKET)).bit_length() - 1  # HF's own automatic choice
        limit = 2 * max(int((length // BUCKET) ** 0.5), BUCKET)
        n_buckets = [2 ** (pow2 // 2), 2 ** (pow2 - pow2 // 2)] if 2**pow2 > limit else 2**pow2
        config = ReformerConfig(
            hidden_size=D_MODEL, num_attention_heads=N_HEADS, attention_head_size=D_HEAD, attn_layers=["lsh"],
            lsh_attn_chunk_length=BUCKET, num_hashes=ATTN_HASHES, num_buckets=n_buckets, is_decoder=True,
            lsh_num_chunks_before=1, lsh_num_chunks_after=0, lsh_attention_probs_dropout_prob=0.0,
            hidden_dropout_prob=0.0, max_position_embeddings=length, use_cache=False,
        )  # fmt: skip
        self.attention = LSHSelfAttention(config, layer_idx=0)
        self.output = ReformerSelfOutput(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.attention(hidden_states=x).hidden_states)


def _attention_layer(impl: str, length: int) -> nn.Module:
    if impl == "sdpa":
        return _Sdpa()
    if impl == "hf":
        return _HFLayer(length)
    if impl == "reformer_pytorch":
        from reformer_pytorch import LSHSelfAttention

        return LSHSelfAttention(
            dim=D_MODEL, heads=N_HEADS, dim_head=D_HEAD, bucket_size=BUCKET, n_hashes=ATTN_HASHES,
            causal=True, attn_chunks=1, use_full_attn=False, full_attn_thres=0, num_mem_kv=0,
            n_local_attn_heads=0, dropout=0.0, post_attn_dropout=0.0,
        )  # fmt: skip
    from reformer import LSHSelfAttention

    backend = {"ours_torch": "torch", "ours_triton": "triton"}[impl]
    return LSHSelfAttention(
        d_model=D_MODEL,
        n_heads=N_HEADS,
        bucket_size=BUCKET,
        n_hashes=ATTN_HASHES,
        causal=True,
        key_rule="chunks",  # HF's rule and its automatic bucket count, as the peers run
        backend=backend,
    )


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_reset() -> int:
    """Reset the peak-memory counter; return the memory allocated now (0 without CUDA)."""
    if not torch.cuda.is_available():
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _peak() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _time_steps(step, cap_s: float) -> dict[str, Any]:
    """One warm-up, then up to 5 timed steps while the time spent stays under ``cap_s``."""
    _sync()
    t0 = time.perf_counter()
    step()
    _sync()
    warm = time.perf_counter() - t0
    times: list[float] = []
    spent = warm
    while len(times) < 5 and spent < cap_s:
        t0 = time.perf_counter()
        step()
        _sync()
        times.append(time.perf_counter() - t0)
        spent += times[-1]
    median = statistics.median(times) if times else warm
    return {
        "ms": median * 1e3,
        "times_ms": [t * 1e3 for t in times],
        "warmup_ms": warm * 1e3,
        "warmup_only": not times,
    }


def run_attention(impl: str, lengths: list[int], cap_s: float, out: Path, dev: torch.device) -> None:
    last: tuple[int, float] | None = None
    for length in lengths:
        record: dict[str, Any] = {"kind": "attention", "impl": impl, "length": length}
        if last is not None:
            growth = GROWTH.get(impl, DEFAULT_GROWTH) ** math.log(length / last[0], 4)
            if last[1] * growth * 2 > cap_s:
                record.update(status="skipped", note=f"predicted {last[1] * growth:.1f} s per step > cap")
                _append(out / "results.jsonl", record)
                print(json.dumps(record), flush=True)
                continue
        layer = x = g = None
        try:
            torch.manual_seed(0)
            layer = _attention_layer(impl, length).to(dev, torch.bfloat16).train()
            x = torch.randn(1, length, D_MODEL, device=dev, dtype=torch.bfloat16, requires_grad=True)
            g = torch.randn(1, length, D_MODEL, device=dev, dtype=torch.bfloat16)

            def step(layer=layer, x=x, g=g) -> None:
                y = layer(x)
                (y.float() * g).sum().backward()
                x.grad = None
                layer.zero_grad(set_to_none=True)

            before = _peak_reset()
            record.update(status="ok", **_time_steps(step, cap_s))
            peak = _peak()
            record.update(peak_mib=peak / MIB, peak_above_inputs_mib=(peak - before) / MIB)
            last = (length, record["ms"] / 1e3)
        except Exception as err:  # noqa: BLE001 - every failure is a table cell
            _record_failure(record, err)
            last = (length, float("inf"))
        del layer, x, g
        _free()
        _append(out / "results.jsonl", record)
        print(json.dumps(record), flush=True)


# ---- 12-layer LM ----------------------------------------------------------------------------------


def run_lm(backend: str, lengths: list[int], cap_s: float, out: Path, dev: torch.device) -> None:
    import reformer
    from reformer.attention import lsh as lsh_module

    dtypes: dict[str, int] = {}
    original = lsh_module.lsh_attention

    def counting(qk, v, **kw):  # which dtype reaches the attention (autocast, reversible recompute)
        dtypes[str(qk.dtype)] = dtypes.get(str(qk.dtype), 0) + 1
        return original(qk, v, **kw)

    lsh_module.lsh_attention = counting
    # The reversible backward recomputes the layers outside autocast (float32): allow TF32 there.
    torch.set_float32_matmul_precision("high")
    last: tuple[int, float] | None = None
    for length in lengths:
        record: dict[str, Any] = {"kind": "lm", "impl": f"lm_{backend}", "length": length}
        if last is not None and last[1] * GROWTH["lm"] ** math.log(length / last[0], 4) * 2 > cap_s:
            record.update(status="skipped", note="predicted step time > cap")
            _append(out / "results.jsonl", record)
            print(json.dumps(record), flush=True)
            continue
        model = opt = None
        dtypes.clear()
        try:
            torch.manual_seed(0)
            config = reformer.ReformerConfig(
                vocab_size=256, d_model=1024, n_heads=8, n_layers=12, d_ff=4096, attn_layers=("lsh",) * 12,
                bucket_size=BUCKET, n_hashes=2, causal=True, max_seq_len=length,
            )  # fmt: skip
            model = reformer.ReformerLM(config).to(dev).train()
            for module in model.modules():
                if isinstance(module, reformer.LSHSelfAttention):
                    module.backend = backend
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            ids = torch.randint(0, 256, (1, length + 1), device=dev)

            def step(model=model, opt=opt, ids=ids) -> None:
                with torch.autocast(dev.type, dtype=torch.bfloat16):
                    loss = model.loss(ids[:, :-1], ids[:, 1:])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            _peak_reset()
            record.update(status="ok", **_time_steps(step, cap_s))
            record.update(
                tokens_per_s=length / (record["ms"] / 1e3), peak_mib=_peak() / MIB,
                params_m=sum(p.numel() for p in model.parameters()) / 1e6, attention_dtypes=dict(dtypes),
                float32_matmul_precision=torch.get_float32_matmul_precision(),
            )  # fmt: skip
            last = (length, record["ms"] / 1e3)
        except Exception as err:  # noqa: BLE001 - every failure is a table cell
            _record_failure(record, err)
            last = (length, float("inf"))
        del model, opt
        _free()
        _append(out / "results.jsonl", record)
        print(json.dumps(record), flush=True)


# ---- correctness ------------------------------------------------------------------------------------


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def check_correctness(dev: torch.device, shrink: int = 1) -> dict[str, Any]:
    """Triton against PyTorch on ``dev``; ``shrink`` divides the lengths (a CPU dry run, interpreted)."""
    from reformer.attention.lsh import lsh_attention

    results: dict[str, Any] = {}

    def compare_fp32(name, batch, length, n_pad, **kw):
        gen = torch.Generator(device=dev).manual_seed(0)
        qk = torch.randn(batch, N_HEADS, length, D_HEAD, device=dev, generator=gen, requires_grad=True)
        v = torch.randn(batch, N_HEADS, length, D_HEAD, device=dev, generator=gen, requires_grad=True)
        mask = torch.ones(batch, length, dtype=torch.bool, device=dev)
        mask[-1, length - n_pad :] = False
        kw["hash_seed"] = 1  # the same rotations for both paths' own hashing
        kw.setdefault("key_rule", "chunks")  # the rule of the automatic bucket counts used here
        ref, idx = lsh_attention(qk, v, attention_mask=mask, backend="torch", return_sort_indices=True, **kw)
        out, own_idx = lsh_attention(
            qk, v, attention_mask=mask, backend="triton", return_sort_indices=True, **kw
        )  # its own hashing: the same buckets in float32 (IEEE products)
        out = lsh_attention(qk, v, attention_mask=mask, backend="triton", sort_indices=idx, **kw)
        w = torch.randn(ref.shape, device=dev, generator=gen) * mask[:, None, :, None]
        g_ref = torch.autograd.grad((ref * w).sum(), (qk, v))
        g_out = torch.autograd.grad((out * w).sum(), (qk, v))
        real = mask[:, None, :, None]
        errs = {
            "out": _max_err(out * real, ref * real),
            "dqk": _max_err(g_out[0], g_ref[0]),
            "dv": _max_err(g_out[1], g_ref[1]),
            "sort_rows_differing": int((own_idx != idx).any(-1).sum().item()),
        }
        ok = max(errs["out"], errs["dqk"], errs["dv"]) < 1e-4 * max(1.0, g_ref[0].abs().max().item())
        results[name] = {"pass": bool(ok), **errs}

    compare_fp32("fp32_causal_pad", 2, 3000 // shrink, 500 // shrink, bucket_size=64, n_hashes=4, causal=True)
    compare_fp32("fp32_noncausal_after", 1, 2050 // shrink, 0, bucket_size=32, n_hashes=2, n_chunks_after=1)
    compare_fp32(
        "fp32_1round_factorised",
        1,
        8192 // shrink,
        0,
        bucket_size=64,
        n_hashes=1,
        n_buckets=(8, 32),
        causal=True,
    )

    for dtype in (torch.bfloat16, torch.float16):
        gen = torch.Generator(device=dev).manual_seed(1)
        length = 16384 // shrink
        qk = torch.randn(1, N_HEADS, length, D_HEAD, device=dev, generator=gen).to(dtype).requires_grad_(True)
        v = torch.randn(1, N_HEADS, length, D_HEAD, device=dev, generator=gen).to(dtype).requires_grad_(True)
        kw = dict(bucket_size=64, n_hashes=4, causal=True, key_rule="chunks")
        half, idx = lsh_attention(qk, v, backend="torch", return_sort_indices=True, **kw)
        fused = lsh_attention(qk, v, backend="triton", sort_indices=idx, **kw)
        q32, v32 = (t.detach().float().requires_grad_(True) for t in (qk, v))
        exact = lsh_attention(q32, v32, backend="torch", sort_indices=idx, **kw)
        w = torch.randn(exact.shape, device=dev, generator=gen)
        ge = torch.autograd.grad((exact * w).sum(), (q32, v32))
        gh = torch.autograd.grad((half * w.to(dtype)).sum(), (qk, v))
        gf = torch.autograd.grad((fused * w.to(dtype)).sum(), (qk, v))
        entry: dict[str, Any] = {}
        ok = True
        triples = (("out", fused, half, exact), ("dqk", gf[0], gh[0], ge[0]), ("dv", gf[1], gh[1], ge[1]))
        for name, f_, h_, e_ in triples:
            ef, eh = _max_err(f_, e_), _max_err(h_, e_)
            entry[name] = {"triton_err": ef, "torch_err": eh, "scale": e_.abs().max().item()}
            ok &= ef <= 2 * eh + 1e-2 * e_.abs().max().item()
        results[str(dtype).replace("torch.", "")] = {"pass": bool(ok), **entry}
    return results


# ---- driver --------------------------------------------------------------------------------------


def write_table(out: Path) -> str:
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return "-"
        if r["status"] == "ok":
            return f"{r['ms']:.2f} ms / {r['peak_mib']:.0f} MiB"
        if r["status"] == "unavailable":
            return "not installed"
        return r["status"]

    impls = [i for i in ATTN_IMPLS if any(r["impl"] == i for r in records)]
    lines = [
        "Attention layer fwd+bwd, bf16, batch 1, d_model 256, 4x64 heads, bucket 64, 4 hashes, causal "
        "(median ms / peak allocated MiB incl. inputs)",
        "",
        "| impl | " + " | ".join(f"{n // 1024}K" for n in LENGTHS) + " |",
        "|---|" + "---|" * len(LENGTHS),
    ]
    for impl in impls:
        by_len = {r["length"]: r for r in records if r["impl"] == impl}
        if any(r["status"] == "unavailable" for r in by_len.values()):
            lines.append(f"| {impl} | " + " | ".join("not installed" for _ in LENGTHS) + " |")
            continue
        lines.append(f"| {impl} | " + " | ".join(cell(by_len.get(n)) for n in LENGTHS) + " |")
    lm = [r for r in records if r["kind"] == "lm"]
    if lm:
        lines += [
            "",
            "12-layer LM (d_model 1024, d_ff 4096, 8 heads, LSH x12, 2 hashes, bf16 autocast, AdamW), "
            "one sequence per step",
            "",
            "| impl | length | step ms | tokens/s | peak MiB | attention dtypes |",
            "|---|---|---|---|---|---|",
        ]
        for r in lm:
            if r["status"] == "ok":
                lines.append(
                    f"| {r['impl']} | {r['length'] // 1024}K | {r['ms']:.0f} | {r['tokens_per_s']:.0f} | "
                    f"{r['peak_mib']:.0f} | {r.get('attention_dtypes')} |"
                )
            else:
                lines.append(f"| {r['impl']} | {r['length'] // 1024}K | {r['status']} | | | |")
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    return table


def child(args: argparse.Namespace, out: Path) -> None:
    kind, impl = args.child.split(":")
    lengths = [int(n) for n in args.lengths.split(",")]
    if kind == "attn":
        module = {"hf": "transformers", "reformer_pytorch": "reformer_pytorch"}.get(impl)
        if module is not None and _version(module.replace("_", "-")) == "not installed":
            for n in lengths:
                record = {"kind": "attention", "impl": impl, "length": n, "status": "unavailable"}
                _append(out / "results.jsonl", record)
            print(f"{impl}: not installed", flush=True)
            return
        run_attention(impl, lengths, args.cap_s, out, torch.device(args.device))
    else:
        run_lm(impl, lengths, args.cap_s, out, torch.device(args.device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_lsh_out")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget of the whole run")
    parser.add_argument("--cap-s", type=float, default=25.0, help="time cap of one configuration")
    parser.add_argument("--impls", default=",".join(ATTN_IMPLS))
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--lm-lengths", default=",".join(map(str, LM_LENGTHS)))
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script (small lengths)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.child:
        child(args, out)
        return

    start = time.perf_counter()
    (out / "results.jsonl").write_text("")
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_lsh.py needs a CUDA device (or --device cpu for a dry run)")
    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
        "sms": torch.cuda.get_device_properties(0).multi_processor_count if dev.type == "cuda" else 0,
        **{name: _version(name) for name in ("triton", "transformers", "reformer-pytorch")},
    }
    (out / "env.json").write_text(json.dumps(env, indent=1))
    print("env:", json.dumps(env), flush=True)

    if not args.skip_correctness:
        t0 = time.perf_counter()
        try:
            correctness = check_correctness(dev, shrink=1 if dev.type == "cuda" else 16)
        except Exception as err:  # noqa: BLE001 - record and go on to the table
            traceback.print_exc()
            correctness = {"error": f"{type(err).__name__}: {err}"}
        correctness["seconds"] = time.perf_counter() - t0
        (out / "correctness.json").write_text(json.dumps(correctness, indent=1))
        print("correctness:", json.dumps(correctness, indent=1), flush=True)
        _free()

    jobs = [(f"attn:{i}", args.lengths) for i in args.impls.split(",") if i]
    jobs += [("lm:triton", args.lm_lengths), ("lm:torch", args.lm_lengths.split(",")[0])]
    for n, (job, lengths) in enumerate(jobs):
        left = args.budget_s - (time.perf_counter() - start)
        share = left / (len(jobs) - n) * (2.0 if job.startswith("lm:triton") else 1.0)
        timeout = max(10.0, min(left - 5, share + 60))
        if left < 15:
            print(f"{job}: skipped, budget spent", flush=True)
            continue
        print(f"== {job} (timeout {timeout:.0f} s)", flush=True)
        cmd = [sys.executable, __file__, "--child", job, "--lengths", lengths, "--out", str(out)]
        cmd += ["--cap-s", str(args.cap_s), "--device", args.device]
        try:
            subprocess.run(cmd, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            print(f"{job}: timed out after {timeout:.0f} s", flush=True)
        print(write_table(out), flush=True)
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
