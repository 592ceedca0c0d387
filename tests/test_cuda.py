"""The CUDA backend against the CPU kernel: dtypes, shapes whose rows straddle
block and grid boundaries, layouts that take the 16-byte, 8-byte and scalar
paths, device-resident weights, CUDA graphs, streams, determinism and the
absence of host synchronisation. Skipped without a GPU, except the build check."""

import re

import pytest
import torch

import koemorph_fused as kf
from helpers import DTYPES, TOL, assert_close, capture_graph, rand
from koemorph_fused import _ops

DEVICE = "cuda"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

WEIGHTS = kf.LossWeights().as_tensor()  # float64, on the CPU
ALL_GRADS = (True, True, True)


def groups_for(cols):
    """The ARKit groups where they fit, else a repeated and a negative index."""
    if cols >= 22:
        return kf.MOUTH_INDICES, kf.EXPRESSION_INDICES
    return (0, cols - 1, 0), (-1,)


def forward(pred, target, prev=None, raw=None, mask=None, weights=WEIGHTS, grads=ALL_GRADS):
    """The operator itself, on the device of pred."""
    mouth, expression = groups_for(pred.shape[-1])
    colw = _ops.column_weights(mouth, expression, pred.shape[-1], pred.dtype, pred.device)
    return _ops.forward_op(pred, target, prev, raw, mask, colw, weights, *grads)


def on_cpu(x):
    return None if x is None else x.detach().cpu()


def assert_same_as_cpu(gpu_out, args, kwargs, dtype):
    """gpu_out equals the CPU operator on the same inputs, within TOL."""
    cpu_args = [on_cpu(a) for a in args]
    cpu_kwargs = {k: (on_cpu(v) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    cpu_out = forward(*cpu_args, **cpu_kwargs)
    tol = TOL[dtype]
    assert_close(gpu_out[0].cpu(), cpu_out[0], *tol["values"], what="total")
    assert_close(gpu_out[1].cpu(), cpu_out[1], *tol["values"], what="terms")
    for name, g, c in zip(("grad_pred", "grad_target", "grad_raw"), gpu_out[2:], cpu_out[2:]):
        assert_close(g.cpu(), c, *tol["grads"], what=name)
    return cpu_out


# Rows per block are 256 / items_per_row: 19.7 for C=52 in 4-element vectors,
# 36.6 for C=7 (scalars), 3.4 for C=300; rows on both sides of those counts.
ROWS = [1, 19, 20, 36, 37, 73, 74, 257, 4099]
COLS = [1, 7, 52, 300]
INPUTS = {
    "all": dict(prev=True, raw=True, mask=True),
    "prev": dict(prev=True, raw=False, mask=False),
    "raw": dict(prev=False, raw=True, mask=False),
    "none": dict(prev=False, raw=False, mask=False),
}


def make_inputs(rows, cols, dtype, prev=True, raw=True, mask=True, device=DEVICE):
    args = [rand((rows, cols), dtype, device) for _ in range(2)]
    args.append(rand((rows, cols), dtype, device) if prev else None)
    args.append(rand((rows, cols), dtype, device) if raw else None)
    kwargs = {"mask": (torch.rand(rows, device=device) > 0.3).float() if mask else None}
    if dtype == torch.float64 and mask:
        kwargs["mask"] = kwargs["mask"].double()
    return args, kwargs


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("cols", COLS)
@pytest.mark.parametrize("inputs", list(INPUTS))
def test_matches_cpu(dtype, rows, cols, inputs):
    args, kwargs = make_inputs(rows, cols, dtype, **INPUTS[inputs])
    out = forward(*args, **kwargs)
    assert out[0].device.type == DEVICE and out[2].dtype == _ops.gradient_storage_dtype(dtype)
    assert_same_as_cpu(out, args, kwargs, dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("rows,cols", [(50_003, 52), (20_000, 300), (300_001, 1)])
def test_many_grid_strides_and_multi_block_mask_sum(dtype, rows, cols):
    """More items than one grid covers (each thread loops), and a mask long
    enough for several pre-kernel blocks, with fractional mask values."""
    args, _ = make_inputs(rows, cols, dtype)
    mask = torch.rand(rows, device=DEVICE, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    out = forward(*args, mask=mask)
    assert_same_as_cpu(out, args, {"mask": mask}, dtype)


def offset_view(rows, cols, dtype, offset, pad=0, device=DEVICE):
    """(rows, cols) values whose data starts `offset` elements into a buffer
    and whose rows are cols + pad elements apart: misaligned on purpose."""
    base = rand((offset + rows * (cols + pad),), dtype, device)
    return base[offset:].view(rows, cols + pad)[:, :cols]


LAYOUTS = {
    # name: (offset of pred, offset of target, row padding), in elements
    "aligned": (0, 0, 0),
    "pred+1": (1, 0, 0),
    "target+2": (0, 2, 0),
    "both+4": (4, 4, 0),
    "both+8": (8, 8, 0),
    "pad1": (0, 0, 1),
    "pad2": (0, 0, 2),
    "pad4": (0, 0, 4),
}


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("cols", [52, 64, 7])
def test_misaligned_and_strided_views(dtype, layout, cols):
    """Offsets and row paddings that leave 16-byte, 8-byte or only element
    alignment; the kernel must pick a path every operand allows."""
    rows = 45
    po, to, pad = LAYOUTS[layout]
    pred = offset_view(rows, cols, dtype, po, pad)
    target = offset_view(rows, cols, dtype, to, pad)
    prev = offset_view(rows, cols, dtype, 0, pad)
    raw = rand((rows, cols), dtype, DEVICE)
    mask = (torch.rand(rows, device=DEVICE) > 0.5).to(_ops.accumulation_dtype(dtype))
    out = forward(pred, target, prev, raw, mask=mask)
    assert_same_as_cpu(out, (pred, target, prev, raw), {"mask": mask}, dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_broadcast_and_sequence_views_are_read_in_place(dtype):
    rows, cols = 33, 52
    target = rand((1, cols), dtype, DEVICE).expand(rows, cols)  # row stride 0
    pred, prev, raw = (rand((rows, cols), dtype, DEVICE) for _ in range(3))
    out = forward(pred, target, prev, raw)
    assert_same_as_cpu(out, (pred, target, prev, raw), {}, dtype)
    seq = rand((rows, 256, cols), dtype, DEVICE)
    out = forward(pred, seq[:, -1, :], prev, raw)
    assert_same_as_cpu(out, (pred, seq[:, -1, :], prev, raw), {}, dtype)


@needs_cuda
@pytest.mark.parametrize("grads", [(True, False, False), (False, True, False), (False, False, True), (False, False, False)])
def test_only_requested_gradients_are_written(grads):
    args, kwargs = make_inputs(100, 52, torch.float32)
    full = forward(*args, **kwargs)
    part = forward(*args, **kwargs, grads=grads)
    assert torch.equal(part[0], full[0]) and torch.equal(part[1], full[1])
    for wanted, g, g_full in zip(grads, part[2:], full[2:]):
        if wanted:
            assert torch.equal(g, g_full)
        else:
            assert g.numel() == 0


@needs_cuda
@pytest.mark.parametrize(
    "weights",
    [
        kf.LossWeights(),
        kf.LossWeights(mse=0, l1=0, perceptual=0, temporal=0, smoothing=0),
        kf.LossWeights(mse=0.0, l1=0.1, perceptual=0.0, temporal=0.0, smoothing=0.1),
        kf.LossWeights(mse=1e-8, l1=1e6, perceptual=123.0, temporal=7.5, smoothing=0.0),
    ],
)
def test_device_weights_equal_host_weights(weights):
    """Weights read on the device (a module's buffer, CUDA graphs) give the very
    same bits as weights passed from the host; a zero weight keeps a NaN out."""
    args, kwargs = make_inputs(300, 52, torch.float32)
    args[2][1, 5] = float("nan")  # prev: reaches only the temporal term
    host = forward(*args, **kwargs, weights=weights.as_tensor())
    device = forward(*args, **kwargs, weights=weights.as_tensor().to(DEVICE))
    for a, b in zip(host, device):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    if weights.temporal == 0:
        assert not host[2].isnan().any()
    assert_same_as_cpu(device, args, dict(kwargs, weights=weights.as_tensor()), torch.float32)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel,offset", [(1, 0), (7, 0), (4096, 0), (10_001, 0), (10_001, 1), (4096, 3)])
@pytest.mark.parametrize("go_dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_scale_gradients_matches_cpu_bitwise(dtype, numel, offset, go_dtype):
    """Backward multiplies in the accumulation type and rounds once, like the
    CPU kernel: the same bits, on vector, scalar and tail paths (saved
    gradients of float16 inputs are float32)."""
    stored = _ops.gradient_storage_dtype(dtype)
    saved = [rand((offset + numel,), stored, DEVICE)[offset:] for _ in range(2)]
    empty = torch.empty(0, dtype=stored, device=DEVICE)
    go = torch.tensor(-1.37, dtype=go_dtype, device=DEVICE)
    out = _ops.scale_op(go, saved[0], empty, saved[1], dtype)
    expected = _ops.scale_op(go.cpu(), saved[0].cpu(), empty.cpu(), saved[1].cpu(), dtype)
    assert out[1].numel() == 0
    for a, b in zip(out, expected):
        assert a.dtype == dtype
        assert torch.equal(a.cpu(), b)


@needs_cuda
def test_scale_gradients_with_nothing_to_scale():
    empty = torch.empty(0, device=DEVICE)
    out = _ops.scale_op(torch.tensor(2.0, device=DEVICE), empty, empty, empty, torch.float32)
    assert all(t.numel() == 0 and t.device.type == DEVICE for t in out)


@needs_cuda
def test_bitwise_identical_run_to_run():
    args, kwargs = make_inputs(100_003, 52, torch.float32)
    runs = [forward(*args, **kwargs) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@needs_cuda
def test_autograd_end_to_end_matches_cpu():
    args, kwargs = make_inputs(513, 52, torch.bfloat16)
    mask = kwargs["mask"] > 0

    def run(device):
        pred, target, prev, raw = (a.detach().to(device) for a in args)
        pred.requires_grad_()
        raw.requires_grad_()
        out = kf.temporal_loss(pred, target, prev, raw, continuity=mask.to(device))
        (out.total * 3.0).backward()
        return out.total.detach().cpu(), pred.grad.cpu(), raw.grad.cpu()

    gpu, cpu = run(DEVICE), run("cpu")
    tol = TOL[torch.bfloat16]
    assert_close(gpu[0], cpu[0], *tol["values"], what="total")
    assert_close(gpu[1], cpu[1], *tol["grads"], what="pred.grad")
    assert_close(gpu[2], cpu[2], *tol["grads"], what="raw.grad")


@needs_cuda
def test_runs_on_the_current_stream():
    """Work sent to any other stream would overtake the sleep and read the
    zeros that the copies have not replaced yet."""
    rows, cols = 4096, 52
    data = [rand((rows, cols)) for _ in range(4)]
    mask = torch.rand(rows) > 0.5
    bufs = [torch.zeros((rows, cols), device=DEVICE) for _ in range(4)]
    mask_buf = torch.zeros(rows, device=DEVICE)
    pinned = [x.pin_memory() for x in data + [mask.float()]]
    go = torch.tensor(2.0, device=DEVICE)
    forward(*bufs, mask=mask_buf)  # caches the column weights: no blocking copy below
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        for b, x in zip(bufs + [mask_buf], pinned):
            b.copy_(x, non_blocking=True)
        out = forward(*bufs, mask=mask_buf)
        scaled = _ops.scale_op(go, *out[2:], torch.float32)
    side.synchronize()
    cpu_out = assert_same_as_cpu(out, data, {"mask": mask.float()}, torch.float32)
    for s, c in zip(scaled, cpu_out[2:]):
        assert_close(s.cpu(), 2.0 * c, *TOL[torch.float32]["grads"], what="scaled")


def _graph_inputs(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    data = {k: torch.rand((rows, cols), generator=g) for k in ("pred", "target", "prev", "raw")}
    data["mask"] = torch.rand(rows, generator=g) > 0.3
    return data


def _cpu_expected(data, weights=kf.LossWeights()):
    pred = data["pred"].clone().requires_grad_()
    raw = data["raw"].clone().requires_grad_()
    out = kf.temporal_loss(pred, data["target"], data["prev"], raw, continuity=data["mask"], weights=weights)
    gp, gr = torch.autograd.grad(out.total, (pred, raw))
    return out.total.detach(), out.terms, gp, gr


@needs_cuda
def test_cuda_graph_capture_and_replay():
    """Forward (mask pre-kernel included) and backward captured once; replays
    on new inputs copied into the static buffers give the new values."""
    rows, cols = 1000, 52
    first = _graph_inputs(rows, cols, 0)
    static = {k: v.to(DEVICE) for k, v in first.items()}
    static["pred"].requires_grad_()
    static["raw"].requires_grad_()

    def step():
        out = kf.temporal_loss(static["pred"], static["target"], static["prev"], static["raw"],
                               continuity=static["mask"])
        gp, gr = torch.autograd.grad(out.total, (static["pred"], static["raw"]))
        return out.total, out.terms, gp, gr

    graph, captured = capture_graph(step)  # warm-up outside the capture (caches, allocator)

    totals = []
    for seed in (1, 2):
        data = _graph_inputs(rows, cols, seed)
        with torch.no_grad():
            for k, v in data.items():
                static[k].copy_(v)
        graph.replay()
        torch.cuda.synchronize()
        expected = _cpu_expected(data)
        tol = TOL[torch.float32]
        for name, got, want in zip(("total", "terms", "grad_pred", "grad_raw"), captured, expected):
            kind = "grads" if name.startswith("grad") else "values"
            assert_close(got.detach().cpu(), want, *tol[kind], what=name)
        totals.append(captured[0].item())
    assert totals[0] != totals[1]


@needs_cuda
def test_cuda_graph_reads_module_weights_on_the_device():
    """FusedKoeMorphLoss keeps its weights in a device buffer: a schedule that
    changes them between replays changes the captured total and gradients."""
    rows, cols = 256, 52
    data = _graph_inputs(rows, cols, 3)
    static = {k: v.to(DEVICE) for k, v in data.items()}
    static["pred"].requires_grad_()
    static["raw"].requires_grad_()
    loss_fn = kf.FusedKoeMorphLoss().to(DEVICE)

    def step():
        total = loss_fn(static["pred"], static["target"], static["prev"], static["raw"], continuity=static["mask"])
        gp, gr = torch.autograd.grad(total, (static["pred"], static["raw"]))
        return total, gp, gr

    graph, captured = capture_graph(step)

    tol = TOL[torch.float32]
    for weights in (kf.LossWeights.for_stride(32), kf.LossWeights.for_stride(1), kf.LossWeights(temporal=0.0)):
        loss_fn.weights = weights
        graph.replay()
        torch.cuda.synchronize()
        total, _, gp, gr = _cpu_expected(data, weights)
        assert_close(captured[0].detach().cpu(), total, *tol["values"], what=f"total {weights}")
        assert_close(captured[1].cpu(), gp, *tol["grads"], what=f"grad_pred {weights}")
        assert_close(captured[2].cpu(), gr, *tol["grads"], what=f"grad_raw {weights}")


@needs_cuda
def test_no_host_synchronisation():
    rows, cols = 512, 52
    pred, target, prev, raw = (rand((rows, cols), torch.float32, DEVICE) for _ in range(4))
    pred.requires_grad_()
    raw.requires_grad_()
    mask = torch.rand(rows, device=DEVICE) > 0.5
    loss_fn = kf.FusedKoeMorphLoss().to(DEVICE)
    kf.temporal_loss(pred, target, prev, raw, continuity=mask)  # caches the column weights
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = kf.temporal_loss(pred, target, prev, raw, continuity=mask)
        out.total.backward()
        loss_fn(pred, target, prev, raw, continuity=mask).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert pred.grad is not None and torch.isfinite(pred.grad).all()


def test_build_reports_backends_and_architectures():
    """What `koemorph-fused info` reports matches what was registered; runs
    without a GPU too (a CUDA build registers its kernels regardless)."""
    from koemorph_fused import info

    lib = _ops.library
    registered = [
        torch._C._dispatch_has_kernel_for_dispatch_key(f"koemorph_fused::{name}", "CUDA")
        for name in ("temporal_loss_forward", "scale_gradients", "scale_gradients_")
    ]
    archs = [a for a in lib.cuda_arch_list.split(",") if a]
    report = info.collect()
    assert registered == [bool(lib.with_cuda)] * 3
    assert report["backends"] == (["cpu", "cuda"] if lib.with_cuda else ["cpu"])
    assert report["cuda_architectures"] == archs
    if lib.with_cuda:
        assert archs and all(re.fullmatch(r"\d+\.\d+(\+PTX)?", a) for a in archs), archs
    else:
        assert archs == []
    if lib.with_cuda and torch.cuda.is_available():  # the GPU here can run what was built
        major, minor = torch.cuda.get_device_capability()
        built = [(*map(int, re.match(r"(\d+)\.(\d+)", a).groups()), a.endswith("+PTX")) for a in archs]
        assert any((M == major and m <= minor) or (ptx and (M, m) <= (major, minor)) for M, m, ptx in built), (
            f"built for {archs}, running on sm_{major}{minor}"
        )


def test_architecture_list_reaches_only_the_cxx_compiler(monkeypatch):
    """nvcc splits -D values at commas: the comma-separated list must not reach it."""
    from koemorph_fused import _build_config as config

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;8.6 9.0+PTX")
    assert all("," not in str(value) for _, value in config.define_macros(True))
    assert "-DKF_CUDA_ARCH_LIST=8.0,8.6,9.0+PTX" in config.cxx_flags(True)
    assert not any(f.startswith("-DKF_CUDA_ARCH_LIST") for f in config.cxx_flags(False))


@needs_cuda
def test_invalid_device_weights_count_as_zero_in_total_and_gradients():
    """Weights on the device cannot be checked without a sync: one that is
    negative, NaN or infinite counts as 0 in the total AND in every gradient
    (before, the gradient used it while the total dropped it)."""
    args, kwargs = make_inputs(300, 52, torch.float32)
    bad = torch.tensor([-1.0, float("nan"), 0.5, float("inf"), 0.1], dtype=torch.float64, device=DEVICE)
    same = torch.tensor([0.0, 0.0, 0.5, 0.0, 0.1], dtype=torch.float64)
    got = forward(*args, **kwargs, weights=bad)
    want = forward(*args, **kwargs, weights=same)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    # The Python API never lets such a weight through.
    with pytest.raises(ValueError, match="finite"):
        kf.LossWeights(l1=float("nan"))


@needs_cuda
def test_cuda_graph_rejects_module_weights_left_on_the_cpu():
    """A module whose weight buffer stayed on the CPU would have its values
    captured as kernel arguments and replayed after they change: clear error."""
    data = {k: v.to(DEVICE) for k, v in _graph_inputs(64, 52, 4).items()}
    loss_fn = kf.FusedKoeMorphLoss()  # not moved to the device
    loss_fn(data["pred"], data["target"], data["prev"], data["raw"])  # fine outside a capture
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match=r"weights.*CUDA graph.*loss_fn\.to"):
        with torch.cuda.graph(graph):
            loss_fn(data["pred"], data["target"], data["prev"], data["raw"])


def _fresh_groups(tag):
    """Column groups no other test uses (C = 52), so the first call builds them."""
    return dict(mouth_indices=(3, 5, 5, -2, tag % 40 + 10), expression_indices=(7, tag % 40 + 11))


def _reference_total(data, groups, weights=kf.LossWeights()):
    cpu = {k: v.cpu() for k, v in data.items()}
    return kf.reference.temporal_loss(cpu["pred"], cpu["target"], cpu["prev"], cpu["raw"],
                                      continuity=cpu["mask"], weights=weights, **groups).total


def _total(data, groups):
    return kf.temporal_loss(data["pred"], data["target"], data["prev"], data["raw"],
                            continuity=data["mask"], **groups).total


@needs_cuda
def test_first_call_inside_a_capture_then_an_eager_call_before_the_replay():
    """Finding 1: a key first seen inside a capture is not cached (its tensor
    is filled only by a replay): an eager call before any replay builds its
    own, and the replay fills the graph's. One copy node, not ~40 kernels."""
    data = {k: v.to(DEVICE) for k, v in _graph_inputs(128, 52, 5).items()}
    groups = _fresh_groups(1)
    cached = set(_ops._COLUMN_WEIGHTS)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _total(data, groups)
    assert set(_ops._COLUMN_WEIGHTS) == cached
    eager = _total(data, groups)  # before any replay
    want = _reference_total(data, groups)
    assert_close(eager.cpu(), want, *TOL[torch.float32]["values"], what="eager total")
    graph.replay()
    torch.cuda.synchronize()
    assert_close(captured.cpu(), want, *TOL[torch.float32]["values"], what="replayed total")


@needs_cuda
def test_first_call_on_a_delayed_side_stream_then_on_the_default_stream():
    """Finding 2: the cached column weights are complete when cached, whatever
    stream reads them next."""
    data = {k: v.to(DEVICE) for k, v in _graph_inputs(256, 52, 8).items()}
    groups = _fresh_groups(2)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # the side stream is busy for a while
        _total(data, groups)  # builds and caches the key
    got = _total(data, groups)  # default stream, not ordered after the side stream
    assert_close(got.cpu(), _reference_total(data, groups), *TOL[torch.float32]["values"], what="total")
    torch.cuda.synchronize()


@needs_cuda
def test_a_no_grad_graph_survives_many_more_keys_and_allocations():
    """Finding 3: a graph captured under no_grad reads the cached column
    weights, which nothing else owns: 257 more keys must not evict (free)
    them, and memory allocated afterwards must not overwrite them."""
    data = {k: v.to(DEVICE) for k, v in _graph_inputs(128, 52, 9).items()}
    groups = _fresh_groups(3)
    keys_before = set(_ops._COLUMN_WEIGHTS)
    try:
        with torch.no_grad():
            _total(data, groups)  # cached outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = _total(data, groups)
            cached = set(_ops._COLUMN_WEIGHTS) - keys_before
            for i in range(257):
                kf.temporal_loss(data["pred"][:, :40], data["target"][:, :40], mouth_indices=(i % 40,),
                                 expression_indices=(i // 40,))
        assert cached <= set(_ops._COLUMN_WEIGHTS)  # nothing evicted
        torch.cuda.empty_cache()
        junk = [torch.full((1 << 20,), float("nan"), device=DEVICE) for _ in range(64)]
        graph.replay()
        torch.cuda.synchronize()
        assert_close(captured.cpu(), _reference_total(data, groups), *TOL[torch.float32]["values"], what="total")
        del junk
    finally:  # leave room in the cache for the other tests
        for key in set(_ops._COLUMN_WEIGHTS) - keys_before:
            del _ops._COLUMN_WEIGHTS[key]


def _replay_device_events(graph):
    """Names of the kernels and copies that one replay of `graph` runs."""
    graph.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@needs_cuda
def test_a_first_call_inside_a_capture_adds_few_nodes():
    """Finding 6: the loss with column weights first built inside the capture
    replays as the copy of the column weights, the workspace memset, the mask
    pre-kernel and the forward kernel."""
    data = {k: v.to(DEVICE) for k, v in _graph_inputs(128, 52, 10).items()}
    with torch.no_grad():
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            _total(data, _fresh_groups(4))
    events = _replay_device_events(graph)
    assert any("forward_kernel" in e for e in events) and len(events) <= 5, events


@needs_cuda
def test_double_backward_with_cpu_weights_has_no_host_sync_and_captures():
    """Finding 4: the create_graph linearisation with the default CPU
    LossWeights copies nothing host-to-device (no sync, legal in a capture)."""
    data = {k: v.to(DEVICE) for k, v in _graph_inputs(256, 52, 11).items()}
    v = torch.rand_like(data["pred"])

    def step():
        pred = data["pred"].detach().requires_grad_()
        out = kf.temporal_loss(pred, data["target"], data["prev"], data["raw"], continuity=data["mask"])
        (g,) = torch.autograd.grad(out.total, pred, create_graph=True)
        (hv,) = torch.autograd.grad((g * v).sum(), pred)
        return hv

    eager = step()  # warm-up: caches the column weights
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(again, eager)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


def _backward_allocations(pred, target, grad_output, retain):
    out = kf.temporal_loss(pred, target)
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    grads = torch.autograd.grad(out.total, (pred, target), grad_outputs=grad_output, retain_graph=retain)
    torch.cuda.synchronize()
    return grads, torch.cuda.memory_stats()["allocation.all.allocated"] - before


@needs_cuda
@pytest.mark.parametrize("factor", [1.0, 65536.0])
def test_backward_hands_the_saved_gradients_over(factor):
    """Finding 7: a backward that frees its graph scales in place and returns
    the saved gradients (no new gradient buffers), for grad_output 1 and for a
    GradScaler's factor; a retained graph allocates new ones. Same bits."""
    pred = torch.rand(4096, 52, device=DEVICE, requires_grad=True)
    target = torch.rand(4096, 52, device=DEVICE, requires_grad=True)
    go = torch.tensor(factor, device=DEVICE)
    _backward_allocations(pred, target, go, False)  # warm-up
    handed, handed_allocs = _backward_allocations(pred, target, go, False)
    scaled, scaled_allocs = _backward_allocations(pred, target, go, True)
    assert all(torch.equal(a, b) for a, b in zip(handed, scaled))
    assert scaled_allocs >= handed_allocs + 2, (handed_allocs, scaled_allocs)


@needs_cuda
def test_in_place_scaling_with_grad_output_one_captures_and_writes_nothing():
    g = torch.rand(3, 7, 52, device=DEVICE)
    before = g.clone()
    go = torch.tensor(1.0, device=DEVICE)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.koemorph_fused.scale_gradients_(go, [g])
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(g, before)
    go.fill_(2.0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(g, 2 * before)


@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA device")
def test_second_device_while_the_first_is_current():
    """Inputs, mask and weights on cuda:1 while cuda:0 is current: the kernels
    run on cuda:1 (eager, backward, and captured on a cuda:1 stream)."""
    assert torch.cuda.current_device() == 0
    host = _graph_inputs(300, 52, 12)
    data = {k: v.to("cuda:1") for k, v in host.items()}
    loss_fn = kf.FusedKoeMorphLoss().to("cuda:1")
    pred = data["pred"].clone().requires_grad_()
    total = loss_fn(pred, data["target"], data["prev"], data["raw"], continuity=data["mask"])
    total.backward()
    want_total, _, want_gp, _ = _cpu_expected(host)
    assert total.device == torch.device("cuda:1") and pred.grad.device == torch.device("cuda:1")
    assert_close(total.detach().cpu(), want_total, *TOL[torch.float32]["values"], what="total")
    assert_close(pred.grad.cpu(), want_gp, *TOL[torch.float32]["grads"], what="grad_pred")
    stream = torch.cuda.Stream(device="cuda:1")
    stream.wait_stream(torch.cuda.current_stream("cuda:1"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        captured = loss_fn(data["pred"], data["target"], data["prev"], data["raw"], continuity=data["mask"])
    graph.replay()
    torch.cuda.synchronize("cuda:1")
    assert torch.cuda.current_device() == 0
    assert_close(captured.cpu(), want_total, *TOL[torch.float32]["values"], what="captured total")


@needs_cuda
def test_more_than_2_31_elements_in_bfloat16():
    """64-bit indexing: R*C > 2^31. Every row is the same, so the terms are
    those of one row and every row's gradient is one row's divided by R."""
    free, _ = torch.cuda.mem_get_info()
    cols = 52
    rows = (1 << 31) // cols + 1000
    if free < 10 * rows * cols:  # pred, target and two gradients in bfloat16
        pytest.skip(f"needs about {10 * rows * cols >> 30} GiB of free GPU memory")
    row = rand((1, cols), torch.bfloat16, DEVICE)
    other = rand((1, cols), torch.bfloat16, DEVICE)
    pred = row.expand(rows, cols).contiguous()
    target = other.expand(rows, cols).contiguous()
    out = forward(pred, target, other.expand(rows, cols), other.expand(rows, cols), grads=(True, True, False))
    one = forward(row, other, other, other, grads=(True, True, False))
    assert_close(out[1].cpu(), one[1].cpu(), *TOL[torch.bfloat16]["values"], what="terms")
    for name, g, g1 in (("grad_pred", out[2], one[2]), ("grad_target", out[3], one[3])):
        want = (g1.float() / rows).to(torch.bfloat16)
        for part in (g[:1], g[rows // 2: rows // 2 + 1], g[-1:]):
            atol = 2e-2 * want.float().abs().max().item()  # rounded twice: relative to the row's scale
            assert_close(part.float().cpu(), want.float().cpu(), 1.6e-2, atol, what=name)
    del target
    go = torch.tensor(4.0, device=DEVICE)
    tail = out[2][-1].clone()
    torch.ops.koemorph_fused.scale_gradients_(go, [out[2]])  # in place, numel > 2^31
    assert torch.equal(out[2][-1], tail * 4)


ALL_MASK_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                   torch.bfloat16, torch.float32, torch.float64, torch.uint16, torch.uint32, torch.uint64,
                   torch.float8_e4m3fn]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("mask_dtype", ALL_MASK_DTYPES, ids=str)
def test_masks_of_every_dtype_with_half_and_double_inputs(dtype, mask_dtype):
    args, _ = make_inputs(300, 52, dtype, mask=False)
    mask = torch.rand(300, device=DEVICE) > 0.4
    got = forward(*args, mask=mask.to(mask_dtype))
    want = forward(*args, mask=mask.to(_ops.accumulation_dtype(dtype)))
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert_same_as_cpu(got, args, {"mask": mask.to(_ops.accumulation_dtype(dtype))}, dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_three_dimensional_pred_with_a_non_contiguous_mask(dtype):
    batch, time, cols = 6, 33, 52
    pred, target, prev, raw = (rand((batch, time, cols), dtype, DEVICE) for _ in range(4))
    mask = (torch.rand(time, batch, device=DEVICE) > 0.3).t()  # (batch, time), not contiguous
    assert not mask.is_contiguous()
    out = forward(pred, target, prev, raw, mask=mask)
    assert out[2].shape == pred.shape
    assert_same_as_cpu(out, (pred, target, prev, raw), {"mask": mask}, dtype)


@needs_cuda
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int64, torch.float16, torch.float32])
def test_mask_of_any_dtype_is_read_without_a_cast(mask_dtype):
    """The mask pre-kernel converts the mask itself: no cast kernel and no
    allocation besides the workspace, and the same answer as a float mask."""
    data = _graph_inputs(500, 52, 6)
    dev = {k: v.to(DEVICE) for k, v in data.items()}
    mask = dev["mask"].to(mask_dtype)
    forward(dev["pred"], dev["target"], dev["prev"], dev["raw"], mask=mask)  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = forward(dev["pred"], dev["target"], dev["prev"], dev["raw"], mask=mask)
    ops = {e.name for e in prof.events()}
    assert not ops & {"aten::to", "aten::_to_copy", "aten::copy_"}, ops
    want = forward(dev["pred"], dev["target"], dev["prev"], dev["raw"], mask=dev["mask"].float())
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@needs_cuda
@pytest.mark.parametrize("mask_dtype", [torch.uint16, torch.uint32, torch.float8_e4m3fn], ids=str)
def test_other_mask_dtypes_are_converted_before_the_kernel(mask_dtype):
    """Dtypes the pre-kernel does not read itself are converted up front: the
    same answer as on the CPU, never an error."""
    data = _graph_inputs(300, 52, 7)
    dev = {k: v.to(DEVICE) for k, v in data.items()}
    got = forward(dev["pred"], dev["target"], dev["prev"], dev["raw"], mask=dev["mask"].to(mask_dtype))
    want = forward(dev["pred"], dev["target"], dev["prev"], dev["raw"], mask=dev["mask"].float())
    for a, b in zip(got, want):
        assert torch.equal(a, b)
