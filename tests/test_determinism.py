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


THREADS_SCRIPT = r"""
import os, sys, torch, koemorph_fused as kf
torch.set_num_threads(2)

def cpu_ticks():
    ticks = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks[tid] = int(fields[11]) + int(fields[12])  # utime + stime
    return ticks

x = [torch.rand(262144, 52) for _ in range(4)]
kf.temporal_loss(*x)  # warm-up: starts the OpenMP workers
before = cpu_ticks()
for _ in range(30):
    kf.temporal_loss(*x)
after = cpu_ticks()
print(sum(1 for tid, t in after.items() if t - before.get(tid, 0) >= 3))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cpu_kernel_runs_on_several_threads():
    """at::parallel_for is inline OpenMP in torch's headers: a library compiled
    without -fopenmp silently runs every chunk on the calling thread."""
    from koemorph_fused import _ops

    if not torch.backends.openmp.is_available():
        pytest.skip("this torch does not use OpenMP")
    assert _ops.library.cpu_openmp == 1, "compiled without OpenMP: the CPU kernel is single-threaded"
    busy = subprocess.run([sys.executable, "-c", THREADS_SCRIPT], capture_output=True, text=True, check=True)
    assert int(busy.stdout) >= 2, "only one thread did the work with torch.set_num_threads(2)"
