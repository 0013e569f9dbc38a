"""Shared builders and fixtures: small training configurations, a repetitive corpus file, and a cache
folder of the test's own."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from reformer.train import TrainConfig

# A model small enough for many short runs: two layers (local + LSH), 64-token windows.
SMALL_MODEL = dict(
    d_model=32, n_heads=2, n_layers=2, d_ff=64, bucket_size=8, n_hashes=2,
    attn_layers=("local", "lsh"), local_chunk_size=16,
)  # fmt: skip
# The same on the command line.
SMALL_FLAGS = [
    "--d-model", "32", "--n-heads", "2", "--n-layers", "2", "--d-ff", "64", "--bucket-size", "8",
    "--attn-layers", "local,lsh", "--seq-len", "64", "--batch-size", "4", "--no-progress", "--no-sample",
]  # fmt: skip
# One exact layer each side for the encoder-decoder tasks.
SMALL_SEQ2SEQ = dict(
    d_model=32, n_heads=2, n_layers=1, d_ff=64, attn_layers=("full",), cross_attention="full"
)


def make_config(**settings: Any) -> TrainConfig:
    """A :class:`TrainConfig` from flat keyword settings: ``task``, ``model`` (a dict), the run settings,
    and the task's own settings by name (``data=``, ``curriculum_start=`` ...)."""
    run = {f.name for f in dataclasses.fields(TrainConfig)}
    task_settings = {k: settings.pop(k) for k in list(settings) if k not in run}
    return TrainConfig(**settings, task_settings=task_settings)


def small_lm_config(data: Path | None, **changes: Any) -> TrainConfig:
    """Ten steps of the small model on ``data`` (None: the default corpus), evaluated and saved every 5."""
    settings = dict(
        model=dict(SMALL_MODEL), data=[str(data)] if data else [], seq_len=64, batch_size=4, steps=10,
        lr=3e-3, warmup=5, eval_every=5, save_every=5, eval_batches=2, progress=False,
    )  # fmt: skip
    return make_config(**{**settings, **changes})


@pytest.fixture
def corpus_file(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    return path


@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> Path:
    """``REFORMER_CACHE`` pointed at a folder of the test's own (where corpora are joined once)."""
    monkeypatch.setenv("REFORMER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
