"""``reformer train --task reverse|sort|pairs``: the synthetic batches, the JSON-lines pairs (split,
padding, errors), a short run with checkpoints and an exact resume, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from reformer.cli import main
from reformer.data import IGNORE_INDEX
from reformer.models.seq2seq import ReformerEncoderDecoder
from reformer.tasks.seq2seq import BYTE_EOS, TeacherForced, pad_pairs, read_pairs, synthetic_batch
from reformer.train import TrainConfig, TrainingError, train
from reformer.train.loop import slice_batch
from reformer.train.metrics import read_metrics
from tests.conftest import SMALL_SEQ2SEQ as SMALL
from tests.conftest import make_config


def _cfg(**changes) -> TrainConfig:
    settings = dict(
        model=dict(SMALL), task="reverse", seq_len=12, batch_size=4, steps=4, lr=3e-3, warmup=2, eval_every=2,
        save_every=2, eval_batches=2, log_every=1, progress=False,
    )  # fmt: skip
    return make_config(**{**settings, **changes})


def test_synthetic_targets_are_the_source_reversed_and_sorted():
    g = torch.Generator().manual_seed(0)
    src, tgt = synthetic_batch("reverse", 3, 10, 64, g)
    assert torch.equal(tgt, src.flip(1)) and int(src.min()) >= 1
    src, tgt = synthetic_batch("sort", 3, 10, 64, g)
    assert torch.equal(tgt, src.sort(1).values) and not torch.equal(src, tgt)


def _write_pairs(path, n=40, long=False):
    lines = [json.dumps({"source": f"ab{i}é", "target": f"x{i}"}) for i in range(n)]
    if long:
        lines.append(json.dumps({"source": "a" * 100, "target": "b"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_pairs_split_padding_and_errors(tmp_path):
    path = _write_pairs(tmp_path / "p.jsonl")
    train_pairs, held_out = read_pairs([str(path)], 16)
    assert len(held_out) == 2 and len(train_pairs) == 38  # every 20th line
    sources, targets = pad_pairs([("ab0é".encode(), b"x0"), (b"a", b"xyz")])
    assert sources[1].tolist()[:2] == [97, -1] and sources.shape == (2, 5)  # é is two bytes
    assert targets[0].tolist() == [ord("x"), ord("0"), BYTE_EOS, IGNORE_INDEX]
    with pytest.raises(TrainingError, match="exceed --seq-len 16"):
        read_pairs([str(_write_pairs(tmp_path / "long.jsonl", long=True))], 16)
    (tmp_path / "bad.jsonl").write_text('{"source": "a"}\n')
    with pytest.raises(TrainingError, match="bad.jsonl:1 is not a JSON object"):
        read_pairs([str(tmp_path / "bad.jsonl")], 16)
    (tmp_path / "empty.jsonl").write_text('{"source": "", "target": "a"}\n')
    with pytest.raises(TrainingError, match="empty source"):
        read_pairs([str(tmp_path / "empty.jsonl")], 16)


def test_teacher_forced_loss_ignores_padding():
    torch.manual_seed(0)
    cfg = _cfg(task="pairs")
    model = ReformerEncoderDecoder(cfg.model_config()).double()
    net = TeacherForced(model)
    sources, targets = pad_pairs([(b"hello", b"hi"), (b"a", b"longer")])
    loss = net(sources, targets)
    first = net(sources[:1, :5], targets[:1, :3])
    second = net(sources[1:, :1], targets[1:])
    torch.testing.assert_close(loss, (first * 3 + second * 7) / 10, rtol=1e-12, atol=1e-12)


def test_short_run_saves_and_resumes_exactly(tmp_path):
    full = train(_cfg(steps=4), tmp_path / "a")
    train(_cfg(steps=2), tmp_path / "b")
    resumed = train(_cfg(steps=4), tmp_path / "b", resume=True)
    assert full.step == resumed.step == 4
    assert set(full.metrics) == {"loss", "accuracy"}
    a = ReformerEncoderDecoder.from_pretrained(tmp_path / "a").state_dict()
    b = ReformerEncoderDecoder.from_pretrained(tmp_path / "b").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_cli_pairs_with_lsh_cross_attention_reports_bits_per_byte(tmp_path, capsys):
    path = _write_pairs(tmp_path / "p.jsonl")
    out = tmp_path / "run"
    code = main([
        "train", "--task", "pairs", "--data", str(path), "--out", str(out), "--seq-len", "16", "--steps", "2",
        "--d-model", "32", "--n-heads", "2", "--n-layers", "1", "--d-ff", "64", "--batch-size", "4",
        "--cross-attention", "lsh", "--cross-chunk-size", "4", "--eval-every", "2", "--no-progress",
    ])  # fmt: skip
    assert code == 0
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "eval"]
    assert {"loss", "accuracy", "bits_per_byte"} <= set(evals[-1])
    model = ReformerEncoderDecoder.from_pretrained(out)
    assert model.config.cross_attention == "lsh" and model.config.eos_id == BYTE_EOS
    assert "held-out token accuracy" in capsys.readouterr().out


def test_batches_are_fixed_held_out_and_sliced_per_process():
    task = _cfg(task="sort").make_task()
    first, second = task.held_out(), task.held_out()
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second, strict=True))
    src, tgt = slice_batch(task.batch(4, torch.Generator().manual_seed(0)), 1, 2)
    assert src.shape == (2, 12) and torch.equal(tgt, src.sort(1).values)


def test_generate_command_decodes_a_source(tmp_path, capsys):
    path = _write_pairs(tmp_path / "p.jsonl")
    out = tmp_path / "run"
    flags = ["--d-model", "32", "--n-heads", "2", "--n-layers", "1", "--d-ff", "64", "--batch-size", "4"]
    assert main(["train", "--task", "pairs", "--data", str(path), "--out", str(out), "--seq-len", "16",
                 "--steps", "1", "--no-progress", "--no-sample", *flags]) == 0  # fmt: skip
    capsys.readouterr()
    assert (
        main(["generate", str(out), "--source", "ab3é", "--temperature", "0", "--max-new-tokens", "5"]) == 0
    )
    captured = capsys.readouterr()
    assert "tokens in" in captured.err and "source 5 bytes" in captured.err
    (tmp_path / "src.txt").write_bytes(b"ab3")
    assert (
        main(["generate", str(out), "--source-file", str(tmp_path / "src.txt"), "--max-new-tokens", "3"]) == 0
    )


def test_eval_command_reports_held_out_accuracy(tmp_path, capsys):
    train(_cfg(steps=1), tmp_path / "run")
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--n-hashes", "4"]) == 0
    lines = capsys.readouterr().out.split()
    assert lines[0].startswith("loss=") and lines[1].startswith("accuracy=")


@pytest.mark.slow
@pytest.mark.parametrize("cross", ["full", "lsh"])
def test_reversal_is_learned(tmp_path, cross):
    """Reversal of 16 symbols: held-out token accuracy >= 0.99 within 300 steps (exact and LSH)."""
    model = dict(
        d_model=64, n_heads=4, n_layers=2, d_ff=128, attn_layers=("full", "full"), axial_pos_shape=(16,),
        axial_pos_dims=(64,), cross_attention=cross, cross_chunk_size=4,
    )  # fmt: skip
    cfg = _cfg(model=model, seq_len=16, batch_size=32, steps=300, lr=3e-3, warmup=30, eval_every=100,
               save_every=300, eval_batches=4, log_every=50)  # fmt: skip
    assert train(cfg, tmp_path / "run").metrics["accuracy"] >= 0.99
