"""The benchmark harness (``koemorph-fused bench``, koemorph_fused/benchmark.py):
it runs, writes well-formed JSON/CSV/PNG, and counts bytes right. No timing
assertions: only that the numbers are there and consistent with each other."""

import csv
import json
import math

import pytest
import torch

import koemorph_fused as kf
from koemorph_fused import benchmark as bm
from koemorph_fused.cli import main as cli_main


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    paths = {k: out / f"bench.{k}" for k in ("json", "csv")}
    paths["png"] = out / "bench.png"
    threads = torch.get_num_threads()
    rc = cli_main(["bench", "--quick", "--min-time", "0.002", "--rounds", "2", "--no-progress",
                   "--json", str(paths["json"]), "--csv", str(paths["csv"]), "--plot", str(paths["png"])])
    assert torch.get_num_threads() == threads, "bench must restore the thread count"
    return rc, paths


def test_quick_bench_exits_0(quick_run):
    rc, _ = quick_run
    assert rc == 0


def test_quick_bench_json(quick_run):
    _, paths = quick_run
    report = json.loads(paths["json"].read_text())
    assert set(report) >= {"machine", "settings", "results", "cases", "goals"}
    s = report["settings"]
    assert s["batch"] == [4, 1024] and s["dtype"] == ["float32"] and s["threads"] == [1]
    assert s["providers"] == ["fused", "eager"] and s["rounds"] == 2
    # 2 batches x 2 modes; fwd: fused, eager, copy, floor; fwdbwd adds floor_none.
    assert len(report["cases"]) == 4
    assert len(report["results"]) == 2 * 4 + 2 * 5
    for row in report["results"]:
        assert list(row) == list(bm.RESULT_COLUMNS)
        assert row["error"] is None, row
        assert row["rounds"] == 2 and row["iters_per_round"] >= 1
        assert 0 < row["min_s"] <= row["q1_s"] <= row["median_s"] <= row["q3_s"] <= row["max_s"]
        case = bm.Case("cpu", row["dtype"], row["mode"], row["batch"], row["threads"])
        assert row["bytes"] == case.min_bytes
        assert math.isclose(row["gbps"], row["bytes"] / row["median_s"] / 1e9, rel_tol=1e-9)
    providers = {(r["mode"], r["batch"]): {x["provider"] for x in report["results"]
                                           if (x["mode"], x["batch"]) == (r["mode"], r["batch"])}
                 for r in report["results"]}
    assert providers[("fwd", 4)] == {"fused", "eager", "copy", "floor"}
    assert providers[("fwdbwd", 1024)] == {"fused", "eager", "copy", "floor", "floor_none"}
    for case in report["cases"]:
        assert list(case) == list(bm.SUMMARY_COLUMNS)
        rows = {r["provider"]: r for r in report["results"]
                if (r["mode"], r["batch"]) == (case["mode"], case["batch"])}
        assert math.isclose(case["eager_over_fused"], rows["eager"]["median_s"] / rows["fused"]["median_s"])
        assert case["eager_over_fused_lo"] <= case["eager_over_fused_hi"]
        assert math.isclose(case["fused_copy_pct"], 100 * rows["copy"]["median_s"] / rows["fused"]["median_s"])
        assert math.isclose(case["fused_over_floor"], rows["fused"]["median_s"] / rows["floor"]["median_s"])
        assert case["compile_s"] is None and case["compile_time_s"] is None  # not requested
    # The goals are for 2 threads; this run had 1, so none is measured.
    assert report["goals"] and all(g["met"] is None for g in report["goals"])


def test_quick_bench_csv(quick_run):
    _, paths = quick_run
    with open(paths["csv"], newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == bm.RESULT_COLUMNS
        rows = list(reader)
    assert len(rows) == 18
    for r in rows:
        assert float(r["median_s"]) > 0 and float(r["gbps"]) > 0
        assert int(r["bytes"]) == bm.min_bytes(r["mode"], int(r["batch"]), 52, 4)
        if r["provider"] == "fused":
            assert float(r["ratio_to_fused"]) == 1.0


def test_quick_bench_plot(quick_run):
    _, paths = quick_run
    data = paths["png"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_byte_accounting_known_case():
    # B = 1024, C = 52 -> N = 53248 elements.
    n = 1024 * 52
    f32 = bm.Case("cpu", "float32", "fwdbwd", 1024, 2)
    assert f32.numel == n and f32.element_size == 4
    assert f32.min_bytes == 10 * n * 4 == 2_129_920  # fwd reads 4, writes 2 grads; bwd reads 2, writes 2
    assert f32.copy_numel * 2 * 4 == f32.min_bytes  # the copy moves the same bytes (read + write)
    bf16 = bm.Case("cpu", "bfloat16", "fwd", 1024, 1)
    assert bf16.min_bytes == 4 * n * 2 == 425_984  # forward only: reads pred, target, prev, raw
    assert bf16.copy_numel == 2 * n
    with pytest.raises(ValueError, match="mode"):
        bm.min_bytes("bwd", 4, 52, 4)


def test_cases_are_the_documented_grid():
    cases = bm.iter_cases()
    assert len(cases) == 6 * 2 * 2 * 2
    assert {c.batch for c in cases} == {4, 64, 1024, 16384, 262144, 1048576}
    assert {c.cols for c in cases} == {52}
    # on CUDA the thread count does not multiply the cases
    assert len(bm.iter_cases("cuda")) == 6 * 2 * 2


def test_steps_compute_the_loss_and_its_gradients():
    case = bm.Case("cpu", "float32", "fwdbwd", 8, 1)
    x = bm.make_inputs(case)
    assert x.pred.requires_grad and x.raw.requires_grad and not x.target.requires_grad
    for provider in ("fused", "eager"):
        step = bm.make_step(case, provider, x)
        assert step.grad_enabled
        step.fn()
        assert x.pred.grad is not None and x.raw.grad is not None
    ref = kf.reference.temporal_loss(x.pred, x.target, x.prev, x.raw).total
    g_pred, = torch.autograd.grad(ref, [x.pred])
    torch.testing.assert_close(x.pred.grad, g_pred)  # the eager step ran last


def test_floor_functions():
    case = bm.Case("cpu", "float32", "fwdbwd", 4, 1)
    x = bm.make_inputs(case)
    zp, zr = torch.zeros_like(x.pred), torch.zeros_like(x.raw)
    steal = bm.make_floor_function(zp, zr, "zeros")
    out = steal.apply(x.pred, x.target, x.prev, x.raw)
    assert out.dim() == 0 and out.requires_grad
    out.backward()
    # AccumulateGrad took the detached alias over: .grad shares the preallocated storage
    assert x.pred.grad.data_ptr() == zp.data_ptr() and x.raw.grad.data_ptr() == zr.data_ptr()
    x.pred.grad = x.raw.grad = None
    bm.make_floor_function(zp, zr, "clone").apply(x.pred, x.target, x.prev, x.raw).backward()
    assert x.pred.grad.data_ptr() != zp.data_ptr() and torch.equal(x.pred.grad, zp)  # cloned
    x.pred.grad = x.raw.grad = None
    bm.make_floor_function(zp, zr, "none").apply(x.pred, x.target, x.prev, x.raw).backward()
    assert x.pred.grad is None and x.raw.grad is None
    with pytest.raises(ValueError):
        bm.make_floor_function(zp, zr, "bogus")


def test_bench_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--device", "--dtype", "--mode", "--batch", "--threads", "--providers", "--min-time",
                 "--rounds", "--json", "--csv", "--plot", "--quick"):
        assert flag in text


def test_bench_rejects_bad_lists():
    for argv in (["bench", "--dtype", "float8"], ["bench", "--mode", "bwd"], ["bench", "--batch", "0"],
                 ["bench", "--providers", "triton"]):
        with pytest.raises(SystemExit) as exc:
            cli_main(argv)
        assert exc.value.code == 2


@pytest.mark.parametrize("flag", [["--batch", "4"], ["--dtype", "bfloat16"], ["--mode", "fwd"],
                                  ["--providers", "fused"], ["--baselines", "copy"], ["--csv", "x.csv"],
                                  ["--plot", "x.png"], ["--quick"]])
def test_bench_sequence_rejects_the_row_options(flag, capsys, tmp_path, monkeypatch):
    """--sequence runs fixed cases: an option it would ignore is a one-line
    error naming it, before anything runs or is written."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", "--sequence", *flag])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{flag[0]} is for the row cases" in err, err
    assert not list(tmp_path.iterdir())


def test_bench_sequence_markdown_table():
    goal = dict(ratio="fused/copy", value=1.02, lo=0.95, hi=1.1, goal=1.15, kind="max", met=True)
    row = dict(threads=2, batch=64, frames=1024, other_load_pct=1.0, goals=[goal],
               **{f"{p}_s": 1.5e-3 for p in bm.SEQUENCE_PROVIDERS})
    lines = bm.format_sequences_markdown([row]).splitlines()
    assert lines[0].startswith("| threads | B | T | fused |") and lines[1].count("---") == 4 + len(bm.SEQUENCE_PROVIDERS)
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:4] == ["2", "64", "1024", bm._fmt_time(1.5e-3)] and "fused/copy 1.02" in cells[-1] and "met" in cells[-1]
    assert len(cells) == len(lines[0].strip("|").split("|"))


def test_breakdown_ladder_runs(capsys):
    """bench/breakdown.py calls the operators directly: it must follow their arguments."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "breakdown.py"
    spec = importlib.util.spec_from_file_location("kf_bench_breakdown", path)
    breakdown = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(breakdown)
    threads = torch.get_num_threads()
    try:
        assert breakdown.main(["--batch", "3", "--threads", "1", "--rounds", "1", "--min-time", "0.001"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for variant in ("floor", "bookkeeping", "function", "fused", "op_grads", "scale_op"):
        assert f"\n{variant} " in out, out


def test_sequence_steps_run_and_fused_matches_eager():
    """Every sequence provider's step runs; fused and eager leave the same gradients."""
    make = bm.sequence_step_factory(bm.SequenceCase(2, 8, threads=1))
    grads = {}
    for provider in ("fused", "eager", "copy", "shifted_rows"):
        step = make(provider)
        with torch.set_grad_enabled(step.grad_enabled):
            step.fn()
        if provider in ("fused", "eager"):
            pred = step.keep[0]
            grads[provider] = pred.grad.clone()
    torch.testing.assert_close(grads["fused"], grads["eager"])
    with pytest.raises(ValueError, match="unknown sequence provider"):
        make("nope")
