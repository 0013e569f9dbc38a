"""torch.compile: the inference forward compiles to one graph, training breaks at most twice (the
reversible stack runs eagerly as one opaque region), and compiled results equal eager ones."""

import pytest
import torch

from reformer import ReformerConfig, ReformerLM

LENGTH = 50  # not a multiple of the LSH bucket (8) nor of the local chunk (16)


def _model(**overrides) -> ReformerLM:
    torch.manual_seed(0)
    cfg = ReformerConfig(
        vocab_size=64, d_model=32, n_heads=2, n_layers=4, d_ff=64, bucket_size=8, n_hashes=2,
        max_seq_len=128, attn_layers=("local", "lsh", "local", "lsh"), local_chunk_size=16,
        initializer_range=0.2, **overrides,
    )  # fmt: skip
    return ReformerLM(cfg)


def _inputs():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, LENGTH), generator=generator)
    mask = torch.ones(2, LENGTH, dtype=torch.long)
    mask[1, 37:] = 0
    return ids, mask


def _train_step(model, ids, mask):
    loss = model(ids, attention_mask=mask, targets=ids.roll(-1, 1))
    loss.backward()
    return loss


# All slow, and torch._dynamo imported inside the tests: once it is imported, the Triton interpreter tests
# that run later in the same process fail (tests/attention/test_triton_lsh.py; also with the older test here).
@pytest.mark.slow
def test_graph_breaks():
    """Dynamo tracing only, no code generation (about 10 s): the graph-break budget."""
    import torch._dynamo

    model = _model()
    ids, mask = _inputs()
    model.eval()
    with torch.no_grad():
        for m in (None, mask):
            torch._dynamo.reset()
            explained = torch._dynamo.explain(model)(ids, m)
            assert explained.graph_break_count == 0, explained.break_reasons
    model.train()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(_train_step)(model, ids, mask)
    # The reversible stack's one eager region, counted once in each enclosing frame (forward, then loss
    # for targets), and loss.backward(); every reason names that region.
    assert explained.graph_break_count <= 3, explained.break_reasons
    assert all("reversible.py" in str(r.user_stack) for r in explained.break_reasons), explained.break_reasons
    torch._dynamo.reset()


# Rotary positions rotate queries and keys in the local layers before the blocked attention core.
POSITIONS = pytest.mark.parametrize("positions", ["axial", "rotary"])


@pytest.mark.slow
@POSITIONS
def test_fullgraph_inference_matches_eager(positions):
    import torch._dynamo

    model = _model(position_embedding=positions).eval()
    ids, mask = _inputs()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        for m in (None, mask):
            expected = model(ids, m)
            assert torch.allclose(compiled(ids, m), expected, atol=1e-5, rtol=0)
        # The mask matters: the compiled output must follow it (padding changes the logits).
        assert not torch.allclose(compiled(ids, mask)[1, 37:], compiled(ids)[1, 37:], atol=1e-3)
    torch._dynamo.reset()


@pytest.mark.slow
@POSITIONS
def test_compiled_training_matches_eager(positions):
    """Loss and every parameter's gradient, fresh rotations per call (no hash_seed) and padding.

    Compiled with AOTAutograd but without Inductor's code generation: the graphs and their autograd
    split are what this library controls. (Inductor in torch 2.13 on CPU drops part of the axial
    position embedding's gradient, rows whose index is computed as ``arange(50) // 16``, also outside
    this library: see docs/compile.md.)
    """
    import torch._dynamo

    model = _model(position_embedding=positions).train()
    ids, mask = _inputs()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")

    def run(fn):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(123)
        loss = _train_step(fn, ids, mask)
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    for _ in range(2):  # the second time through, the compiled graphs are reused
        expected_loss, expected_grads = run(model)
        loss, grads = run(compiled)
        assert torch.allclose(loss, expected_loss, atol=1e-5, rtol=0)
        for name, grad in grads.items():
            assert torch.allclose(grad, expected_grads[name], atol=1e-5, rtol=0), name
    torch._dynamo.reset()


def _graph_ops(explained) -> int:
    return sum(1 for graph in explained.graphs for node in graph.graph.nodes if node.op == "call_function")


@pytest.mark.slow
def test_compiled_graph_does_not_grow_with_length(monkeypatch):
    """The attention cores are single ops in the graph: with one chunk per block, more than twice the
    blocks trace the same number of operations (Dynamo tracing only)."""
    import torch._dynamo

    from reformer.attention import chunked

    monkeypatch.setattr(chunked, "BLOCK_SCORES", 1)
    model = _model().eval()
    counts = []
    with torch.no_grad():
        for length in (48, 112):  # multiples of the chunks: no padding branch
            torch._dynamo.reset()
            ids = torch.randint(0, 64, (2, length), generator=torch.Generator().manual_seed(1))
            explained = torch._dynamo.explain(model)(ids)
            assert explained.graph_break_count == 0, explained.break_reasons
            counts.append(_graph_ops(explained))
    assert counts[0] == counts[1], counts
    torch._dynamo.reset()


@pytest.mark.slow
def test_eval_forward_with_gradients_compiles_whole_and_matches_eager():
    """An eval-mode loss with gradients: one graph (the stack runs as plain residuals under compile), and
    its gradients equal the eager (reversible) ones. AOTAutograd without Inductor's code generation, as
    for training."""
    import torch._dynamo

    model = _model().eval()
    ids, mask = _inputs()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(ids, mask, targets=ids.roll(-1, 1))
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (model, compiled):
        model.zero_grad(set_to_none=True)
        loss = fn(ids, attention_mask=mask, targets=ids.roll(-1, 1))
        loss.backward()
        results.append((loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}))
    (expected_loss, expected_grads), (loss, grads) = results
    assert torch.allclose(loss, expected_loss, atol=1e-6, rtol=0)
    for name, grad in grads.items():
        assert torch.allclose(grad, expected_grads[name], atol=1e-6, rtol=0), name
    torch._dynamo.reset()


@pytest.mark.slow
def test_cross_attention_cores_compile_whole_and_match_eager():
    """Exact and LSH cross-attention reach the blocked core's op with their own plans: one graph each,
    outputs and gradients equal to eager ones."""
    import torch._dynamo

    from reformer.attention import cross_attention, lsh_cross_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 8, generator=g, dtype=torch.float64) for n in (20, 37, 37))
    key_mask = torch.ones(2, 37, dtype=torch.bool)
    key_mask[1, 30:] = False
    _, plan = lsh_cross_attention(q, k, v, n_buckets=4, chunk_size=4, window=8, hash_seed=3, return_plan=True)
    cases = {
        "exact": lambda q, k, v: cross_attention(q, k, v, key_mask=key_mask, block_scores=64),
        "lsh": lambda q, k, v: lsh_cross_attention(q, k, v, n_buckets=4, chunk_size=4, window=8, plan=plan),
    }
    for name, fn in cases.items():
        torch._dynamo.reset()
        explained = torch._dynamo.explain(fn)(q, k, v)
        assert explained.graph_break_count == 0, (name, explained.break_reasons)
        results = []
        for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
            inputs = [t.clone().requires_grad_() for t in (q, k, v)]
            out = f(*inputs)
            out.backward(torch.ones_like(out))
            results.append((out.detach(), [t.grad for t in inputs]))
        (expected, expected_grads), (out, grads) = results
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10, msg=name)
        for a, b in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
    torch._dynamo.reset()
