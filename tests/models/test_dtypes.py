"""Half-precision autocast: gradients against float32, reversible against ordinary residuals.

``reformer train`` (like PyTorch's AMP recipe) calls ``loss.backward()`` outside ``torch.autocast``. The
reversible backward rebuilds each layer's inputs by subtracting the layer's output recomputed then; if
that recomputation ran in float32 while the forward ran in half precision, every rebuilt input would be
off by the half-precision rounding of the layer, and the error would pile up towards the bottom of the
stack. These tests measure per-parameter gradient errors against float32 on the same weights.
"""

import pytest
import torch

from reformer import ReformerConfig, ReformerLM

# Relative gradient error of the reversible stack may exceed that of ordinary residuals by this factor
# (plus SLACK): the rebuilt inputs differ from the forward's in the last float32 bits, which can flip a
# half-precision rounding in the recomputation.
RATIO, SLACK = 1.25, 2e-3
# Ordinary residuals' relative error of the summed squared gradients, per precision (measured 0.01-0.05).
BOUND = {torch.bfloat16: 0.12, torch.float16: 0.06}


def _models(seed: int):
    cfg = dict(
        vocab_size=64, d_model=32, n_heads=2, n_layers=6, d_ff=64, bucket_size=8, n_hashes=2,
        max_seq_len=128, attn_layers=("local", "lsh") * 3, local_chunk_size=16, initializer_range=0.2,
        dropout=0.0, attn_dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    rev = ReformerLM(ReformerConfig(**cfg)).eval()  # eval: fixed rotations
    plain = ReformerLM(ReformerConfig(**cfg, reversible=False)).eval()
    plain.load_state_dict(rev.state_dict())
    return rev, plain


def _grads(model, ids, dtype):
    """Per-parameter gradients of the loss; with ``dtype`` the forward runs under autocast and the
    backward outside it (float16 with a GradScaler, unscaled here)."""
    model.zero_grad(set_to_none=True)
    targets = ids.roll(-1, 1)
    if dtype is None:
        model.loss(ids, targets).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if dtype == torch.float16 else None
    with torch.autocast("cpu", dtype=dtype):
        loss = model.loss(ids, targets)
    (loss if scaler is None else scaler.scale(loss)).backward()
    scale = 1.0 if scaler is None else scaler.get_scale()
    return {n: p.grad / scale for n, p in model.named_parameters()}


def _relative_errors(grads, reference):
    return {n: ((grads[n] - ref).norm() / ref.norm()).item() for n, ref in reference.items()}


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reversible_autocast_gradients_are_as_accurate_as_ordinary_residuals(dtype, seed):
    rev, plain = _models(seed)
    ids = torch.randint(0, 64, (2, 100))  # several local chunks and LSH chunks
    reference = _grads(plain, ids, None)
    silent = [n for n, g in reference.items() if not g.any()]
    assert not silent, f"parameters that do not reach the loss in float32: {silent}"
    assert torch.allclose(
        torch.cat([g.flatten() for g in _grads(rev, ids, None).values()]),
        torch.cat([g.flatten() for g in reference.values()]),
        atol=1e-5,
    )
    plain_errors = _relative_errors(_grads(plain, ids, dtype), reference)
    rev_errors = _relative_errors(_grads(rev, ids, dtype), reference)
    total = torch.cat([(g - reference[n]).flatten() for n, g in _grads(plain, ids, dtype).items()])
    total_error = total.norm() / torch.cat([g.flatten() for g in reference.values()]).norm()
    assert total_error < BOUND[dtype], (
        f"{dtype} gradients are off by {total_error:.3f} even without reversibility"
    )
    worse = {
        n: (rev_errors[n], plain_errors[n])
        for n in reference
        if rev_errors[n] > RATIO * plain_errors[n] + SLACK
    }
    assert not worse, f"reversible {dtype} gradient error (reversible, ordinary): {worse}"
