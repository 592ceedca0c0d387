"""LossMonitor's TensorBoard and CSV output, and the run plot (function and `koemorph-fused plot`)."""

import io
import math
import os
import struct
import subprocess
import sys

import pytest
import torch

import koemorph_fused as kf
from koemorph_fused import cli
from koemorph_fused.plot import plot_run
from koemorph_fused.run_log import CSV_COLUMNS, read_csv

tensorboard = pytest.importorskip("tensorboard", reason="tensorboard is an optional dependency")


def _record_run(mon, epochs=8, steps=5):
    """A small run through the schedule: phase changes, stride changes, a divergent
    step, a NaN step, a temporal jump and file transitions. Returns the flushed rows."""
    schedule = kf.TrainingSchedule(total_epochs=epochs)
    rows = []
    for epoch in range(epochs):
        phase = schedule.at(epoch)
        for s in range(steps):
            base = 0.1 / (1 + epoch * steps + s)
            terms = [base, 2 * base, 1.5 * base, (8.0 if (epoch, s) == (5, 3) else 0.5) * base, 0.2 * base]
            total = 1.7 if (epoch, s) == (2, 1) else (math.nan if (epoch, s) == (4, 2) else sum(terms))
            mon.record(kf.LossOutput(torch.tensor(total, dtype=torch.float64), torch.tensor(terms, dtype=torch.float64)),
                       stride=phase.stride, phase=phase, file_transition=s == 0)
        rows += mon.flush()
    return rows


def _same(a, b):
    return (math.isnan(a) and math.isnan(b)) if isinstance(a, float) and math.isnan(a) else a == b


def test_tensorboard_event_files_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "tb"
    with kf.LossMonitor(tensorboard=logdir) as mon:
        rows = _record_run(mon)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(logdir))
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected_tags = {f"loss/{k}" for k in (*kf.TERM_NAMES, "total")} | {"schedule/stride", "schedule/epoch",
                                                                         "data/file_transition"} \
        | {f"flags/{f}" for f in kf.monitor.FLAGS}
    assert expected_tags <= tags
    for key in (*kf.TERM_NAMES, "total"):
        events = acc.Scalars(f"loss/{key}")
        assert [e.step for e in events] == [r["step"] for r in rows]
        for e, r in zip(events, rows):  # TensorBoard stores float32
            assert (math.isnan(e.value) and math.isnan(r[key])) or e.value == pytest.approx(r[key], rel=1e-6)
    assert [e.value for e in acc.Scalars("schedule/stride")] == [r["stride"] for r in rows]
    for flag in kf.monitor.FLAGS:
        flagged = [e.step for e in acc.Scalars(f"flags/{flag}") if e.value == 1.0]
        assert flagged == [r["step"] for r in rows if flag in r["flags"]]
    assert [e.step for e in acc.Scalars("flags/divergence") if e.value] == [11]
    assert [e.step for e in acc.Scalars("flags/nonfinite") if e.value] == [22]
    assert [e.step for e in acc.Scalars("data/file_transition") if e.value] == list(range(0, 40, 5))
    phases = acc.Tensors("schedule/phase/text_summary")  # add_text's tag
    changes = [rows[0]] + [r for a, r in zip(rows, rows[1:]) if a["phase"] != r["phase"]]
    assert [p.step for p in phases] == [r["step"] for r in changes]
    assert [p.tensor_proto.string_val[0].decode() for p in phases] == [r["phase"] for r in changes] \
        == ["early", "mid", "late"]


def test_a_given_summary_writer_is_used_and_left_open(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path))
    with kf.LossMonitor(tensorboard=writer) as mon:
        mon.record(kf.temporal_loss(torch.full((2, 52), 0.5), torch.zeros(2, 52)), stride=4)
        mon.flush()
    writer.add_scalar("mine", 1.0, 0)  # still open after the monitor closed
    writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert acc.Scalars("loss/total")[0].value == pytest.approx(0.55, rel=1e-6)
    assert acc.Scalars("mine")[0].value == 1.0


def test_csv_round_trip_and_append(tmp_path):
    path = tmp_path / "run.csv"
    with kf.LossMonitor(csv=path) as mon:
        rows = _record_run(mon, epochs=4)
    text = path.read_text()
    assert text.splitlines()[0] == ",".join(CSV_COLUMNS) and text.count("step,epoch") == 1
    back = read_csv(path)
    assert len(back) == len(rows)
    for a, b in zip(back, rows):
        assert a.keys() == {*CSV_COLUMNS} and all(_same(a[k], b[k]) for k in CSV_COLUMNS), (a, b)
    # A second monitor appends (one header) and continues the file.
    with kf.LossMonitor(csv=str(path)) as mon:
        mon.record(kf.temporal_loss(torch.full((2, 52), 0.5), torch.zeros(2, 52)))
        mon.flush()
    back = read_csv(path)
    assert len(back) == len(rows) + 1 and path.read_text().count("step,epoch") == 1
    assert back[-1]["stride"] is None and back[-1]["phase"] is None and back[-1]["flags"] == []


def test_csv_to_an_open_stream_is_left_open():
    stream = io.StringIO()
    mon = kf.LossMonitor(csv=stream)
    mon.record(kf.temporal_loss(torch.full((2, 52), 0.5), torch.zeros(2, 52)), stride=2)
    mon.flush()
    mon.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == ",".join(CSV_COLUMNS) and lines[1].startswith("0,,,2,0,")


def test_csv_refuses_a_file_that_is_not_a_run(tmp_path):
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"other\.csv: exists and is not a LossMonitor run CSV"):
        kf.LossMonitor(csv=other)
    with pytest.raises(ValueError, match=r"other\.csv: not a LossMonitor run CSV"):
        read_csv(other)
    assert other.read_text() == "a,b\n1,2\n"


def test_bad_log_targets(tmp_path, monkeypatch):
    with pytest.raises(TypeError, match="csv must be a path or an open text file"):
        kf.LossMonitor(csv=3)
    with pytest.raises(TypeError, match="tensorboard must be a log directory"):
        kf.LossMonitor(tensorboard=3)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(OSError, match="cannot open run CSV"):
        kf.LossMonitor(csv=tmp_path / "a_file" / "run.csv")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        kf.LossMonitor(tensorboard=tmp_path / "tb")


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _vertical_lines(ax):
    return sorted({line.get_xdata()[0] for line in ax.lines
                   if len(line.get_xdata()) == 2 and line.get_xdata()[0] == line.get_xdata()[1]})


def test_plot_run_marks_phases_strides_and_flags(tmp_path):
    mon = kf.LossMonitor()
    rows = _record_run(mon)
    out = tmp_path / "curves.png"
    fig = plot_run(rows, out, size=(900, 600))
    assert _png_size(out) == (900, 600) and out.stat().st_size > 20_000
    top, bottom = fig.axes
    phase_steps = [b["step"] for a, b in zip(rows, rows[1:]) if a["phase"] != b["phase"]]
    stride_steps = [b["step"] for a, b in zip(rows, rows[1:]) if a["stride"] != b["stride"]]
    assert phase_steps and set(stride_steps) - set(phase_steps)  # the run has both kinds
    assert _vertical_lines(top) == _vertical_lines(bottom) == sorted(set(phase_steps) | set(stride_steps))
    labels = {t.get_text() for t in top.texts}
    assert {"early", "mid", "late"} <= labels
    legend = [t.get_text() for t in top.get_legend().get_texts()]
    assert {"divergence (1)", "nonfinite (1)", "temporal_jump (1)"} <= set(legend)
    assert set(kf.TERM_NAMES) | {"total"} <= set(legend)
    assert top.get_yscale() == "log"


def test_plot_run_from_csv_equals_from_rows(tmp_path):
    path = tmp_path / "run.csv"
    with kf.LossMonitor(csv=path) as mon:
        rows = _record_run(mon, epochs=4)
    a = plot_run(path, tmp_path / "a.png")
    b = plot_run(rows, tmp_path / "b.png", title="run.csv")
    assert _png_size(tmp_path / "a.png") == (1200, 800)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert a._suptitle.get_text() == "run.csv"


def test_plot_run_bad_arguments():
    with pytest.raises(ValueError, match="no rows"):
        plot_run([])
    row = {"step": 0, "mse": 1.0, "l1": 1.0, "perceptual": 1.0, "temporal": 1.0, "smoothing": 1.0, "total": 1.0}
    with pytest.raises(ValueError, match="size"):
        plot_run([row], size=(50, 50))
    with pytest.raises(ValueError, match="dpi"):
        plot_run([row], dpi=0)


# --- koemorph-fused plot --------------------------------------------------------------------------

@pytest.fixture()
def run_csv(tmp_path):
    path = tmp_path / "run.csv"
    with kf.LossMonitor(csv=path) as mon:
        _record_run(mon, epochs=4)
    return path


def test_plot_is_registered():
    assert cli.SUBCOMMANDS["plot"][0] == "koemorph_fused.plot"


def test_cli_plot_writes_the_image(run_csv, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert cli.main(["plot", str(run_csv), "-o", str(out), "--size", "800x500"]) == 0
    assert _png_size(out) == (800, 500)
    assert "20 steps (0..19)" in capsys.readouterr().out
    assert cli.main(["plot", str(run_csv)]) == 0  # default: run.png beside the CSV
    assert _png_size(run_csv.with_suffix(".png")) == (1200, 800)


@pytest.mark.parametrize("make, word", [
    (lambda d, run: ["plot", str(d / "missing.csv")], "missing.csv: no such file"),
    (lambda d, run: ["plot", str(d)], "not a file"),
    (lambda d, run: ["plot", str(run), "-o", str(d / "nodir" / "x.png")], "does not exist"),
    (lambda d, run: ["plot", str(run), "-o", str(d / "x.bmpx")], "cannot tell the image format"),
])
def test_cli_plot_usage_errors(run_csv, tmp_path, capsys, make, word):
    with pytest.raises(SystemExit) as info:
        cli.main(make(tmp_path, run_csv))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("koemorph-fused: error: ") and word in err and err.count("\n") == 1


def test_cli_plot_rejects_other_and_empty_csv(tmp_path, capsys):
    other = tmp_path / "other.csv"
    other.write_text("x,y\n1,2\n")
    for path, word in ((other, "not a LossMonitor run CSV"), (tmp_path / "empty.csv", "has no rows yet")):
        if path.name == "empty.csv":
            kf.LossMonitor(csv=path).close()  # header only
        with pytest.raises(SystemExit) as info:
            cli.main(["plot", str(path)])
        assert info.value.code == 2 and word in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["plot", str(other), "--size", "big"])
    assert info.value.code == 2 and "WIDTHxHEIGHT" in capsys.readouterr().err


def test_cli_plot_bad_path_in_a_subprocess(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "koemorph_fused", "plot", str(tmp_path / "nope.csv")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"koemorph-fused: error: plot: {tmp_path / 'nope.csv'}: no such file (see koemorph-fused plot --help)"]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_appending_to_a_run_csv_continues_its_steps(tmp_path):
    path = tmp_path / "run.csv"
    for _ in range(2):  # a run, then a resumed run with a new monitor (steps from 0 again)
        with kf.LossMonitor(csv=path) as mon:
            for _ in range(3):
                mon.record(kf.temporal_loss(torch.rand(2, 52), torch.rand(2, 52)))
            mon.flush()
    assert [row["step"] for row in read_csv(path)] == list(range(6))


def test_a_csv_whose_steps_restart_is_not_one_run(tmp_path):
    path = tmp_path / "two_runs.csv"
    with kf.LossMonitor(csv=path) as mon:
        mon.record(kf.temporal_loss(torch.rand(2, 52), torch.rand(2, 52)))
        mon.record(kf.temporal_loss(torch.rand(2, 52), torch.rand(2, 52)))
        mon.flush()
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + lines[1:]) + "\n")  # the same steps again
    with pytest.raises(ValueError, match=r"two_runs\.csv:4: step 0 does not follow step 1"):
        read_csv(path)


def test_an_existing_file_that_is_not_utf8_is_refused_by_name(tmp_path):
    path = tmp_path / "binary.csv"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=r"binary\.csv.*not UTF-8"):
        kf.LossMonitor(csv=path)


# --- A monitor that loses nothing (issue 18) ------------------------------------------------------

def _loss(value=0.5):
    return kf.temporal_loss(torch.full((2, 52), value), torch.zeros(2, 52))


def _steps_after_one_more_record(path):
    """Record one step with a new monitor on the CSV, leave its with block, and read the steps back."""
    with kf.LossMonitor(csv=path) as mon:
        mon.record(_loss())
    return [r["step"] for r in read_csv(path)]


def test_the_csv_folder_is_created(tmp_path):
    assert _steps_after_one_more_record(tmp_path / "runs" / "exp1" / "run.csv") == [0]


def test_leaving_with_flushes(tmp_path):
    path = tmp_path / "run.csv"
    with kf.LossMonitor(csv=path) as mon:
        for _ in range(3):
            mon.record(_loss())
    assert len(mon) == 0 and [r["step"] for r in read_csv(path)] == [0, 1, 2]


def test_leaving_with_on_an_error_still_writes_the_records(tmp_path):
    path = tmp_path / "run.csv"
    with pytest.raises(KeyError):
        with kf.LossMonitor(csv=path) as mon:
            mon.record(_loss())
            raise KeyError("training crashed")
    assert len(read_csv(path)) == 1


def test_close_without_flush_warns_about_the_dropped_records(tmp_path):
    mon = kf.LossMonitor(csv=tmp_path / "run.csv")
    mon.record(_loss())
    with pytest.warns(RuntimeWarning, match="1 records never flushed"):
        mon.close()


class _FailingOnce:
    """A SummaryWriter stand-in whose first flush fails (a full disk, a lost connection)."""

    def __init__(self):
        self.scalars, self.fail = [], True

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, step))

    def add_text(self, *args):
        pass

    def flush(self):
        if self.fail:
            self.fail = False
            raise OSError(28, "No space left on device")


def test_a_failed_flush_keeps_its_records_and_a_retry_writes_each_row_once(tmp_path):
    path = tmp_path / "run.csv"
    writer = _FailingOnce()
    mon = kf.LossMonitor(csv=path, tensorboard=writer)
    mon.record(_loss(0.5))
    mon.record(_loss(2.0))
    with pytest.raises(OSError, match="No space"):
        mon.flush()
    assert len(mon) == 2  # nothing lost
    mon.record(_loss(0.1))
    rows = mon.flush()
    assert [r["step"] for r in rows] == [0, 1, 2] and len(mon) == 0
    assert rows[1]["flags"] == ["divergence"]
    mon.close()
    # The CSV took the first two rows before TensorBoard failed: the retry did not write them again.
    assert [r["step"] for r in read_csv(path)] == [0, 1, 2]
    assert [step for tag, step in writer.scalars if tag == "loss/total"] == [0, 1, 0, 1, 2]


def test_a_failed_csv_write_is_cut_back_off_the_file(tmp_path, monkeypatch):
    path = tmp_path / "run.csv"
    mon = kf.LossMonitor(csv=path)
    mon.record(_loss())
    mon.flush()
    before = path.read_bytes()
    log = mon._csv
    real_write = log._file.write

    def torn_write(data):  # half the bytes reach the file, then the disk is full
        real_write(data[: len(data) // 2])
        log._file.flush()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(log._file, "write", torn_write, raising=False)
    mon.record(_loss())
    with pytest.raises(OSError):
        mon.flush()
    assert path.read_bytes() == before  # no half row left behind
    monkeypatch.undo()
    mon.flush()
    mon.close()
    assert [r["step"] for r in read_csv(path)] == [0, 1]


@pytest.mark.skipif(sys.platform != "linux", reason="a file-size limit (RLIMIT_FSIZE) as Linux sets it")
def test_a_write_the_system_cuts_short_is_cut_back_and_retried_once(tmp_path):
    """A real partial write (a file-size limit, as a full disk): the file
    takes part of the rows, then the write fails. Nothing of it may stay
    behind, in the file or in a buffer that a later write would flush: the
    retry writes each row once, and the file reads back whole."""
    path = tmp_path / "run.csv"
    code = f"""
import os, resource, signal, torch, koemorph_fused as kf
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
m = kf.LossMonitor(csv={str(path)!r})
for i in range(3): m.record(kf.temporal_loss(torch.rand(4, 52), torch.rand(4, 52)))
m.flush()
size = os.path.getsize({str(path)!r})
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, resource.RLIM_INFINITY))  # room for part of a row
for i in range(3): m.record(kf.temporal_loss(torch.rand(4, 52), torch.rand(4, 52)))
try:
    m.flush()
    raise SystemExit("the flush did not fail")
except OSError:
    assert os.path.getsize({str(path)!r}) == size, "the failed write was not cut back"
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
m.flush()
m.close()
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert [r["step"] for r in read_csv(path)] == list(range(6))


def test_a_last_line_cut_inside_its_flags_is_skipped_on_read(tmp_path):
    """Cut inside the flags cell, the last line still parses: read_csv skips
    it all the same (as the appender removes it), never reading a shortened flag."""
    path = tmp_path / "run.csv"
    with kf.LossMonitor(csv=path, divergence_threshold=1e-9) as mon:  # every step flagged
        for _ in range(2):
            mon.record(_loss())
    text = path.read_text()
    assert text.endswith("divergence\n")
    path.write_text(text[:-5])  # "...,diverg"
    with pytest.warns(RuntimeWarning, match=r"run\.csv:3: the last line is cut short"):
        assert [r["step"] for r in read_csv(path)] == [0]


def test_a_torn_last_line_is_repaired_on_append_and_skipped_on_read(tmp_path):
    path = tmp_path / "run.csv"
    with kf.LossMonitor(csv=path) as mon:
        for _ in range(3):
            mon.record(_loss())
    text = path.read_text()
    path.write_text(text[: text.rindex("\n", 0, len(text) - 1) + 15])  # the last row cut after 14 characters
    with pytest.warns(RuntimeWarning, match=r"run\.csv:4: the last line is cut short"):
        assert [r["step"] for r in read_csv(path)] == [0, 1]
    with pytest.warns(RuntimeWarning, match=r"run\.csv: its last line was cut short.*removed"):
        mon = kf.LossMonitor(csv=path)
    with mon:
        mon.record(_loss())
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and all(line.count(",") == len(CSV_COLUMNS) - 1 for line in lines)
    assert [r["step"] for r in read_csv(path)] == [0, 1, 2]  # never glued onto the torn line


def test_a_torn_header_is_repaired(tmp_path):
    path = tmp_path / "run.csv"
    path.write_text("step,epoch,ph")
    with pytest.warns(RuntimeWarning, match="cut short"):
        assert _steps_after_one_more_record(path) == [0]


def test_two_writers_on_one_csv_are_refused(tmp_path):
    path = tmp_path / "run.csv"
    with kf.LossMonitor(csv=path) as first:
        with pytest.raises(ValueError, match=r"run\.csv: another LossMonitor is writing this run CSV"):
            kf.LossMonitor(csv=path)
        script = ("import koemorph_fused as kf, sys\n"
                  "try:\n    kf.LossMonitor(csv=sys.argv[1])\nexcept ValueError as e:\n    print(e)\n")
        proc = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120)
        assert "another LossMonitor is writing" in proc.stdout
        first.record(_loss())
    assert _steps_after_one_more_record(path) == [0, 1]  # the lock went with the first monitor


def test_appending_continues_the_steps_in_csv_and_tensorboard_alike(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path, logdir = tmp_path / "run.csv", tmp_path / "tb"
    for _ in range(2):
        with kf.LossMonitor(csv=path, tensorboard=logdir) as mon:
            for _ in range(3):
                mon.record(_loss())
    assert [r["step"] for r in read_csv(path)] == list(range(6))
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    assert sorted(e.step for e in acc.Scalars("loss/total")) == list(range(6))
    # TensorBoard alone continues too.
    with kf.LossMonitor(tensorboard=logdir) as mon:
        mon.record(_loss())
        assert mon.flush()[0]["step"] == 6


def test_sequence_records_get_a_velocity_column(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path, logdir = tmp_path / "seq.csv", tmp_path / "tb"
    terms = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=torch.float64)
    with kf.LossMonitor(csv=path, tensorboard=logdir) as mon:
        mon.record(kf.LossOutput(terms.sum(), terms), stride=1)
        with pytest.raises(ValueError, match="6-term losses; got 5"):
            mon.record(_loss())
        (row,) = mon.flush()
    assert row["velocity"] == 0.6 and row["smoothing"] == 0.5
    assert path.read_text().splitlines()[0].split(",")[5:12] == [
        "mse", "l1", "perceptual", "temporal", "smoothing", "velocity", "total"]
    (back,) = read_csv(path)
    assert back["velocity"] == 0.6 and back["total"] == pytest.approx(2.1)
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    assert acc.Scalars("loss/velocity")[0].value == pytest.approx(0.6)
    # A five-term file takes no six-term record, and the reverse.
    five = tmp_path / "five.csv"
    with kf.LossMonitor(csv=five) as mon:
        mon.record(_loss())
    assert "velocity" not in read_csv(five)[0]
    with kf.LossMonitor(csv=five) as mon:
        with pytest.raises(ValueError, match=r"five\.csv: its rows have five terms, this record 6"):
            mon.record(kf.LossOutput(terms.sum(), terms))
    fig = plot_run(path)
    assert "velocity" in [line.get_label() for line in fig.axes[0].lines]


def test_cli_plot_never_writes_over_its_input(tmp_path, capsys):
    path = tmp_path / "run.png"  # a run CSV under an image's name
    with kf.LossMonitor(csv=path) as mon:
        mon.record(_loss())
    before = path.read_bytes()
    for argv in (["plot", str(path)], ["plot", str(path), "-o", str(path)]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2
        assert "would write over its input" in capsys.readouterr().err
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="would write over"):
        plot_run(path, path)


def test_cli_plot_draws_a_csv_with_a_torn_last_line_and_says_so(tmp_path, capsys):
    path = tmp_path / "run.csv"
    with kf.LossMonitor(csv=path) as mon:
        for _ in range(3):
            mon.record(_loss())
    text = path.read_text()
    path.write_text(text[:-20])  # the run was killed while writing its last row
    assert cli.main(["plot", str(path), "-o", str(tmp_path / "run.png")]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line]
    assert len(warnings) == 1 and "warning" in warnings[0] and "cut short" in warnings[0]
    assert "2 steps (0..1)" in captured.out and (tmp_path / "run.png").stat().st_size > 0
