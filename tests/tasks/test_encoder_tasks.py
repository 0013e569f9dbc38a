"""The encoder tasks of `reformer train` (mlm, classify, listops), `reformer eval` / `reformer predict`
on their runs, BERT masking, and the errors for bad labelled input."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reformer.cli import main
from reformer.data import IGNORE_INDEX
from reformer.models import ReformerForMaskedLM, ReformerForSequenceClassification
from reformer.tasks.classification import macro_f1
from reformer.tasks.labelled import DataError, load_labelled
from reformer.tasks.mlm import MASK_ID, mask_tokens
from reformer.train import TrainConfig, checkpoint_dirs, train
from tests.conftest import make_config

SMALL = [
    "--d-model", "32", "--n-heads", "2", "--d-ff", "64", "--bucket-size", "8", "--attn-layers", "local,lsh",
    "--batch-size", "8", "--no-progress", "--eval-batches", "2",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("own_cache")


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def vowel_task(tmp_path: Path, n: int, name: str) -> Path:
    """Class "a" texts are runs of 'a' and 'b' bytes, class "z" of 'y' and 'z': learnable in a few steps."""
    g = torch.Generator().manual_seed(len(name))
    rows = []
    for i in range(n):
        label = "az"[i % 2]
        letters = "ab" if label == "a" else "yz"
        length = int(torch.randint(5, 40, (1,), generator=g))
        text = "".join(letters[int(c)] for c in torch.randint(0, 2, (length,), generator=g))
        rows.append({"text": text, "label": label})
    return write_jsonl(tmp_path / name, rows)


# ---- masking -------------------------------------------------------------------------------------


def test_masking_chooses_15_percent_and_splits_80_10_10():
    ids = torch.randint(0, 256, (64, 400), generator=torch.Generator().manual_seed(0))
    inputs, labels = mask_tokens(ids, torch.Generator().manual_seed(1))
    chosen = labels != IGNORE_INDEX
    assert (chosen.sum(1) == 60).all()  # round(0.15 * 400) in every row
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])  # unchosen positions untouched
    n = chosen.sum().item()
    masked = (inputs[chosen] == MASK_ID).sum().item() / n
    kept = (inputs[chosen] == ids[chosen]).sum().item() / n  # includes random bytes that hit the original
    changed = ((inputs[chosen] != MASK_ID) & (inputs[chosen] != ids[chosen])).sum().item() / n
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.015 and abs(changed - 0.1 * 255 / 256) < 0.015
    assert inputs.max() <= MASK_ID and (inputs[inputs != MASK_ID] < 256).all()
    again, _ = mask_tokens(ids, torch.Generator().manual_seed(1))
    assert torch.equal(inputs, again)


def test_macro_f1_against_hand_counts():
    # class 0: tp 1, fp 1, fn 1 -> 2/4; class 1: tp 2, fp 1, fn 1 -> 4/6; classes 2 and 3: tp 0 -> 0
    assert macro_f1([0, 0, 1, 1, 1, 3], [0, 1, 1, 1, 0, 2]) == pytest.approx((2 / 4 + 4 / 6 + 0 + 0) / 4)
    assert macro_f1([1, 1], [1, 1]) == 1.0


# ---- labelled input ------------------------------------------------------------------------------


def test_folder_layout_reads_one_class_per_sub_folder(tmp_path):
    for label, texts in (("neg", ["bad", "awful"]), ("pos", ["good"])):
        (tmp_path / "d" / label).mkdir(parents=True)
        for i, text in enumerate(texts):
            (tmp_path / "d" / label / f"{i}.txt").write_text(text)
    data = load_labelled(tmp_path / "d", max_len=16)
    assert data.labels == ["neg", "pos"] and data.label_ids == [0, 0, 1]
    assert data.ids[2] == list(b"good")


def test_integer_labels_sort_numerically(tmp_path):
    rows = [{"text": "x", "label": n} for n in (10, 9, 2)]
    assert load_labelled(write_jsonl(tmp_path / "t.jsonl", rows), 8).labels == ["2", "9", "10"]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "ok", "label": "a"', r"t\.jsonl:2: not valid JSON .*one object like"),
        ('{"text": "no label"}', r't\.jsonl:2: no "label"'),
        ('{"label": "a"}', r't\.jsonl:2: no "text"'),
        ('{"text": "   ", "label": "a"}', r"t\.jsonl:2: the text is empty"),
        ('["text", "a"]', r"t\.jsonl:2: a JSON list, not an object"),
        (
            '{"text": "0123456789abcdef!", "label": "a"}',
            r"t\.jsonl:2: the text is 17 bytes, over .* --truncate",
        ),
    ],
)
def test_bad_lines_name_the_file_line_and_fix(tmp_path, line, message):
    path = write_jsonl(tmp_path / "t.jsonl", ['{"text": "fine", "label": "b"}', line])
    with pytest.raises(DataError, match=message):
        load_labelled(path, max_len=16)


def test_truncate_cuts_and_unknown_labels_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "x" * 20, "label": "a"}, {"text": "y", "label": "b"}])
    assert len(load_labelled(path, max_len=16, truncate=True).ids[0]) == 16
    with pytest.raises(DataError, match=r"t\.jsonl:2: label 'b' is not one of the run's classes \['a'\]"):
        load_labelled(path, max_len=32, labels=["a"])


# ---- the commands --------------------------------------------------------------------------------


def test_classify_trains_evaluates_and_predicts(tmp_path, capsys):
    train_file, valid_file = vowel_task(tmp_path, 64, "train.jsonl"), vowel_task(tmp_path, 16, "valid.jsonl")
    run = tmp_path / "run"
    argv = ["train", "--task", "classify", "--data", str(train_file), "--valid", str(valid_file)]
    assert main([*argv, "--out", str(run), *SMALL, "--seq-len", "64", "--steps", "20", "--lr", "5e-3"]) == 0
    saved = json.loads((run / "train_config.json").read_text())
    assert (run / "loss.png").is_file() and saved["task_settings"]["labels"] == ["a", "z"]
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    accuracy = float(out.split("accuracy=")[1].split()[0])
    assert accuracy >= 0.9 and "macro_f1=" in out
    assert main(["predict", str(run), "--text", "abba", "--text", "zyzzy"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["a", "z"]
    probs = {kv.split("=")[0]: float(kv.split("=")[1]) for kv in lines[0].split("\t")[2].split()}
    assert probs.keys() == {"a", "z"} and sum(probs.values()) == pytest.approx(1, abs=1e-3)

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ab", "label": "a"}, {"text": "ab", "label": "q"}])
    assert main(["eval", str(run), "--data", str(bad)]) == 1
    assert "bad.jsonl:2: label 'q'" in capsys.readouterr().err
    assert main(["predict", str(run), "--text", "x" * 65]) == 1
    assert "--text 1: the text is 65 tokens" in capsys.readouterr().err
    assert main(["predict", str(run), "--text", "x" * 65, "--truncate"]) == 0


def test_classify_refuses_long_texts_without_truncate(tmp_path, capsys):
    rows = [{"text": "short", "label": "a"}, {"text": "long " * 20, "label": "b"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    argv = [
        "train",
        "--task",
        "classify",
        "--data",
        str(path),
        "--valid",
        str(path),
        *SMALL,
        "--seq-len",
        "64",
    ]
    assert main([*argv, "--out", str(tmp_path / "r1"), "--steps", "1"]) == 1
    assert "t.jsonl:2: the text is 100 bytes, over the model's max_seq_len 64" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "r2"), "--steps", "1", "--truncate"]) == 0


@pytest.mark.parametrize(
    "flags", [["--tokenizer", "tok"], ["--format", "fasta"], ["--dtype", "uint16"], ["--image-size", "8"]]
)
def test_mlm_refuses_the_options_of_other_data_formats(tmp_path, capsys, flags):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox. " * 50)
    run = tmp_path / "run"
    with pytest.raises(SystemExit):
        main(["train", "--task", "mlm", "--data", str(corpus), *flags, *SMALL, "--out", str(run)])
    err = capsys.readouterr().err
    assert flags[0] in err and "--task mlm pretrains on bytes" in err and "Traceback" not in err
    assert not run.exists()


def test_mlm_holds_out_the_valid_file(tmp_path):
    corpus, valid = tmp_path / "corpus.txt", tmp_path / "valid.txt"
    corpus.write_text("the quick brown fox. " * 50)
    valid.write_text("ZZZZ" * 64)
    cfg = TrainConfig(task="mlm", seq_len=16)
    cfg.task_settings.data, cfg.task_settings.valid = [str(corpus)], str(valid)
    read = cfg.make_task().corpus
    assert bytes(read.test) == valid.read_bytes() and bytes(read.train) == corpus.read_bytes()


def test_mlm_pretrains_resumes_exactly_and_initialises_a_classifier(tmp_path, capsys, caplog):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    common = ["train", "--task", "mlm", "--data", str(corpus), *SMALL, "--seq-len", "64", "--no-sample"]
    assert main([*common, "--out", str(tmp_path / "straight"), "--steps", "6", "--save-every", "3"]) == 0
    assert main([*common, "--out", str(tmp_path / "halves"), "--steps", "3", "--save-every", "3"]) == 0
    assert main([*common, "--out", str(tmp_path / "halves"), "--steps", "6", "--resume"]) == 0
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "halves" / "model.safetensors")
    assert straight.keys() == resumed.keys() and "lm_head.weight" in straight
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    model = ReformerForMaskedLM.from_pretrained(tmp_path / "straight")
    assert model.config.vocab_size == 257 and not model.config.causal
    records = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert "bits_per_byte" in [r for r in records if r["split"] == "eval"][-1]
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "straight"), "--max-tokens", "512"]) == 0
    assert "bits_per_byte=" in capsys.readouterr().out

    train_file, valid_file = vowel_task(tmp_path, 32, "train.jsonl"), vowel_task(tmp_path, 8, "valid.jsonl")
    run = tmp_path / "clf"
    argv = ["train", "--task", "classify", "--data", str(train_file), "--valid", str(valid_file)]
    with caplog.at_level(logging.WARNING, logger="reformer"):
        assert main([*argv, "--init", str(tmp_path / "straight"), "--out", str(run), "--steps", "1",
                     "--no-progress", "--batch-size", "4"]) == 0  # fmt: skip
    assert (
        "loaded the trunk of a masked_lm checkpoint" in caplog.text
        and "classifier.dense.weight" in caplog.text
    )
    clf = ReformerForSequenceClassification.from_pretrained(run)
    assert clf.config == model.config
    with pytest.raises(SystemExit):
        main([*argv, "--init", str(tmp_path / "straight"), "--d-model", "64", "--out", str(tmp_path / "x")])
    assert "brings its model settings; drop --d-model" in capsys.readouterr().err


def test_listops_task_trains_and_predicts(tmp_path, capsys):
    run = tmp_path / "lo"
    argv = ["train", "--task", "listops", "--seq-len", "96", "--min-len", "20", *SMALL, "--steps", "2"]
    assert main([*argv, "--out", str(run)]) == 0
    cfg = TrainConfig.from_dict(json.loads((run / "train_config.json").read_text()))
    assert cfg.model_config().vocab_size == 15 and len(checkpoint_dirs(run)) >= 1
    capsys.readouterr()
    assert main(["eval", str(run), "--n-examples", "16"]) == 0
    assert "accuracy=" in capsys.readouterr().out
    assert main(["predict", str(run), "--text", "[MAX 2 9 [MIN 4 7 ] 0 ]"]) == 0
    label, prob, _ = capsys.readouterr().out.strip().split("\t")
    assert label in "0123456789" and 0 < float(prob) <= 1
    assert main(["predict", str(run), "--text", "[AVG 1 2 ]"]) == 1
    assert "--text 1: '[AVG' is not a ListOps symbol" in capsys.readouterr().err


def test_listops_held_out_lengths_and_mean_pooling(tmp_path, capsys, monkeypatch):
    """--eval-min-len: training expressions longer than --min-len, the run's held-out ones and reformer
    eval's test set longer than --eval-min-len (reformer eval --min-len overrides); --pooling mean is
    recorded in the run's head.json and a resumed run keeps it."""
    from reformer.tasks import listops

    cfg = make_config(task="listops", seq_len=96, min_len=10, eval_min_len=60, batch_size=64)
    task = cfg.make_task()
    g = torch.Generator().manual_seed(0)
    train_lengths = (task.batch(64, g)[0] != listops.PAD).sum(1)
    held_out = torch.cat([(inputs != listops.PAD).sum(1) for inputs, _ in task.held_out()])
    assert train_lengths.min() > 10 and train_lengths.max() < 97 and train_lengths.min() <= 60
    assert held_out.min() > 60 and held_out.max() < 97

    run = tmp_path / "lo"
    argv = ["train", "--task", "listops", "--seq-len", "96", "--min-len", "10", "--eval-min-len", "60",
            "--pooling", "mean", *SMALL, "--steps", "2", "--out", str(run)]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((run / "head.json").read_text())["pooling"] == "mean"
    assert ReformerForSequenceClassification.from_pretrained(run).pooling == "mean"
    asked = []
    real_set = listops.listops_set
    monkeypatch.setattr(
        listops, "listops_set", lambda n, lo, hi, seed: asked.append(lo) or real_set(n, lo, hi, seed)
    )
    capsys.readouterr()
    assert main(["eval", str(run), "--n-examples", "8"]) == 0
    assert main(["eval", str(run), "--n-examples", "8", "--min-len", "30"]) == 0
    assert asked == [60, 30] and capsys.readouterr().out.count("accuracy=") == 2
    assert main(["eval", str(run), "--n-examples", "8", "--min-len", "96"]) == 1
    assert "--min-len 96 must lie in [0, the run's --seq-len 96)" in capsys.readouterr().err
    assert main([*argv[:-2], "--steps", "3", "--out", str(run), "--resume"]) == 0
    assert ReformerForSequenceClassification.from_pretrained(run).pooling == "mean"
    with pytest.raises(SystemExit):
        main([*argv[:-2], "--pooling", "first", "--steps", "4", "--out", str(run), "--resume"])
    assert "--pooling first differs from the resumed run's 'mean'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--eval-min-len is for --task listops, not --task lm"):
        TrainConfig(model={}, task="lm", task_settings=dict(eval_min_len=5)).validate()
    with pytest.raises(ValueError, match="--eval-min-len 96 must lie"):
        make_config(task="listops", seq_len=96, eval_min_len=96).validate()


def test_classify_needs_a_valid_set(tmp_path):
    path = vowel_task(tmp_path, 8, "train.jsonl")
    cfg = make_config(model=dict(d_model=32, n_heads=2, n_layers=1, d_ff=64, attn_layers=("full",)),
                      task="classify", data=[str(path)], seq_len=64, steps=1, progress=False)  # fmt: skip
    with pytest.raises(Exception, match="--task classify needs one --data .* and one --valid"):
        train(cfg, tmp_path / "run")


def test_sigint_stops_an_encoder_run_that_then_resumes(tmp_path):
    run = tmp_path / "lo"
    argv = ["train", "--task", "listops", "--seq-len", "96", "--min-len", "20", *SMALL, "--log-every", "1"]
    env = {**os.environ, "REFORMER_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "reformer", *argv, "--steps", "100000", "--save-every", "100000",
         "--out", str(run)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not (run / "metrics.jsonl").is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, err
    step = json.loads((checkpoint_dirs(run)[-1] / "trainer_state.json").read_text())["step"]
    assert main([*argv, "--steps", str(step + 2), "--out", str(run), "--resume"]) == 0
    assert json.loads((checkpoint_dirs(run)[-1] / "trainer_state.json").read_text())["step"] == step + 2


def test_padded_batches_give_each_row_its_unpadded_logits():
    from reformer.config import ReformerConfig
    from reformer.tasks.encoder import pad_rows, split_padding

    torch.manual_seed(0)
    cfg = ReformerConfig(vocab_size=15, d_model=32, n_heads=2, n_layers=2, d_ff=64, bucket_size=8,
                         attn_layers=("local", "lsh"), local_chunk_size=8, causal=False, max_seq_len=64,
                         initializer_range=0.3)  # fmt: skip
    model = ReformerForSequenceClassification(cfg, n_labels=10).eval()
    rows = [torch.randint(0, 15, (n,)).tolist() for n in (40, 7, 23)]
    ids, mask = split_padding(pad_rows(rows))
    batched = model(ids, attention_mask=mask)
    for i, row in enumerate(rows):
        torch.testing.assert_close(batched[i], model(torch.tensor([row]))[0], atol=1e-5, rtol=1e-5)
