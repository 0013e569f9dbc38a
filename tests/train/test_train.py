"""Training loop, checkpoints, resume, signals, data sources, DDP and the train/eval commands."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from reformer import ReformerLM
from reformer.cli import main
from reformer.data import IGNORE_INDEX, contiguous_windows, load_corpus
from reformer.tasks.copy import COPY_SYMBOLS, copy_task_batch
from reformer.tasks.lm import LanguageModelTask
from reformer.train import (
    TrainConfig,
    TrainingError,
    checkpoint_dirs,
    evaluate_run,
    learning_rate,
    preset_config,
    read_metrics,
    train,
)
from tests.conftest import SMALL_FLAGS, SMALL_MODEL
from tests.conftest import small_lm_config as small_config

pytestmark = pytest.mark.usefixtures("own_cache")


# ---- data ------------------------------------------------------------------------------------------


def test_copy_task_batch_is_0w0w_with_second_half_targets():
    inputs, targets = copy_task_batch(5, 20, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (5, 20)
    assert (inputs[:, 0] == 0).all() and (inputs[:, 10] == 0).all()
    assert torch.equal(inputs[:, 1:10], inputs[:, 11:])
    assert inputs[:, 1:10].min() >= 1 and inputs[:, 1:10].max() <= COPY_SYMBOLS
    counted = targets != IGNORE_INDEX
    assert counted[:, 10:19].all() and not counted[:, :10].any() and not counted[:, 19].any()
    assert torch.equal(targets[:, 10:19], inputs[:, 11:20])  # next token of the second copy
    with pytest.raises(ValueError, match="even"):
        copy_task_batch(1, 21, torch.Generator())


def test_single_file_holds_out_its_tail(corpus_file):
    corpus = load_corpus([corpus_file])
    raw = corpus_file.read_bytes()
    assert len(corpus.train) + len(corpus.test) == len(raw)
    assert len(corpus.test) == int(len(raw) * 0.05)
    assert bytes(corpus.train[:10]) == raw[:10] and bytes(corpus.test[-10:]) == raw[-10:]


def test_folder_is_split_by_file(tmp_path):
    folder = tmp_path / "texts"
    for i in range(40):
        (folder / f"sub{i % 3}").mkdir(parents=True, exist_ok=True)
        (folder / f"sub{i % 3}" / f"f{i}.txt").write_text(f"file {i} " * 20)
    (folder / ".hidden").write_text("never read")
    corpus = load_corpus([folder])
    train_text, test_text = bytes(corpus.train), bytes(corpus.test)
    assert test_text and train_text and b"never read" not in train_text + test_text
    for i in range(40):  # each file is wholly on one side
        needle = f"file {i} " * 20
        assert (needle.encode() in train_text) != (needle.encode() in test_text)
    assert load_corpus([folder]).test.filename == corpus.test.filename  # deterministic, cached


def test_bad_data_paths_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_corpus([tmp_path / "nope"])
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_corpus([tmp_path / "empty.txt"])
    (tmp_path / "enwik8.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a valid zip"):
        load_corpus([tmp_path / "enwik8.zip"])
    (tmp_path / "enwik8").write_bytes(b"x" * 1000)
    with pytest.raises(ValueError, match="truncated or not enwik8"):
        load_corpus([tmp_path / "enwik8"])


def test_enwik8_zip_gives_the_standard_split(tmp_path):
    data = np.zeros(100_000_000, dtype=np.uint8)
    data[89_999_999], data[90_000_000], data[95_000_000] = 1, 2, 3
    archive = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        z.writestr("enwik8", data.tobytes())
    del data
    corpus = load_corpus([archive])
    assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == (90_000_000, 5_000_000, 5_000_000)
    assert corpus.train[-1] == 1 and corpus.valid[0] == 2 and corpus.test[0] == 3


def test_contiguous_windows_predict_every_byte_once():
    data = np.arange(1, 26, dtype=np.uint8)  # 25 bytes: 24 predictions
    batches = list(contiguous_windows(data, seq_len=5, batch_size=2, max_tokens=None))
    targets = torch.cat([t.flatten() for _, t in batches]).tolist()
    assert targets == list(range(2, 26))
    for inputs, t in batches:
        assert torch.equal(inputs[:, 1:], t[:, :-1])


# ---- schedule --------------------------------------------------------------------------------------


def test_rsqrt_schedule_warms_up_and_does_not_depend_on_steps():
    cfg = TrainConfig(model={}, lr=1e-3, warmup=100)
    assert learning_rate(cfg, 0) == pytest.approx(1e-5)
    assert learning_rate(cfg, 99) == pytest.approx(1e-3)
    assert learning_rate(cfg, 399) == pytest.approx(5e-4)  # sqrt(100 / 400)
    longer = TrainConfig(model={}, lr=1e-3, warmup=100, steps=10**6)
    assert [learning_rate(longer, s) for s in range(0, 2000, 37)] == [
        learning_rate(cfg, s) for s in range(0, 2000, 37)
    ]
    cosine = TrainConfig(model={}, lr=1e-3, warmup=10, schedule="cosine", cosine_steps=110)
    assert learning_rate(cosine, 9) == pytest.approx(1e-3)
    assert learning_rate(cosine, 109) == pytest.approx(1e-4)
    # Without cosine_steps the horizon is the run's steps.
    stretched = TrainConfig(model={}, lr=1e-3, warmup=10, schedule="cosine", steps=110)
    assert [learning_rate(stretched, s) for s in (9, 50, 109)] == [
        learning_rate(cosine, s) for s in (9, 50, 109)
    ]
    assert learning_rate(cosine, 500) == pytest.approx(1e-4)  # past the horizon: the floor
    with pytest.raises(ValueError, match="cosine_steps=0"):
        TrainConfig(model={}, schedule="cosine", cosine_steps=0).validate()


def test_resuming_a_cosine_run_with_more_steps_stretches_its_horizon_and_says_so(
    tmp_path, corpus_file, capsys
):
    run = tmp_path / "run"
    first = ["train", "--data", str(corpus_file), "--out", str(run), "--schedule", "cosine", "--warmup", "1"]
    first += ["--log-every", "1"]
    assert main([*first, "--steps", "4", "--save-every", "4", *SMALL_FLAGS]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--steps", "8", "--no-sample", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "horizon moves from step 4 to 8" in err and "--cosine-steps 4 to keep the old curve" in err
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["cosine_steps"] is None and saved["steps"] == 8  # the run's settings now
    lrs = {r["step"]: r["lr"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"}
    cfg = TrainConfig(model={}, lr=saved["lr"], warmup=1, schedule="cosine", steps=8)
    assert lrs[5] == pytest.approx(learning_rate(cfg, 4)) and lrs[5] > 2 * saved["lr"] * saved["min_lr_ratio"]
    # A fixed horizon keeps the old curve: the extra steps train at the floor, and that is said too.
    assert (
        main(["train", "--out", str(run), "--resume", "--steps", "10", "--cosine-steps", "8", "--no-sample"])
        == 0
    )
    assert "steps 9 to 10 train at the floor" in capsys.readouterr().err
    lrs = {r["step"]: r["lr"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"}
    assert lrs[10] == pytest.approx(saved["lr"] * saved["min_lr_ratio"])


# ---- training --------------------------------------------------------------------------------------


def test_loss_falls_on_a_repetitive_corpus(tmp_path, corpus_file):
    result = train(small_config(corpus_file, steps=60, eval_every=60, save_every=60), tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if r["split"] == "train")
    assert result.metrics["bits_per_byte"] < 0.5 * first["loss"] / math.log(2)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    state = json.loads((result.checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 60 and state["world_size"] == 1


def test_resume_is_bit_identical_to_a_straight_run(tmp_path, corpus_file):
    # Dropout and fresh hash rotations every step: the RNG states must be restored exactly.
    cfg = small_config(corpus_file, model={**SMALL_MODEL, "dropout": 0.1}, steps=20, save_every=10)
    train(cfg, tmp_path / "straight")
    train(small_config(corpus_file, model=cfg.model, steps=10, save_every=10), tmp_path / "halves")
    train(
        small_config(corpus_file, model=cfg.model, steps=20, save_every=10), tmp_path / "halves", resume=True
    )
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "halves" / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    straight_opt = torch.load(checkpoint_dirs(tmp_path / "straight")[-1] / "optimizer.pt")
    resumed_opt = torch.load(checkpoint_dirs(tmp_path / "halves")[-1] / "optimizer.pt")
    for a, b in zip(straight_opt["state"].values(), resumed_opt["state"].values(), strict=True):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_runs_refuse_to_overwrite_or_resume_nothing(tmp_path, corpus_file):
    with pytest.raises(TrainingError, match="no checkpoint"):
        train(small_config(corpus_file), tmp_path / "empty", resume=True)
    train(small_config(corpus_file, steps=5), tmp_path / "run")
    with pytest.raises(TrainingError, match="already holds a run"):
        train(small_config(corpus_file, steps=5), tmp_path / "run")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, corpus_file):
    cfg = small_config(corpus_file, steps=5, save_every=5)
    train(cfg, tmp_path / "run")
    poisoned = tmp_path / "run" / "checkpoints" / "step-00000005"
    weights = load_file(poisoned / "model.safetensors")
    weights["lm_head.bias"][0] = float("nan")
    from safetensors.torch import save_file

    from reformer.train.checkpoints import write_manifest

    save_file(weights, poisoned / "model.safetensors")
    write_manifest(poisoned)  # weights that make the loss NaN, written by the run itself
    with pytest.raises(TrainingError, match="loss became nan at step 6.*step-00000005"):
        train(small_config(corpus_file, steps=10, save_every=5), tmp_path / "run", resume=True)
    assert checkpoint_dirs(tmp_path / "run")[-1].name == "step-00000005"
    saved = load_file(tmp_path / "run" / "model.safetensors")  # nothing written after the bad step
    for name, value in saved.items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0, equal_nan=True)


def test_skip_nonfinite_skips_the_update_counts_it_and_stops_past_its_budget(
    tmp_path, corpus_file, monkeypatch
):
    from reformer.train import loop

    real = loop.accumulate_gradients

    def poison(steps):  # the loss of these steps (counted from the run's start) reads NaN
        calls = itertools.count(1)

        def flaky(*args, **kwargs):
            total = real(*args, **kwargs)  # the gradients are finite: an update would change the weights
            return float("nan") if next(calls) in steps else total

        monkeypatch.setattr(loop, "accumulate_gradients", flaky)

    run = tmp_path / "run"
    poison({3, 5})
    train(small_config(corpus_file, steps=6, save_every=1, keep_checkpoints=10, skip_nonfinite=2), run)
    folders = {int(d.name[5:]): d for d in checkpoint_dirs(run)}
    assert sorted(folders) == [1, 2, 3, 4, 5, 6]

    def saved(step):
        weights = load_file(folders[step] / "model.safetensors")
        moments = torch.load(folders[step] / "optimizer.pt", weights_only=True)["state"]
        return [*weights.values(), *(t for s in moments.values() for t in s.values())]

    for step in (3, 5):  # a skipped step leaves weights and optimiser state exactly as they were
        assert all(torch.equal(a, b) for a, b in zip(saved(step), saved(step - 1), strict=True))
        assert not all(torch.equal(a, b) for a, b in zip(saved(step + 1), saved(step), strict=True))
    assert json.loads((folders[6] / "trainer_state.json").read_text())["skipped_steps"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = [(r["step"], r["skipped_steps"]) for r in records if r["split"] == "skipped"]
    assert skipped == [(3, 1), (5, 2)]
    assert all(math.isfinite(r["loss"]) for r in records if r["split"] == "train")

    poison({2})  # the budget is spent: the next NaN stops the run before its update, nothing saved
    with pytest.raises(TrainingError, match=r"loss became nan at step 8 .*after 2 skipped .*step-00000007"):
        train(small_config(corpus_file, steps=9, save_every=1, keep_checkpoints=10, skip_nonfinite=2), run,
              resume=True)  # fmt: skip
    assert checkpoint_dirs(run)[-1].name == "step-00000007"


def test_damaged_checkpoint_is_reported(tmp_path, corpus_file, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(corpus_file), "--out", str(run), "--steps", "3", *SMALL_FLAGS]) == 0
    newest = checkpoint_dirs(run)[-1]
    (newest / "model.safetensors").write_bytes(b"garbage")
    assert main(["train", "--out", str(run), "--resume", "--steps", "6", "--no-sample"]) == 1
    err = capsys.readouterr().err
    assert f"no checkpoint of {run} passes verification" in err
    assert "model.safetensors has 7 bytes, the manifest says" in err
    assert checkpoint_dirs(run) == [newest]  # nothing is moved when nothing verifies
    (newest / "manifest.json").unlink()  # as older versions wrote checkpoints: loading finds the damage
    assert main(["train", "--out", str(run), "--resume", "--steps", "6", "--no-sample"]) == 1
    assert "not a readable safetensors file" in capsys.readouterr().err
    (checkpoint_dirs(run)[-1] / "trainer_state.json").write_text("{")
    assert main(["train", "--out", str(run), "--resume", "--steps", "6", "--no-sample"]) == 1
    assert "not valid JSON" in capsys.readouterr().err


def test_cli_errors_name_the_bad_value(tmp_path, capsys):
    with pytest.raises(SystemExit):  # the data is read before the run folder is made
        main(["train", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "r"), *SMALL_FLAGS])
    assert "missing.txt does not exist" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit):
        main(["train", "--batch-size", "0", "--out", str(tmp_path / "r2")])
    assert "batch_size=0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--task", "lm", "--preset", "copy", "--out", str(tmp_path / "r3")])
    assert "copy-task preset" in capsys.readouterr().err


def test_resume_only_changes_run_control_flags(tmp_path, corpus_file, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(corpus_file), "--out", str(run), "--steps", "2", *SMALL_FLAGS]) == 0
    with pytest.raises(SystemExit):
        main(["train", "--out", str(run), "--resume", "--lr", "0.5"])
    assert "differs from the resumed run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--out", str(run), "--resume", "--d-model", "64"])
    assert "drop --d-model" in capsys.readouterr().err


def test_resume_accepts_the_original_command_line_and_names_each_conflict(tmp_path, corpus_file, capsys):
    run = tmp_path / "run"
    first = ["train", "--data", str(corpus_file), "--out", str(run), "--preset", "tiny", "--lr", "0.003"]
    first += SMALL_FLAGS
    assert main([*first, "--steps", "2"]) == 0
    # The original command line (--preset and --data included) with --resume and a later --steps.
    assert main([*first, "--resume", "--steps", "4"]) == 0
    assert json.loads((checkpoint_dirs(run)[-1] / "trainer_state.json").read_text())["step"] == 4
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*first, "--resume", "--steps", "6", "--lr", "0.5", "--d-model", "64", "--batch-size", "4"])
    err = capsys.readouterr().err
    assert "--lr 0.5 differs from the resumed run's 0.003" in err
    assert "--d-model 64 differs from the resumed run's 32" in err
    assert "--batch-size 4 differs" not in err  # equal to the saved value
    with pytest.raises(SystemExit):
        main(["train", "--out", str(run), "--resume", "--preset", "copy"])
    err = capsys.readouterr().err
    assert "--preset copy" in err and "'copy'" in err and "'lm'" in err  # its task, as one of the conflicts
    assert json.loads((checkpoint_dirs(run)[-1] / "trainer_state.json").read_text())["step"] == 4


def test_eval_command_prints_bits_per_byte_last(tmp_path, corpus_file, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(corpus_file), "--out", str(run), "--steps", "3", *SMALL_FLAGS]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--max-tokens", "500"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("bits_per_byte=") and 0 < float(last.split("=")[1]) < 9
    assert main(["eval", str(tmp_path / "nowhere")]) == 1


def test_copy_task_run_reports_accuracy(tmp_path, capsys):
    run = tmp_path / "copy"
    flags = ["--task", "copy", "--seq-len", "32", "--batch-size", "4", "--bucket-size", "8",
             "--d-model", "32", "--d-ff", "64", "--n-heads", "2", "--steps", "2", "--no-progress",
             "--no-sample"]  # fmt: skip
    assert main(["train", "--out", str(run), *flags]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--n-hashes", "8"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("accuracy=") and 0 <= float(last.split("=")[1]) <= 1
    full = evaluate_run(run, full_attention=True)
    assert 0 <= full["accuracy"] <= 1


# ---- interruption ----------------------------------------------------------------------------------


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "reformer", *args]


def test_sigint_saves_a_loadable_checkpoint(tmp_path, corpus_file):
    run = tmp_path / "run"
    env = {**os.environ, "REFORMER_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        _cli("train", "--data", str(corpus_file), "--out", str(run), "--steps", "100000",
             "--log-every", "1", "--save-every", "100000", *SMALL_FLAGS),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300  # a loaded machine may take minutes to start
    while not (run / "metrics.jsonl").is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "stopped by signal" in err and "--resume" in err
    state = json.loads((checkpoint_dirs(run)[-1] / "trainer_state.json").read_text())
    assert state["step"] >= 1
    model = ReformerLM.from_pretrained(run)
    assert model(torch.zeros(1, 8, dtype=torch.long)).isfinite().all()


# ---- scale out -------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_processes_equal_one_process_on_the_combined_batch(tmp_path, corpus_file):
    env = {**os.environ, "REFORMER_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    common = ["train", "--data", str(corpus_file), "--steps", "2", "--device", "cpu", *SMALL_FLAGS]
    single = subprocess.run(
        _cli(*common, "--out", str(tmp_path / "one")), env=env, capture_output=True, text=True
    )
    assert single.returncode == 0, single.stderr
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                "127.0.0.1", "--master-port", str(_free_port()), "-m", "reformer"]  # fmt: skip
    ddp = subprocess.run(
        [*launcher, *common, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True
    )
    assert ddp.returncode == 0, ddp.stderr
    assert "parameters identical across 2 processes" in ddp.stderr
    state = json.loads((checkpoint_dirs(tmp_path / "two")[-1] / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 2
    one, two = (
        load_file(tmp_path / "one" / "model.safetensors"),
        load_file(tmp_path / "two" / "model.safetensors"),
    )
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=2e-6, msg=name)


def test_gradient_accumulation_equals_the_full_batch(tmp_path, corpus_file):
    # Fixed rotations: with fresh ones every forward, two micro-batches would hash differently.
    model = {**SMALL_MODEL, "hash_seed": 3}
    train(small_config(corpus_file, model=model, steps=3, grad_accum=1), tmp_path / "one")
    train(small_config(corpus_file, model=model, steps=3, grad_accum=2), tmp_path / "two")
    one = load_file(tmp_path / "one" / "model.safetensors")
    two = load_file(tmp_path / "two" / "model.safetensors")
    torch.manual_seed(0)  # the run's seed: the weights it started from
    init = ReformerLM(small_config(corpus_file, model=model).model_config()).state_dict()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-6)
    moved = max(float((one[n] - init[n]).abs().max()) for n in one)
    assert moved > 1e-3  # the steps did train


def test_gradient_accumulation_weights_micro_batches_by_their_target_tokens(
    tmp_path, corpus_file, monkeypatch
):
    # The n-th row drawn ignores (n % 4) quarters of its targets, so the micro-batches of an accumulated
    # step hold different numbers of target tokens: the step must still be the full batch's mean over all
    # of its target tokens, not the mean of the micro-batches' means.
    draw, drawn = LanguageModelTask.batch, itertools.count()

    def uneven(self, size, generator, split="train"):
        inputs, targets = draw(self, size, generator, split)
        targets = targets.clone()  # a view of the same windows as the inputs
        for row in range(size):
            targets[row, : next(drawn) % 4 * targets.shape[1] // 4] = IGNORE_INDEX
        return inputs, targets

    monkeypatch.setattr(LanguageModelTask, "batch", uneven)
    model = {**SMALL_MODEL, "hash_seed": 3}
    runs = {}
    for accum in (1, 2, 4):
        train(small_config(corpus_file, model=model, steps=3, grad_accum=accum), tmp_path / str(accum))
        runs[accum] = load_file(tmp_path / str(accum) / "model.safetensors")
    for accum in (2, 4):
        for name in runs[1]:
            torch.testing.assert_close(runs[accum][name], runs[1][name], rtol=0, atol=1e-6)
    logged = [json.loads(line) for line in (tmp_path / "4" / "metrics.jsonl").read_text().splitlines()]
    logged_full = [json.loads(line) for line in (tmp_path / "1" / "metrics.jsonl").read_text().splitlines()]
    train_loss = lambda records: [r["loss"] for r in records if r["split"] == "train"]
    assert train_loss(logged) == pytest.approx(train_loss(logged_full), rel=1e-5)


def test_bf16_autocast_trains(tmp_path, corpus_file):
    result = train(small_config(corpus_file, steps=3, precision="bf16"), tmp_path / "run")
    assert math.isfinite(result.metrics["loss"])


def test_a_training_step_is_deterministic_at_the_tiny_presets_size():
    # Bit-exact resume needs bit-exact steps. At this size CPU kernels run multi-threaded, where an
    # accumulating index_put_ (the backward of weight[index]) once made position gradients vary.
    cfg = preset_config("tiny")
    torch.manual_seed(0)
    model = ReformerLM(cfg.model_config())
    ids = torch.randint(0, 256, (8, cfg.seq_len), generator=torch.Generator().manual_seed(1))
    runs = []
    for _ in range(4):
        torch.manual_seed(5)  # the same rotations every time
        model.zero_grad()
        model(ids, targets=ids.roll(-1, 1)).backward()
        runs.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for grads in runs[1:]:
        assert [n for n in grads if not torch.equal(grads[n], runs[0][n])] == []


@pytest.mark.parametrize("max_norm", [0.5, 1.0 + 5e-7, 1.0 + 1e-4, 2.0])
def test_clip_gradients_equals_clip_grad_norm(max_norm):
    """Clipped, inside clip_grad_norm_'s 1e-6 band (it scales by 1 / (1 + 1e-6 - 5e-7)), and not clipped."""
    from reformer.train.loop import clip_gradients

    torch.manual_seed(0)
    models = [
        torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)) for _ in "ab"
    ]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randn(5, 8)
    for m in models:
        m(x).square().sum().backward()
        norm = torch.nn.utils.get_total_norm([p.grad for p in m.parameters()])
        for p in m.parameters():
            p.grad /= norm  # total norm 1 (to float32 rounding)
    torch.nn.utils.clip_grad_norm_(models[0].parameters(), max_norm)
    clip_gradients(models[1], max_norm)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize(("flag", "reversible"), [("--reversible", True), ("--no-reversible", False)])
def test_reversible_flag_sets_the_model(tmp_path, corpus_file, flag, reversible):
    run = tmp_path / "run"
    main(["train", "--data", str(corpus_file), "--out", str(run), *SMALL_FLAGS, "--steps", "1", flag])
    assert json.loads((run / "config.json").read_text())["reversible"] is reversible
    assert json.loads((run / "train_config.json").read_text())["model"]["reversible"] is reversible
