"""The task registry: a task added from outside the package trains, evaluates and resumes through the
shared commands; unknown tasks and other tasks' flags are named; train_config.json's layouts (the
current one, ``--config`` round trips, the flat layout of older runs); ``--help`` shows the values a run
will use; task metrics against hand-built models."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from reformer.cli import build_parser, main
from reformer.config import ReformerConfig
from reformer.data import IGNORE_INDEX
from reformer.tasks import Preset, Task, get_task, register, setting, task_names, unregister
from reformer.tasks.copy import copy_task_batch
from reformer.train import TrainConfig, config_from_args, parse_train_args, train
from tests.conftest import SMALL_FLAGS

LEGACY = Path(__file__).parent.parent / "fixtures" / "train_config_flat_layout.json"


pytestmark = pytest.mark.usefixtures("own_cache")


# ---- a task from outside the package --------------------------------------------------------------


@dataclass
class CounterSettings:
    modulus: int = setting(16, "the counter's modulus: tokens 0 .. modulus - 1")


class CounterTask(Task):
    """Next value of a counter ``s, s + 1, ...`` (mod ``modulus``) from a random start; training
    sequences are shifted by the steps taken so far, a state that a resumed run must get back."""

    name = "counter"
    about = "a test task: the next value of a counter"
    Settings = CounterSettings
    presets = {
        "counter-small": Preset(
            "counter",
            "one exact layer",
            tasks=("counter",),
            model=dict(d_model=32, n_heads=2, n_layers=1, d_ff=64, attn_layers=("full",)),
            run=dict(
                seq_len=16,
                batch_size=4,
                steps=4,
                lr=3e-3,
                warmup=1,
                eval_every=2,
                save_every=2,
                eval_batches=1,
                log_every=1,
            ),
        )  # fmt: skip
    }
    default_preset = "counter-small"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.steps_taken = 0

    def model_config(self):
        return self.cfg.model.reformer_config(self.cfg.seq_len, self.settings.modulus, causal=True)

    def batch(self, size, generator, split="train"):
        shift = self.steps_taken if split == "train" else 0
        start = torch.randint(0, self.settings.modulus, (size, 1), generator=generator) + shift
        values = (start + torch.arange(self.cfg.seq_len + 1)) % self.settings.modulus
        return values[:, :-1], values[:, 1:]

    @torch.no_grad()
    def evaluate(self, model, batches, device, n_hashes=None):
        model.eval()
        loss, right, count = 0.0, 0, 0
        for inputs, targets in batches:
            logits = model(inputs.to(device), n_hashes=n_hashes).float()
            loss += float(
                nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
            )
            right += int((logits.argmax(-1) == targets).sum())
            count += targets.numel()
        model.train()
        return {"loss": loss / count, "accuracy": right / count}

    @classmethod
    def add_eval_arguments(cls, parser):
        parser.add_argument("--n-sequences", type=int, default=3, help="test sequences")

    def test_batches(self, model, options):
        return [self.batch(options.n_sequences, torch.Generator().manual_seed(7), "test")]

    def after_step(self, loss, step):
        self.steps_taken += 1
        return "counter: half-way" if step == 2 else None

    def state(self):
        return {"counter_steps": self.steps_taken}

    def restore(self, state):
        self.steps_taken = state["counter_steps"]

    def report(self, model, device):
        batches = self.test_batches(model, argparse.Namespace(n_sequences=3))
        return [f"counter accuracy: {self.evaluate(model, batches, device)['accuracy']:.4f}"]


@pytest.fixture
def counter():
    register(CounterTask)
    yield CounterTask
    unregister("counter")


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def test_a_registered_task_trains_evaluates_and_resumes_through_the_shared_commands(tmp_path, counter):
    flags = ["--task", "counter", "--modulus", "12", "--no-progress"]
    code, out, err = _run(["train", *flags, "--out", str(tmp_path / "a")])
    assert code == 0, err
    assert "counter: half-way" in err and "counter accuracy: " in out  # after_step's line, the report
    saved = json.loads((tmp_path / "a" / "train_config.json").read_text())
    assert saved["task"] == "counter" and saved["task_settings"] == {"modulus": 12}
    assert saved["seq_len"] == 16 and saved["model"]["d_model"] == 32  # the task's own preset
    assert json.loads((tmp_path / "a" / "config.json").read_text())["vocab_size"] == 12

    assert _run(["train", *flags, "--no-sample", "--steps", "2", "--out", str(tmp_path / "b")])[0] == 0
    code, _, err = _run(
        ["train", "--out", str(tmp_path / "b"), "--resume", "--steps", "4", "--no-progress", "--no-sample"]
    )
    assert code == 0, err
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    code, out, _ = _run(["eval", str(tmp_path / "a"), "--n-sequences", "2"])
    assert (
        code == 0 and out.splitlines()[0].startswith("loss=") and out.splitlines()[1].startswith("accuracy=")
    )
    code, _, err = _run(["eval", str(tmp_path / "a"), "--max-tokens", "5"])  # another task's eval flag
    assert code == 2 and "unrecognized arguments: --max-tokens" in err
    code, _, err = _run(["predict", str(tmp_path / "a"), "--text", "x"])
    assert code == 1 and "not a classifier run (task 'counter')" in err


def test_the_loop_hands_the_task_its_state_back_on_resume(tmp_path, counter, monkeypatch):
    """Without restore() the resumed run draws other batches: the state is what makes it exact."""
    flags = ["--task", "counter", "--no-progress", "--no-sample"]
    assert _run(["train", *flags, "--out", str(tmp_path / "a")])[0] == 0
    assert _run(["train", *flags, "--steps", "2", "--out", str(tmp_path / "b")])[0] == 0
    monkeypatch.setattr(CounterTask, "restore", lambda self, state: None)
    assert (
        _run(
            [
                "train",
                "--out",
                str(tmp_path / "b"),
                "--resume",
                "--steps",
                "4",
                "--no-progress",
                "--no-sample",
            ]
        )[0]
        == 0
    )
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_an_unknown_task_is_named_with_the_known_ones(tmp_path):
    with pytest.raises(
        ValueError, match="unknown task 'nope'; the tasks are lm, copy, mlm, classify, listops"
    ):
        get_task("nope")
    code, _, err = _run(["train", "--task", "nope", "--out", str(tmp_path / "r")])
    assert code == 2 and "unknown task 'nope'" in err and ", ".join(task_names()) in err
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        TrainConfig(task="nope")


def test_another_tasks_flag_names_the_tasks_that_take_it(tmp_path):
    code, _, err = _run(["train", "--task", "lm", "--min-len", "5", "--out", str(tmp_path / "r")])
    assert code == 2 and "--min-len is for --task listops / passkey / recall, not --task lm" in err
    code, _, err = _run(["train", "--cross-attention", "lsh", "--out", str(tmp_path / "r")])
    assert code == 2 and "--cross-attention is for --task reverse / sort / pairs, not --task lm" in err
    code, _, err = _run(["train", "--task", "copy", "--data", "x.txt", "--out", str(tmp_path / "r")])
    assert code == 2 and "--data is for --task lm / mlm / classify / pairs, not --task copy" in err


# ---- settings files ---------------------------------------------------------------------------------


def test_unknown_layouts_and_keys_are_named_in_saved_runs_and_config_files(tmp_path):
    saved = TrainConfig().to_dict()
    for bad, message in (({**saved, "format": 99}, "format 99 is unknown"), ({**saved, "nope": 1}, "'nope'")):
        with pytest.raises(ValueError, match=message):
            TrainConfig.from_dict(bad)
        config = tmp_path / "run.json"
        config.write_text(json.dumps(bad))
        code, _, err = _run(["train", "--config", str(config), "--out", str(tmp_path / "r")])
        assert code == 2 and message in err and str(config) in err


def test_config_file_round_trip_and_flags_over_it(tmp_path, corpus_file):
    run = tmp_path / "run"
    argv = [
        "train",
        "--data",
        str(corpus_file),
        "--out",
        str(run),
        "--steps",
        "2",
        "--lr",
        "0.002",
        *SMALL_FLAGS,
    ]
    assert main(argv) == 0
    saved = json.loads((run / "train_config.json").read_text())
    unset = ("format", "valid", "dtype", "vocab_size", "tokenizer", "reverse_complement", "image_size")
    assert saved["format"] == 2
    assert saved["task_settings"] == {"data": [str(corpus_file.resolve())], **dict.fromkeys(unset)}
    again = config_from_args(parse_train_args(["--config", str(run / "train_config.json")]))
    assert again.to_dict() == saved  # the saved file repeats the run
    changed = config_from_args(parse_train_args(["--config", str(run / "train_config.json"), "--steps", "9"]))
    assert changed.to_dict() == {**saved, "steps": 9}
    part = tmp_path / "part.json"
    part.write_text(json.dumps({"task": "copy", "steps": 3, "model": {"d_model": 64}}))
    cfg = config_from_args(parse_train_args(["--config", str(part), "--n-hashes", "2"]))
    assert (cfg.task, cfg.steps, cfg.seq_len) == ("copy", 3, 256)  # the copy preset under the file
    assert (cfg.model.d_model, cfg.model.n_hashes, cfg.model.axial_pos_dims) == (64, 2, (64,))
    part.write_text(json.dumps({"model": {"d_modle": 64}}))
    with pytest.raises(ValueError, match=r"unknown --task lm model settings \['d_modle'\]"):
        config_from_args(parse_train_args(["--config", str(part)]))


def test_runs_saved_in_the_flat_layout_load_as_they_were_trained(monkeypatch):
    """train_config.json files of the flat layout (task settings at the top level, a partial model dict)
    give the model the run was trained with, keep their task settings, and survive a round trip."""
    from reformer import ReformerConfig
    from reformer.models import Seq2SeqConfig
    from reformer.tasks.lm import LanguageModelTask

    # Runs of that layout read bytes; their data files are not on this machine.
    monkeypatch.setattr(LanguageModelTask, "vocab_size", property(lambda self: 256))

    for name, saved in json.loads(LEGACY.read_text()).items():
        flat = saved["train_config"]
        cfg = TrainConfig.from_dict(flat)
        config = cfg.model_config()
        if isinstance(config, Seq2SeqConfig):
            assert config.to_dict() == Seq2SeqConfig.from_dict(saved["config"]).to_dict(), name
        else:
            assert config.to_dict() == ReformerConfig.from_dict(saved["config"]).to_dict(), name
        newer = {f.name: f.default for f in dataclasses.fields(cfg.task_settings)}  # added since: defaults
        for key, value in dataclasses.asdict(cfg.task_settings).items():
            assert flat.get(key, newer[key]) == value, (name, key)
        defaults = TrainConfig().run_settings()
        for key, value in cfg.run_settings().items():  # a setting newer than the layout: its default
            assert flat.get(key, defaults[key]) == value, (name, key)
        assert set(defaults) - set(flat) <= {"skip_nonfinite", "cosine_steps", "log", "keep_best"}, name
        assert TrainConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict(), name
    assert TrainConfig.from_dict(
        json.loads(LEGACY.read_text())["classify"]["train_config"]
    ).task_settings.labels == [
        "a",
        "z",
    ]


# ---- --help ----------------------------------------------------------------------------------------


def _help(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([*argv, "--help"])
    return " ".join(out.getvalue().split())


def test_help_shows_the_values_of_the_chosen_preset_and_every_flag_has_help():
    assert "--d-model D_MODEL model width (the size of each residual stream's half) (default: 128)" in _help(
        ["train"]
    )
    copy = _help(["train", "--preset", "copy"])
    assert (
        "(default: 256)" in copy.split("--d-model D_MODEL model width")[1][:80]
        and "--seq-len SEQ_LEN tokens per sequence (default: 256)" in copy
    )
    listops = _help(["train", "--task", "listops"])
    assert (
        "--min-len MIN_LEN shortest expression: training expressions are longer than this (default: 128)"
        in listops
    )
    assert "--cross-attention" not in listops and "--cross-attention {full,lsh}" in _help(
        ["train", "--task", "sort"]
    )
    for argv in (["train"], ["train", "--task", "classify"], ["train", "--task", "pairs"]):
        command = build_parser(argv)._subparsers._group_actions[0].choices["train"]
        for action in command._actions:
            assert action.help, (argv, action.option_strings)


def test_flags_over_a_preset_follow_the_rules_of_the_model_settings():
    """Plain learned positions follow --seq-len; one attention kind fills --n-layers; several set it."""
    cfg = config_from_args(parse_train_args(["--preset", "copy", "--seq-len", "32"]))
    config = cfg.model_config()
    assert config.axial_pos_shape == (32,) and config.axial_pos_dims == (256,)
    cfg = config_from_args(parse_train_args(["--attn-layers", "local", "--n-layers", "3"]))
    assert cfg.model.attn_layers == ("local",) * 3
    cfg = config_from_args(parse_train_args(["--attn-layers", "local,lsh,full"]))
    assert cfg.model.n_layers == 3 and cfg.model.lsh_key_rule == "own_bucket"
    assert config_from_args(parse_train_args(["--task", "mlm"])).model.lsh_key_rule == "chunks"


# ---- task metrics against models built to be right or wrong ----------------------------------------


class Oracle(nn.Module):
    """Logits that put all weight on the true next token where ``right`` (a ``(length,)`` mask), and on
    token 0 elsewhere."""

    def __init__(self, right: torch.Tensor, vocab: int = 128) -> None:
        super().__init__()
        self.right, self.vocab, self.anchor = right, vocab, nn.Parameter(torch.zeros(()))

    def forward(self, inputs, n_hashes=None):
        guess = torch.where(self.right, inputs.roll(-1, dims=1), torch.zeros_like(inputs))
        return nn.functional.one_hot(guess, self.vocab).float() * 50


def test_copy_accuracy_counts_the_second_copy_only():
    cfg = TrainConfig(task="copy", seq_len=20, model={})
    task = cfg.make_task()
    batches = [copy_task_batch(4, 20, torch.Generator().manual_seed(0))]
    second = torch.arange(20) >= 10
    assert task.evaluate(Oracle(second), batches, torch.device("cpu"))["accuracy"] == 1.0
    assert task.evaluate(Oracle(~second), batches, torch.device("cpu"))["accuracy"] == 0.0
    half = second & (torch.arange(20) < 15)
    metrics = task.evaluate(Oracle(half), batches, torch.device("cpu"))
    counted = (batches[0][1] != IGNORE_INDEX)[:, :15].sum() / (batches[0][1] != IGNORE_INDEX).sum()
    assert metrics["accuracy"] == pytest.approx(float(counted))


def test_train_accepts_a_config_without_the_command_line(tmp_path, corpus_file):
    from tests.conftest import small_lm_config

    result = train(small_lm_config(corpus_file, steps=2), tmp_path / "run")
    assert result.step == 2 and set(result.metrics) == {"loss", "bits_per_byte"}


def test_model_settings_have_every_model_config_field_with_its_default():
    """Field for field (so a new ReformerConfig field cannot be missed); None only where the task or
    the length decides."""
    from reformer.models import Seq2SeqConfig
    from reformer.tasks import ModelSettings, Seq2SeqModelSettings

    ours = {f.name: f for f in dataclasses.fields(Seq2SeqModelSettings)}
    derived = {"vocab_size", "causal", "max_seq_len"}
    for source in (ReformerConfig, Seq2SeqConfig):
        for f in dataclasses.fields(source):
            if f.name in (
                "encoder",
                "decoder",
                "share_embeddings",
                "decoder_start_id",
                "eos_id",
                "cross_hash_seed",
            ):
                continue
            assert f.name in ours, f.name
            if f.name not in derived and f.default is not dataclasses.MISSING:
                assert ours[f.name].default == f.default, f.name
    assert {f.name for f in dataclasses.fields(ModelSettings)} == {
        f.name for f in dataclasses.fields(ReformerConfig)
    }


def test_copy_test_batches_take_the_eval_length_within_the_models_reach():
    import argparse

    from reformer.models import ReformerLM

    task = TrainConfig(task="copy", seq_len=20, model={}).make_task()
    model = ReformerLM(
        ReformerConfig(
            vocab_size=128,
            d_model=16,
            n_heads=2,
            n_layers=1,
            max_seq_len=64,
            position_embedding="rotary",
            attn_layers=("local",),
        )
    )
    longer = task.test_batches(model, argparse.Namespace(batch_size=2, max_tokens=96, length=48))
    assert [tuple(inputs.shape) for inputs, _ in longer] == [(2, 48)]
    trained = task.test_batches(model, argparse.Namespace(batch_size=2, max_tokens=40, length=None))
    assert [tuple(inputs.shape) for inputs, _ in trained] == [(2, 20)]
    with pytest.raises(ValueError, match="--length 80: input length 80 exceeds max_seq_len=64"):
        task.test_batches(model, argparse.Namespace(batch_size=2, max_tokens=None, length=80))
