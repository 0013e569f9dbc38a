"""The length curriculum of the reverse / sort tasks (``--curriculum-start``): batches of short examples
with the tokens of a full batch, doubling on the training loss up to ``--seq-len``, examples centred in
the position range (the reversal's mirror kept), the checks, and a resumed run continuing at its length."""

from __future__ import annotations

import json

import pytest
import torch

from reformer.models.seq2seq import ReformerEncoderDecoder
from reformer.tasks.seq2seq import CURRICULUM_WINDOW, TeacherForced
from reformer.train import TrainConfig, train
from reformer.train.loop import slice_batch
from tests.conftest import SMALL_SEQ2SEQ, make_config

SMALL = dict(SMALL_SEQ2SEQ, position_embedding="sinusoidal")


def _cfg(**changes) -> TrainConfig:
    settings = dict(
        model=dict(SMALL), task="reverse", seq_len=32, batch_size=4, steps=4, lr=3e-3, warmup=2, eval_every=5,
        save_every=10, eval_batches=1, log_every=1, progress=False, curriculum_start=8, curriculum_loss=0.5,
    )  # fmt: skip
    return make_config(**{**settings, **changes})


class Batches:
    """The task's training batches as the loop draws them: one generator, each process's slice."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.task, self.generator, self.step = cfg.make_task(), torch.Generator().manual_seed(0), 0

    def next(self, size: int, rank: int, world_size: int):
        return slice_batch(self.task.batch(size, self.generator), rank, world_size)

    def after_step(self, loss: float):
        self.step += 1
        return self.task.after_step(loss, self.step)

    @property
    def length(self) -> int:
        return self.task.length


def test_batches_keep_the_tokens_of_a_step_and_double_on_a_low_loss():
    batches = Batches(_cfg())
    src, tgt = batches.next(4, 0, 1)
    assert src.shape == (16, 8) and torch.equal(tgt, src.flip(1))  # 4 x 32 tokens as 16 x 8
    for _ in range(CURRICULUM_WINDOW - 1):
        assert not batches.after_step(0.1)
    assert batches.after_step(0.1) and batches.length == 16
    # A mean over the window at or above the threshold keeps the length; the window restarts on growth.
    losses = [0.1] * (CURRICULUM_WINDOW - 1) + [0.5 * CURRICULUM_WINDOW - 0.1 * (CURRICULUM_WINDOW - 1)]
    assert not any(batches.after_step(x) for x in losses) and batches.length == 16
    src, tgt = batches.next(4, 1, 2)  # this process's half of 8 rows of 16
    assert src.shape == (4, 16)
    assert any(batches.after_step(0.0) for _ in range(CURRICULUM_WINDOW)) and batches.length == 32
    assert not any(batches.after_step(0.0) for _ in range(2 * CURRICULUM_WINDOW)) and batches.length == 32
    src, _ = batches.next(4, 0, 1)
    assert src.shape == (4, 32)
    sort = Batches(_cfg(task="sort", curriculum_start=5))
    src, tgt = sort.next(2, 0, 1)
    assert src.shape == (12, 5) and torch.equal(tgt, src.sort(1).values)  # 64 tokens as 12 x 5 (floor)
    for _ in range(3):  # 5 -> 10 -> 20 -> 32, not 40
        assert any(sort.after_step(0.0) for _ in range(CURRICULUM_WINDOW))
    assert sort.length == 32


def test_short_examples_are_centred_so_the_mirror_pairs_stay():
    torch.manual_seed(0)
    cfg = _cfg(model=dict(SMALL, initializer_range=0.3))
    model = ReformerEncoderDecoder(cfg.model_config()).double()
    src = torch.randint(1, 64, (3, 12))
    centred = TeacherForced(model, centre=True)(src, src.flip(1))
    o = 10  # (32 - 12) // 2: source token j at position 10 + j, its copy at target position 10 + 11 - j
    assert all((o + j) + (o + 11 - j) == 32 - 1 for j in range(12))
    expected = model.loss(src, src.flip(1), source_offset=o, target_offset=o)
    torch.testing.assert_close(centred, expected, rtol=0, atol=0)
    assert not torch.allclose(centred, TeacherForced(model)(src, src.flip(1)))
    full = torch.randint(1, 64, (2, 32))  # full-length examples sit at offset 0
    torch.testing.assert_close(
        TeacherForced(model, centre=True)(full, full.flip(1)), model.loss(full, full.flip(1))
    )


def test_bad_curriculum_settings_are_named():
    for changes, message in (
        (dict(task="pairs"), "--curriculum-start is for --task reverse / sort"),
        (dict(curriculum_start=0), "--curriculum-start 0 must lie in"),
        (dict(curriculum_start=33), "--curriculum-start 33 must lie in"),
        (dict(curriculum_loss=0.0), "--curriculum-loss 0.0 must be positive"),
    ):
        with pytest.raises(ValueError, match=message):
            _cfg(**changes).validate()


def test_a_resumed_run_continues_at_its_curriculum_length(tmp_path):
    """A loss threshold above any loss grows the length every CURRICULUM_WINDOW steps: 8 -> 16 at step 10,
    -> 32 at step 20. Runs stopped at step 10 (a doubling) and at step 15 (half-way through a window of
    losses) and resumed end with the uninterrupted run's weights."""
    always = dict(curriculum_loss=100.0, steps=2 * CURRICULUM_WINDOW + 2)
    train(_cfg(**always), tmp_path / "a")
    state = json.loads(
        sorted((tmp_path / "a" / "checkpoints").iterdir())[-1].joinpath("trainer_state.json").read_text()
    )
    assert state["curriculum_length"] == 32
    a = ReformerEncoderDecoder.from_pretrained(tmp_path / "a").state_dict()
    for run, stop in (("b", CURRICULUM_WINDOW), ("c", CURRICULUM_WINDOW + CURRICULUM_WINDOW // 2)):
        train(_cfg(**{**always, "steps": stop, "save_every": stop}), tmp_path / run)
        train(_cfg(**always), tmp_path / run, resume=True)
        b = ReformerEncoderDecoder.from_pretrained(tmp_path / run).state_dict()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=f"{run}: {name}")


@pytest.mark.slow
def test_the_curriculum_learns_reversal_of_256_tokens(tmp_path):
    """One layer each side, one head, sinusoidal positions: 32 -> 256 tokens. Without the curriculum the
    same model stayed at chance for 1,500 steps (docs/seq2seq.md)."""
    model = dict(d_model=64, n_heads=1, n_layers=1, d_ff=128, attn_layers=("local",), local_chunk_size=64,
                 reversible=False, position_embedding="sinusoidal", cross_attention="full")  # fmt: skip
    cfg = _cfg(model=model, seq_len=256, curriculum_start=32, curriculum_loss=0.3, steps=800, lr=3e-3,
               warmup=30, schedule="cosine", cosine_steps=800, eval_every=800, save_every=800,
               eval_batches=4, log_every=50)  # fmt: skip
    assert train(cfg, tmp_path / "run").metrics["accuracy"] >= 0.98
