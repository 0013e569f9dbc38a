"""Tools for showing that a model uses its long context: the accuracy grid of a retrieval task drawn as a
heatmap (length x depth, as needle-in-a-haystack tests show it), and the two ablations every such claim
needs: the LSH layers' outputs zeroed, and the context cut to its last ``W`` tokens."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from ..attention import LSHSelfAttention
from ..files import atomic_write

ABLATIONS = ("none", "lsh-zeroed", "last-window")


@contextlib.contextmanager
def lsh_outputs_zeroed(model: nn.Module) -> Iterator[int]:
    """Inside the block, every LSH self-attention layer of ``model`` outputs zeros (its residual branch
    adds nothing), so whatever the model knows it knows without them. Yields the number of layers."""
    layers = [m for m in model.modules() if isinstance(m, LSHSelfAttention)]
    if not layers:
        raise ValueError("the model has no LSH layer to zero; this ablation needs attn_layers with 'lsh'")
    handles = [layer.register_forward_hook(lambda _m, _in, out: torch.zeros_like(out)) for layer in layers]
    try:
        yield len(layers)
    finally:
        for handle in handles:
            handle.remove()


def last_window(
    inputs: torch.Tensor, targets: torch.Tensor, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The last ``window`` positions of ``inputs`` and ``targets`` ``(batch, length)``: the context a model
    with a ``window``-token memory would see before the scored positions (which must lie inside it)."""
    if window < 1:
        raise ValueError(f"window={window} must be a positive number of tokens")
    scored = (targets >= 0).any(0).nonzero()
    if len(scored) and int(scored[0]) < inputs.shape[1] - window:
        raise ValueError(
            f"window={window} cuts off scored positions (the first is {inputs.shape[1] - int(scored[0])} "
            "tokens from the end); choose a larger window"
        )
    return inputs[:, -window:], targets[:, -window:]


def plot_heatmap(
    grid: Sequence[Sequence[float]],
    rows: Sequence[int],
    columns: Sequence[float],
    path: str | Path,
    title: str,
    column_label: str = "needle depth",
) -> None:
    """Write a PNG heatmap of ``grid`` (accuracy in [0, 1], one row per length in ``rows``, one column per
    value in ``columns``), each cell annotated with its percentage; red is 0, green is 1."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.figure import Figure

    cmap = LinearSegmentedColormap.from_list("accuracy", ["#d73027", "#fee08b", "#1a9850"])
    fig = Figure(figsize=(1.0 + 0.75 * len(columns), 0.9 + 0.5 * len(rows)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if not math.isnan(value):
                ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(columns)), [f"{c:g}" for c in columns])
    ax.set_yticks(range(len(rows)), [_tokens(r) for r in rows])
    ax.set_xlabel(column_label)
    ax.set_ylabel("length (tokens)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04, label="accuracy")
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def _tokens(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    return f"{n >> 10}K" if n >= 1024 and n % 1024 == 0 else str(n)
