"""The output of a sweep: the text / Markdown table, the JSON rows, the time and memory plot."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


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
