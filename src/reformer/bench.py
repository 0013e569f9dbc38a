"""``reformer bench``: forward+backward time and peak memory of Reformer layers and models by length.

What is measured (``--what``):

* ``attention``: one self-attention layer with its projections (d_model 256, 4 heads of 64, causal), input
  ``x`` of shape ``(batch, L, 256)`` requiring grad, loss ``(layer(x) * g).sum()`` for a fixed random
  ``g``. Implementations: ``lsh-H`` (``reformer.LSHSelfAttention``, bucket 64, ``H`` hash rounds, one
  line per ``--hashes`` entry), ``local`` (``reformer.LocalSelfAttention``, chunk 128) and ``full``
  (``reformer.FullSelfAttention``: exact attention through SDPA).
* ``model``: ``reformer.ReformerLM`` (vocab 256, d_model 256, 4 heads, d_ff 1024, bucket 64, 2 hashes),
  ``model.loss(ids, ids)`` and its backward, reversible (``model-rev-N``) against ordinary residuals
  (``model-plain-N``) at each depth ``N`` of ``--layers``.
* ``--paper-figure``: the Reformer paper's speed figure (Kitaev et al. 2020, Figure 5 right): the
  attention layers above at a fixed 32K tokens per batch (batch = 32768 // L), full attention against
  LSH attention with 1/2/4/8 hashes, L from 1K to 32K.

Protocol: every configuration runs in a fresh Python subprocess (so that its peak memory is its own and a
hang can be cut off): build the module and inputs (train mode, dropout 0), take a memory baseline, run
one warm-up step and ``--repeats`` timed steps of forward+backward (gradients cleared before each); the
time is the median of the timed steps. Peak memory is MiB above the baseline: on CUDA
``torch.cuda.max_memory_allocated``; on CPU the larger of a 5 ms resident-set sampler and the kernel's
high-water mark ``VmHWM`` (reset after the baseline through ``/proc/self/clear_refs``). A configuration
that runs past ``--timeout`` seconds (start-up and build included), runs out of memory (on CPU the worker's
address space is capped at ``--mem-limit-gib``) or fails is recorded as such in its row and the sweep
goes on.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

MIB = 1024 * 1024
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
DEFAULT_TIMEOUT_S = 300.0
RESULT_TAG = "@@reformer-bench "


# ---- configurations ---------------------------------------------------------------------------------


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
    import reformer

    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    gen = torch.Generator().manual_seed(INPUT_SEED)
    torch.manual_seed(0)
    if cfg.kind == "model":
        config = reformer.ReformerConfig(
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
        model = reformer.ReformerLM(config).to(device=device, dtype=dtype).train()
        ids = torch.randint(0, VOCAB, (cfg.batch, cfg.length), generator=gen).to(device)
        grads: list[torch.Tensor] = list(model.parameters())

        def loss() -> torch.Tensor:
            return model.loss(ids, ids)

    else:
        if cfg.kind == "lsh":
            layer: torch.nn.Module = reformer.LSHSelfAttention(
                d_model=D_MODEL, n_heads=N_HEADS, bucket_size=BUCKET, n_hashes=cfg.hashes, causal=True
            )
        elif cfg.kind == "local":
            layer = reformer.LocalSelfAttention(D_MODEL, N_HEADS, chunk_size=LOCAL_CHUNK, causal=True)
        elif cfg.kind == "full":
            layer = reformer.FullSelfAttention(D_MODEL, N_HEADS, causal=True)
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


# ---- memory on CPU: resident set, sampled and the kernel's high-water mark ------------------------------

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Resident set size of this process in bytes (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE_SIZE


def hwm_bytes() -> int:
    """The kernel's peak resident set (``VmHWM``) of this process, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise KeyError("VmHWM is not in /proc/self/status")


def reset_hwm() -> bool:
    """Reset ``VmHWM`` to the current resident set; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def mem_total_bytes() -> int:
    """Physical memory of the machine in bytes (0 where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RssSampler:
    """Records the largest resident set seen every ``interval_s`` while active (a daemon thread)."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s, self.peak, self.samples = interval_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_bytes())
            self.samples += 1
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> RssSampler:
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def measure(step: Callable[[], None], repeats: int, device: str) -> dict[str, Any]:
    """One warm-up ``step()`` and ``repeats`` timed ones: median ms and peak MiB above the baseline."""
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gc.collect()
    if cuda:
        sync()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        baseline = rss_bytes()
        hwm_ok = reset_hwm()

    t0 = time.perf_counter()
    step()
    sync()
    warmup_ms = (time.perf_counter() - t0) * 1e3

    times: list[float] = []
    if cuda:
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        peak = torch.cuda.max_memory_allocated() - baseline
        how = "cuda max_memory_allocated"
    else:
        with RssSampler() as sampler:
            for _ in range(repeats):
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
        # Without a reset VmHWM holds the start-up peak, so only the sampler counts then.
        peak = max(sampler.peak, hwm_bytes()) if hwm_ok else sampler.peak
        peak -= baseline
        how = "rss sampler + VmHWM" if hwm_ok else "rss sampler"
    return {
        "ms": round(statistics.median(times), 3),
        "times_ms": [round(t, 3) for t in times],
        "warmup_ms": round(warmup_ms, 3),
        "peak_mib": round(max(peak, 0) / MIB, 2),
        "baseline_mib": round(baseline / MIB, 2),
        "memory": how,
    }


def _is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return (
        isinstance(err, MemoryError)
        or type(err).__name__ == "OutOfMemoryError"
        or "out of memory" in text
        or "can't allocate memory" in text
    )


def run_in_process(cfg: BenchConfig) -> dict[str, Any]:
    """Build and measure ``cfg`` in this process; returns ``status`` and the measurement (never raises
    for a failing configuration)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out: dict[str, Any] = {"threads": torch.get_num_threads()}
    try:
        if cfg.device.startswith("cuda:"):
            torch.cuda.set_device(torch.device(cfg.device))  # memory statistics follow this device
        step = build_step(cfg)
        out.update(measure(step, cfg.repeats, cfg.device), status="ok")
    except Exception as err:
        out.update(status="oom" if _is_oom(err) else "error", error=f"{type(err).__name__}: {err}")
    return out


def worker_main(argv: Sequence[str]) -> int:
    """Subprocess entry: ``python -m reformer.bench CONFIG_JSON MEM_LIMIT_GIB``; prints one result line."""
    cfg = BenchConfig(**json.loads(argv[0]))
    mem_limit_gib = float(argv[1]) if len(argv) > 1 else 0.0
    if mem_limit_gib > 0 and not cfg.device.startswith("cuda"):
        limit = int(mem_limit_gib * 1024**3)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    result = run_in_process(cfg)
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


# ---- the sweep (parent process) ---------------------------------------------------------------------


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


def base_row(cfg: BenchConfig) -> dict[str, Any]:
    return {
        "impl": cfg.impl,
        "what": cfg.what,
        "length": cfg.length,
        "batch": cfg.batch,
        "tokens": cfg.batch * cfg.length,
        "hashes": cfg.hashes,
        "layers": cfg.layers,
        "reversible": cfg.reversible,
        "dtype": cfg.dtype,
        "repeats": cfg.repeats,
        "ms": None,
        "peak_mib": None,
        "status": None,
    }


def run_config(cfg: BenchConfig, timeout_s: float, mem_limit_gib: float = 0.0) -> dict[str, Any]:
    """Measure ``cfg`` in a fresh subprocess; returns its row (``status`` says how it went)."""
    row = base_row(cfg)
    src = str(Path(__file__).resolve().parents[1])  # importable even when the package is not installed
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "reformer.bench", json.dumps(asdict(cfg)), str(mem_limit_gib)]
    row["loadavg_1m"] = round(os.getloadavg()[0], 2)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {**row, "status": "timeout", "error": f"over --timeout {timeout_s:g} s", "wall_s": timeout_s}
    row["wall_s"] = round(time.perf_counter() - start, 3)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return {**row, **json.loads(line[len(RESULT_TAG) :])}
    # No result line: the worker died; SIGKILL is most likely the kernel's out-of-memory killer.
    status = "oom-killed" if proc.returncode == -9 else "crashed"
    return {**row, "status": status, "error": f"exit code {proc.returncode}: {_tail(proc.stderr)}"}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str, threads: int) -> dict[str, Any]:
    from . import __version__

    return {
        "device": device,
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "threads": threads if threads > 0 else torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "mem_total_gib": round(mem_total_bytes() / 1024**3, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "reformer_version": __version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def sweep(
    configs: Sequence[BenchConfig],
    timeout_s: float,
    mem_limit_gib: float = 0.0,
    env: dict[str, Any] | None = None,
    progress: bool | None = None,
) -> list[dict[str, Any]]:
    """Run every configuration (a tqdm bar on stderr); rows carry the environment's device name,
    torch version and threads."""
    from tqdm.auto import tqdm

    env = env or environment(configs[0].device if configs else "cpu", configs[0].threads if configs else 0)
    shared = {k: env[k] for k in ("device", "device_name", "torch_version", "threads")}
    rows: list[dict[str, Any]] = []
    bar = tqdm(
        configs, desc="reformer bench", unit="config", disable=None if progress is None else not progress
    )
    # Without a terminal the bar is off; unless asked for silence, log one line per configuration instead.
    log_lines = progress is None and bar.disable
    for n, cfg in enumerate(bar, 1):
        label = f"{cfg.impl} L={cfg.length}" + (f" batch={cfg.batch}" if cfg.batch > 1 else "")
        bar.set_postfix_str(label)
        row = run_config(cfg, timeout_s, mem_limit_gib)
        rows.append({**row, **{k: row.get(k, v) for k, v in shared.items()}})
        if row["status"] == "ok":
            detail = f"{row['ms']:.1f} ms, {row['peak_mib']:.0f} MiB"
        else:
            detail = f"{row['status']}: {row.get('error', '')}"
        if log_lines or row["status"] != "ok":
            bar.write(f"[{n}/{len(configs)}] {label}: {detail}", file=sys.stderr)
    bar.close()
    return rows


# ---- output: table, JSON, plot ----------------------------------------------------------------------


def _impl_order(rows: Sequence[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        seen.setdefault(r["impl"], None)
    return list(seen)


def _sorted(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    order = {impl: i for i, impl in enumerate(_impl_order(rows))}
    return sorted(rows, key=lambda r: (order[r["impl"]], r["length"]))


def _ok(row: dict[str, Any]) -> bool:
    return row.get("status") == "ok"


def _fmt_time(ms: float, seconds: bool) -> str:
    if seconds:
        return f"{ms / 1e3:.3f}"
    return f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}"


def table(rows: Sequence[dict[str, Any]], markdown: bool = False, seconds: bool = False) -> str:
    """Rows grouped by implementation, shortest length first."""
    show_batch = any(r["batch"] != 1 for r in rows)
    headers = ["impl", "L", *(["batch"] if show_batch else []), "hashes", "layers"]
    headers += ["s/step" if seconds else "ms", "peak MiB", "status"]
    cells = []
    for r in _sorted(rows):
        line = [r["impl"], str(r["length"]), *([str(r["batch"])] if show_batch else [])]
        line += ["-" if r["hashes"] is None else str(r["hashes"]), str(r["layers"])]
        if _ok(r):
            line += [_fmt_time(r["ms"], seconds), f"{r['peak_mib']:.0f}", "ok"]
        else:
            line += ["-", "-", r["status"]]
        cells.append(line)
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]

    def fmt(line: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )

    return "\n".join([fmt(headers), fmt(["-" * w for w in widths]), *map(fmt, cells)])


def write_json(path: Path, rows: Sequence[dict[str, Any]], env: dict[str, Any], argv: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"environment": {**env, "argv": list(argv)}, "rows": list(rows)}
    path.write_text(json.dumps(doc, indent=2) + "\n")


def _length_label(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def plot(
    rows: Sequence[dict[str, Any]],
    path: Path,
    title: str,
    seconds: bool = False,
) -> None:
    """Log-log PNG: time (left) and peak memory (right) against length, one line per implementation.
    Failed points are left out and named in the legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

    fig = Figure(figsize=(11, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_time, ax_mem = fig.subplots(1, 2)
    lengths = sorted({r["length"] for r in rows})
    markers = "osD^v<>ph*"
    finished = any(_ok(r) and r["ms"] > 0 for r in rows)
    for i, impl in enumerate(_impl_order(rows)):
        mine = sorted((r for r in rows if r["impl"] == impl), key=lambda r: r["length"])
        ok = [r for r in mine if _ok(r) and r["ms"] > 0]
        failed = [f"{r['status']} at {_length_label(r['length'])}" for r in mine if not _ok(r)]
        label = impl + (f" ({', '.join(failed)})" if failed else "")
        xs = [r["length"] for r in ok]
        style = dict(marker=markers[i % len(markers)], linestyle="--" if impl == "full" else "-", label=label)
        ax_time.plot(xs, [r["ms"] / (1e3 if seconds else 1) for r in ok], **style)
        ax_mem.plot(xs, [max(r["peak_mib"], 1e-1) for r in ok], **style)
    for ax, ylabel in (
        (ax_time, "seconds per step" if seconds else "ms per forward+backward step"),
        (ax_mem, "peak memory above baseline (MiB)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(lengths, [_length_label(n) for n in lengths])
        ax.xaxis.set_minor_locator(NullLocator())
        ys = [y for line in ax.get_lines() for y in line.get_ydata()]
        if ys and max(ys) < 4 * min(ys):  # keep a narrow range from looking like a steep one
            mid = math.sqrt(min(ys) * max(ys))
            ax.set_ylim(mid / 2, mid * 2)
        if not finished:  # nothing to scale the axes by
            ax.set_xlim(lengths[0] / 1.5, lengths[-1] * 1.5)
            ax.set_ylim(1, 10)
            ax.text(0.5, 0.5, "no configuration finished", transform=ax.transAxes, ha="center")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_time.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


# ---- command line -----------------------------------------------------------------------------------


def _positive_ints(what: str, example: str) -> Callable[[str], list[int]]:
    def parse(text: str) -> list[int]:
        values = []
        for part in (p.strip() for p in text.split(",")):
            try:
                n = int(part)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"{part!r} is not an integer; give a comma list of positive integers, e.g. {example}"
                ) from None
            if n <= 0:
                raise argparse.ArgumentTypeError(
                    f"{n} is not a positive {what}; give a comma list of positive integers, e.g. {example}"
                )
            values.append(n)
        return values

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds, e.g. 300") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be more than 0 seconds, e.g. 300")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer, e.g. 3") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1, e.g. 3")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``reformer bench`` options."""
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    p.add_argument("--what", choices=("attention", "model"), default="attention", help="default: attention")
    p.add_argument(
        "--lengths",
        type=_positive_ints("length", "1024,4096"),
        default=None,
        help="comma list of sequence lengths (default: attention "
        f"{','.join(map(str, DEFAULT_ATTENTION_LENGTHS))}; "
        f"model {','.join(map(str, DEFAULT_MODEL_LENGTHS))})",
    )
    p.add_argument(
        "--hashes",
        type=_positive_ints("hash count", "1,2,4,8"),
        default=None,
        help=f"LSH hash rounds, one line each (attention; default {','.join(map(str, DEFAULT_HASHES))})",
    )
    p.add_argument(
        "--layers",
        type=_positive_ints("layer count", "2,6,12"),
        default=None,
        help=f"model depths (--what model; default {','.join(map(str, DEFAULT_LAYERS))})",
    )
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="default: float32")
    p.add_argument("--repeats", type=_positive_int, default=3, help="timed steps after 1 warm-up (median)")
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds per configuration, start-up included (default {DEFAULT_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads per configuration (0: torch default)"
    )
    p.add_argument(
        "--mem-limit-gib",
        type=float,
        default=round(0.8 * mem_total_bytes() / 1024**3, 1),
        help="CPU: address-space cap per configuration, so a blow-up is recorded as 'oom' (0: none; "
        "default 80%% of RAM)",
    )
    p.add_argument(
        "--paper-figure",
        action="store_true",
        help="the Reformer paper's speed figure: attention at 32768 tokens per batch (batch = 32768 // L), "
        "L = 1K..32K, full vs LSH with 1,2,4,8 hashes; writes paper_figure.png unless --plot is given",
    )
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the rows here")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE", help="write a log-log PNG here")
    p.add_argument("--markdown", type=Path, default=None, metavar="FILE", help="write the table as Markdown")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[BenchConfig]:
    """Check the options together and list the configurations (``parser.error`` on bad input)."""
    device = args.device
    if device != "cpu" and not (device == "cuda" or device.startswith("cuda:")):
        parser.error(f"--device {device!r} is unknown; use cpu or cuda (cuda:N for one GPU)")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            why = (
                f"torch {torch.__version__} is a CPU-only build"
                if torch.version.cuda is None
                else f"torch {torch.__version__} sees no GPU"
            )
            parser.error(f"--device {device}: CUDA is not available ({why}); use --device cpu")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            parser.error(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    common = dict(device=device, dtype=args.dtype, repeats=args.repeats, threads=args.threads)
    if args.paper_figure:
        if args.what != "attention" or args.layers is not None:
            parser.error("--paper-figure measures attention layers; drop --what model / --layers")
        lengths = args.lengths or list(PAPER_LENGTHS)
        too_long = [n for n in lengths if n > PAPER_TOKENS]
        if too_long:
            parser.error(
                f"--lengths {','.join(map(str, too_long))} is over the {PAPER_TOKENS} tokens per batch of "
                f"--paper-figure; use lengths up to {PAPER_TOKENS}"
            )
        hashes = args.hashes or list(DEFAULT_HASHES)
        return attention_configs(
            lengths, hashes, kinds=("full", "lsh"), tokens_per_batch=PAPER_TOKENS, **common
        )
    if args.what == "attention":
        if args.layers is not None:
            parser.error(f"--layers {','.join(map(str, args.layers))} applies to --what model only")
        return attention_configs(
            args.lengths or DEFAULT_ATTENTION_LENGTHS, args.hashes or DEFAULT_HASHES, **common
        )
    if args.hashes is not None:
        parser.error(
            f"--hashes {','.join(map(str, args.hashes))} applies to --what attention only "
            f"(the models use {MODEL_HASHES} hashes)"
        )
    return model_configs(args.lengths or DEFAULT_MODEL_LENGTHS, args.layers or DEFAULT_LAYERS, **common)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``reformer bench``: measure, print the table, write the JSON / plot / Markdown asked for."""
    configs = plan(args, parser)
    if args.paper_figure and args.plot is None:
        args.plot = Path("paper_figure.png")
    env = environment(args.device, args.threads)
    start = time.perf_counter()
    rows = sweep(configs, args.timeout, args.mem_limit_gib, env, progress=False if args.no_progress else None)
    wall_s = time.perf_counter() - start

    seconds = bool(args.paper_figure)
    first = configs[0]
    if args.paper_figure:
        title = (
            f"time per step at {PAPER_TOKENS} tokens per batch (batch = {PAPER_TOKENS}/L), "
            f"attention forward+backward"
        )
    elif first.what == "model":
        title = "ReformerLM loss forward+backward (d_model 256, d_ff 1024, 2 hashes), batch 1"
    else:
        title = "causal self-attention + projections forward+backward (d_model 256, 4 heads), batch 1"
    title += f"\n{env['device_name']}, {env['threads']} threads, torch {env['torch_version']}, {args.dtype}"

    memory = "cuda max_memory_allocated" if args.device.startswith("cuda") else "resident set"
    legend = (
        f"{title}\nmedian of {args.repeats} steps after 1 warm-up; "
        f"peak: MiB above the built-module baseline ({memory})"
    )
    print(legend)
    print(table(rows, seconds=seconds))
    print(f"{len(rows)} configurations in {wall_s:.0f} s")
    if args.json:
        write_json(args.json, rows, {**env, "wall_s": round(wall_s, 1)}, sys.argv)
        print(f"rows: {args.json}", file=sys.stderr)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table(rows, markdown=True, seconds=seconds) + "\n")
        print(f"markdown: {args.markdown}", file=sys.stderr)
    if args.plot:
        plot(rows, args.plot, title, seconds=seconds)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
