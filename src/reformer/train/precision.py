"""The arithmetic a training run uses: ``--precision auto`` takes bfloat16 autocast where the hardware
computes in bfloat16 natively, float32 elsewhere.

Native bfloat16 means a CUDA device that supports it, or a CPU with AVX512_BF16 or AMX (as torch's
CPU feature detection reports them). On other CPUs bfloat16 matrix products are emulated and many times
slower than float32 (on an AVX2-only CPU about 1 against 55 GFLOP/s), so ``auto`` stays in float32 there.
Autocast in bfloat16 trains the benchmark study's model to the same held-out bits/byte as float32
(docs/quality.md).
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "fp32", "bf16")
HELP = (
    "auto: bf16 autocast where the device computes in bf16 natively (GPU; CPU with AVX512_BF16 or AMX), "
    "else fp32"
)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matrix products natively (not by emulation)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.9
    if capabilities is None:
        return False
    found = capabilities()
    return bool(found.get("avx512_bf16") or found.get("amx_bf16"))


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"bf16"`` or ``"fp32"`` for the setting ``precision`` (``"auto"``, ``"fp32"`` or ``"bf16"``) on
    ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is unknown; use one of {PRECISIONS}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def training_autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context the forward passes of a run enter: bfloat16 autocast on ``device`` or nothing."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
