"""Calls that move more than kStreamingStoreBytes (csrc/cpu_vector_lanes.h)
write the bulk of their gradients with non-temporal stores. Those must be the
very values the plain stores of smaller calls write, bit for bit, in every
dtype, for rows and for windows of frames. The sizes below are computed from
the constant in the header, so that one call is above it and the other below."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

import koemorph_fused as kf
from helpers import DTYPES, rand

ROOT = Path(__file__).resolve().parents[1]
C = 52
MAX_STEP = 16  # elements of the widest step of the CPU kernels (AVX2: float16 and bfloat16)


def header_constant(name: str) -> int:
    """A constant of csrc/cpu_vector_lanes.h, so that the sizes below follow it."""
    text = (ROOT / "csrc" / "cpu_vector_lanes.h").read_text()
    found = re.search(rf"{name} = (?:int64_t\((\d+)\) << (\d+)|(\d+));", text)
    assert found, f"{name} not found in csrc/cpu_vector_lanes.h"
    return int(found.group(1)) << int(found.group(2)) if found.group(1) else int(found.group(3))


def grad_size(dtype: torch.dtype) -> int:
    """Bytes per gradient element: float16's are kept in float32."""
    return 4 if dtype == torch.float16 else dtype.itemsize


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_streamed_equal_row_path(dtype):
    """Contiguous rows above the threshold (the flat path, streamed) give the
    gradients that the same values give as strided rows (the row path, which
    never streams)."""
    per_row = C * (4 * dtype.itemsize + 2 * grad_size(dtype))  # pred, target, prev, raw; grads of pred, raw
    rows = math.ceil(1.25 * header_constant("kStreamingStoreBytes") / per_row) + 3
    g = torch.Generator().manual_seed(5)
    values = [rand((rows, C), dtype, generator=g) for _ in range(4)]
    grads = []
    for strided in (False, True):
        bases = [torch.cat([v, v], dim=1) if strided else v.clone() for v in values]
        bases[0].requires_grad_()
        bases[3].requires_grad_()
        inputs = [b[:, :C] if strided else b for b in bases]
        assert all(x.is_contiguous() != strided for x in inputs)
        kf.temporal_loss(*inputs).total.backward()
        grads.append([bases[0].grad[:, :C], bases[3].grad[:, :C]])
    for name, flat, row in zip(("pred", "raw"), *grads):
        assert torch.equal(flat, row), f"grad_{name} differs between the streamed and the plain path"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_windows_streamed_equal_halves(dtype):
    """A batch of windows above the threshold and its two halves below it,
    with reduction "sum" (gradients that do not depend on the batch size):
    the whole batch's gradients are the halves' gradients. The second half
    starts on a chunk boundary of the whole batch (chunks are whole frames,
    kChunkElements / C of them) and on a multiple of every step width (the
    flat runs' steps are aligned to the element index over the batch), so both
    calls split their flat runs into the same steps: a run's partial first or
    last step can give a gradient an ulp apart from the same element in a
    whole step (seen in float32 with target's gradient, in the last columns
    of a chunk's last frame). Padding and velocity included; T
    odd, so that windows start at different alignments."""
    threshold = header_constant("kStreamingStoreBytes")
    frames_per_chunk = header_constant("kChunkElements") // C
    per_frame = C * 3 * (dtype.itemsize + grad_size(dtype))  # pred, target, raw and their gradients
    frames = frames_per_chunk  # the odd part of it: 39 frames for C = 52
    while frames % 2 == 0:
        frames //= 2
    multiple = 2 * (frames_per_chunk // frames)  # batches whose halves start on a chunk boundary
    while (multiple // 2) * frames * C % MAX_STEP:  # ... and on a step boundary
        multiple *= 2
    batch = multiple * math.ceil(1.5 * threshold / (per_frame * frames * multiple))
    assert (batch // 2) * frames % frames_per_chunk == 0 and (batch // 2) * frames * C % MAX_STEP == 0
    assert (batch // 2) * frames * per_frame < threshold < batch * frames * per_frame
    g = torch.Generator().manual_seed(6)
    pred, target, raw = (rand((batch, frames, C), dtype, generator=g) for _ in range(3))
    prev, prev_target = (rand((batch, C), dtype, generator=g) for _ in range(2))
    lengths = torch.randint(0, frames + 1, (batch,), generator=g)
    lengths[::3] = frames

    def gradients(rows: slice) -> list[torch.Tensor]:
        leaves = [x[rows].clone().requires_grad_() for x in (pred, target, raw)]
        out = kf.sequence_loss(*leaves, prev=prev[rows], prev_target=prev_target[rows], lengths=lengths[rows],
                               velocity_weight=0.5, reduction="sum")
        out.total.backward()
        return [x.grad for x in leaves]

    whole = gradients(slice(None))
    halves = [gradients(slice(None, batch // 2)), gradients(slice(batch // 2, None))]
    for i, name in enumerate(("pred", "target", "raw")):
        assert torch.equal(whole[i], torch.cat([halves[0][i], halves[1][i]])), \
            f"grad_{name} differs between the streamed whole batch and its halves"
