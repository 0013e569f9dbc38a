"""One default per concept, the same in the config, the layers, Python and the command line."""

import inspect

import pytest
import torch

from reformer import LSHSelfAttention, ReformerConfig, ReformerLM, lsh_attention
from reformer.cli import build_parser
from reformer.data.byte_corpus import load_corpus
from reformer.devices import default_device
from reformer.generation import seq2seq, streaming
from reformer.tasks.lm import sample_text


def _default(fn, name):
    return inspect.signature(fn).parameters[name].default


def test_the_causal_lsh_key_rule_is_own_bucket_at_every_level():
    assert ReformerConfig(causal=True).lsh_key_rule == "own_bucket"
    assert LSHSelfAttention(32, 2, causal=True).key_rule == "own_bucket"
    assert ReformerConfig(causal=False).lsh_key_rule == LSHSelfAttention(32, 2).key_rule == "chunks"
    qk = torch.randn(1, 1, 20, 4)
    with pytest.raises(ValueError, match="own_bucket"):
        lsh_attention(qk, qk, bucket_size=4, causal=True)  # the rule needs a fixed count here


def test_every_generate_path_samples_at_temperature_1_by_default():
    parser = build_parser()
    cli = parser.parse_args(["generate", "DIR", "--prompt", "x"])
    defaults = {
        "ReformerLM.generate": _default(ReformerLM.generate, "temperature"),
        "stream": _default(streaming.stream, "temperature"),
        "seq2seq generate": _default(seq2seq.generate, "temperature"),
        "reformer generate": cli.temperature,
    }
    assert set(defaults.values()) == {1.0}, defaults
    assert (cli.top_k, cli.top_p, _default(ReformerLM.generate, "top_k")) == (None, None, None)


def test_the_sample_after_training_is_what_reformer_generate_prints(tmp_path, capsys):
    from reformer.cli import main

    torch.manual_seed(0)
    cfg = ReformerConfig(
        vocab_size=256, d_model=32, n_heads=2, n_layers=2, d_ff=64, bucket_size=8, max_seq_len=128,
        attn_layers=("local", "lsh"), local_chunk_size=8,
    )  # fmt: skip
    model = ReformerLM(cfg)
    model.save_pretrained(tmp_path / "m")
    text = tmp_path / "corpus.txt"
    text.write_text("def main():\n    return 0\n" * 100)
    sample = sample_text(model, load_corpus([text]), n=30, seed=3)
    prompt = sample.split("|", 1)[0]
    args = ["generate", str(tmp_path / "m"), "--prompt", prompt, "--max-new-tokens", "30"]
    assert main([*args, "--seed", "3"]) == 0
    assert prompt + "|" + capsys.readouterr().out[:-1] == sample


@pytest.mark.parametrize(
    "argv",
    [
        ["train"],
        ["eval", "RUN"],
        ["predict", "RUN", "--text", "x"],
        ["generate", "DIR", "--prompt", "x"],
        ["bench"],
    ],
)
def test_every_command_takes_the_same_device_rule(argv):
    assert build_parser(argv).parse_args(argv).device is None  # resolved by default_device


def test_the_device_rule(monkeypatch):
    assert default_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == torch.device("cuda")
