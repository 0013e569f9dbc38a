"""``ReformerLM(ids, labels=ids)``: HF's causal-LM loss, labels shifted inside; pre-shifted ``targets``."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from reformer import ReformerConfig, ReformerLM


def _model():
    torch.manual_seed(0)
    cfg = ReformerConfig(
        vocab_size=50, d_model=32, n_heads=2, n_layers=3, d_ff=64, bucket_size=8, n_hashes=2,
        max_seq_len=128, local_chunk_size=16, attn_layers=("lsh", "local", "lsh"), initializer_range=0.2,
    )  # fmt: skip
    return ReformerLM(cfg).eval()


def _hf_loss(logits, labels):
    """HF's causal-LM loss written from its definition: logits[:, :-1] against labels[:, 1:]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def test_labels_are_shifted_inside_as_hf_does():
    model = _model()
    ids = torch.randint(0, 50, (2, 45))
    out = model(ids, labels=ids)
    logits = model(ids)
    assert torch.allclose(out.loss, _hf_loss(logits, ids), atol=1e-5)
    assert torch.allclose(out.logits, logits, atol=1e-6)
    # the unshifted reading (position i predicting ids[:, i]) is far from it
    assert not torch.allclose(out.loss, F.cross_entropy(logits.flatten(0, 1), ids.flatten()), atol=1e-2)


def test_labels_ignore_minus_100_and_padding():
    model = _model()
    ids = torch.randint(0, 50, (2, 40))
    labels = ids.clone()
    labels[0, 10:20] = -100
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 30:] = False  # right padding: its labels do not count
    out = model(ids, attention_mask=mask, labels=labels)
    expected_labels = labels.masked_fill(~mask, -100)
    assert torch.allclose(out.loss, _hf_loss(model(ids, attention_mask=mask), expected_labels), atol=1e-5)


def test_labels_loss_trains():
    model = _model().train()
    ids = torch.randint(0, 50, (2, 33))
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.lm_head.parameters())


def test_targets_are_pre_shifted_and_the_inputs_themselves_are_refused():
    model = _model()
    ids = torch.randint(0, 50, (2, 41))
    shifted = model(ids[:, :-1], targets=ids[:, 1:])
    expected = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    assert torch.allclose(shifted, expected, atol=1e-5)
    with pytest.raises(ValueError, match="labels=input_ids"):
        model(ids, targets=ids)
    with pytest.raises(ValueError, match="labels=input_ids"):
        model.loss(ids, ids)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.loss(ids, ids.clone())
    assert any("not shifted" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="not both"):
        model(ids, targets=ids.roll(-1, 1), labels=ids)
    with pytest.raises(ValueError, match="labels shape"):
        model(ids, labels=ids[:, :-1])
