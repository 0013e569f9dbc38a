"""Input checks and padding shared by the attention kinds."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_attention_inputs(
    q: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | None, q_name: str = "q"
) -> torch.Tensor | None:
    """Validate ``(batch, heads, length, dim)`` inputs; return the mask as bool ``(batch, length)``.

    A mask with every token real is returned as None, so that the unmasked fast paths apply.
    """
    if q.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"{q_name} and v must be (batch, heads, length, head_dim); "
            f"got {tuple(q.shape)} and {tuple(v.shape)}"
        )
    if q.shape[:3] != v.shape[:3]:
        raise ValueError(f"{q_name} {tuple(q.shape)} and v {tuple(v.shape)} differ in batch, heads or length")
    if not q.is_floating_point() or not v.is_floating_point():
        raise TypeError(f"{q_name} and v must be floating point, got {q.dtype} and {v.dtype}")
    if attention_mask is None:
        return None
    batch, _, length, _ = q.shape
    if attention_mask.shape != (batch, length):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, "
            f"expected (batch, length) = {(batch, length)}"
        )
    if attention_mask.is_floating_point():
        raise TypeError("attention_mask must be bool or integer (1 = real token, 0 = padding), not float")
    return attention_mask.to(device=q.device, dtype=torch.bool)


def pad_to_multiple(
    padded_length: int, *tensors: torch.Tensor, key_valid: torch.Tensor | None
) -> tuple[torch.Tensor, ...]:
    """Zero-pad ``(batch, heads, length, dim)`` tensors on the length axis to ``padded_length``.

    Returns the padded tensors followed by the key-validity mask ``(batch, padded_length)`` (None when
    there is neither user padding nor added padding).
    """
    length = tensors[0].shape[2]
    extra = padded_length - length
    if extra == 0:
        return (*tensors, key_valid)
    padded = tuple(F.pad(t, (0, 0, 0, extra)) for t in tensors)
    if key_valid is None:
        key_valid = torch.ones(tensors[0].shape[0], length, dtype=torch.bool, device=tensors[0].device)
    key_valid = F.pad(key_valid, (0, extra), value=False)
    return (*padded, key_valid)
