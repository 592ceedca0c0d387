"""Bitwise determinism: run to run, and whatever the number of CPU threads."""

import subprocess
import sys

import pytest
import torch

import koemorph_fused as kf
from helpers import rand

SCRIPT = r"""
import sys, torch, koemorph_fused as kf
torch.set_num_threads(int(sys.argv[1]))
g = torch.Generator().manual_seed(7)
rows = 262144 + 37
x = [torch.rand(rows, 52, generator=g) for _ in range(4)]
mask = torch.rand(rows, generator=g) > 0.2
pred = x[0].requires_grad_()
out = kf.temporal_loss(pred, x[1], x[2], x[3], continuity=mask)
out.total.backward()
h = torch.cat([out.terms, out.total.detach().reshape(1)])
import hashlib
sys.stdout.write(h.numpy().tobytes().hex() + " " + hashlib.sha256(pred.grad.numpy().tobytes()).hexdigest())
"""


@pytest.mark.parametrize("isa", ["native", "default"])
def test_bitwise_identical_for_1_and_2_threads(isa):
    env = None
    if isa == "default":
        import os

        env = dict(os.environ, ATEN_CPU_CAPABILITY="default")  # the baseline (non-AVX2) kernel build
    outs = {
        n: subprocess.run([sys.executable, "-c", SCRIPT, str(n)], capture_output=True, text=True, check=True, env=env).stdout
        for n in (1, 2)
    }
    assert outs[1] == outs[2]


def test_bitwise_identical_run_to_run():
    x = [rand((100003, 52)) for _ in range(4)]
    results = []
    for _ in range(3):
        out = kf.temporal_loss(*x, continuity=torch.arange(100003) % 3 > 0)
        results.append(torch.cat([out.terms, out.total.reshape(1)]))
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_baseline_and_avx2_kernels_agree():
    """The two CPU kernel builds agree to float rounding (they sum in different lane orders)."""
    code = SCRIPT[: SCRIPT.index("import hashlib")] + "torch.save((h, pred.grad), sys.argv[2])\n"
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        paths = {}
        for isa in ("default", "avx2"):
            paths[isa] = os.path.join(d, isa + ".pt")
            subprocess.run([sys.executable, "-c", code, "2", paths[isa]], check=True,
                           env=dict(os.environ, ATEN_CPU_CAPABILITY=isa))
        (h1, g1), (h2, g2) = (torch.load(paths[k]) for k in ("default", "avx2"))
    torch.testing.assert_close(h1, h2, rtol=1e-5, atol=0)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-12)
