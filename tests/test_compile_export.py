"""torch.compile and torch.export with the fused loss."""

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

import koemorph_fused as kf
from helpers import rand


class TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 52)
        self.loss = kf.FusedKoeMorphLoss()

    def forward(self, x, target, prev, raw, mask):
        return self.loss(self.lin(x), target, prev=prev, raw=raw, continuity=mask)


def batch(b, device="cpu"):
    return (rand((b, 16), device=device), rand((b, 52), device=device), rand((b, 52), device=device),
            rand((b, 52), device=device), torch.rand(b, device=device) > 0.3)


def train_step(model):
    def step(x, target, prev, raw, mask):
        loss = model(x, target, prev, raw, mask)
        loss.backward()
        return loss.detach()

    return step


@pytest.fixture
def trace_backward():
    # Let dynamo trace `loss.backward()` inside the compiled step (fullgraph).
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        torch._dynamo.reset()
        yield
    torch._dynamo.reset()


def grads_of(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_training_step_matches_eager_without_recompiling(trace_backward, backend):
    torch.manual_seed(0)
    model = TinyModel()
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(train_step(model), fullgraph=True, backend=counter)
    eager = train_step(model)
    for b in [4, 8, 33, 64, 5]:
        args = batch(b)
        model.zero_grad(set_to_none=True)
        got = compiled(*args)
        g_compiled = grads_of(model)
        model.zero_grad(set_to_none=True)
        want = eager(*args)
        torch.testing.assert_close(got, want)
        for a, e in zip(g_compiled, grads_of(model)):
            torch.testing.assert_close(a, e)
    # One compile for the first batch size, one recompile to dynamic shapes.
    assert counter.frame_count <= 2
    frames = counter.frame_count
    # A schedule changing the weights between steps recompiles nothing, and
    # the compiled step sees the new values.
    for w in (kf.LossWeights.for_stride(32), kf.LossWeights.for_stride(1), {"temporal_weight": 0.9}):
        model.loss.weights = w
        args = batch(16)
        model.zero_grad(set_to_none=True)
        got = compiled(*args)
        model.zero_grad(set_to_none=True)
        torch.testing.assert_close(got, eager(*args))
    assert counter.frame_count == frames


def test_compiled_functional_call_has_no_graph_break():
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    @torch.compile(fullgraph=True, backend=counter)
    def f(pred, target, prev, raw):
        out = kf.temporal_loss(pred, target, prev, raw, mouth_indices=[12, 13, -1], expression_indices=range(5))
        return out.total, out.terms

    pred, target, prev, raw = (rand((9, 52)) for _ in range(4))
    total, terms = f(pred, target, prev, raw)
    ref = kf.temporal_loss(pred, target, prev, raw, mouth_indices=[12, 13, -1], expression_indices=range(5))
    torch.testing.assert_close(total, ref.total)
    torch.testing.assert_close(terms, ref.terms)
    assert counter.frame_count == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reduce_overhead_on_cuda(trace_backward):
    model = TinyModel().cuda()
    step = torch.compile(lambda *a: model(*a), mode="reduce-overhead")
    for _ in range(3):
        args = batch(32, "cuda")
        got = step(*args)
        torch.testing.assert_close(got, model(*args))


def test_export_forward():
    model = TinyModel()
    b = torch.export.Dim("B", min=2)
    ep = torch.export.export(model, batch(8), dynamic_shapes=tuple({0: b} for _ in range(5)))
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "koemorph_fused.temporal_loss_forward.default" in ops
    for n in (5, 8, 40):
        args = batch(n)
        torch.testing.assert_close(ep.module()(*args), model(*args))


def test_eager_calls_keep_the_cpp_node_after_a_compiled_step(trace_backward):
    """Tracing creates torch.func's thread-local state, which then outlives
    it; only an active transform may send eager calls to the Python Function."""
    model = TinyModel()
    compiled = torch.compile(train_step(model), fullgraph=True, backend="aot_eager")
    compiled(*batch(4))
    pred = rand((4, 52)).requires_grad_()
    out = kf.temporal_loss(pred, rand((4, 52)))
    assert "TemporalLossFunction" in out.total.grad_fn.name(), out.total.grad_fn.name()
