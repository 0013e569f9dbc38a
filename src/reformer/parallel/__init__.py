"""Parallelism beyond data parallel: sequence parallelism over a process group."""

from .sequence import SequenceParallelLM, set_sequence_group

__all__ = ["SequenceParallelLM", "set_sequence_group"]
