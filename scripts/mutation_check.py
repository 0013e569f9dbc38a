#!/usr/bin/env python
"""Mutation check: do the tests fail when the math is wrong?

For each mutation below (one small, plausible bug: a file under ``src/``, an exact snippet, its
replacement, and what it breaks), this script copies ``src/`` to a scratch directory, plants that one
bug, and runs a fast subset of the test suite against the copy (``PYTHONPATH=<scratch>/src``,
``pytest -x -q``, with a timeout). A mutation is *caught* when the tests fail and *survives* when they
pass. A mutation may name the tests that should catch it instead (those of the training code). The
unmutated copy runs first (the fast subset and every named test) and must pass, and must be the copy
that gets imported.

Exit status: 0 when every mutation is caught; 1 when one survives, times out or errors; 2 when a
snippet no longer matches its file exactly once (the code moved: update the snippet), which is checked
for every mutation before anything runs.

A mutation of code that the fast subset does not reach names its own tests, which run instead of the
subset (and in the baseline); ``--tests`` overrides both.

Usage (from the repository root; about 1-2 minutes per mutation on an idle 2-core machine):

    .venv/bin/python scripts/mutation_check.py                 # all mutations
    .venv/bin/python scripts/mutation_check.py --list          # names and descriptions
    .venv/bin/python scripts/mutation_check.py lse-merge mask-constant   # a few by name
    .venv/bin/python scripts/mutation_check.py --check         # only check that every snippet matches
    .venv/bin/python scripts/mutation_check.py --tests tests/attention/test_lsh_oracle.py lse-merge  # others

See docs/testing.md for the table of mutations and the tests that catch them.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Ordered so that the quick, sharp tests come first (pytest -x stops at the first failure).
FAST_TESTS = [
    "tests/attention/test_hashing.py",
    "tests/attention/test_lsh_oracle.py",
    "tests/attention/test_lsh_attention.py",
    "tests/attention/test_blocked.py",
    "tests/attention/test_cross_attention.py",
    "tests/attention/test_lsh_cross_attention.py",
    "tests/models/test_model.py::test_loss_is_mean_cross_entropy_of_logits",
    "tests/models/test_model.py::test_reversible_gradients_equal_plain_residual_gradients",
    "tests/models/test_model.py::test_feed_forward_in_chunks_gives_the_loss_and_gradients_of_plain_residuals",
    "tests/models/test_model.py::test_reversible_backward_rebuilds_inputs_from_outputs",
    "tests/models/test_model.py::test_padding_does_not_change_real_token_outputs",
    "tests/models/test_model.py::test_axial_position_embedding_is_the_row_major_broadcast_concatenation",
    "tests/models/test_hf.py",
    "tests/models/test_model.py::test_chunked_loss_gradients_equal_those_of_the_plain_loss",
    "tests/train/test_cold_start.py",
    "tests/train/test_precision.py",
    "tests/data/test_data_tokens.py",
    "tests/data/test_data_tokenizer.py",
    "tests/data/test_data_fasta.py",
    "tests/data/test_data_images.py",
    "tests/models/test_labels.py",
    "tests/generation/test_generation_stopping.py",
]


# The reversible engine's decoder configuration (not in the fast subset).
DECODER_TESTS = (
    "tests/models/test_reversible_engine.py",
    "tests/models/test_seq2seq.py::test_reversible_matches_plain_residuals",
    "tests/models/test_seq2seq.py::test_memory_gradient_accumulates_over_every_decoder_layer",
)
DECODE_STEPS = "tests/attention/test_decode_steps.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to src/reformer
    old: str
    new: str
    description: str
    tests: tuple[str, ...] = ()  # the tests that should catch it, instead of FAST_TESTS


MUTATIONS = [
    Mutation(
        "mask-constant", "attention/blocked.py",
        "MASK_VALUE = -1e9", "MASK_VALUE = -1e4",
        "padding/causal mask above the self mask: a token that sees only itself attends to masked keys",
    ),
    Mutation(
        "self-mask-constant", "attention/chunked.py",
        "SELF_MASK_VALUE = -1e5", "SELF_MASK_VALUE = -1.0",
        "the self mask barely masks: tokens attend to themselves",
    ),
    Mutation(
        "key-norm-eps", "attention/lsh_sort.py",
        "eps: float = 1e-6", "eps: float = 1e-4",
        "key normalisation epsilon 1e-4 instead of 1e-6",
    ),
    Mutation(
        "key-scale", "attention/lsh_sort.py",
        "return keys / math.sqrt(qk.shape[-1])", "return keys",
        "keys not divided by sqrt(head_dim)",
    ),
    Mutation(
        "argmax-tie-break", "hashing.py",
        "torch.where(top >= -bottom, top_idx, bottom_idx", "torch.where(top > -bottom, top_idx, bottom_idx",
        "argmax(cat([x, -x])) ties resolved to the negative half",
    ),
    Mutation(
        "per-row-argmax-tie-break", "hashing.py",
        "torch.where(top >= -bottom, top_idx - start", "torch.where(top > -bottom, top_idx - start",
        "the automatic per-row hashing resolves argmax ties to the negative half",
    ),
    Mutation(
        "factor-combination", "hashing.py",
        "stride *= factor\n", "stride *= factor // 2\n",
        "factorised bucket ids combined with the wrong stride (buckets collide)",
    ),
    Mutation(
        "sort-tie-break", "hashing.py",
        "return torch.sort(buckets, dim=-1, stable=True).indices",
        "return buckets.shape[-1] - 1 - torch.sort(buckets.flip(-1), dim=-1, stable=True).indices",
        "ties within a bucket sorted by descending position",
    ),
    Mutation(
        "round-wrap", "attention/chunked.py",
        "plain = (ids[:, None] + deltas) % (rounds * chunks)",
        "plain = (ids[:, None] // chunks) * chunks + (ids[:, None] % chunks + deltas) % chunks",
        "the first chunk of a round looks back into its own round's last chunk, not the previous round's",
    ),
    Mutation(
        "padding-chunk-skip", "attention/chunked.py",
        "mapped = (compact // m) * chunks + compact % m", "mapped = compact",
        "neighbours of real chunks not mapped back past the all-padding chunks",
    ),
    Mutation(
        "real-chunks-rounding", "attention/lsh.py",
        "real_chunks = (key_valid.sum(-1) + bucket_size - 1) // bucket_size",
        "real_chunks = key_valid.sum(-1) // bucket_size",
        "chunks holding real tokens counted rounding down (the last, partly real chunk is skipped over)",
    ),
    Mutation(
        "local-key-scale", "attention/local.py",
        "k = k / math.sqrt(q.shape[-1])", "k = k",
        "local attention keys not divided by sqrt(head_dim)",
    ),
    Mutation(
        "causal-direction", "attention/chunked.py",
        "q_rows[:, :, None] < k_rows[:, None, :]", "q_rows[:, :, None] > k_rows[:, None, :]",
        "causal mask hides the past instead of the future",
    ),
    Mutation(
        "padding-mask-skipped", "attention/chunked.py",
        "if self.key_valid is not None:", "if False:",
        "padding keys are not masked",
    ),
    Mutation(
        "lse-merge", "attention/blocked.py",
        "acc[rows] * old_scale[:, None] + out", "acc[rows] + out",
        "hash rounds merged without rescaling the earlier rounds (old_scale dropped)",
    ),
    Mutation(
        "dropout-replay", "attention/blocked.py",
        "for t in (q, k, v))\n    generator = _generator(seed, q.device)",
        "for t in (q, k, v))\n    generator = _generator(seed and seed + 1, q.device)",
        "the attention backward draws other dropout masks than the forward",
    ),
    Mutation(
        "output-scale", "attention/base.py",
        "return self.dropout(self.to_out(merged))", "return self.dropout(self.to_out(merged) * 1.05)",
        "attention output scaled by 1.05",
    ),
    Mutation(
        "rng-replay", "recompute.py",
        "torch.set_rng_state(self.cpu)", "torch.get_rng_state()",
        "reversible backward recomputes layers without restoring the RNG state (other dropout masks)",
    ),
    Mutation(
        "reversible-rebuild", "reversible.py",
        "b.sub_(f_out)  # now a_in", "b.sub_(f_out * 0.999)  # now a_in",
        "reversible backward rebuilds each half-step's input slightly wrong",
    ),
    Mutation(
        "ff-full-backward", "reversible.py",
        "if kind == FEED_FORWARD:  # chunk by chunk", 'if kind == "feed_forward":  # chunk by chunk',
        "the reversible backward runs the feed-forward over the whole sequence (d_ff activations whole)",
        ("tests/models/test_reversible_engine.py",),
    ),
    Mutation(
        "decoder-memory-grad", "reversible.py",
        "grad_memory.add_(rest[-1])", "grad_memory.copy_(rest[-1])",
        "the encoder output's gradient keeps only the first decoder layer's cross-attention contribution",
        DECODER_TESTS,
    ),
    Mutation(
        "decoder-memory-steps", "reversible_decoder.py",
        'memory_steps = ("cross",)', "memory_steps = ()",
        "the reversible decoder passes no gradient to the encoder output",
        DECODER_TESTS,
    ),
    Mutation(
        "decoder-cross-norm-grad", "reversible_decoder.py",
        '"cross": (self.cross_norm, self.cross_attention),', '"cross": (self.cross_attention,),',
        "the reversible decoder drops the gradients of the cross-attention's LayerNorm",
        DECODER_TESTS,
    ),
    Mutation(
        "axial-digits", "embeddings.py",
        'digit = torch.div(positions, stride, rounding_mode="floor") % n',
        'digit = torch.div(positions, self.max_positions // (stride * n), rounding_mode="floor") % n',
        "axial position digits in the transposed order (first axis fastest)",
    ),
    Mutation(
        "loss-normaliser", "models/lm.py",
        "count = (targets != ignore_index).sum().clamp(min=1)", "count = targets.numel()",
        "loss divided by all targets, ignored ones included",
    ),
    Mutation(
        "ff-chunk-order", "feedforward.py",
        "for part in x.split(self.chunk_size, dim=1)], dim=1)",
        "for part in x.split(self.chunk_size, dim=1)][::-1], dim=1)",
        "feed-forward chunks concatenated in the wrong order",
    ),
    Mutation(
        "ff-chunk-grad-accumulation", "feedforward.py",
        "acc.add_(g)", "acc.copy_(g)",
        "feed-forward parameter gradients keep only the last chunk's",
    ),
    Mutation(
        "blocked-first-visit", "attention/blocked.py",
        "merge_block(acc, run_max, run_sum, block_rows, out, lse, first)",
        "merge_block(acc, run_max, run_sum, block_rows, out, lse, True)",
        "every block overwrites its rows' output: only the last hash round or key tile counts",
    ),
    Mutation(
        "blocked-grad-scale", "attention/blocked.py",
        "dq = dq if dq_scale == 1.0 else dq.mul_(dq_scale)", "dq = dq",
        "the query gradient misses the score scale (cross-attention dq off by sqrt(head_dim))",
    ),
    Mutation(
        "blocked-empty-rows", "attention/blocked.py",
        "EMPTY_LSE = HIDDEN / 2", "EMPTY_LSE = HIDDEN * 2",
        "a query with every key hidden averages the hidden values instead of giving zeros",
    ),
    Mutation(
        "tiled-key-mask", "attention/cross.py",
        "~self.key_valid[:, None, k0:k1]", "~self.key_valid[:, None, : k1 - k0]",
        "exact cross-attention masks the first key tile's padding in every tile",
    ),
    Mutation(
        "lsh-cross-round-keys", "attention/lsh_cross.py",
        "self.k_rows[r].index_select(0, chunks)", "self.k_rows[0].index_select(0, chunks)",
        "LSH cross-attention: every hash round attends to the first round's keys",
    ),
    Mutation(
        "vjp-sum", "vjp.py",
        "total = (output * grad).sum()", "total = (output * grad).mean()",
        "the recomputing backward passes scale every gradient by 1/numel",
    ),
    Mutation(
        "chunk-loss-hidden-grad", "models/loss.py",
        "grad_hidden = grads[0] if ctx.needs_input_grad[0] else None", "grad_hidden = None",
        "the chunked loss passes no gradient to the trunk",
    ),
    Mutation(
        "eager-rotations-through-op", "hashing.py",
        "    return _column_seeded_randn(seed, shape, width)\n\n\ndef",
        "    return _column_seeded_randn_op(seed, shape, width)\n\n\ndef",
        "eager calls go through the custom op, whose first call imports torch._dynamo (cold start)",
    ),
    Mutation(
        "precision-auto-avx512", "train/precision.py",
        'found.get("avx512_bf16")', 'found.get("avx512_f")',
        "--precision auto takes bf16 on every AVX512 CPU, where bf16 is emulated and slow",
    ),
    Mutation(
        "local-rotary-skipped", "attention/local.py",
        "        q, k = self.rotate(q, k)\n        dropout_p", "        dropout_p",
        "local layers built with rotary positions attend without them",
        ("tests/attention/test_rotary.py",),
    ),
    Mutation(
        "gather-backward-slice", "parallel/sequence.py",
        "return grad.chunk(size, dim=1)[rank], None",
        "return grad.chunk(size, dim=1)[(rank + 1) % size], None",
        "sequence parallelism: the logits' all-gather hands each rank another rank's slice of the gradient",
        ("tests/parallel/test_sequence_parallel.py::test_two_gloo_ranks_equal_one_process_and_share_checkpoints",),
    ),
    Mutation(
        "passkey-decoy-is-key", "tasks/passkey.py",
        "        if tail[0] == first:", "        if False:",
        "a passkey decoy can be the key itself (a second needle)",
        ("tests/tasks/test_long_context_data.py",),
    ),
    Mutation(
        "passkey-decoys-in-tests", "tasks/passkey.py",
        'with_decoys = split == "train" and length >= self.settings.decoys_from',
        "with_decoys = length >= self.settings.decoys_from",
        "held-out and test haystacks carry the training decoys",
        ("tests/tasks/test_long_context_data.py",),
    ),
    Mutation(
        "passkey-decoys-from-ignored", "tasks/passkey.py",
        'with_decoys = split == "train" and length >= self.settings.decoys_from',
        'with_decoys = split == "train"',
        "--decoys-from is ignored: short training haystacks carry decoys too",
        ("tests/tasks/test_long_context_data.py",),
    ),
    Mutation(
        "copy-eval-length-ignored", "tasks/copy.py",
        'options.length or self.cfg.seq_len', "self.cfg.seq_len",
        "copy eval --length is ignored: test sequences keep the training length",
        ("tests/tasks/test_tasks.py",),
    ),
    Mutation(
        "best-direction", "train/best.py",
        'value < self.best if self.direction == "min"', 'value > self.best if self.direction == "min"',
        "--keep-best keeps the worst held-out loss",
        ("tests/train/test_best.py",),
    ),
    Mutation(
        "best-swap-not-restored", "train/best.py",
        "    if old.exists() and not final.exists():\n        old.rename(final)\n", "",
        "an interruption between the two renames loses the kept best weights",
        ("tests/train/test_best.py",),
    ),
    Mutation(
        "manifest-not-flushed", "train/checkpoints.py",
        "atomic_write(folder / MANIFEST_FILE, lambda tmp: tmp.write_text(text))",
        "(folder / MANIFEST_FILE).write_text(text)",
        "the manifest is written in place, not flushed before the checkpoint's rename (an empty manifest "
        "after a power cut)",
        ("tests/train/test_checkpoints.py::test_every_file_and_folder_is_flushed_before_and_after_the_rename",),
    ),
    Mutation(
        "checkpoint-parent-fsync", "train/checkpoints.py",
        "        os.replace(tmp, final)\n        fsync_dir(root)\n", "        os.replace(tmp, final)\n",
        "the checkpoints folder is not flushed after the rename (the new name can vanish in a power cut)",
        ("tests/train/test_checkpoints.py::test_every_file_and_folder_is_flushed_before_and_after_the_rename",),
    ),
    Mutation(
        "torch-save-fsync", "train/checkpoints.py",
        "        f.flush()\n        os.fsync(f.fileno())\n", "        f.flush()\n",
        "optimizer.pt and rng.pt are not flushed before the rename (empty files after a power cut)",
        ("tests/train/test_checkpoints.py::test_every_file_and_folder_is_flushed_before_and_after_the_rename",),
    ),
    Mutation(
        "manifest-checksum-skipped", "train/checkpoints.py",
        "        if digest != sha256:", "        if False:",
        "verification compares sizes only: a flipped byte is resumed from",
        ("tests/train/test_checkpoints.py",),
    ),
    Mutation(
        "prune-trusts-damaged", "train/checkpoints.py",
        "problem = None if folder == newest else checkpoint_problem(folder, checksums=False)",
        "problem = None",
        "pruning counts a damaged checkpoint as good, and deletes the last good one",
        ("tests/train/test_checkpoints.py",),
    ),
    Mutation(
        "shared-run-lock", "train/run_lock.py",
        "fcntl.LOCK_EX | fcntl.LOCK_NB", "fcntl.LOCK_SH | fcntl.LOCK_NB",
        "the run folder's lock is shared: two runs write one folder",
        ("tests/train/test_run_lock.py",),
    ),
    Mutation(
        "unbounded-jsonl-line", "jsonl.py",
        "f.readline(max_line_bytes + 1)", "f.readline()",
        "a JSON-lines file's line is read whole before its length is checked (10 GB into memory)",
        ("tests/data/test_bad_data.py::test_a_huge_line_is_refused_after_a_bounded_read",),
    ),
    Mutation(
        "complement-table", "data/fasta.py",
        "COMPLEMENT = np.array([3, 2, 1, 0, 4, SEPARATOR]",
        "COMPLEMENT = np.array([2, 3, 0, 1, 4, SEPARATOR]",
        "reverse complement pairs A with G and C with T",
    ),
    Mutation(
        "complement-not-reversed", "data/fasta.py",
        "return torch.from_numpy(COMPLEMENT)[ids.flip(-1)]", "return torch.from_numpy(COMPLEMENT)[ids]",
        "the other strand is complemented but not read backwards",
    ),
    Mutation(
        "separator-target", "data/fasta.py",
        "return targets.masked_fill(targets == SEPARATOR, IGNORE_INDEX)", "return targets",
        "the record separator is a target: bits per base count non-bases",
    ),
    Mutation(
        "fastq-quality-length", "data/fasta.py",
        "if len(quality) != len(bases):", "if len(quality) > len(bases):",
        "a FASTQ record with fewer quality values than bases is accepted",
    ),
    Mutation(
        "token-id-range", "data/tokens.py",
        "if low < 0 or high >= vocab_size:", "if low < 0 or high > vocab_size:",
        "id == vocab_size passes the check (an embedding index out of range later)",
    ),
    Mutation(
        "bin-dtype-width", "data/tokens.py",
        "if size % width:", "if size % 2:",
        "a uint32 file of 6 bytes is accepted: its last id is silently cut",
    ),
    Mutation(
        "bits-per-token-not-byte", "data/tokenizer.py",
        "return int(self.tokenizer.byte_lengths[counted].sum())", "return len(counted)",
        "a tokenized corpus counts tokens, not the bytes they spell: bits per token reported as per byte",
    ),
    Mutation(
        "raster-order-planar", "data/images.py",
        "return pixels.reshape(*pixels.shape[:-3], -1).long()",
        "return pixels.movedim(-1, -3).reshape(*pixels.shape[:-3], -1).long()",
        "sub-pixels in planar order (all R, then G, then B) instead of RGB per pixel",
    ),
    Mutation(
        "labels-unshifted", "models/lm.py",
        "targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore_index)], dim=1)",
        "targets = labels",
        "labels= not shifted inside (position i scored against its own token)",
    ),
    Mutation(
        "repetition-penalty-sign", "generation/sampling.py",
        "torch.where(logits > 0, logits / penalty, logits * penalty)",
        "torch.where(logits > 0, logits * penalty, logits / penalty)",
        "repetition penalty raises the logits of repeated ids instead of lowering them",
    ),
    Mutation(
        "eos-dropped", "generation/stopping.py",
        "next_ids = torch.where(self.finished, torch.full_like(next_ids, self.pad), next_ids)",
        "next_ids = torch.where(self.finished | torch.isin(next_ids, self.eos if self.eos is not None "
        "else next_ids[:0]), torch.full_like(next_ids, self.pad), next_ids)",
        "the end-of-sequence id itself replaced by the pad id",
    ),
    Mutation(
        "stop-sequence-window", "generation/stopping.py",
        "done |= (self.recent[:, -len(sequence) :] == sequence).all(1)",
        "done |= (self.recent[:, -len(sequence) :] == sequence).any(1)",
        "a stop sequence matches when any of its ids matches",
    ),
    Mutation(
        "resume-config-not-rewritten", "train/loop.py",
        "    atomic_write_text(run / TRAIN_CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2) + \"\\n\")\n",
        "    if resumed is None:\n"
        "        atomic_write_text(run / TRAIN_CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2) + \"\\n\")\n",
        "a resumed run's train_config.json keeps the old --steps",
        ("tests/train/test_train.py::test_resuming_a_cosine_run_with_more_steps_stretches_its_horizon_and_says_so",),
    ),
    Mutation(
        "cosine-horizon-floor", "train/config.py",
        "horizon = cfg.cosine_steps or cfg.steps", "horizon = cfg.cosine_steps or cfg.steps // 2",
        "the cosine schedule without --cosine-steps reaches its floor half-way through the run",
        ("tests/train/test_train.py::test_rsqrt_schedule_warms_up_and_does_not_depend_on_steps",),
    ),
    Mutation(
        "logger-not-fed", "train/loggers.py",
        "            logger.log(dict(record))\n", "            pass\n",
        "loggers registered with register_logger never receive the metrics lines",
        ("tests/train/test_loggers.py::test_a_registered_logger_gets_every_metrics_line_and_is_closed",),
    ),
    Mutation(
        "micro-batch-weights", "train/loop.py",
        "loss = objective(*batch) * (count * replicas / step_count)",
        "loss = objective(*batch) * (replicas / len(micro_batches))",
        "accumulated micro-batches weighted equally, not by their share of the step's counted targets",
        ("tests/train/test_train.py::test_gradient_accumulation_weights_micro_batches_by_their_target_tokens",),
    ),
    Mutation(
        "skipped-step-updates", "train/loop.py",
        "            if not skipped:\n", "            if True:\n",
        "a step skipped for its NaN loss still runs the optimiser (on whatever gradients it has)",
        ("tests/train/test_train.py::test_skip_nonfinite_skips_the_update_counts_it_and_stops_past_its_budget",),
    ),
    Mutation(
        "task-state-not-restored", "train/loop.py",
        "        task.restore(state)\n", "",
        "a resumed run does not hand the task its state back (the curriculum restarts)",
        ("tests/tasks/test_tasks.py::test_a_registered_task_trains_evaluates_and_resumes_through_the_shared_commands",),
    ),
    Mutation(
        "copy-accuracy-count", "tasks/copy.py",
        "total_count += int(counted.sum())", "total_count += targets.numel()",
        "copy-task accuracy divided by every position, not only the second copy's",
        ("tests/tasks/test_tasks.py::test_copy_accuracy_counts_the_second_copy_only",),
    ),
    Mutation(
        "macro-f1", "tasks/classification.py",
        "scores.append(2 * tp / (2 * tp + fp + fn))", "scores.append(tp / (tp + fp + fn))",
        "macro-F1 computed as the mean Jaccard index",
        ("tests/tasks/test_encoder_tasks.py::test_macro_f1_against_hand_counts",),
    ),
    Mutation(
        "legacy-key-rule", "train/config.py",
        'model = {"lsh_key_rule": "chunks", **data.pop("model", {})}', 'model = data.pop("model", {})',
        "runs saved before the LSH key rule was recorded load with the default rule, not the one they used",
        ("tests/tasks/test_tasks.py::test_runs_saved_in_the_flat_layout_load_as_they_were_trained",),
    ),
    Mutation(
        "learned-positions-length", "tasks/model_settings.py",
        'values["axial_pos_shape"], values["axial_pos_dims"] = (seq_len,), (values["d_model"],)',
        'values["axial_pos_dims"] = (values["d_model"],)',
        "plain learned positions keep the preset's length when --seq-len changes",
        ("tests/tasks/test_tasks.py::test_flags_over_a_preset_follow_the_rules_of_the_model_settings",),
    ),
    Mutation(
        "lm-metric-per-token", "tasks/lm.py",
        "total_units += corpus.units(targets)", "total_units += count",
        "a tokenizer run reports bits per token as bits per byte",
        ("tests/data/test_lm_formats.py::test_a_tokenizer_run_reports_bits_per_byte_of_the_text_and_generates_through_it",),
    ),
    Mutation(
        "eval-through-named-tokenizer", "tasks/lm.py",
        "if self.settings.tokenizer is not None and kept.is_file():",
        "if self.settings.tokenizer is None and kept.is_file():",
        "reformer eval reads a tokenizer run's data through the tokenizer it named, not the one it kept",
        ("tests/data/test_lm_formats.py::test_eval_and_generate_read_through_the_tokenizer_kept_in_the_run",),
    ),
    Mutation(
        "eval-data-keeps-valid", "tasks/lm.py",
        "dataclasses.replace(self.settings, valid=None)", "dataclasses.replace(self.settings)",
        "reformer eval --data evaluates the run's --valid file instead of the files given",
        ("tests/data/test_lm_formats.py::test_eval_and_generate_read_through_the_tokenizer_kept_in_the_run",),
    ),
    Mutation(
        "mlm-ignores-valid", "tasks/mlm.py",
        "load_corpus(self.settings.data, self.settings.valid)", "load_corpus(self.settings.data)",
        "reformer train --task mlm --valid V holds out 5% of --data and never reads V",
        ("tests/tasks/test_encoder_tasks.py::test_mlm_holds_out_the_valid_file",),
    ),
    Mutation(
        "run-folder-without-format", "train/loop.py",
        "    task.save_files(run)\n", "",
        "a run folder keeps no data format: generate reads a token-file model's prompt as bytes",
        ("tests/data/test_lm_formats.py::test_a_bin_token_file_trains_evaluates_in_bits_per_token_and_generates_ids",),
    ),
    Mutation(
        "tokenizer-spell-first-byte", "data/codec.py",
        "return self.tokenizer.token_bytes[token]", "return self.tokenizer.token_bytes[token][:1]",
        "generate streams only the first byte of each subword token",
        ("tests/data/test_lm_formats.py::test_a_tokenizer_run_reports_bits_per_byte_of_the_text_and_generates_through_it",),
    ),
    Mutation(
        "image-start-sampled", "generation/images.py",
        '            logits[:, START] = float("-inf")\n', "",
        "image sampling may draw the start token as a sub-pixel",
        ("tests/data/test_lm_formats.py::test_image_sampling_never_emits_the_start_token",),
    ),
    Mutation(
        "image-prompt-rows", "generation/images.py",
        "given = image_to_ids(prompt.copy())[: 3 * size * rows]",
        "given = image_to_ids(prompt.copy())[: size * rows]",
        "an image completion keeps a third of the prompt's rows (pixels, not sub-pixels, counted)",
        ("tests/data/test_lm_formats.py::test_an_image_run_samples_whole_images_and_completes_prompts",),
    ),
    Mutation(
        "rotary-pair-sign", "attention/rotary.py",
        "second * cos + first * sin", "second * cos - first * sin",
        "rotary positions: the second feature of a pair turns the wrong way (no longer a rotation)",
        ("tests/attention/test_rotary.py",),
    ),
    Mutation(
        "rotary-angles-float32", "attention/rotary.py",
        "positions.to(torch.float64)[..., None] * inv_freq",
        "(positions.float()[..., None] * inv_freq.float())",
        "rotary angles formed in float32: positions near 2**20 lose their angle",
        ("tests/attention/test_rotary.py",),
    ),
    Mutation(
        "token-shift-next", "embeddings.py",
        "previous = torch.cat([before[..., half:], x[:, :-1, half:]], dim=1)",
        "previous = torch.cat([x[:, 1:, half:], before[..., half:]], dim=1)",
        "token shift takes the next token's features (a causal leak)",
        ("tests/models/test_token_shift.py",),
    ),
    Mutation(
        "decode-last-id-stale", "generation/decoding.py",
        "cache.last_ids = next_ids", "cache.last_ids = cache.last_ids",
        "cached decoding shifts in the prompt's last token at every step, not the newest",
        ("tests/models/test_token_shift.py",),
    ),
    Mutation(
        "sparse-loss-rows", "models/loss.py",
        "hidden, targets = hidden[counted][None], targets[counted][None]",
        "hidden, targets = hidden[counted][None], targets[counted].roll(1)[None]",
        "the loss over a few scored rows pairs each row with another row's target",
        ("tests/tasks/test_retrieval_tasks.py", "tests/models/test_model.py"),
    ),
    Mutation(
        "passkey-depth", "tasks/passkey.py",
        "cut = int(round(depth * n_fill))", "cut = int(round(0.5 * n_fill))",
        "the needle always sits in the middle of the haystack, whatever depth was asked",
        ("tests/tasks/test_long_context_data.py",),
    ),
    Mutation(
        "ablation-lsh-kept", "tasks/context_probe.py",
        "lambda _m, _in, out: torch.zeros_like(out)", "lambda _m, _in, out: out",
        "the LSH-zeroed ablation leaves the LSH layers working",
        ("tests/tasks/test_long_context_data.py",),
    ),
    Mutation(
        "ablation-window-shifted", "tasks/context_probe.py",
        "return inputs[:, -window:], targets[:, -window:]",
        "return inputs[:, -window - 1 : -1], targets[:, -window:]",
        "the last-window ablation pairs the kept inputs with targets one position off",
        ("tests/tasks/test_long_context_data.py",),
    ),
    Mutation(
        "kv-step-self-hidden", "attention/kv_cache.py",
        "later = torch.arange(keys.shape[2], device=q.device) > lengths[:, None]",
        "later = torch.arange(keys.shape[2], device=q.device) >= lengths[:, None]",
        "a full-attention decode step hides the new token's own key from it",
        (DECODE_STEPS,),
    ),
    Mutation(
        "kv-step-scale", "attention/kv_cache.py",
        ".to(acc) / math.sqrt(q.shape[-1])", ".to(acc)",
        "a full-attention decode step does not scale its scores by 1/sqrt(head_dim)",
        (DECODE_STEPS,),
    ),
    Mutation(
        "full-step-rotary-position", "attention/full.py",
        "q, k = self.rotate(q, k, lengths.view(-1, 1))", "q, k = self.rotate(q, k)",
        "a rotary full-attention decode step rotates the new token to position 0",
        (DECODE_STEPS,),
    ),
    Mutation(
        "local-step-wrap-count", "attention/local_cache.py",
        "seen = (chunk + deltas) % (chunk + 1)", "seen = (chunk + deltas).clamp(min=0)",
        "a local decode step does not wrap the first chunks' look-back (a chunk met twice counts once)",
        (DECODE_STEPS,),
    ),
    Mutation(
        "local-step-scale", "attention/local_cache.py",
        "(k / math.sqrt(q.shape[-1])).to(cache.keys.dtype)", "k.to(cache.keys.dtype)",
        "a local decode step keeps the new key unscaled (the prompt's keys are scaled)",
        (DECODE_STEPS,),
    ),
    Mutation(
        "lsh-step-rank", "attention/lsh_cache.py",
        "rank = cache.counts.cumsum(-1).gather(-1, bucket)",
        "rank = (cache.counts.cumsum(-1) - cache.counts).gather(-1, bucket)",
        "an LSH decode step sorts the new token before the kept ones of its bucket",
        (DECODE_STEPS,),
    ),
    Mutation(
        "lsh-step-self-mask", "attention/lsh_cache.py",
        "scores.masked_fill(is_self, SELF_MASK_VALUE)", "scores.masked_fill(is_self, 0.0)",
        "an LSH decode step lets the new token attend to its own key",
        (DECODE_STEPS,),
    ),
    Mutation(
        "own-bucket-step-ring-slot", "attention/own_bucket_cache.py",
        "slot = bucket * window + count % window", "slot = bucket * window + (count + 1) % window",
        "an own_bucket decode step evicts the wrong position from a full bucket ring",
        (DECODE_STEPS,),
    ),
    Mutation(
        "block-step-norm-skipped", "block_decoding.py",
        "block.attention.step(cache, block.attn_norm(x2), lengths, max_length)",
        "block.attention.step(cache, x2, lengths, max_length)",
        "a block's decode step feeds its attention the un-normalised stream",
        (DECODE_STEPS,),
    ),
    Mutation(
        "decoder-step-ff-input", "block_decoding.py",
        "return b, a + block.feed_forward(b)", "return b, a + block.feed_forward(a)",
        "a decoder block's decode step feeds the feed-forward the stream before cross-attention",
        ("tests/models/test_positions.py::test_seq2seq_cached_decoding_uses_absolute_positions",),
    ),
    Mutation(
        "cross-step-mask-dropped", "attention/cross.py",
        "key_mask=cache.memory_mask", "key_mask=None",
        "a cross-attention decode step attends to the source's padding",
        (DECODE_STEPS,),
    ),
    Mutation(
        "lsh-cross-step-window", "attention/lsh_cross_cache.py",
        "places = first + torch.arange(self.window, device=q.device)",
        "places = first + 1 + torch.arange(self.window, device=q.device)",
        "an LSH cross-attention decode step reads the sorted keys one place late",
        (DECODE_STEPS,),
    ),
]  # fmt: skip


def check_snippets(mutations: list[Mutation], src: Path) -> list[str]:
    """Problems: every snippet must occur exactly once in its file."""
    problems = []
    for m in mutations:
        path = src / "reformer" / m.file
        if not path.is_file():
            problems.append(f"{m.name}: {path} does not exist")
            continue
        count = path.read_text().count(m.old)
        if count != 1:
            problems.append(
                f"{m.name}: snippet {m.old!r} occurs {count} times in src/reformer/{m.file} (need 1)"
            )
    return problems


def run_tests(src_copy: Path, tests: list[str], timeout: float) -> tuple[str, str, float]:
    """(``"passed"`` | ``"failed"`` | ``"timeout"`` | ``"error rc=N"``, first failing test, seconds)."""
    env = {**os.environ, "PYTHONPATH": str(src_copy), "COLUMNS": "400"}  # untruncated FAILED lines
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", "", time.monotonic() - start
    seconds = time.monotonic() - start
    # "FAILED node - Error: message": keep the node and the exception type (a crash is a weak catch).
    failed = [
        f"{node} ({reason.split(':')[0]})" if reason else node
        for node, reason in re.findall(r"^FAILED (\S+)(?: - (.*))?$", proc.stdout, flags=re.MULTILINE)
    ]
    if proc.returncode == 0:
        return "passed", "", seconds
    if proc.returncode == 1:
        return "failed", failed[0] if failed else "?", seconds
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
    return f"error rc={proc.returncode}", " | ".join(tail), seconds


def scratch_copy(mutation: Mutation | None) -> Path:
    scratch = Path(tempfile.mkdtemp(prefix="mutation-"))
    shutil.copytree(ROOT / "src", scratch / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    if mutation is not None:
        path = scratch / "src" / "reformer" / mutation.file
        path.write_text(path.read_text().replace(mutation.old, mutation.new, 1))
    return scratch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--check", action="store_true", help="only check that every snippet matches")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per test run (default 600)")
    parser.add_argument(
        "--tests", action="append", metavar="TARGET",
        help="a pytest target to run instead of the fast subset (repeat for several)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    by_name = {m.name: m for m in MUTATIONS}
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        parser.error(f"unknown mutations {unknown}; --list shows them")
    chosen = [by_name[n] for n in args.names] if args.names else MUTATIONS
    if args.list:
        for m in chosen:
            print(f"{m.name:28} src/reformer/{m.file:22} {m.description}")
        return 0
    problems = check_snippets(chosen, ROOT / "src")
    for problem in problems:
        print(f"SNIPPET MISMATCH {problem}", flush=True)
    if problems:
        return 2
    if args.check:
        print(f"all {len(chosen)} snippets match exactly once")
        return 0

    scratch = scratch_copy(None)
    try:
        where = subprocess.run(
            [sys.executable, "-c", "import reformer; print(reformer.__file__)"],
            env={**os.environ, "PYTHONPATH": str(scratch / "src")}, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        if not where.startswith(str(scratch)):
            print(f"the scratch copy is not the one imported (reformer comes from {where!r})")
            return 1
        baseline = args.tests or list(dict.fromkeys([*FAST_TESTS, *(t for m in chosen for t in m.tests)]))
        status, detail, seconds = run_tests(scratch / "src", baseline, args.timeout)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"baseline (no mutation): {status} in {seconds:.0f}s {detail}", flush=True)
    if status != "passed":
        print("the unmutated tests must pass first")
        return 1

    rows = []
    for m in chosen:
        scratch = scratch_copy(m)
        try:
            status, detail, seconds = run_tests(
                scratch / "src", args.tests or list(m.tests) or FAST_TESTS, args.timeout
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        verdict = {"failed": "CAUGHT", "passed": "SURVIVED"}.get(status, status.upper())
        rows.append((m, verdict, detail, seconds))
        print(f"{verdict:9} {m.name:28} {seconds:5.0f}s  {detail}", flush=True)

    print("\n| mutation | file | bug | verdict | caught by (first failing test) |")
    print("|---|---|---|---|---|")
    for m, verdict, detail, _ in rows:
        print(f"| {m.name} | {m.file} | {m.description} | {verdict} | {detail} |")
    bad = [m.name for m, verdict, _, _ in rows if verdict != "CAUGHT"]
    if bad:
        print(f"\nnot caught: {', '.join(bad)}")
        return 1
    print(f"\nall {len(rows)} mutations caught")
    return 0


if __name__ == "__main__":
    sys.exit(main())
