"""Metrics of a run: ``metrics.jsonl`` lines, the ``loss.png`` plot, and the progress bar."""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

from ..files import atomic_write, atomic_write_text
from .config import TrainConfig

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


def postfix(loss: float, last_eval: dict, tokens_per_s: float, bits: bool = False) -> dict[str, str]:
    """The progress bar's figures: the training loss (and in bits per byte with ``bits``), the last
    held-out metrics, tokens per second."""
    post = {"loss": f"{loss:.3f}"}
    if bits:
        post["bpb"] = f"{loss / math.log(2):.3f}"
    for key in ("bits_per_byte", "accuracy"):
        if key in last_eval:
            post["eval_" + key.split("_")[0]] = f"{last_eval[key]:.3f}"
    post["tok/s"] = f"{tokens_per_s:,.0f}"
    return post


def progress_bar(cfg: TrainConfig, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=cfg.steps, initial=initial, unit="step", desc="train", disable=not (enabled and cfg.progress),
        dynamic_ncols=True,
    )  # fmt: skip


class MetricsLog:
    """Appends JSON lines to ``metrics.jsonl`` and draws ``loss.png`` from them (``bits``: the losses in
    bits per byte)."""

    def __init__(self, run: Path, bits: bool, enabled: bool) -> None:
        self.path, self.plot_path, self.bits, self.enabled = (
            run / METRICS_FILE,
            run / PLOT_FILE,
            bits,
            enabled,
        )

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {**record, "time": time.time()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after ``step`` (a run killed after its last checkpoint logged them)."""
        if not self.path.is_file():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def plot(self) -> None:
        if not self.enabled or not self.path.is_file():
            return
        plot_metrics(self.path, self.plot_path, self.bits)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut by a crash is skipped
            records.append(json.loads(line))
    return records


def plot_metrics(metrics: Path, out: Path, bits: bool = False) -> None:
    """Loss curves (train and held-out; in bits per byte with ``bits``) into a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics)
    scale = 1 / math.log(2) if bits else 1.0
    fig, ax = plt.subplots(figsize=(7, 4))
    for split, style in (("train", "-"), ("eval", "o-")):
        points = [(r["step"], r["loss"] * scale) for r in records if r.get("split") == split]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=split, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte" if bits else "loss (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
