"""TensorMemory counts live CPU tensor storages: exact sizes, frees, views, autograd's saved tensors."""

import torch

from reformer.bench.tensor_memory import TensorMemory

MIB = 2**20


def floats(mib: float) -> int:
    return int(mib * MIB) // 4


def test_peak_follows_allocations_and_frees():
    with TensorMemory() as mem:
        a = torch.empty(floats(4))
        b = torch.empty(floats(2))
        del a  # freed: the next 3 MiB fit under the 6 MiB peak
        c = torch.empty(floats(3))
        assert mem.live == 5 * MIB
    assert mem.peak == 6 * MIB
    del b, c
    assert mem.live == 0


def test_views_and_in_place_results_are_not_counted_again():
    with TensorMemory() as mem:
        a = torch.zeros(floats(2))
        a.view(-1, 4).t().add_(1.0)
        a[: floats(1)].mul_(2.0)
    assert mem.peak == 2 * MIB


def test_existing_storages_and_their_views_are_not_counted():
    weight = torch.randn(512, 512)  # 1 MiB
    with TensorMemory(existing=[weight]) as mem:
        out = weight.t() @ weight.t()  # a 1 MiB result; the transposes are views of the weight
    assert mem.peak == MIB
    del out


def test_backward_peak_includes_saved_activations_and_gradients():
    w = torch.randn(256, 256, requires_grad=True)  # 256 KiB
    x = torch.randn(1024, 256)  # 1 MiB
    with TensorMemory(existing=[w, x]) as mem:
        h = torch.tanh(x @ w)  # x @ w (1 MiB, freed after tanh) and h (1 MiB, saved by tanh)
        h.sum().backward()
    # Forward: x @ w and h alive together (2 MiB); backward: h, its gradient and the pre-tanh gradient
    # (3 MiB) before w's gradient (256 KiB) is made from the last of them.
    assert 2 * MIB < mem.peak <= 3 * MIB + 512 * 1024
    assert w.grad is not None
