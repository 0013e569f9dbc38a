"""The passkey and recall tasks through the shared commands: the objective against a hand computation
from full logits, the accuracy of exact-match and per-token tasks, the curriculum and its resume, the
test grid of ``reformer eval`` with its heatmap and ablations, and bad settings named."""

import argparse
import math

import pytest
import torch

from reformer import ReformerConfig, ReformerLM
from reformer.cli import main
from reformer.data import IGNORE_INDEX
from reformer.tasks.retrieval import RetrievalObjective
from reformer.train import TrainConfig

SMALL = [
    "--d-model", "32", "--n-heads", "2", "--d-ff", "64", "--no-progress", "--eval-batches", "1",
    "--row-tokens", "512", "--min-len", "128", "--curriculum-start", "128", "--seq-len", "512",
    "--eval-lengths", "256",
]  # fmt: skip


def _model(**changes) -> ReformerLM:
    settings = dict(vocab_size=40, d_model=16, n_heads=2, n_layers=2, d_ff=32, attn_layers=("local", "lsh"),
                    bucket_size=8, local_chunk_size=8, max_seq_len=256, position_embedding="rotary",
                    lsh_key_rule="chunks", initializer_range=0.3)  # fmt: skip
    return ReformerLM(ReformerConfig(**{**settings, **changes}))


@pytest.mark.parametrize("weight", [0.0, 0.3])
def test_objective_is_answer_loss_plus_weighted_next_token_loss(weight):
    torch.manual_seed(0)
    model = _model().double().eval()  # eval: the same rotations in both forward passes
    inputs = torch.randint(0, 40, (2, 30))
    targets = torch.full((2, 30), IGNORE_INDEX)
    targets[:, -3:] = torch.randint(0, 40, (2, 3))
    logits = model(inputs)
    answer = torch.nn.functional.cross_entropy(logits[:, -3:].flatten(0, 1), targets[:, -3:].flatten())
    # every other position predicts the next input token
    rest = torch.nn.functional.cross_entropy(logits[:, :-3].flatten(0, 1), inputs[:, 1:-2].flatten())
    expected = answer + weight * rest
    got = RetrievalObjective(model, weight)(inputs, targets)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    (grad,) = torch.autograd.grad(got, model.lm_head.weight)
    (expected_grad,) = torch.autograd.grad(expected, model.lm_head.weight)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)


def _task(name: str, **settings):
    from reformer.tasks import get_task

    cfg = TrainConfig(task=name, seq_len=512, task_settings=settings or None)
    return get_task(name)(cfg)


def test_exact_match_counts_examples_and_per_token_counts_tokens():
    """A model whose logits are fixed: two examples, one with every answer token right, one with one of
    two right. Exact match: 1/2; per token: 3/4."""
    targets = torch.full((2, 6), IGNORE_INDEX)
    targets[:, -2:] = torch.tensor([[3, 4], [5, 6]])
    predicted = torch.tensor([[3, 4], [5, 0]])

    class Fixed(torch.nn.Module):
        config = None

        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Identity()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def hidden_states(self, inputs, n_hashes=None):
            out = torch.zeros(*inputs.shape, 10)
            out[:, -2:] = torch.nn.functional.one_hot(predicted, 10).float() * 5
            return out

    passkey, recall = _task("passkey"), _task("recall", vocab=64)
    batch = [(torch.zeros(2, 6, dtype=torch.long), targets)]
    assert passkey.evaluate(Fixed(), batch, torch.device("cpu"))["accuracy"] == 0.5
    assert recall.evaluate(Fixed(), batch, torch.device("cpu"))["accuracy"] == 0.75


def test_training_rows_fill_the_row_tokens_at_one_length():
    task = _task("passkey", min_len=128, curriculum_start=512, row_tokens=1024)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        inputs, targets = task.batch(2, generator)
        length = inputs.shape[1]
        assert 128 <= length <= 512 and inputs.shape[0] == 2 * max(1, 1024 // length)
        assert bool(((targets != IGNORE_INDEX).sum(1) == 5).all())


def test_curriculum_doubles_on_accuracy_and_stops_at_the_sequence_length(monkeypatch):
    task = _task("passkey", min_len=128, curriculum_start=128, curriculum_every=10)
    task.model = _model(vocab_size=256)
    accuracy = {"value": 0.5}
    monkeypatch.setattr(task, "evaluate", lambda *a, **k: {"accuracy": accuracy["value"]})
    assert task.after_step(0.0, 10) is None and task.longest == 128
    accuracy["value"] = 0.95
    assert task.after_step(0.0, 15) is None, "only every --curriculum-every steps"
    assert "up to 256" in task.after_step(0.0, 20) and task.longest == 256
    task.after_step(0.0, 30), task.after_step(0.0, 40)
    assert task.longest == 512 and task.after_step(0.0, 50) is None
    fresh = _task("passkey", min_len=128, curriculum_start=128)
    fresh.restore(task.state())
    assert fresh.longest == 512


def test_passkey_run_resumes_exactly_and_evaluates_a_grid(tmp_path, capsys):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    args = ["--task", "passkey", "--filler", "noise", *SMALL, "--eval-every", "2", "--save-every", "2"]
    assert main(["train", "--out", str(whole), "--steps", "4", "--no-sample", *args]) == 0
    assert main(["train", "--out", str(parts), "--steps", "2", "--no-sample", *args]) == 0
    assert main(["train", "--out", str(parts), "--steps", "4", "--resume", "--no-sample", *args]) == 0
    a, b = ReformerLM.from_pretrained(whole), ReformerLM.from_pretrained(parts)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    capsys.readouterr()
    heatmap = tmp_path / "grid.png"
    code = main(["eval", str(whole), "--lengths", "256,512", "--depths", "0,1", "--n-per-cell", "1",
                 "--heatmap", str(heatmap)])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and heatmap.read_bytes()[:4] == b"\x89PNG"
    assert "length 256: accuracy" in out and "length 512: accuracy" in out and "depth 0:" in out
    assert out.strip().splitlines()[-1].startswith("accuracy=")


def test_recall_eval_reports_accuracy_by_gap_and_refuses_lengths_over_the_model(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--task", "recall", "--vocab", "600", *SMALL, "--min-len", "64", "--curriculum-start", "128"]
    assert main(["train", "--out", str(run), "--steps", "1", "--no-sample", *args]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--lengths", "512", "--pairs", "16", "--n-per-cell", "2",
                 "--ablate", "lsh-zeroed"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert (
        "by gap (tokens after the pairs): 1-4:" in out and (run / "recall_heatmap_lsh-zeroed.png").is_file()
    )
    assert main(["eval", str(run), "--lengths", str(2**21)]) == 1
    assert "exceeds the model's max_seq_len" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--min-len", "10"], "below the"),
        (["--curriculum-start", "100"], "--curriculum-start 100 must lie in"),
        (["--curriculum-accuracy", "0"], "--curriculum-accuracy 0.0 must lie"),
        (["--lm-weight", "-1"], "--lm-weight -1.0 must be non-negative"),
        (["--digits", "0"], "--digits 0 must lie"),
    ],
)
def test_bad_passkey_settings_are_named(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        main(["train", "--task", "passkey", "--out", str(tmp_path / "r"), *flags])
    assert message in capsys.readouterr().err


def test_recall_pairs_that_cannot_fit_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(
            ["train", "--task", "recall", "--out", str(tmp_path / "r"), "--vocab", "64", "--max-pairs", "100"]
        )
    assert "vocabulary of at least" in capsys.readouterr().err


def test_the_presets_keep_the_lsh_layers_free_of_positions():
    """Rotary positions reach the local layers only (passkey), and recall has no positions at all: an
    LSH layer's scores must not depend on where a token stands, or retrieval could not run past the
    lengths seen in training."""
    from reformer.attention import LocalSelfAttention, LSHSelfAttention
    from reformer.tasks import get_task
    from reformer.train.config import preset_config

    for name, local_rotary in (("passkey", True), ("recall", False)):
        model = get_task(name)(preset_config(name)).build_model()
        layers = [m for m in model.modules() if isinstance(m, LocalSelfAttention | LSHSelfAttention)]
        kinds = {type(m): m.rotary_base for m in layers}
        assert kinds[LSHSelfAttention] is None and model.config.max_seq_len == 2**20
        if local_rotary:
            assert kinds[LocalSelfAttention] is not None and math.isclose(model.config.rotary_base, 10000.0)
        else:
            assert LocalSelfAttention not in kinds and model.config.position_embedding == "none"


def test_eval_options_reject_an_empty_cell():
    task = _task("passkey")
    options = argparse.Namespace(lengths=(256,), grid=(0.0,), n_per_cell=0, ablate="none", window=4096,
                                 heatmap=None, run=".")  # fmt: skip
    with pytest.raises(ValueError, match="--n-per-cell 0"):
        task.evaluate_test(_model(vocab_size=256), options, torch.device("cpu"))
