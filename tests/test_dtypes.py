import pytest
import torch

from reformer import ReformerConfig, ReformerLM


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_runs_forward_and_backward(dtype):
    torch.manual_seed(0)
    cfg = ReformerConfig(
        vocab_size=64, d_model=32, n_heads=2, n_layers=2, d_ff=64, bucket_size=8, n_buckets=4,
        max_seq_len=128, attn_layers=("lsh", "local"), local_chunk_size=16,
    )  # fmt: skip
    model = ReformerLM(cfg).eval()  # fixed rotations: the two losses differ by precision only
    ids = torch.randint(0, 64, (2, 50))
    reference = model.loss(ids, ids)
    half = model.to(dtype)
    loss = half.loss(ids, ids)
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - reference.item()) < 0.05
    assert all(torch.isfinite(p.grad).all() for p in half.parameters())
