"""Loggers beside metrics.jsonl: the hook (register_logger, --log NAME) and TensorBoard."""

from __future__ import annotations

import shutil

import pytest

from reformer.cli import main
from reformer.train import TrainConfig, read_metrics, train
from reformer.train.loggers import LOGGERS, register_logger

SMALL_MODEL = dict(
    d_model=32, n_heads=2, n_layers=2, d_ff=64, bucket_size=8, n_hashes=2,
    attn_layers=("local", "lsh"), local_chunk_size=16,
)  # fmt: skip


pytestmark = pytest.mark.usefixtures("own_cache")


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    return str(path)


def _config(corpus, **changes) -> TrainConfig:
    settings = dict(
        model=dict(SMALL_MODEL), task_settings=dict(data=[corpus]), seq_len=64, batch_size=4, steps=6,
        lr=3e-3, warmup=2, eval_every=3, save_every=3, eval_batches=2, progress=False, log_every=1,
    )  # fmt: skip
    settings.update(changes)
    return TrainConfig(**settings)


class Recorder:
    made: list[Recorder] = []

    def __init__(self, run, start_step):
        self.run, self.start_step, self.records, self.closed = run, start_step, [], False
        Recorder.made.append(self)

    def log(self, record):
        self.records.append(record)

    def close(self):
        self.closed = True


@pytest.fixture
def recorder():
    Recorder.made = []
    register_logger("recorder", Recorder)
    yield Recorder
    del LOGGERS["recorder"]


def _lines(records):
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def test_a_registered_logger_gets_every_metrics_line_and_is_closed(tmp_path, corpus, recorder):
    run = tmp_path / "run"
    train(_config(corpus, log=["recorder"]), run)
    (first,) = recorder.made
    assert (first.run, first.start_step, first.closed) == (run, 0, True)
    assert _lines(first.records) == _lines(read_metrics(run / "metrics.jsonl"))
    assert {r["split"] for r in first.records} == {"train", "eval"}
    train(_config(corpus, log=["recorder"], steps=9), run, resume=True)
    second = recorder.made[1]
    assert second.start_step == 6 and [r["step"] for r in second.records if r["split"] == "train"] == [
        7,
        8,
        9,
    ]


def test_an_unknown_logger_stops_before_the_run_folder_is_made(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="--log nope is unknown; use one of .*tensorboard"):
        train(_config(corpus, log=["nope"]), run)
    with pytest.raises(SystemExit):
        main(["train", "--data", corpus, "--out", str(run), "--log", "nope", "--no-sample"])
    assert "--log nope is unknown" in capsys.readouterr().err
    assert not run.exists()


def test_tensorboard_holds_the_metrics_and_a_resume_drops_the_lost_steps(tmp_path, corpus):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    flags = ["--data", corpus, "--out", str(run), "--log", "tensorboard", "--no-sample", "--no-progress"]
    flags += ["--d-model", "32", "--n-heads", "2", "--n-layers", "2", "--d-ff", "64", "--seq-len", "64"]
    flags += ["--batch-size", "2", "--eval-every", "3", "--save-every", "3", "--log-every", "1"]
    assert main(["train", *flags, "--steps", "5"]) == 0  # checkpoints at 3 and 5
    shutil.rmtree(run / "checkpoints" / "step-00000005")  # as if killed after logging steps 4 and 5
    assert main(["train", "--out", str(run), "--resume", "--steps", "6", "--no-sample", "--no-progress"]) == 0
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]  # 4 and 5 once
    loss = {e.step: e.value for e in events.Scalars("train/loss")}
    lines = {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"}
    assert sorted(loss) == sorted(lines) == [1, 2, 3, 4, 5, 6]
    assert all(abs(loss[s] - lines[s]) < 1e-6 for s in lines)
    assert {"train/lr", "train/tokens_per_s", "eval/loss", "eval/bits_per_byte"} <= set(
        events.Tags()["scalars"]
    )
