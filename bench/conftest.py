"""pytest-benchmark suite of the fused loss: ``pytest bench/`` (not part of
the default ``python -m pytest`` run, whose testpaths is tests/).

The cases come from :mod:`koemorph_fused.benchmark`, the same definition as
``koemorph-fused bench``. Select a subset with the options below (same
comma-separated syntax and defaults as the CLI), or with ``-k``:

    pytest bench/ --kf-quick
    pytest bench/ --kf-batch 4,1024 --kf-threads 2 --kf-mode fwdbwd --kf-providers fused,eager
    pytest bench/ --benchmark-json out.json     # pytest-benchmark's own options work too

pytest-benchmark times each test on its own, one after the other; ratios
between providers from this suite are NOT from interleaved rounds. For
same-run ratios use ``koemorph-fused bench``.
"""

import pytest

from koemorph_fused import benchmark as bm


def pytest_addoption(parser):
    g = parser.getgroup("koemorph_fused benchmark cases")
    g.addoption("--kf-device", default="cpu", choices=["cpu", "cuda"], help="device (default cpu)")
    g.addoption("--kf-dtype", default=None, help=f"dtypes (default {','.join(bm.DTYPES)})")
    g.addoption("--kf-mode", default=None, help=f"modes (default {','.join(bm.MODES)})")
    g.addoption("--kf-batch", default=None, help=f"batch sizes (default {','.join(map(str, bm.BATCHES))})")
    g.addoption("--kf-threads", default=None, help=f"CPU threads (default {','.join(map(str, bm.THREADS))})")
    g.addoption("--kf-providers", default=None,
                help=f"providers and baselines (default {','.join(bm.PROVIDERS + bm.BASELINES)})")
    g.addoption("--kf-quick", action="store_true", help="the subset of `koemorph-fused bench --quick`")


def _opt(config, name, parse, quick_key, default):
    raw = config.getoption(name)
    if raw is not None:
        return [parse(v) for v in raw.split(",") if v.strip()]
    if config.getoption("--kf-quick") and quick_key in bm.QUICK:
        return list(bm.QUICK[quick_key])
    return list(default)


def pytest_generate_tests(metafunc):
    if "kf_case" not in metafunc.fixturenames:
        return
    c = metafunc.config
    cases = bm.iter_cases(
        c.getoption("--kf-device"),
        _opt(c, "--kf-dtype", str, "dtype", bm.DTYPES),
        _opt(c, "--kf-mode", str, "mode", bm.MODES),
        _opt(c, "--kf-batch", int, "batch", bm.BATCHES),
        _opt(c, "--kf-threads", int, "threads", bm.THREADS),
    )
    providers = _opt(c, "--kf-providers", str, "providers", bm.PROVIDERS + bm.BASELINES)
    if c.getoption("--kf-quick") and c.getoption("--kf-providers") is None:
        providers += list(bm.BASELINES)
    params = []
    for case in cases:
        for p in bm.providers_for(case, [p for p in providers if p in bm.PROVIDERS],
                                  [p for p in providers if p in bm.ALL_BASELINES]):
            params.append(pytest.param(case, p, id=f"{case.dtype}-{case.mode}-t{case.threads}-B{case.batch}-{p}"))
    metafunc.parametrize(("kf_case", "kf_provider"), params)
