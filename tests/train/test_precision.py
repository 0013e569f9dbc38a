"""--precision: auto takes bf16 autocast only where the CPU (or GPU) computes in bf16 natively."""

import contextlib

import pytest
import torch

from reformer.train import precision

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "capabilities,expected",
    [
        ({"avx512_bf16": True, "avx512_f": True}, "bf16"),
        ({"amx_bf16": True, "amx_tile": True}, "bf16"),
        ({"avx512_f": True, "avx512_bf16": False}, "fp32"),  # AVX512 alone emulates bf16
        ({"avx2": True}, "fp32"),
        ({}, "fp32"),
    ],
)
def test_auto_follows_the_cpus_native_bf16(monkeypatch, capabilities, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert precision.resolve_precision("auto", CPU) == expected
    autocast = precision.training_autocast("auto", CPU)
    if expected == "bf16":
        with autocast:
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            assert torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == torch.bfloat16
    else:
        assert isinstance(autocast, contextlib.nullcontext)


def test_explicit_settings_win_on_any_hardware(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    assert precision.resolve_precision("fp32", CPU) == "fp32"
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {})
    assert precision.resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(ValueError, match="fp16"):
        precision.resolve_precision("fp16", CPU)


def test_this_machine_answer_comes_from_torch():
    """Whatever this CPU is, the answer is torch's feature detection (no /proc parsing)."""
    found = torch.cpu.get_capabilities()
    native = bool(found.get("avx512_bf16") or found.get("amx_bf16"))
    assert precision.native_bf16(CPU) == (native and torch.backends.mkldnn.is_available())
