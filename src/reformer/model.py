"""Compatibility re-export: the models live in :mod:`reformer.models`."""

from .models.base import CONFIG_FILE, EVAL_HASH_SEED_BASE, WEIGHTS_FILE, build_attention
from .models.lm import ReformerLM

__all__ = ["CONFIG_FILE", "EVAL_HASH_SEED_BASE", "WEIGHTS_FILE", "ReformerLM", "build_attention"]
