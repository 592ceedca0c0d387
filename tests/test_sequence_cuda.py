"""The CUDA sequence operator (``torch.ops.koemorph_fused.sequence_loss_forward``
on CUDA tensors, csrc/cuda/sequence_kernel.cu) against the CPU operator on the
same inputs: values, counts and gradients for every dtype, reduction and form
of lengths / mask / continuity; strided and misaligned inputs; chunk
boundaries of the window kernel; NaN in padded frames; no valid frame; more
than 2^31 elements; determinism, no host synchronisation, CUDA graphs, a
second GPU and torch.compile. Skipped without a GPU, except the build check."""

from __future__ import annotations

import pytest
import torch

import koemorph_fused as kf
from helpers import TOL, assert_close, capture_graph
from koemorph_fused import _build_config, _ops
from koemorph_fused.terms import EXPRESSION_INDICES, MOUTH_INDICES

NAME = "koemorph_fused::sequence_loss_forward"
OP = torch.ops.koemorph_fused.sequence_loss_forward.default
DEVICE = "cuda"
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
WEIGHTS = (1.0, 0.5, 0.7, 0.3, 0.2, 0.9)  # every term, velocity included, in the gradients
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
NUM_TERMS = 6

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_cpu_op = pytest.mark.skipif(
    not torch._C._dispatch_has_kernel_for_dispatch_key(NAME, "CPU"),
    reason="the CPU sequence kernel is not built into this library",
)


def groups(cols):
    """Perceptual groups that fit C: the ARKit ones, else a repeated and an overlapping index."""
    if cols >= 22:
        return MOUTH_INDICES, EXPRESSION_INDICES
    return (0, cols - 1, cols - 1), tuple(range(min(cols, 3)))


def rand(shape, dtype, generator, device=DEVICE):
    """Values in [0, 1), drawn in float64 on the CPU (the same values for every dtype and device)."""
    return torch.rand(shape, dtype=torch.float64, generator=generator).to(dtype=dtype, device=device)


# Frame sets: which of lengths / mask and which continuity form a case uses.
VALID = ("all", "lengths", "mask")
CONTINUITY = (None, "window", "frame")
PREV = (None, "prev", "prev_target")


def make_case(batch, frames, cols, dtype, *, raw=True, prev="prev_target", valid="lengths", continuity="frame",
              seed=0, device=DEVICE):
    """One call's inputs on `device`; frame tensors of assorted dtypes (the kernel reads them in place)."""
    g = torch.Generator().manual_seed(seed)
    case = dict(
        pred=rand((batch, frames, cols), dtype, g, device),
        target=rand((batch, frames, cols), dtype, g, device),
        raw=rand((batch, frames, cols), dtype, g, device) if raw else None,
        prev=None, prev_target=None, lengths=None, mask=None, continuity=None,
    )
    if prev:
        case["prev"] = rand((batch, cols), dtype, g, device)
    if prev == "prev_target":
        case["prev_target"] = rand((batch, cols), dtype, g, device)
    if valid == "lengths":
        case["lengths"] = torch.randint(0, frames + 1, (batch,), generator=g, dtype=torch.int32).to(device)
    elif valid == "mask":
        case["mask"] = (torch.rand(batch, frames, generator=g) > 0.3).to(device)
    if continuity == "window":
        case["continuity"] = (torch.rand(batch, generator=g) > 0.4).to(device=device, dtype=torch.float32)
    elif continuity == "frame":  # file boundaries inside windows
        case["continuity"] = (torch.rand(batch, frames, generator=g) > 0.25).to(device=device, dtype=torch.uint8)
    return case


def to_cpu(case):
    return {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def call(case, reduction="mean", weights=WEIGHTS, counts=None, frame_scale=None, grads=(True, True, True)):
    """The operator on the device of case["pred"]."""
    pred = case["pred"]
    mouth, expression = groups(pred.shape[-1])
    colw = _ops.column_weights(tuple(mouth), tuple(expression), pred.shape[-1], pred.dtype, pred.device)
    if not isinstance(weights, torch.Tensor):
        weights = torch.tensor(weights, dtype=torch.float64)
    return OP(pred, case["target"], case["raw"], case["prev"], case["prev_target"], case["lengths"], case["mask"],
              case["continuity"], colw, weights, counts, frame_scale, REDUCTIONS[reduction], *grads)


def assert_same_as_cpu(gpu_out, case, dtype, what="", **kwargs):
    """The CUDA outputs equal the CPU operator's on the same inputs: counts
    exactly, values and gradients within the dtype's tolerance."""
    cpu_kwargs = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    cpu_out = call(to_cpu(case), **cpu_kwargs)
    tol = TOL[dtype]
    for name, got, want in zip(("total", "terms", "counts", "grad_pred", "grad_target", "grad_raw"), gpu_out, cpu_out):
        assert got.device.type == DEVICE, name
        if name == "counts":
            assert torch.equal(got.cpu(), want), f"{what} counts {got.tolist()} != {want.tolist()}"
        else:
            kind = "grads" if name.startswith("grad") else "values"
            assert_close(got.cpu(), want, *tol[kind], what=f"{what} {name}")
    return cpu_out


# ---------------------------------------------------------------------------
# Runs without a GPU.


def test_cuda_build_registers_the_sequence_kernel():
    """A CUDA build registers the CUDA kernel of the sequence operator (a CPU-only
    build does not), and builds it from csrc/cuda/sequence_kernel.cu."""
    lib = _ops.library
    assert torch._C._dispatch_has_kernel_for_dispatch_key(NAME, "CUDA") == bool(lib.with_cuda)
    assert "cuda/sequence_kernel.cu" in _build_config.CUDA_SOURCES
    assert all(s.endswith(".cu") is (s in _build_config.CUDA_SOURCES) for s in
               _build_config.CPU_SOURCES + _build_config.CUDA_SOURCES)
    sources = _build_config.sources(with_cuda=True)
    assert any(s.endswith("sequence_kernel.cu") for s in sources)
    assert not any(s.endswith(".cu") for s in _build_config.sources(with_cuda=False))


# ---------------------------------------------------------------------------
# Against the CPU operator.

# (B, T, C): one frame; windows shorter and longer than a chunk of the window
# kernel (4 frames at least); C = 1, 7 (scalar and tail items), 52, 300
# (several warps of the per-frame kernel).
SHAPES = [(1, 1, 52), (3, 5, 7), (4, 37, 52), (2, 130, 1), (2, 9, 300)]
SCENARIOS = {
    "plain": dict(valid="all", continuity=None, prev=None, raw=True),
    "prev": dict(valid="all", continuity=None, prev="prev", raw=False),
    "lengths+window": dict(valid="lengths", continuity="window", prev="prev_target", raw=True),
    "mask+frame": dict(valid="mask", continuity="frame", prev="prev", raw=True),
    "lengths+frame": dict(valid="lengths", continuity="frame", prev="prev_target", raw=False),
    "mask+window": dict(valid="mask", continuity="window", prev=None, raw=True),
}


@needs_cuda
@needs_cpu_op
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", list(REDUCTIONS))
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_cpu(dtype, reduction, scenario, shape):
    case = make_case(*shape, dtype, seed=sum(shape) + list(SCENARIOS).index(scenario), **SCENARIOS[scenario])
    out = call(case, reduction)
    acc = _ops.accumulation_dtype(dtype)
    assert out[0].dtype == acc and out[1].dtype == acc and out[2].dtype == torch.int64
    if reduction == "none":
        assert out[0].shape == shape[:2] and out[1].shape == (*shape[:2], NUM_TERMS)
        assert all(g.numel() == 0 for g in out[3:])
    else:
        assert out[0].shape == () and out[1].shape == (NUM_TERMS,)
        assert out[3].shape == shape and out[3].dtype == _ops.gradient_storage_dtype(dtype)
        assert (out[5].numel() == 0) == (case["raw"] is None)
    assert_same_as_cpu(out, case, dtype, what=f"{scenario} {reduction}", reduction=reduction)


@needs_cuda
@needs_cpu_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("batch,frames", [(1, 4099), (3, 1000), (64, 33), (700, 8)])
def test_chunk_boundaries_and_velocity_look_ahead(dtype, batch, frames):
    """Long windows are cut into chunks: the frame before a chunk is read in
    place and the first frame of the next chunk moves the chunk's last frame
    (velocity). Every gradient element, chunk edges included, equals the CPU's."""
    case = make_case(batch, frames, 52, dtype, valid="mask", continuity="frame", seed=batch)
    out = call(case, "sum", weights=(0.0, 0.0, 0.0, 0.0, 0.0, 1.0))  # the velocity term alone
    assert_same_as_cpu(out, case, dtype, reduction="sum", weights=(0.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    out = call(case, "mean")
    assert_same_as_cpu(out, case, dtype, reduction="mean")


@needs_cuda
@needs_cpu_op
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_frame_scale_and_given_counts(dtype):
    """frame_scale (the backward of reduction none) with reduction sum, NaN in
    the scale of padded frames; counts given on the CPU or on the device."""
    case = make_case(5, 23, 52, dtype, valid="lengths", continuity="frame")
    g = torch.Generator().manual_seed(1)
    scale = torch.randn(5, 23, generator=g, dtype=torch.float64).to(_ops.accumulation_dtype(dtype))
    lengths = case["lengths"].cpu().long()
    for b in range(5):
        scale[b, lengths[b]:] = float("nan")  # never read: those frames are not in V
    out = call(case, "sum", frame_scale=scale.to(DEVICE))
    assert not any(x.isnan().any() for x in out[:2] + out[3:])
    assert_same_as_cpu(out, case, dtype, reduction="sum", frame_scale=scale)
    counts = torch.tensor([400, 400, 3, 0, 400, 7], dtype=torch.int32)
    host = call(case, "mean", counts=counts)
    device = call(case, "mean", counts=counts.to(DEVICE))
    for a, b in zip(host, device):
        assert torch.equal(a, b)
    assert_same_as_cpu(host, case, dtype, reduction="mean", counts=counts)


@needs_cuda
@needs_cpu_op
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int64, torch.uint8], ids=str)
def test_lengths_of_any_integer_dtype_are_clamped(dtype):
    """Direct callers may pass lengths outside [0, T]: read in place in any
    integer dtype, clamped into [0, T] as on the CPU."""
    case = make_case(4, 9, 52, torch.float32, valid="lengths", continuity=None)
    values = [0, 12, 3, 9] if dtype == torch.uint8 else [-3, 12, 3, 9]
    case["lengths"] = torch.tensor(values, dtype=dtype, device=DEVICE)
    out = call(case, "mean")
    assert out[2][0].item() == 9 + 3 + 9
    assert_same_as_cpu(out, case, torch.float32, reduction="mean")


@needs_cuda
@pytest.mark.parametrize("grads", [(True, False, False), (False, True, False), (False, False, True),
                                   (False, False, False)])
def test_only_requested_gradients_are_written(grads):
    case = make_case(6, 50, 52, torch.float32)
    full = call(case, "mean")
    part = call(case, "mean", grads=grads)
    for a, b in zip(part[:3], full[:3]):
        assert torch.equal(a, b)
    for wanted, g, g_full in zip(grads, part[3:], full[3:]):
        assert torch.equal(g, g_full) if wanted else g.numel() == 0


# ---------------------------------------------------------------------------
# Layouts.


def strided(x, how):
    """The same values as x (B, T, C) in another layout."""
    batch, frames, cols = x.shape
    if how == "transposed":  # a (B, C, T) model output seen as (B, T, C): column stride T
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if how == "offset1":  # misaligned start: scalar path
        buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
        out = buf[1:].view(batch, frames, cols)
        out.copy_(x)
        return out
    if how == "padded_frames":  # frames cols + 2 elements apart: half-width vectors (float64: full)
        buf = torch.empty(batch, frames, cols + 2, dtype=x.dtype, device=x.device)
        out = buf[..., :cols]
        out.copy_(x)
        return out
    if how == "time_slice":  # every other frame of a longer window
        buf = torch.empty(batch, 2 * frames, cols, dtype=x.dtype, device=x.device)
        out = buf[:, ::2]
        out.copy_(x)
        return out
    raise ValueError(how)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("how", ["transposed", "offset1", "padded_frames", "time_slice"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_strided_inputs_read_in_place(dtype, how, reduction):
    """Any layout gives what the contiguous inputs give (vector, 8-byte and
    scalar paths; the per-frame kernel reads any strides)."""
    case = make_case(3, 21, 52, dtype, valid="mask", continuity="window")
    views = dict(case)
    for k in ("pred", "target", "raw"):
        views[k] = strided(case[k], how)
    if how == "transposed":
        views["prev"] = case["prev"].t().contiguous().t()  # (B, C) with column stride B
    want = call(case, reduction)
    got = call(views, reduction)
    tol = TOL[dtype]
    for name, a, b in zip(("total", "terms", "counts", "grad_pred", "grad_target", "grad_raw"), got, want):
        assert a.is_contiguous()
        assert_close(a, b, *tol["grads" if name.startswith("grad") else "values"], what=f"{how} {name}")


# ---------------------------------------------------------------------------
# Padding and empty inputs.


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("valid", ["lengths", "mask"])
@pytest.mark.parametrize("reduction", list(REDUCTIONS))
def test_nan_in_padded_frames_changes_nothing(dtype, valid, reduction):
    """Frames outside V are never read: NaN / inf there gives the very same
    bits as finite values, and their gradients are exactly 0."""
    case = make_case(4, 40, 52, dtype, valid=valid, continuity="frame")
    if valid == "lengths":
        case["lengths"] = torch.tensor([0, 40, 17, 1], dtype=torch.int64, device=DEVICE)
        padded = torch.arange(40, device=DEVICE)[None, :] >= case["lengths"][:, None]
    else:
        padded = ~case["mask"]
    clean = call(case, reduction)
    dirty = dict(case)
    for k, bad in (("pred", float("nan")), ("target", float("inf")), ("raw", float("nan"))):
        dirty[k] = case[k].masked_fill(padded[..., None], bad)
    got = call(dirty, reduction)
    for a, b in zip(got, clean):
        assert torch.equal(a, b)
    if reduction != "none":
        for g in got[3:]:
            assert torch.equal(g[padded], torch.zeros_like(g[padded]))
            assert torch.isfinite(g).all()


@needs_cuda
@pytest.mark.parametrize("reduction", list(REDUCTIONS))
@pytest.mark.parametrize("shape,how", [((3, 8, 52), "lengths"), ((3, 8, 52), "mask"), ((0, 8, 52), "lengths"),
                                       ((3, 0, 52), "mask"), ((0, 0, 7), None)])
def test_no_valid_frame_gives_zeros(reduction, shape, how):
    batch, frames, cols = shape
    case = make_case(batch, frames, cols, torch.float32, valid=how or "all", continuity=None)
    if how == "lengths":
        case["lengths"] = torch.zeros(batch, dtype=torch.int64, device=DEVICE)
    elif how == "mask":
        case["mask"] = torch.zeros(batch, frames, dtype=torch.bool, device=DEVICE)
    case["pred"] = case["pred"].fill_(float("nan"))  # never read
    out = call(case, reduction)
    for x in out:
        assert x.device.type == DEVICE and not x.isnan().any()
        assert torch.equal(x, torch.zeros_like(x))
    if reduction != "none":
        assert out[3].shape == shape


# ---------------------------------------------------------------------------
# 64-bit indexing.


def _free_gpu_bytes():
    return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0


@needs_cuda
@pytest.mark.slow
@pytest.mark.skipif(_free_gpu_bytes() < 24 * 2**30, reason="needs about 20 GiB of free GPU memory")
def test_more_than_2_31_elements_bfloat16():
    """B*T*C > 2^31 in bfloat16: window 1 starts past 2^30 elements and ends
    past 2^31. Zeros everywhere except the last frames of window 1, so the
    result must equal the operator on that tail alone (same kernel path),
    and every gradient before the tail must be 0."""
    cols, tail = 52, 64
    frames = 2**30 // cols + tail
    assert 2 * frames * cols > 2**31
    pred = torch.zeros(2, frames, cols, dtype=torch.bfloat16, device=DEVICE)
    target = torch.zeros_like(pred)
    g = torch.Generator().manual_seed(3)
    pred[1, -tail:] = rand((tail, cols), torch.bfloat16, g)
    target[1, -tail:] = rand((tail, cols), torch.bfloat16, g)
    big = dict(pred=pred, target=target, raw=None, prev=None, prev_target=None,
               lengths=torch.tensor([frames, frames], device=DEVICE), mask=None, continuity=None)
    got = call(big, "sum", grads=(True, True, False))
    # The tail with the zero frame before it (whose pair with the first random frame counts).
    small = dict(big, pred=pred[1:, -tail - 1:].clone(), target=target[1:, -tail - 1:].clone(), lengths=None)
    want = call(small, "sum", grads=(True, True, False))
    assert_close(got[1].cpu(), want[1].cpu(), *TOL[torch.bfloat16]["values"], what="terms")
    assert got[2].tolist() == [2 * frames] * 3 + [2 * frames - 2, 0, 2 * frames - 2]
    for g_big, g_small in zip(got[3:5], want[3:5]):
        # The same formulas; only where chunks end differs (1 ulp at most).
        assert_close(g_big[1, -tail - 1:].cpu(), g_small[0].cpu(), *TOL[torch.bfloat16]["grads"], what="tail")
        assert not g_big[0].any() and not g_big[1, : -tail - 1].any()
    del got, big, pred, target
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------
# Determinism, synchronisation, graphs, devices, compile.


@needs_cuda
@pytest.mark.parametrize("reduction", list(REDUCTIONS))
def test_bitwise_identical_run_to_run(reduction):
    case = make_case(37, 300, 52, torch.float32, valid="lengths", continuity="frame")
    runs = [call(case, reduction) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@needs_cuda
def test_no_host_synchronisation():
    """Nothing in the operator reads a value on the host: lengths, mask,
    continuity, weights, counts and frame_scale all stay on the device."""
    case = make_case(8, 64, 52, torch.float32, valid="mask", continuity="frame")
    lengths_case = make_case(8, 64, 52, torch.bfloat16, valid="lengths", continuity="window")
    weights = torch.tensor(WEIGHTS, dtype=torch.float64, device=DEVICE)
    counts = torch.tensor([10.0, 10, 10, 5, 10, 5], device=DEVICE)
    scale = torch.rand(8, 64, device=DEVICE)
    calls = [
        lambda: call(case, "mean", weights=weights, counts=counts),
        lambda: call(case, "sum", weights=weights, frame_scale=scale),
        lambda: call(case, "none", weights=weights),
        lambda: call(lengths_case, "mean", weights=weights),
    ]
    for f in calls:  # warm-up: column weights cached, occupancy queried
        f()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [f() for f in calls]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(o[0]).all() for o in outs)


@needs_cuda
def test_public_api_backward_without_host_synchronisation():
    """kf.sequence_loss forward and backward, every reduction, no sync. (Without
    lengths, mask and continuity: the API checks their values on the host in
    eager calls, one bool read.)"""
    case = make_case(4, 32, 52, torch.float32, valid="all", continuity=None)
    pred = case["pred"].clone().requires_grad_()
    kwargs = dict(prev=case["prev"], prev_target=case["prev_target"], velocity_weight=0.5)
    kf.sequence_loss(pred, case["target"], case["raw"], **kwargs).total.backward()  # warm-up
    torch.cuda.synchronize()
    pred.grad = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        for reduction in ("mean", "sum", "none"):
            out = kf.sequence_loss(pred, case["target"], case["raw"], reduction=reduction, **kwargs)
            out.total.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(pred.grad).all()


@needs_cuda
def test_cuda_graph_capture_and_replay():
    """Pre-kernel, window kernel and per-frame kernel captured once; replays
    on new values copied into the static inputs give the eager results bit for bit."""
    static = make_case(6, 45, 52, torch.float32, valid="lengths", continuity="frame", seed=0)
    weights = torch.tensor(WEIGHTS, dtype=torch.float64, device=DEVICE)

    def step():
        return call(static, "mean", weights=weights), call(static, "none", weights=weights)

    graph, captured = capture_graph(step, warmup=2)

    totals = []
    for seed in (1, 2):
        fresh = make_case(6, 45, 52, torch.float32, valid="lengths", continuity="frame", seed=seed)
        for k, v in fresh.items():
            if v is not None:
                static[k].copy_(v)
        weights.copy_(torch.tensor(WEIGHTS[::-1], dtype=torch.float64))  # weights read on the device
        graph.replay()
        torch.cuda.synchronize()
        eager = call(fresh, "mean", weights=weights), call(fresh, "none", weights=weights)
        for got, want in zip(captured, eager):
            for a, b in zip(got, want):
                assert torch.equal(a, b)
        totals.append(captured[0][0].item())
    assert totals[0] != totals[1]


@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_second_gpu():
    """Inputs on cuda:1 while cuda:0 is current: the kernels run there (device
    guard, per-device occupancy) and give what cuda:0 gives."""
    case0 = make_case(5, 70, 52, torch.float32, valid="mask", continuity="frame", device="cuda:0")
    case1 = {k: (v.to("cuda:1") if isinstance(v, torch.Tensor) else v) for k, v in case0.items()}
    with torch.cuda.device(0):
        out1 = call(case1, "mean")
        out0 = call(case0, "mean")
    for a, b in zip(out1, out0):
        assert a.device == torch.device("cuda:1")
        assert_close(a.cpu(), b.cpu(), 1e-6, 1e-7, what="cuda:1 vs cuda:0")


@needs_cuda
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_matches_eager(reduction):
    """kf.sequence_loss under torch.compile (fullgraph, dynamic B and T) on the
    GPU: the same values and gradients as eager calls."""
    def loss(pred, target, raw, lengths, continuity):
        out = kf.sequence_loss(pred, target, raw, lengths=lengths, continuity=continuity, velocity_weight=0.5,
                               reduction=reduction)
        return out.total.sum(), out.terms

    compiled = torch.compile(loss, fullgraph=True, dynamic=True)
    for batch, frames in ((3, 20), (5, 33)):
        case = make_case(batch, frames, 52, torch.float32, valid="lengths", continuity="frame", seed=frames)
        results = []
        for f in (loss, compiled):
            pred = case["pred"].clone().requires_grad_()
            raw = case["raw"].clone().requires_grad_()
            total, terms = f(pred, case["target"], raw, case["lengths"], case["continuity"])
            grads = torch.autograd.grad(total, (pred, raw))
            results.append((total.detach(), terms.detach(), *grads))
        for name, a, b in zip(("total", "terms", "grad_pred", "grad_raw"), *results):
            assert_close(a, b, 1e-6, 1e-7, what=f"compiled {name}")


@needs_cuda
def test_structural_errors_name_the_argument():
    case = make_case(2, 6, 52, torch.float32, valid="lengths", continuity=None)
    with pytest.raises(ValueError, match="lengths or mask"):
        call(dict(case, mask=torch.ones(2, 6, dtype=torch.bool, device=DEVICE)))
    with pytest.raises(ValueError, match="counts"):
        call(case, "sum", counts=torch.ones(6))
    with pytest.raises(ValueError, match="prev_target needs prev"):
        call(dict(case, prev=None))
    with pytest.raises(ValueError, match="lengths must have shape"):
        call(dict(case, lengths=case["lengths"][:1]))
    with pytest.raises(ValueError, match="mask must be on the device"):
        call(dict(case, lengths=None, mask=torch.ones(2, 6, dtype=torch.bool)))
