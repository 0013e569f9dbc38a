import pytest
import torch

from reformer import ReformerConfig, ReformerLM


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    cfg = ReformerConfig(
        vocab_size=64, d_model=32, n_heads=2, n_layers=2, d_ff=64, bucket_size=8, n_buckets=4,
        max_seq_len=128, attn_layers=("lsh", "local"), local_chunk_size=16,
    )  # fmt: skip
    model = ReformerLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 50))
    compiled = torch.compile(model)
    assert torch.allclose(compiled(ids), model(ids), atol=1e-5)
