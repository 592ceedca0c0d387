"""kf.sequence_loss: the public API over (B, T, C) windows, against the eager
reference, the row loss at T = 1, and its argument checks (docs/spec.md,
"Sequences")."""

from __future__ import annotations

import pytest
import torch

import koemorph_fused as kf

from helpers import DTYPES, TOL, assert_close
from sequence_helpers import assert_sequence_matches_reference, rand_windows, run_sequence

LOSSES = [kf.sequence_loss, kf.reference.sequence_loss]


def frame_forms(batch, frames, generator):
    """Every way to say which frames count: (lengths, mask, continuity) triples."""
    lengths = torch.randint(0, frames + 1, (batch,), generator=generator)
    mask = torch.rand(batch, frames, generator=generator) > 0.3
    c_rows = torch.randint(0, 2, (batch,), generator=generator)
    c_frames = (torch.rand(batch, frames, generator=generator) > 0.2).to(torch.float32)
    return [
        dict(),
        dict(lengths=lengths),
        dict(lengths=lengths.to(torch.int32), continuity=c_rows),
        dict(mask=mask),
        dict(mask=mask.to(torch.float64), continuity=c_frames),
        dict(lengths=lengths, continuity=c_frames.to(torch.uint8)),
        dict(continuity=False),
        dict(continuity=True, mask=mask.to(torch.int64)),
    ]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_prev", ["none", "prev", "both"])
def test_matches_reference_over_frame_forms(reduction, with_prev):
    g = torch.Generator().manual_seed(1)
    pred, target, raw, prev, prev_target = rand_windows(3, 7, 52, torch.float64, g)
    extra = {} if with_prev == "none" else dict(prev=prev)
    if with_prev == "both":
        extra["prev_target"] = prev_target
    for form in frame_forms(3, 7, g):
        for r in (raw, None):
            assert_sequence_matches_reference(pred, target, r, reduction=reduction, velocity_weight=0.7,
                                              **extra, **form)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 1, 52), (3, 5, 7), (4, 33, 52), (2, 9, 61), (0, 4, 52), (3, 0, 52)])
def test_matches_reference_over_shapes_and_dtypes(dtype, shape):
    g = torch.Generator().manual_seed(2)
    b, t, c = shape
    pred, target, raw, prev, prev_target = rand_windows(b, t, c, dtype, g)
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    assert_sequence_matches_reference(pred, target, raw, prev=prev, prev_target=prev_target, lengths=lengths,
                                      velocity_weight=0.5, mouth_indices=[0], expression_indices=[c - 1])


def test_row_loss_is_the_case_t_equals_1():
    g = torch.Generator().manual_seed(3)
    pred, target, raw, prev, _ = rand_windows(6, 1, 52, torch.float64, g)
    same_file = torch.tensor([1, 0, 1, 1, 0, 1])
    for loss, row_loss in ((kf.sequence_loss, kf.temporal_loss),
                           (kf.reference.sequence_loss, kf.reference.temporal_loss)):
        seq, seq_grads = run_sequence(loss, pred, target, raw, prev=prev, continuity=same_file,
                                      velocity_weight=0.0)
        p = pred[:, 0].detach().clone().requires_grad_()
        t = target[:, 0].detach().clone().requires_grad_()
        r = raw[:, 0].detach().clone().requires_grad_()
        row = row_loss(p, t, prev, r, continuity=same_file)
        grads = torch.autograd.grad(row.total, (p, t, r))
        torch.testing.assert_close(seq.terms[:5], row.terms)
        torch.testing.assert_close(seq.total, row.total.detach())
        for name, g_row in zip(("pred", "target", "raw"), grads):
            torch.testing.assert_close(seq_grads[name][:, 0], g_row)


@pytest.mark.parametrize("loss", LOSSES)
def test_padding_is_never_read(loss):
    g = torch.Generator().manual_seed(4)
    pred, target, raw, prev, prev_target = rand_windows(3, 6, 52, torch.float32, g)
    lengths = torch.tensor([6, 2, 0])
    kwargs = dict(prev=prev, prev_target=prev_target, lengths=lengths, velocity_weight=0.3)
    clean, clean_grads = run_sequence(loss, pred, target, raw, **kwargs)
    for x in (pred, target, raw):
        x[1, 2:] = float("nan")
        x[2] = float("inf")
    dirty, dirty_grads = run_sequence(loss, pred, target, raw, **kwargs)
    assert torch.equal(clean.terms, dirty.terms) and torch.equal(clean.total, dirty.total)
    for name in clean_grads:
        assert torch.equal(clean_grads[name], dirty_grads[name]), name
        assert (dirty_grads[name][1, 2:] == 0).all() and (dirty_grads[name][2] == 0).all()


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_valid_frame_gives_zeros(loss, reduction):
    pred, target, raw, prev, prev_target = rand_windows(2, 4, 52)
    out, grads = run_sequence(loss, pred, target, raw, prev=prev, prev_target=prev_target,
                              lengths=torch.zeros(2, dtype=torch.long), velocity_weight=1.0, reduction=reduction)
    assert (out.terms == 0).all() and (out.total == 0).all() and (out.counts == 0).all()
    assert all((g == 0).all() for g in grads.values())


@pytest.mark.parametrize("loss", LOSSES)
def test_counts_make_the_mean_over_micro_batches_exact(loss):
    g = torch.Generator().manual_seed(5)
    pred, target, raw, prev, prev_target = rand_windows(5, 9, 52, torch.float64, g)
    pred[2:] *= 3  # the two micro-batches differ, so a mean of their means is off
    lengths = torch.tensor([9, 3, 7, 0, 2])
    kwargs = dict(raw=raw, prev=prev, prev_target=prev_target, velocity_weight=0.5)
    whole = loss(pred, target, lengths=lengths, **kwargs)
    parts = [slice(0, 2), slice(2, 5)]
    counts = sum(kf.sequence_counts((p.stop - p.start, 9), lengths=lengths[p], with_prev=True,
                                    with_prev_target=True, with_raw=True) for p in parts)
    assert torch.equal(counts, whole.counts)
    total = 0
    for p in parts:
        part = loss(pred[p], target[p], raw[p], prev=prev[p], prev_target=prev_target[p], lengths=lengths[p],
                    velocity_weight=0.5, counts=counts)
        assert torch.equal(part.counts, kf.sequence_counts((p.stop - p.start, 9), lengths=lengths[p],
                                                           with_prev=True, with_prev_target=True, with_raw=True))
        total = total + part.total
    torch.testing.assert_close(total, whole.total)
    # plain per-part means averaged are NOT the mean (the batch is uneven): counts= matters
    naive = sum(loss(pred[p], target[p], raw[p], prev=prev[p], prev_target=prev_target[p], lengths=lengths[p],
                     velocity_weight=0.5).total for p in parts) / 2
    assert not torch.allclose(naive, whole.total)


@pytest.mark.parametrize("loss", LOSSES)
def test_reductions_agree(loss):
    g = torch.Generator().manual_seed(6)
    pred, target, raw, prev, prev_target = rand_windows(3, 5, 52, torch.float64, g)
    kwargs = dict(prev=prev, prev_target=prev_target, lengths=torch.tensor([5, 4, 1]), velocity_weight=2.0)
    none, none_grads = run_sequence(loss, pred, target, raw, reduction="none", **kwargs)
    total, sum_grads = run_sequence(loss, pred, target, raw, reduction="sum", **kwargs)
    mean = loss(pred, target, raw, reduction="mean", **kwargs)
    assert none.terms.shape == (3, 5, 6) and none.total.shape == (3, 5)
    torch.testing.assert_close(none.terms.sum((0, 1)), total.terms)
    torch.testing.assert_close(none.total.sum(), total.total)
    torch.testing.assert_close(mean.terms, total.terms / total.counts.clamp(min=1))
    for name in sum_grads:
        torch.testing.assert_close(none_grads[name], sum_grads[name])
    # "none" backward with a per-frame grad_output weights each frame
    go = torch.rand(3, 5, dtype=torch.float64, generator=g)
    _, fused_grads = run_sequence(loss, pred, target, raw, reduction="none", grad_output=go, **kwargs)
    _, ref_grads = run_sequence(kf.reference.sequence_loss, pred, target, raw, reduction="none", grad_output=go,
                                **kwargs)
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], ref_grads[name])


def test_strided_inputs_read_in_place():
    g = torch.Generator().manual_seed(7)
    out_bct = torch.rand(4, 52, 11, dtype=torch.float64, generator=g)        # a (B, C, T) model output
    pred = out_bct.transpose(1, 2)
    target = torch.rand(4, 22, 52, dtype=torch.float64, generator=g)[:, ::2]
    raw = torch.rand(11, 4, 52, dtype=torch.float64, generator=g).transpose(0, 1)
    prev = torch.rand(52, 4, dtype=torch.float64, generator=g).t()
    assert not pred.is_contiguous() and not target.is_contiguous() and not raw.is_contiguous()
    fused, *_ = assert_sequence_matches_reference(pred, target, raw, prev=prev, prev_target=prev,
                                                  lengths=torch.tensor([11, 3, 0, 8]), velocity_weight=1.0)
    contiguous = kf.sequence_loss(pred.contiguous(), target.contiguous(), raw.contiguous(), prev=prev.contiguous(),
                                  prev_target=prev.contiguous(), lengths=torch.tensor([11, 3, 0, 8]),
                                  velocity_weight=1.0)
    torch.testing.assert_close(fused.terms, contiguous.terms, rtol=1e-14, atol=1e-15)


def test_velocity_moves_both_frames_and_target_gets_its_gradient():
    pred = torch.zeros(1, 2, 3, dtype=torch.float64, requires_grad=True)
    target = torch.zeros(1, 2, 3, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        target[0, 1] = 1.0                                           # the true motion is +1 per column
    w = kf.LossWeights(mse=0, l1=0, perceptual=0, temporal=0, smoothing=0)
    for loss in LOSSES:
        pred.grad = target.grad = None
        out = loss(pred, target, weights=w, velocity_weight=1.0, mouth_indices=[], expression_indices=[])
        assert out.terms[5].item() == 1.0 and out.counts[5].item() == 1    # ((0 - 0) - (1 - 0))^2
        out.total.backward()
        # d/dpred[1] = 2/3 * (dp - dt) = -2/3; frame 0 gets the opposite
        torch.testing.assert_close(pred.grad[0, 1], torch.full((3,), -2 / 3, dtype=torch.float64))
        torch.testing.assert_close(pred.grad[0, 0], torch.full((3,), 2 / 3, dtype=torch.float64))
        torch.testing.assert_close(target.grad, -pred.grad)


def test_temporal_term_detaches_the_previous_frame():
    pred = torch.tensor([[[0.0], [1.0]]], dtype=torch.float64, requires_grad=True)
    w = kf.LossWeights(mse=0, l1=0, perceptual=0, temporal=1.0, smoothing=0)
    for loss in LOSSES:
        pred.grad = None
        loss(pred, torch.zeros_like(pred), weights=w, mouth_indices=[], expression_indices=[]).total.backward()
        assert pred.grad[0, :, 0].tolist() == [0.0, 2.0]


@pytest.mark.parametrize("module_cls", [kf.FusedKoeMorphSequenceLoss, kf.reference.KoeMorphSequenceLoss])
def test_modules(module_cls):
    g = torch.Generator().manual_seed(8)
    pred, target, raw, prev, prev_target = rand_windows(2, 6, 52, torch.float64, g)
    lengths = torch.tensor([6, 4])
    loss_fn = module_cls(temporal_weight=0.3, velocity_weight=0.5)
    loss = loss_fn(pred, target, raw, prev=prev, prev_target=prev_target, lengths=lengths)
    out = kf.reference.sequence_loss(pred, target, raw, prev=prev, prev_target=prev_target, lengths=lengths,
                                     weights=kf.LossWeights(temporal=0.3), velocity_weight=0.5)
    torch.testing.assert_close(loss, out.total)
    torch.testing.assert_close(loss_fn.last_terms, out.terms)
    assert torch.equal(loss_fn.last_counts, out.counts)
    loss_fn.velocity_weight = 2.0
    loss_fn.weights = {"mse_weight": 0.0}
    out2 = kf.reference.sequence_loss(pred, target, raw, prev=prev, prev_target=prev_target, lengths=lengths,
                                      weights=kf.LossWeights(mse=0.0), velocity_weight=2.0)
    torch.testing.assert_close(loss_fn(pred, target, raw, prev=prev, prev_target=prev_target, lengths=lengths),
                               out2.total)
    if isinstance(loss_fn, kf.FusedKoeMorphSequenceLoss):
        assert loss_fn.weight_values.tolist() == [0.0, 0.1, 0.5, 0.2, 0.1, 2.0]
        loss_fn.half()
        assert loss_fn.weight_values.dtype == torch.float64
    with pytest.raises(ValueError, match="velocity"):
        loss_fn.velocity_weight = -1.0
    assert "velocity_weight=2.0" in repr(loss_fn) and "reduction='mean'" in repr(loss_fn)
    none_fn = module_cls(reduction="none")
    assert none_fn(pred, target).shape == (2, 6)
    with pytest.raises(ValueError, match="reduction"):
        module_cls(reduction="avg")


def test_sequence_counts():
    lengths = torch.tensor([4, 2, 0])
    assert kf.sequence_counts((3, 4), lengths=lengths).tolist() == [6, 6, 6, 4, 0, 4]
    assert kf.sequence_counts((3, 4), lengths=lengths, with_prev=True, with_raw=True).tolist() == [6, 6, 6, 6, 6, 4]
    assert kf.sequence_counts((3, 4), lengths=lengths, with_prev=True, with_prev_target=True,
                              continuity=torch.tensor([1, 0, 1])).tolist() == [6, 6, 6, 5, 0, 5]
    cont = torch.ones(3, 4)
    cont[0, 2] = 0                                                        # a file boundary inside window 0
    assert kf.sequence_counts((3, 4), lengths=lengths, continuity=cont).tolist() == [6, 6, 6, 3, 0, 3]
    assert kf.sequence_counts((0, 4)).tolist() == [0] * 6
    with pytest.raises(ValueError, match="with_prev_target"):
        kf.sequence_counts((3, 4), with_prev_target=True)
    with pytest.raises(ValueError, match="lengths"):
        kf.sequence_counts((3, 4), lengths=torch.tensor([5, 0, 0]))
    for shape in (3, (2.5, 4), ("2", 4), (True, 4), (2, 3, 4)):  # never truncated or guessed
        with pytest.raises(TypeError, match="shape"):
            kf.sequence_counts(shape)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.uint32, torch.uint64], ids=str)
def test_unsigned_lengths(dtype):
    """lengths of any integer dtype, including the unsigned ones torch cannot
    compare (uint16/32/64): the same counts, terms and gradients as int64."""
    pred, target, raw, prev, prev_target = rand_windows(3, 4, 52, torch.float64)
    lengths = torch.tensor([4, 2, 0])
    assert torch.equal(kf.sequence_counts((3, 4), lengths=lengths.to(dtype)), kf.sequence_counts((3, 4), lengths=lengths))
    for loss in LOSSES:
        want, want_grads = run_sequence(loss, pred, target, raw, prev=prev, lengths=lengths)
        got, got_grads = run_sequence(loss, pred, target, raw, prev=prev, lengths=lengths.to(dtype))
        assert torch.equal(got.terms, want.terms) and torch.equal(got.counts, want.counts)
        for name in want_grads:
            assert torch.equal(got_grads[name], want_grads[name]), name


def test_unpaired_previous_frames_reach_no_gradient():
    """A previous frame that is not paired (the prev of a window that starts a
    file, the frame before a file boundary) is never read into a term, by
    either loss: a NaN there gives no NaN gradient anywhere else. Only frame
    (0, 0), which holds a NaN itself, gets NaN gradients of pred and target."""
    pred, target, raw, prev, prev_target = rand_windows(2, 3, 52, torch.float64)
    prev[1] = prev_target[1] = float("nan")      # window 1 starts a file: its prev is unused
    pred[0, 0] = float("nan")                    # frame (0, 1) starts a file: frame (0, 0) is not its previous
    continuity = torch.tensor([[1, 0, 1], [0, 1, 1]])
    (fused, fused_grads), (ref, ref_grads) = (
        run_sequence(loss, pred, target, raw, prev=prev, prev_target=prev_target, continuity=continuity,
                     velocity_weight=0.5, reduction="none") for loss in LOSSES)
    assert torch.equal(fused.counts, ref.counts)
    elsewhere = torch.ones(2, 3, dtype=torch.bool)
    elsewhere[0, 0] = False
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], ref_grads[name], equal_nan=True, msg=name)
        assert fused_grads[name][elsewhere].isfinite().all(), name
    assert fused_grads["pred"][0, 0].isnan().all() and fused_grads["target"][0, 0].isnan().all()


def test_as_dict():
    pred, target, raw, prev, prev_target = rand_windows(2, 3)
    d = kf.sequence_loss(pred, target, raw).as_dict()
    assert list(d) == list(kf.SEQUENCE_TERM_NAMES) + ["total"]
    with pytest.raises(ValueError, match="reduced"):
        kf.sequence_loss(pred, target, reduction="none").as_dict()


BAD = [
    (dict(pred=torch.rand(4, 52)), ValueError, "pred must have 3 dimensions"),
    (dict(pred=torch.rand(2, 3, 0), target=torch.rand(2, 3, 0)), ValueError, "at least one column"),
    (dict(pred=torch.rand(2, 3, 52, dtype=torch.float64).to(torch.int32)), TypeError, "pred must be a float16"),
    (dict(target=torch.rand(2, 4, 52)), ValueError, "target must have the shape"),
    (dict(raw=torch.rand(2, 3, 51)), ValueError, "raw must have the shape"),
    (dict(prev=torch.rand(2, 3, 52)), ValueError, "prev must have the shape"),
    (dict(prev_target=torch.rand(2, 52)), ValueError, "prev_target was given without prev"),
    (dict(prev=torch.rand(2, 52), prev_target=torch.rand(3, 52)), ValueError, "prev_target must have the shape"),
    (dict(lengths=torch.tensor([3, 4])), ValueError, r"lengths must be in \[0, T\]"),
    (dict(lengths=torch.tensor([3, -1])), ValueError, r"lengths must be in \[0, T\]"),
    (dict(lengths=torch.tensor([3, 2**64 - 1], dtype=torch.uint64)), ValueError, r"lengths must be in \[0, T\]"),
    (dict(lengths=torch.tensor([3.0, 1.0])), TypeError, "lengths must be an integer tensor"),
    (dict(lengths=torch.tensor([True, False])), TypeError, "lengths must be an integer tensor"),
    (dict(lengths=torch.tensor([3])), ValueError, r"lengths must have shape \(2,\)"),
    (dict(lengths=[3, 2]), TypeError, "lengths must be a torch.Tensor"),
    (dict(lengths=torch.tensor([3, 2]), mask=torch.ones(2, 3)), ValueError, "lengths or mask, not both"),
    (dict(mask=torch.ones(2, 4)), ValueError, r"mask must have shape \(2, 3\)"),
    (dict(mask=torch.full((2, 3), 2.0)), ValueError, "mask must hold only 0 and 1"),
    (dict(continuity=torch.ones(3)), ValueError, "continuity must have shape"),
    (dict(continuity=torch.tensor([0.5, 1.0])), ValueError, "continuity must hold only 0 and 1"),
    (dict(continuity=1), TypeError, "continuity must be None, a bool, or a tensor"),
    (dict(continuity=torch.ones(2, dtype=torch.complex64)), TypeError, "continuity must be a bool, integer"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(counts=[1] * 6, reduction="sum"), ValueError, "counts is only used with reduction='mean'"),
    (dict(counts=[1] * 5), ValueError, "counts must hold six numbers"),
    (dict(counts=[1, 1, 1, 1, 1, -1]), ValueError, "counts must be finite and >= 0"),
    (dict(counts=torch.tensor([1, 1, 1, 1, 1, float("nan")])), ValueError, "counts must be finite and >= 0"),
    (dict(counts="abcdef"), TypeError, "counts must be six numbers"),
    (dict(velocity_weight=-0.5), ValueError, "velocity"),
    (dict(velocity_weight="1"), TypeError, "velocity"),
    (dict(mouth_indices=[52]), ValueError, "mouth_indices"),
    (dict(layout="live_link_face_61"), ValueError, "layout: .* names 61 columns, but the data has C = 52"),
]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("bad,error,message", BAD)
def test_bad_input_names_the_argument(loss, bad, error, message):
    args = dict(pred=torch.rand(2, 3, 52), target=torch.rand(2, 3, 52))
    args.update(bad)
    if "target" not in bad and args["pred"].shape != (2, 3, 52):
        args["target"] = args["pred"].clone()
    pred, target = args.pop("pred"), args.pop("target")
    with pytest.raises(error, match=message):
        loss(pred, target, **args)


def test_meta_tensors_on_another_device_are_named():
    pred = torch.rand(2, 3, 52)
    with pytest.raises(ValueError, match="lengths must be on the device of pred"):
        kf.reference.sequence_loss(pred, pred, lengths=torch.tensor([1, 2], device="meta"))


@pytest.mark.parametrize("loss", LOSSES)
def test_compiles_fullgraph_with_dynamic_batch_and_frames(loss):
    def f(p, t, r, prev, prev_target, lengths, continuity):
        out = loss(p, t, r, prev=prev, prev_target=prev_target, lengths=lengths, continuity=continuity,
                   velocity_weight=0.5)
        return out.total, out.terms, out.counts

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(9)
    for b, t in ((2, 5), (3, 7), (4, 9), (2, 12)):
        pred, target, raw, prev, prev_target = rand_windows(b, t, 52, torch.float32, g)
        lengths, continuity = torch.randint(0, t + 1, (b,), generator=g), torch.randint(0, 2, (b,), generator=g)
        p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
        got, want = compiled(p1, target, raw, prev, prev_target, lengths, continuity), f(
            p2, target, raw, prev, prev_target, lengths, continuity)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e)
        got[0].backward()
        want[0].backward()
        torch.testing.assert_close(p1.grad, p2.grad)
        # a bad length is still an error under tracing (checked on the device)
        with pytest.raises(RuntimeError, match=r"lengths must be in \[0, T\]"):
            compiled(p1, target, raw, prev, prev_target, lengths + t + 1, continuity)
    assert counters["stats"]["unique_graphs"] == 1  # B and T stay symbolic (no value of T is baked in)


@pytest.mark.parametrize("dynamic", [None, True])
def test_weights_as_float_arguments_of_a_compiled_function(dynamic):
    """A weight passed to a compiled function as a Python float (symbolic
    under dynamic shapes) is checked without breaking the graph, for the
    sequence and the row loss, and each value gives eager's result."""
    pred, target, raw, prev, prev_target = rand_windows(2, 4, 52, torch.float64)

    def f(p, t, w):
        seq = kf.sequence_loss(p, t, velocity_weight=w, weights={"temporal_weight": w}).total
        return seq + kf.temporal_loss(p[:, -1], t[:, -1], weights=kf.LossWeights(temporal=w)).total

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic, backend="eager")
    for w in (0.1, 0.2, 0.3):
        torch.testing.assert_close(compiled(pred, target, w), f(pred, target, w))
    assert kf.sequence_loss(pred, target).total.isfinite()  # the default 0.0 too (it had broken the graph)
    torch.compile(lambda p, t: kf.sequence_loss(p, t).total, fullgraph=True, dynamic=True, backend="eager")(pred, target)


class TinySequenceModel(torch.nn.Module):
    """A linear layer per frame and the fused sequence loss, for export and compile."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 52)
        self.loss = kf.FusedKoeMorphSequenceLoss(velocity_weight=0.5)

    def forward(self, x, target, prev, prev_target, lengths):
        return self.loss(self.lin(x), target, prev=prev, prev_target=prev_target, lengths=lengths)


def sequence_batch(b, t):
    g = torch.Generator().manual_seed(b * 100 + t)
    return (torch.rand(b, t, 16, generator=g), torch.rand(b, t, 52, generator=g), torch.rand(b, 52, generator=g),
            torch.rand(b, 52, generator=g), torch.randint(0, t + 1, (b,), generator=g))


def test_export_with_dynamic_batch_and_frames():
    model = TinySequenceModel()
    b, t = torch.export.Dim("B", min=2), torch.export.Dim("T", min=2)
    ep = torch.export.export(model, sequence_batch(3, 8),
                             dynamic_shapes=({0: b, 1: t}, {0: b, 1: t}, {0: b}, {0: b}, {0: b}))
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "koemorph_fused.sequence_loss_forward.default" in ops
    for shape in ((3, 8), (5, 2), (2, 33)):
        args = sequence_batch(*shape)
        torch.testing.assert_close(ep.module()(*args), model(*args))


def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    model = TinySequenceModel()
    twin = TinySequenceModel()
    twin.load_state_dict(model.state_dict())

    def step(m, *args):
        loss = m(*args)
        loss.backward()
        return loss.detach()

    compiled = torch.compile(lambda *a: step(model, *a), fullgraph=False, dynamic=True)
    for shape in ((4, 8), (3, 11)):
        args = sequence_batch(*shape)
        model.zero_grad()
        twin.zero_grad()
        torch.testing.assert_close(compiled(*args), step(twin, *args))
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p.grad, q.grad)


def test_autocast_feeds_low_precision_straight_in():
    lin = torch.nn.Linear(16, 52)
    x, target, prev, prev_target, lengths = sequence_batch(3, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = lin(x)
        assert pred.dtype == torch.bfloat16
        out = kf.sequence_loss(pred, target.bfloat16(), prev=prev.bfloat16(), prev_target=prev_target.bfloat16(),
                               lengths=lengths, velocity_weight=0.5)
    assert out.total.dtype == torch.float32
    out.total.backward()
    assert lin.weight.grad is not None and lin.weight.grad.dtype == torch.float32
    ref = kf.reference.sequence_loss(pred.detach(), target.bfloat16(), prev=prev.bfloat16(),
                                     prev_target=prev_target.bfloat16(), lengths=lengths, velocity_weight=0.5)
    torch.testing.assert_close(out.total, ref.total, rtol=TOL[torch.bfloat16]["values"][0],
                               atol=TOL[torch.bfloat16]["values"][1])


def test_meta_tensors_give_shapes_and_dtypes():
    pred = torch.empty(4, 9, 52, device="meta", dtype=torch.float16, requires_grad=True)
    target, raw = torch.empty_like(pred), torch.empty_like(pred)
    loss_fn = kf.FusedKoeMorphSequenceLoss().to("meta")
    for reduction, total_shape, terms_shape in (("mean", (), (6,)), ("none", (4, 9), (4, 9, 6))):
        out = kf.sequence_loss(pred, target, raw, mask=torch.empty(4, 9, device="meta"), reduction=reduction)
        assert out.total.shape == total_shape and out.terms.shape == terms_shape
        assert out.total.dtype == torch.float32 and out.counts.dtype == torch.int64
    assert loss_fn(pred, target, raw, lengths=torch.empty(4, dtype=torch.long, device="meta")).shape == ()


def test_module_weights_assigned_between_forward_and_a_none_backward():
    """Reduction "none" reads the weights again in backward: assigning the
    same values in between changes nothing (the buffer is not written);
    other values raise instead of giving the gradients of other weights."""
    loss_fn = kf.FusedKoeMorphSequenceLoss(velocity_weight=0.5, reduction="none")
    pred = torch.rand(2, 4, 52, requires_grad=True)
    target = torch.rand(2, 4, 52)
    expected = torch.autograd.grad(loss_fn(pred, target).sum(), pred)[0]
    total = loss_fn(pred, target).sum()
    loss_fn.weights = loss_fn.weights
    loss_fn.velocity_weight = 0.5
    assert torch.equal(torch.autograd.grad(total, pred)[0], expected)
    total = loss_fn(pred, target).sum()
    loss_fn.velocity_weight = 0.25
    with pytest.raises(RuntimeError, match="sequence_loss's weights"):
        torch.autograd.grad(total, pred)
    assert torch.equal(loss_fn.weight_values[-1], torch.tensor(0.25, dtype=torch.float64))
