"""Each (case, provider) of koemorph_fused.benchmark as one pytest-benchmark test."""

import pytest
import torch

from koemorph_fused import benchmark as bm


def test_loss(benchmark, kf_case, kf_provider):
    case = kf_case
    if case.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    threads = torch.get_num_threads()
    if case.device == "cpu":
        torch.set_num_threads(case.threads)
    try:
        inputs = bm.make_inputs(case)
        step = bm.make_step(case, kf_provider, inputs)  # compiles, for the compile provider
        fn = step.fn
        if case.device == "cuda":
            def fn():  # noqa: F811 - time until the GPU is done
                step.fn()
                torch.cuda.synchronize()
        with torch.set_grad_enabled(step.grad_enabled):
            for _ in range(2):  # warm-up (page faults, buffer pool, compiled code)
                fn()
            benchmark(fn)
        benchmark.extra_info.update(
            device=case.device, dtype=case.dtype, mode=case.mode, threads=case.threads, batch=case.batch,
            cols=case.cols, provider=kf_provider, bytes=case.min_bytes, compile_s=step.setup_s,
        )
        if benchmark.stats is not None:
            benchmark.extra_info["gbps_median"] = case.min_bytes / benchmark.stats.stats.median / 1e9
    finally:
        torch.set_num_threads(threads)
        if kf_provider == "compile":
            torch._dynamo.reset()
