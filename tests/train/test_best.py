"""``--keep-best``: RUN/best holds the weights of the best held-out evaluation, survives resume and an
interrupted swap, and loads like a run."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from reformer.cli import main
from reformer.train import train
from reformer.train.best import BEST_DIR, BEST_FILE, BestKeeper, best_record
from tests.conftest import small_lm_config as small_config

pytestmark = pytest.mark.usefixtures("own_cache")


def eval_losses(run) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if r["split"] == "eval"}


def test_best_holds_the_weights_of_the_lowest_held_out_loss(tmp_path, corpus_file):
    run = tmp_path / "run"
    settings = dict(steps=6, eval_every=1, save_every=1, keep_checkpoints=20, keep_best=True, lr=3e-2)
    train(small_config(corpus_file, **settings), run)
    losses = eval_losses(run)
    step = min(losses, key=losses.get)
    record = best_record(run)
    assert record["step"] == step and record["value"] == pytest.approx(losses[step])
    assert record["metric"] == "loss" and record["direction"] == "min"
    kept = load_file(run / BEST_DIR / "model.safetensors")
    saved = load_file(run / "checkpoints" / f"step-{step:08d}" / "model.safetensors")
    assert kept.keys() == saved.keys() and all((kept[k] == saved[k]).all() for k in kept)
    assert main(["eval", str(run / BEST_DIR), "--max-tokens", "256"]) == 0

    # A resumed run only replaces it with a better evaluation than the one on disk.
    train(small_config(corpus_file, **{**settings, "steps": 9}), run, resume=True)
    losses = eval_losses(run)
    step = min(losses, key=losses.get)
    assert best_record(run)["step"] == step


class _Task:
    name, selection = "stub", ("accuracy", "max")

    def save_files(self, folder) -> None:
        (folder / "task_file").write_text("kept")


class _Model:
    def __init__(self, value: int) -> None:
        self.value = value

    def save_pretrained(self, folder) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "weights").write_text(str(self.value))


def test_keeper_ranks_by_the_tasks_metric_and_direction(tmp_path):
    (tmp_path / "train_config.json").write_text("{}")
    keeper = BestKeeper(tmp_path, _Task())
    written = [
        keeper.offer({"accuracy": a}, step, _Model(step)) for step, a in enumerate([0.2, 0.1, 0.5, 0.5])
    ]
    assert written == [True, False, True, False]
    assert (tmp_path / BEST_DIR / "weights").read_text() == "2"
    assert (tmp_path / BEST_DIR / "task_file").read_text() == "kept"
    assert (tmp_path / BEST_DIR / "train_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [BEST_DIR, "train_config.json"]
    with pytest.raises(KeyError, match="no 'accuracy'"):
        keeper.offer({"loss": 1.0}, 4, _Model(4))


def test_an_interrupted_swap_keeps_the_previous_best(tmp_path):
    (tmp_path / "train_config.json").write_text("{}")
    BestKeeper(tmp_path, _Task()).offer({"accuracy": 0.7}, 3, _Model(3))
    (tmp_path / BEST_DIR).rename(tmp_path / f"{BEST_DIR}.old")  # stopped between the two renames
    (tmp_path / f"{BEST_DIR}.new").mkdir()
    keeper = BestKeeper(tmp_path, _Task())
    assert keeper.best == 0.7 and json.loads((tmp_path / BEST_DIR / BEST_FILE).read_text())["step"] == 3
    assert not (tmp_path / f"{BEST_DIR}.new").exists()
    assert keeper.offer({"accuracy": 0.6}, 4, _Model(4)) is False
