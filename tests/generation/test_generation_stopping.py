"""``generate``'s end-of-sequence ids, stop sequences and repetition penalty, against hand computations
and greedy decoding written here from the model's forward pass."""

import pytest
import torch

from reformer import ReformerConfig, ReformerLM
from reformer.generation.sampling import apply_repetition_penalty


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = ReformerConfig(
        vocab_size=24, d_model=32, n_heads=2, n_layers=3, d_ff=64, attn_layers=("lsh", "local", "lsh"),
        bucket_size=4, n_buckets=4, n_hashes=2, max_seq_len=64, local_chunk_size=4,
    )  # fmt: skip
    model = ReformerLM(cfg).double().eval()
    with torch.no_grad():  # peaked attention and logits: greedy choices are far from ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


def _greedy_reference(model, prompt, steps, penalty=1.0):
    """Greedy decoding by recomputing the whole sequence each step, the penalty applied by hand."""
    seq = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([seq]))[0, -1].tolist()
        for token in set(seq):
            value = logits[token]
            logits[token] = value / penalty if value > 0 else value * penalty
        seq.append(max(range(len(logits)), key=logits.__getitem__))
    return seq[len(prompt) :]


def test_repetition_penalty_is_ctrls_rule():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 0.0], [2.0, -1.0, 0.5, -3.0, 0.0]])
    seen = torch.tensor([[True, True, False, False, True], [False, False, True, True, False]])
    expected = torch.tensor([[1.0, -2.0, 0.5, -3.0, 0.0], [2.0, -1.0, 0.25, -6.0, 0.0]])
    assert torch.equal(apply_repetition_penalty(logits, seen, 2.0), expected)
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_with_a_repetition_penalty_equals_the_hand_computation(use_cache):
    model = _model()
    prompt = [3, 7, 3, 11, 5, 7]
    plain = model.generate(torch.tensor([prompt]), 12, temperature=0, use_cache=use_cache)[0, 6:].tolist()
    assert plain == _greedy_reference(model, prompt, 12)
    out = model.generate(
        torch.tensor([prompt]), 12, temperature=0, use_cache=use_cache, repetition_penalty=3.0
    )[0, 6:].tolist()
    assert out == _greedy_reference(model, prompt, 12, penalty=3.0)
    assert out != plain  # the penalty changed the choices
    assert len(set(out)) > len(set(plain))


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_stops_at_the_eos_id_and_pads_finished_rows(use_cache):
    model = _model()
    prompts = torch.tensor([[3, 7, 3, 11, 5, 7], [1, 2, 9, 4, 4, 8]])
    free = model.generate(prompts, 16, temperature=0, use_cache=use_cache)[:, 6:]
    # an id that row 0 produces first at step k and row 1 never produces earlier than row 0 does
    k = next(i for i in range(2, 16) if int(free[0, i]) not in free[0, :i].tolist())
    eos = int(free[0, k])
    out = model.generate(prompts, 16, temperature=0, use_cache=use_cache, eos_token_id=eos, pad_token_id=0)
    new = out[:, 6:]
    row1_end = next((i for i in range(16) if int(free[1, i]) == eos), 15)
    assert new.shape[1] == max(k, row1_end) + 1  # stops once both rows finished
    assert new[0, : k + 1].tolist() == free[0, : k + 1].tolist() and int(new[0, k]) == eos
    assert (new[0, k + 1 :] == 0).all()  # padded after its eos
    assert new[1, : row1_end + 1].tolist() == free[1, : row1_end + 1].tolist()
    # alone, row 0 stops right after its eos
    alone = model.generate(prompts[:1], 16, temperature=0, use_cache=use_cache, eos_token_id=[eos, 23])
    assert alone[0, 6:].tolist() == free[0, : k + 1].tolist()


def test_generation_stops_after_a_stop_sequence():
    model = _model()
    prompt = torch.tensor([[3, 7, 3, 11, 5, 7]])
    free = model.generate(prompt, 16, temperature=0)[0, 6:].tolist()
    pairs = [free[i : i + 2] for i in range(15)]
    k = next(i for i in range(1, 15) if pairs[i] not in pairs[:i])  # the first time this pair ends
    out = model.generate(prompt, 16, temperature=0, stop=[[99 % 24, 98 % 24, 97 % 24], pairs[k]])
    assert out[0, 6:].tolist() == free[: k + 2]
    # the prompt's own ids do not count: a stop sequence equal to the prompt's end does not stop at once
    assert model.generate(prompt, 3, temperature=0, stop=[[5, 7]]).shape[1] == 9


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(eos_token_id=24), "eos_token_id holds 24"),
        (dict(eos_token_id=[1, -1]), "eos_token_id holds -1"),
        (dict(stop=[[]]), "stop sequence is empty"),
        (dict(stop=[[1, 30]]), "stop sequence holds 30"),
        (dict(pad_token_id=24), "pad_token_id holds 24"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
    ],
)
def test_bad_stopping_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _model().generate(torch.tensor([[1, 2]]), 3, **kwargs)


def test_cli_stops_at_a_stop_text(tmp_path, capsys):
    from reformer.cli import main

    torch.manual_seed(0)
    cfg = ReformerConfig(
        vocab_size=256, d_model=32, n_heads=2, n_layers=2, d_ff=64, bucket_size=8, n_buckets=4,
        max_seq_len=128, attn_layers=("local", "lsh"), local_chunk_size=8,
    )  # fmt: skip
    model = ReformerLM(cfg)
    model.save_pretrained(tmp_path / "m")
    free = model.generate(torch.tensor([list(b"ab")]), 40, temperature=0)[0, 2:].tolist()
    first = next(i for i, b in enumerate(free) if 32 <= b < 127)  # an ASCII character to stop at
    args = [str(tmp_path / "m"), "--prompt", "ab", "--max-new-tokens", "40", "--temperature", "0"]
    assert main(["generate", *args, "--stop", chr(free[first])]) == 0
    expected = bytes(free[: first + 1]).decode("utf-8", errors="replace")
    assert capsys.readouterr().out[:-1] == expected
    assert main(["generate", *args, "--eos-id", str(free[first])]) == 0
    assert capsys.readouterr().out[:-1] == expected
    assert main(["generate", *args, "--repetition-penalty", "1.5"]) == 0
    capsys.readouterr()
