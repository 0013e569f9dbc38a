"""``reformer bench``: forward+backward time and peak memory of Reformer layers and models by length.

What is measured (``--what``):

* ``attention``: one self-attention layer with its projections (d_model 256, 4 heads of 64, causal), input
  ``x`` of shape ``(batch, L, 256)`` requiring grad, loss ``(layer(x) * g).sum()`` for a fixed random
  ``g``. Implementations: ``lsh-H`` (``reformer.LSHSelfAttention``, bucket 64, ``H`` hash rounds, one
  line per ``--hashes`` entry), ``local`` (``reformer.LocalSelfAttention``, chunk 128) and ``full``
  (``reformer.FullSelfAttention``: exact attention through SDPA).
* ``model``: ``reformer.ReformerLM`` (vocab 256, d_model 256, 4 heads, d_ff 1024, bucket 64, 2 hashes),
  ``model.loss`` and its backward, reversible (``model-rev-N``) against ordinary residuals
  (``model-plain-N``) at each depth ``N`` of ``--layers``.
* ``--what model --sequence-parallel P``: the 6-layer reversible model at 65536 tokens (``--lengths``,
  ``--layers`` to change) in one process and split over ``P`` CPU processes (gloo): per-rank peak
  resident set, step time and communication share (:mod:`reformer.bench.sequence_parallel`).
* ``--paper-figure``: the Reformer paper's speed figure (Kitaev et al. 2020, Figure 5 right): the
  attention layers above at a fixed 32K tokens per batch (batch = 32768 // L), full attention against
  LSH attention with 1/2/4/8 hashes, L from 1K to 32K.

Protocol: every configuration runs in a fresh Python subprocess (so that its peak memory is its own and a
hang can be cut off): build the module and inputs (train mode, dropout 0), take a memory baseline, run
one warm-up step and ``--repeats`` timed steps of forward+backward (gradients cleared before each); the
time is the median of the timed steps. Peak memory is MiB above the baseline: on CUDA
``torch.cuda.max_memory_allocated``; on CPU the larger of a 5 ms resident-set sampler and the kernel's
high-water mark ``VmHWM`` (reset after the baseline through ``/proc/self/clear_refs``). A configuration
that runs past ``--timeout`` seconds (start-up and build included), runs out of memory (on CPU the worker's
address space is capped at ``--mem-limit-gib``) or fails is recorded as such in its row and the sweep
goes on.
"""

# Modules (this docstring is also `reformer bench --help`'s description): protocol (measure a step, run a
# configuration in a worker process; shared with benchmarks/), memory (the CPU probes), workloads (the
# configurations and their steps), sweep, report (table, JSON, plot), command.

from .command import add_arguments, plan, run
from .memory import RssSampler, hwm_bytes, mem_total_bytes, reset_hwm, rss_bytes
from .protocol import measure, run_worker
from .report import plot, table, write_json
from .sweep import environment, run_config, run_in_process, sweep, worker_main
from .workloads import (
    DEFAULT_ATTENTION_LENGTHS,
    DEFAULT_HASHES,
    DEFAULT_LAYERS,
    DEFAULT_MODEL_LENGTHS,
    PAPER_LENGTHS,
    BenchConfig,
    attention_configs,
    build_step,
    model_configs,
)

__all__ = [
    "DEFAULT_ATTENTION_LENGTHS",
    "DEFAULT_HASHES",
    "DEFAULT_LAYERS",
    "DEFAULT_MODEL_LENGTHS",
    "PAPER_LENGTHS",
    "BenchConfig",
    "RssSampler",
    "add_arguments",
    "attention_configs",
    "build_step",
    "environment",
    "hwm_bytes",
    "measure",
    "mem_total_bytes",
    "model_configs",
    "plan",
    "plot",
    "reset_hwm",
    "rss_bytes",
    "run",
    "run_config",
    "run_in_process",
    "run_worker",
    "sweep",
    "table",
    "worker_main",
    "write_json",
]
