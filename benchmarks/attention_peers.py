"""Forward+backward time and peak memory of Reformer LSH attention against its peers, on CPU.

Sections (``--what``):

* ``attention``: one causal LSH self-attention layer with its projections (d_model 256, 4 heads of 64,
  bucket/chunk 64, 4 hashes), batch 1, input ``x`` of shape (1, L, 256) requiring grad,
  loss ``(layer(x) * g).sum()`` for a fixed random ``g``. Implementations: ``ours``
  (``reformer.LSHSelfAttention``), ``hf`` (transformers' ``LSHSelfAttention`` + ``ReformerSelfOutput``),
  ``reformer_pytorch`` (``reformer_pytorch.LSHSelfAttention``) and ``sdpa`` (exact causal attention:
  Linear(256, 768) -> ``scaled_dot_product_attention(is_causal=True)`` -> Linear(256, 256)).
  Default lengths 4K, 16K, 64K.
* ``model``: a 6-layer byte-level causal LM (d_model 256, d_ff 1024, 2 hashes, bucket 64), loss and
  backward, for ``ours`` (``reformer.ReformerLM``), ``hf`` (``ReformerModelWithLMHead``) and
  ``reformer_pytorch`` (``ReformerLM``). Default lengths 16K and 64K.
* ``depth``: ``ours`` LM at 2 and 12 layers at 16K; thanks to reversible layers the 12-layer peak
  should be at most 1.25x the 2-layer peak.

Protocol (``reformer.bench.protocol``, the one ``reformer bench`` follows): every (section,
implementation, length, layers) configuration runs in a fresh Python subprocess, so its peak memory is
its own. The worker builds the module and inputs (train mode, all dropout 0, torch's default thread
count unless ``--threads``), reads the baseline RSS, resets the kernel's VmHWM, runs one warm-up step
and then ``--repeats`` timed steps of forward+backward (gradients cleared between steps). Time is the
median of the timed steps. Peak memory is MiB above the baseline: the larger of a 5 ms RSS sampler over
the timed steps and VmHWM - baseline. A configuration that exceeds ``--timeout`` seconds, runs out of
memory (the worker's address space is capped at ``--mem-limit-gib``) or crashes is recorded as such and
the sweep goes on; an implementation that cannot be imported is recorded as ``unavailable``. RSS counts
freed memory that glibc keeps cached in its heap; ``--malloc mmap`` sets ``MALLOC_MMAP_THRESHOLD_`` in
the workers so RSS follows live tensor memory instead (steps get slower, so read its times with care).

Peer settings chosen for comparability: HF's ``num_buckets`` is fixed to what HF itself would pick
automatically (2 * L / 64 rounded to a power of two, factorised into two factors above its limit),
which keeps HF from rewriting its config on the first call; the peers' LMs chunk the feed-forward in
``--ff-chunk`` tokens and use axial position embeddings of the shape ``ours`` picks by default.
reformer_pytorch always uses L / 64 buckets (one per chunk) and shares QK; it needs L % 128 == 0.

Run (from the repository root, after ``pip install -e '.[bench]'``)::

    python benchmarks/attention_peers.py                       # everything, defaults above
    python benchmarks/attention_peers.py --what attention --lengths 4096 --impls hf,sdpa --repeats 1
    python benchmarks/attention_peers.py --json runs/peers.json --markdown runs/peers.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from reformer.bench import mem_total_bytes
from reformer.bench.protocol import emit_result, is_oom, limit_memory, measure, run_worker

D_MODEL = 256
N_HEADS = 4
D_HEAD = 64
BUCKET = 64
ATTN_HASHES = 4
LM_HASHES = 2
LM_LAYERS = 6
D_FF = 1024
VOCAB = 256
INPUT_SEED = 1234

SECTIONS = ("attention", "model", "depth")
DEFAULT_LENGTHS = {"attention": (4096, 16384, 65536), "model": (16384, 65536), "depth": (16384,)}
DEFAULT_DEPTH_LAYERS = (2, 12)
DEPTH_TARGET = 1.25


# ---- configurations and their results ------------------------------------------------------------


@dataclass
class Spec:
    """One configuration to measure; ``layers`` is 1 for the attention section."""

    section: str
    impl: str
    length: int
    layers: int = 1
    ff_chunk: int = 4096


@dataclass
class Case:
    """A built configuration: ``loss()`` runs the forward pass; ``grads`` are cleared between steps."""

    loss: Callable[[], torch.Tensor]
    grads: list[torch.Tensor]
    notes: dict[str, Any] = field(default_factory=dict)


class UnsupportedLength(ValueError):
    """The implementation cannot run this length (e.g. not a multiple of its chunk size)."""


def _require_multiple(length: int, multiple: int, who: str) -> None:
    if length % multiple:
        raise UnsupportedLength(f"{who} needs the length to be a multiple of {multiple}, got {length}")


def hf_num_buckets(length: int, max_positions: int) -> int | list[int]:
    """The value HF's ``LSHSelfAttention._set_num_buckets`` would choose for this length."""
    pow2 = (2 * (length // BUCKET)).bit_length() - 1
    limit = 2 * max(int((max_positions // BUCKET) ** 0.5), BUCKET)
    if 2**pow2 > limit:
        return [2 ** (pow2 // 2), 2 ** (pow2 - pow2 // 2)]
    return 2**pow2


def axial_shape(length: int) -> tuple[int, int]:
    """Two axes near sqrt(length) with product exactly ``length`` (65536 -> (256, 256))."""
    first = 1 << (math.ceil(math.log2(length)) // 2)
    if length % first:
        raise UnsupportedLength(f"no power-of-two axial shape has product {length}")
    return first, length // first


def ff_chunk_tokens(spec: Spec) -> int:
    """The peers' feed-forward chunk: ``--ff-chunk`` tokens, shrunk to a divisor of the length."""
    return math.gcd(spec.ff_chunk, spec.length)


def _inputs(length: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(INPUT_SEED)
    x = torch.randn(1, length, D_MODEL, generator=gen).requires_grad_(True)
    g = torch.randn(1, length, D_MODEL, generator=gen)
    return x, g


def _tokens(length: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(INPUT_SEED)
    ids = torch.randint(0, VOCAB, (1, length), generator=gen)
    targets = torch.randint(0, VOCAB, (1, length), generator=gen)
    return ids, targets


def _attention_case(layer: nn.Module, length: int, **notes: Any) -> Case:
    layer.train()
    x, g = _inputs(length)

    def loss() -> torch.Tensor:
        y = layer(x)
        if y.shape != x.shape:
            raise RuntimeError(f"output shape {tuple(y.shape)} != input shape {tuple(x.shape)}")
        return (y * g).sum()

    return Case(loss=loss, grads=[x, *layer.parameters()], notes=notes)


def _lm_case(model: nn.Module, loss: Callable[[], torch.Tensor], **notes: Any) -> Case:
    model.train()
    return Case(loss=loss, grads=list(model.parameters()), notes=notes)


# ---- attention layers ---------------------------------------------------------------------------


class _HFAttentionLayer(nn.Module):
    """HF's LSH self-attention (query_key, value projections) followed by its output projection."""

    def __init__(self, attention: nn.Module, output: nn.Module) -> None:
        super().__init__()
        self.attention = attention
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.attention(hidden_states=x).hidden_states)


class _SdpaAttention(nn.Module):
    """Exact causal multi-head attention with the same projections as the LSH layers."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


def attention_ours(spec: Spec) -> Case:
    from reformer import LSHSelfAttention

    layer = LSHSelfAttention(
        d_model=D_MODEL,
        n_heads=N_HEADS,
        bucket_size=BUCKET,
        n_hashes=ATTN_HASHES,
        causal=True,
        key_rule="chunks",  # HF's rule and its automatic bucket count, as the peers run
    )
    return _attention_case(layer, spec.length)


def attention_hf(spec: Spec) -> Case:
    from transformers import ReformerConfig
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention, ReformerSelfOutput

    _require_multiple(spec.length, BUCKET, "hf")
    n_buckets = hf_num_buckets(spec.length, spec.length)
    config = ReformerConfig(
        hidden_size=D_MODEL,
        num_attention_heads=N_HEADS,
        attention_head_size=D_HEAD,
        attn_layers=["lsh"],
        lsh_attn_chunk_length=BUCKET,
        num_hashes=ATTN_HASHES,
        num_buckets=n_buckets,
        is_decoder=True,
        lsh_num_chunks_before=1,
        lsh_num_chunks_after=0,
        lsh_attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=0.0,
        max_position_embeddings=spec.length,
        use_cache=False,
    )
    layer = _HFAttentionLayer(LSHSelfAttention(config, layer_idx=0), ReformerSelfOutput(config))
    return _attention_case(layer, spec.length, num_buckets=n_buckets)


def attention_reformer_pytorch(spec: Spec) -> Case:
    from reformer_pytorch import LSHSelfAttention

    _require_multiple(spec.length, 2 * BUCKET, "reformer_pytorch")
    layer = LSHSelfAttention(
        dim=D_MODEL,
        heads=N_HEADS,
        dim_head=D_HEAD,
        bucket_size=BUCKET,
        n_hashes=ATTN_HASHES,
        causal=True,
        attn_chunks=1,
        use_full_attn=False,
        full_attn_thres=0,
        num_mem_kv=0,
        n_local_attn_heads=0,
        dropout=0.0,
        post_attn_dropout=0.0,
    )
    return _attention_case(layer, spec.length, num_buckets=spec.length // BUCKET)


def attention_sdpa(spec: Spec) -> Case:
    return _attention_case(_SdpaAttention(D_MODEL, N_HEADS), spec.length)


# ---- language models ----------------------------------------------------------------------------


def lm_ours(spec: Spec) -> Case:
    import reformer

    config = reformer.ReformerConfig(
        vocab_size=VOCAB,
        d_model=D_MODEL,
        n_heads=N_HEADS,
        n_layers=spec.layers,
        d_ff=D_FF,
        bucket_size=BUCKET,
        n_hashes=LM_HASHES,
        causal=True,
        max_seq_len=spec.length,
    )
    model = reformer.ReformerLM(config)
    ids, targets = _tokens(spec.length)
    return _lm_case(model, lambda: model.loss(ids, targets))


def lm_hf(spec: Spec) -> Case:
    from transformers import ReformerConfig, ReformerModelWithLMHead

    _require_multiple(spec.length, BUCKET, "hf")
    n_buckets = hf_num_buckets(spec.length, spec.length)
    shape = axial_shape(spec.length)
    config = ReformerConfig(
        vocab_size=VOCAB,
        hidden_size=D_MODEL,
        num_attention_heads=N_HEADS,
        attention_head_size=D_HEAD,
        attn_layers=["lsh"] * spec.layers,
        feed_forward_size=D_FF,
        hidden_act="relu",
        num_hashes=LM_HASHES,
        num_buckets=n_buckets,
        lsh_attn_chunk_length=BUCKET,
        lsh_num_chunks_before=1,
        lsh_num_chunks_after=0,
        is_decoder=True,
        max_position_embeddings=spec.length,
        axial_pos_embds=True,
        axial_pos_shape=shape,
        axial_pos_embds_dim=(D_MODEL // 2, D_MODEL // 2),
        hidden_dropout_prob=0.0,
        lsh_attention_probs_dropout_prob=0.0,
        local_attention_probs_dropout_prob=0.0,
        chunk_size_feed_forward=ff_chunk_tokens(spec),
        use_cache=False,
        pad_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
    )
    model = ReformerModelWithLMHead(config)
    ids, _ = _tokens(spec.length)
    return _lm_case(
        model,
        lambda: model(input_ids=ids, labels=ids).loss,
        num_buckets=n_buckets,
        axial_shape=list(shape),
        ff_chunk=ff_chunk_tokens(spec),
    )


def lm_reformer_pytorch(spec: Spec) -> Case:
    from reformer_pytorch import ReformerLM

    _require_multiple(spec.length, 2 * BUCKET, "reformer_pytorch")
    shape = axial_shape(spec.length)
    ff_chunks = spec.length // ff_chunk_tokens(spec)
    model = ReformerLM(
        num_tokens=VOCAB,
        dim=D_MODEL,
        depth=spec.layers,
        max_seq_len=spec.length,
        heads=N_HEADS,
        dim_head=D_HEAD,
        bucket_size=BUCKET,
        n_hashes=LM_HASHES,
        causal=True,
        ff_chunks=ff_chunks,
        ff_mult=D_FF // D_MODEL,
        ff_activation=nn.ReLU,
        axial_position_emb=True,
        axial_position_shape=shape,
        lsh_dropout=0.0,
        ff_dropout=0.0,
        post_attn_dropout=0.0,
        layer_dropout=0.0,
        use_full_attn=False,
        full_attn_thres=0,
    )
    ids, targets = _tokens(spec.length)
    loss = lambda: F.cross_entropy(model(ids).view(-1, VOCAB), targets.view(-1))
    return _lm_case(model, loss, ff_chunks=ff_chunks, axial_shape=list(shape))


Builder = Callable[[Spec], Case]

REGISTRY: dict[str, dict[str, Builder]] = {
    "attention": {
        "ours": attention_ours,
        "hf": attention_hf,
        "reformer_pytorch": attention_reformer_pytorch,
        "sdpa": attention_sdpa,
    },
    "model": {"ours": lm_ours, "hf": lm_hf, "reformer_pytorch": lm_reformer_pytorch},
    "depth": {"ours": lm_ours},
}


# ---- worker (one configuration, in its own process) ---------------------------------------------


def measure_spec(spec: Spec, repeats: int, threads: int, mem_limit_gib: float) -> dict[str, Any]:
    """Build and measure one configuration; returns its row (never raises for benchmark failures)."""
    if threads > 0:
        torch.set_num_threads(threads)
    limit_memory(mem_limit_gib)
    torch.manual_seed(0)
    row: dict[str, Any] = {**asdict(spec), "threads": torch.get_num_threads(), "repeats": repeats}
    row["loadavg_1m"] = os.getloadavg()[0]  # other work on the machine skews the timings

    try:
        case = REGISTRY[spec.section][spec.impl](spec)
    except ImportError as err:
        return {**row, "status": "unavailable", "error": f"{type(err).__name__}: {err}"}
    except UnsupportedLength as err:
        return {**row, "status": "unsupported", "error": str(err)}
    except Exception as err:
        status = "oom" if is_oom(err) else "build-error"
        return {**row, "status": status, "error": f"{type(err).__name__}: {err}"}
    row["notes"] = case.notes

    def step() -> None:
        for t in case.grads:
            t.grad = None
        case.loss().backward()

    try:
        result = measure(step, repeats, "cpu")
    except Exception as err:
        status = "oom" if is_oom(err) else "error"
        return {**row, "status": status, "error": f"{type(err).__name__}: {err}"}
    return {**row, "status": "ok", **result}


# ---- parent (sweep, tables) ---------------------------------------------------------------------


def run_config(spec: Spec, args: argparse.Namespace) -> dict[str, Any]:
    """Run one configuration in a fresh subprocess and return its row."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        json.dumps(asdict(spec)),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
        "--mem-limit-gib",
        str(args.mem_limit_gib),
    ]
    row: dict[str, Any] = {**asdict(spec), "malloc": args.malloc}
    env = dict(os.environ)
    if args.malloc == "mmap":
        # Every allocation of 64 KiB or more gets its own mapping, returned to the OS when freed, so
        # RSS follows live tensor memory instead of what glibc's heap keeps cached (slower steps).
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    return {**row, **run_worker(cmd, args.timeout, env)}


def _ok(row: dict[str, Any] | None) -> bool:
    return row is not None and row.get("status") == "ok"


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> str:
    if not (_ok(a) and _ok(b)) or b[key] <= 0:
        return "-"
    return f"{a[key] / b[key]:.2f}x"


def _find(rows: Iterable[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def _time_cell(row: dict[str, Any]) -> str:
    return f"{row['ms'] / 1e3:.3f}" if _ok(row) else row["status"]


def _mem_cell(row: dict[str, Any]) -> str:
    return f"{row['peak_mib']:.0f}" if _ok(row) else "-"


def table_rows(section: str, rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of one section's table; ratios are filled on the ``ours`` rows."""
    mine = [r for r in rows if r["section"] == section]
    if section == "attention":
        headers = ["impl", "L", "time (s)", "peak MiB", "ours/hf time", "ours/hf mem", "ours/sdpa time"]
    elif section == "model":
        headers = ["impl", "L", "layers", "time (s)", "peak MiB", "ours/hf time", "ours/hf mem"]
    else:
        headers = [
            "impl",
            "L",
            "layers",
            "time (s)",
            "peak MiB",
            f"mem vs fewest layers (target <= {DEPTH_TARGET})",
        ]
    cells: list[list[str]] = []
    for r in mine:
        line = [r["impl"], str(r["length"])]
        if section != "attention":
            line.append(str(r["layers"]))
        line += [_time_cell(r), _mem_cell(r)]
        same = dict(section=section, length=r["length"], layers=r["layers"])
        if section in ("attention", "model"):
            hf = _find(mine, impl="hf", **same)
            is_ours = r["impl"] == "ours"
            line += [
                _ratio(r, hf, "ms") if is_ours else "-",
                _ratio(r, hf, "peak_mib") if is_ours else "-",
            ]
            if section == "attention":
                sdpa = _find(mine, impl="sdpa", **same)
                line.append(_ratio(r, sdpa, "ms") if is_ours else "-")
        else:
            group = [o for o in mine if o["impl"] == r["impl"] and o["length"] == r["length"]]
            base = min(group, key=lambda o: o["layers"])
            ratio = _ratio(r, base, "peak_mib") if base is not r else "-"
            if ratio != "-":
                ratio += " (met)" if r["peak_mib"] <= DEPTH_TARGET * base["peak_mib"] else " (MISSED)"
            line.append(ratio)
        cells.append(line)
    return headers, cells


def render(headers: Sequence[str], cells: Sequence[Sequence[str]], markdown: bool) -> str:
    if markdown:
        out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        out += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(out)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    fmt = lambda line: "  ".join(
        c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
    )
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths]), *map(fmt, cells)])


SECTION_TITLES = {
    "attention": "causal LSH self-attention + projections (d_model 256, 4x64 heads, bucket 64, 4 hashes)",
    "model": "Byte-level LM, loss forward+backward (6 layers, d_model 256, d_ff 1024, 2 hashes, causal)",
    "depth": "ours: LM depth scaling (reversible layers)",
}


def report(rows: list[dict[str, Any]], sections: Sequence[str], markdown: bool, legend: str = "") -> str:
    parts: list[str] = []
    for section in sections:
        if not any(r["section"] == section for r in rows):
            continue
        headers, cells = table_rows(section, rows)
        title = SECTION_TITLES[section]
        parts.append(f"### {section}: {title}\n" if markdown else f"== {section}: {title}")
        if legend:
            parts.append(f"{legend}\n" if markdown else legend)
        parts.append(render(headers, cells, markdown))
        failures = [r for r in rows if r["section"] == section and r["status"] != "ok"]
        for r in failures:
            bullet = "- " if markdown else "  "
            where = f"L={r['length']}" + (f" layers={r['layers']}" if section != "attention" else "")
            parts.append(f"{bullet}{r['impl']} {where}: {r['status']}: {r.get('error', '')}")
        parts.append("")
    return "\n".join(parts)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "mem_total_gib": round(mem_total_bytes() / 1024**3, 1),
        "versions": {d: _version(d) for d in ("torch", "transformers", "reformer-pytorch", "reformer")},
        "argv": sys.argv,
    }


def plan(args: argparse.Namespace) -> list[Spec]:
    specs: list[Spec] = []
    for section in args.what:
        lengths = args.lengths or DEFAULT_LENGTHS[section]
        impls = [i for i in args.impls if i in REGISTRY[section]]
        layer_counts = (
            args.depth_layers if section == "depth" else [1 if section == "attention" else LM_LAYERS]
        )
        for length in lengths:
            for impl in impls:
                for layers in layer_counts:
                    specs.append(Spec(section, impl, length, layers, args.ff_chunk))
    return specs


def _csv(kind: type) -> Callable[[str], list[Any]]:
    return lambda text: [kind(p) for p in text.split(",") if p.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=_csv(int), default=None, help="comma list; default depends on section")
    p.add_argument("--impls", type=_csv(str), default=["ours", "hf", "reformer_pytorch", "sdpa"])
    p.add_argument("--what", type=_csv(str), default=list(SECTIONS), help="attention,model,depth")
    p.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up (median)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per configuration")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--depth-layers", type=_csv(int), default=list(DEFAULT_DEPTH_LAYERS))
    p.add_argument(
        "--malloc",
        choices=("glibc", "mmap"),
        default="glibc",
        help="glibc: default allocator settings (RSS includes freed memory glibc keeps cached); "
        "mmap: MALLOC_MMAP_THRESHOLD_=64KiB so RSS tracks live tensors (slower steps)",
    )
    p.add_argument("--ff-chunk", type=int, default=4096, help="peers' LM feed-forward chunk, in tokens")
    p.add_argument(
        "--mem-limit-gib",
        type=float,
        default=round(0.8 * mem_total_bytes() / 1024**3, 1),
        help="address-space cap per worker so a blow-up fails as 'oom' (0: none)",
    )
    p.add_argument("--json", type=Path, default=None, help="write the rows (and environment) here")
    p.add_argument("--markdown", type=Path, default=None, help="write the tables as Markdown here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = [s for s in args.what if s not in SECTIONS]
    if unknown:
        p.error(f"unknown --what {unknown}; choose from {SECTIONS}")
    known_impls = {i for section in REGISTRY.values() for i in section}
    unknown = [i for i in args.impls if i not in known_impls]
    if unknown:
        p.error(f"unknown --impls {unknown}; choose from {sorted(known_impls)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        emit_result(
            measure_spec(Spec(**json.loads(args.worker)), args.repeats, args.threads, args.mem_limit_gib)
        )
        return 0

    specs = plan(args)
    rows: list[dict[str, Any]] = []
    for n, spec in enumerate(specs, 1):
        label = f"[{n}/{len(specs)}] {spec.section} {spec.impl} L={spec.length} layers={spec.layers}"
        print(f"{label} ...", file=sys.stderr, flush=True)
        row = run_config(spec, args)
        rows.append(row)
        detail = f"{row['ms'] / 1e3:.3f} s, {row['peak_mib']:.0f} MiB" if _ok(row) else row.get("error", "")
        print(f"{label}: {row['status']} {detail} (wall {row['wall_s']:.0f} s)", file=sys.stderr, flush=True)

    legend = (
        f"time: median of {args.repeats} forward+backward steps after 1 warm-up; "
        f"peak: MiB of RSS above the built-model baseline (malloc={args.malloc})"
    )
    print(report(rows, args.what, markdown=False, legend=legend))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report(rows, args.what, markdown=True, legend=legend))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": environment(), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
