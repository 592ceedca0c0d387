"""``koemorph-fused demo``: train a small temporal model with the fused loss and,
at every step, check the fused loss against the plain-PyTorch reference on the
same model outputs.

Exit status: 0 when every step agreed within the dtype's tolerances (PASS),
1 when one did not (FAIL), 2 on a usage problem (one ``koemorph-fused: error:``
line; see :mod:`koemorph_fused.cli`).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from ..cli_args import CommandLineError, float_arg, int_arg, output_file, plot_file, seed_arg, thread_count
from ..config import load_loss_config
from ..reference import KoeMorphTemporalLoss
from ..run_log import empty_run_csv
from ..schedule import TrainingSchedule
from .data import WINDOW, make_corpus
from ..terms import SEQUENCE_TERM_NAMES
from .report import chaos_summary, epoch_table, median_us, plot, verdict_table
from .sequence import SEQUENCE_WINDOW, VELOCITY_WEIGHT, sequence_run
from .train import CALIBRATION_NOTE, DTYPES, EXPECTED_TOTAL, GROUPS, GROUPS_NOTE, DemoConfig, demo_run, train

#: Upper bounds of the sizes (beyond them the demo stops being a demo: memory, hours).
MAX_EPOCHS, MAX_STEPS, MAX_BATCH, MAX_HIDDEN, MAX_FILES, MAX_WINDOW = 10_000, 100_000, 1024, 1024, 1000, 4096


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    parser.description = (
        "Train a small GRU + temporal-smoothing model on synthetic speech-like blendshape data (the 52 ARKit "
        "blend shapes in ARKit column order) with the fused loss, its perceptual groups chosen by name "
        "(kf.blendshapes.preset('semantic', layout='arkit'): jaw* + mouth*, brow* + eye* + cheek* + nose*), "
        "through the seed's stride schedule. At every step the plain-PyTorch reference loss gets the very "
        "same model outputs, target, previous frame, continuity mask and weights, and its five terms, total and "
        "gradients (d total/d pred, d total/d raw) are compared with the fused loss's, within tolerances derived "
        "from the dtype. Prints the per-epoch monitor table, the worst error/tolerance ratio per quantity, the "
        "loss forward+backward time per step, and PASS (exit 0) or FAIL (exit 1)."
    )
    parser.epilog = ("The verdict does not compare two training runs: those drift apart by rounding (chaos) at a "
                     "rate that depends on the CPU, the thread count and the seed. --reference-run trains a second "
                     "model on the reference loss for the picture only.")
    parser.add_argument("--epochs", type=int_arg(1, MAX_EPOCHS), default=d.epochs,
                        help=f"epochs of the curriculum (early/mid/late phases; default {d.epochs})")
    parser.add_argument("--steps-per-epoch", type=int_arg(1, MAX_STEPS), default=d.steps_per_epoch,
                        help=f"training steps per epoch (default {d.steps_per_epoch})")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to train (default cpu)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=d.dtype,
                        help="model, data and loss-input dtype (default float32); with bfloat16 the loss's "
                             "total and terms are float32, its gradients bfloat16")
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="take the base loss weights from this config's loss section ('loss:', "
                             "'training.loss:' or 'model.loss:', following a Hydra defaults list); the schedule's "
                             "sparse and dense presets are rescaled term by term by config/default "
                             "(TrainingSchedule.from_base); the perceptual groups stay the demo's; with --sequence "
                             "its velocity_weight too (0 where it has none) unless --velocity-weight is given")
    parser.add_argument("--plot", metavar="FILE.png", type=plot_file,
                        help="save the term curves and the per-step error/tolerance ratios to this image")
    parser.add_argument("--csv", metavar="RUN.csv", type=output_file,
                        help="write the fused run's monitor rows (one per step: epoch, phase, stride, the five terms, "
                             "total, flags) to this CSV, replacing it (an earlier run CSV only: a file another monitor "
                             "is writing, or any other file, is an error); draw it with: koemorph-fused plot RUN.csv")
    parser.add_argument("--reference-run", action="store_true",
                        help="also train a second model on the reference loss (same seed) and show its curves next "
                             "to the fused run's (--plot) and how far they drift apart; a picture, not the verdict")
    parser.add_argument("--seed", type=seed_arg, default=d.seed,
                        help=f"seed of the data and the model, 0..2**64-1 (default {d.seed})")
    parser.add_argument("--files", type=int_arg(2, MAX_FILES), default=6,
                        help="synthetic files, >= 2: streams move on from file to file (default 6)")
    parser.add_argument("--batch", type=int_arg(1, MAX_BATCH), default=d.batch,
                        help=f"parallel streams (windows) per step (default {d.batch})")
    parser.add_argument("--hidden", type=int_arg(1, MAX_HIDDEN), default=d.hidden,
                        help=f"GRU width (default {d.hidden})")
    parser.add_argument("--lr", type=float_arg(0.0, low_inclusive=False), default=d.lr,
                        help=f"Adam learning rate, > 0 (default {d.lr})")
    parser.add_argument("--threads", type=thread_count, default=1,
                        help="torch intra-op threads, 1..the machine's CPUs (default 1: the tensors are small)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    seq = parser.add_argument_group(
        "windows of frames",
        "--sequence trains a GRU that predicts every frame of (B, T, 52) windows with "
        "kf.FusedKoeMorphSequenceLoss: consecutive windows of each file, the file's last window padded "
        "(lengths), prev/prev_target carried from the stream's previous window, continuity 0 where a window "
        "starts a file, a velocity term. The reference (kf.reference.KoeMorphSequenceLoss) gets the same outputs "
        "at every step: six terms, total, d/d pred, d/d raw and the counts are compared, with the same PASS/FAIL "
        "rule. The schedule gives the five weights per epoch; --batch, --hidden, --lr, --dtype, --epochs, "
        "--steps-per-epoch, --seed, --files and --config apply as above.")
    seq.add_argument("--sequence", action="store_true",
                     help="train on windows of frames with the fused sequence loss (see above)")
    seq.add_argument("--window", type=int_arg(1, MAX_WINDOW), default=None,
                     help=f"with --sequence: frames per window T (default {SEQUENCE_WINDOW})")
    seq.add_argument("--velocity-weight", type=float_arg(0.0), default=None,
                     help=f"with --sequence: weight of the velocity term, >= 0 (default {VELOCITY_WEIGHT:g})")


def _schedule_summary(schedule: TrainingSchedule, with_strides: bool = True) -> str:
    parts = []
    spans = (("early", 0, schedule.mid_start), ("mid", schedule.mid_start, schedule.late_start),
             ("late", schedule.late_start, schedule.total_epochs))
    for name, lo, hi in spans:
        if hi <= lo:
            continue
        strides = [schedule.at(e).stride for e in range(lo, hi)]
        stride = str(strides[0]) if len(set(strides)) == 1 else f"{strides[0]}->{strides[-1]}"
        epochs = f"{name} {lo}-{hi - 1}" if hi - lo > 1 else f"{name} {lo}"
        parts.append(f"{epochs} (stride {stride})" if with_strides else epochs)
    return ", ".join(parts)


def main(args: argparse.Namespace) -> int:
    """Checks what the parser could not (CUDA present, config readable), then runs."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CommandLineError("--device cuda: no CUDA device is available")
    if args.sequence:
        for flag, given in (("--plot", args.plot), ("--reference-run", args.reference_run), ("--csv", args.csv)):
            if given:
                raise CommandLineError(f"{flag} is for the row demo; --sequence does not take it")
    else:
        for flag, given in (("--window", args.window), ("--velocity-weight", args.velocity_weight)):
            if given is not None:
                raise CommandLineError(f"{flag} needs --sequence")
    if args.csv and args.plot and os.path.abspath(args.csv) == os.path.abspath(args.plot):
        raise CommandLineError(f"--csv and --plot are the same file ({args.csv}): the plot would overwrite the run CSV")
    config = None
    if args.config:
        try:
            config = load_loss_config(args.config)
        except (OSError, ValueError, TypeError) as e:
            raise CommandLineError(f"--config {args.config}: {e}") from None
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, config)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, config) -> int:
    from tqdm import tqdm

    start = time.perf_counter()
    base = None if config is None else config.weights
    corpus = make_corpus(args.files, seed=args.seed)
    cfg = DemoConfig(epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch=args.batch,
                     hidden=args.hidden, lr=args.lr, seed=args.seed, device=args.device, dtype=args.dtype,
                     base_weights=base)
    schedule = cfg.schedule()
    total_steps = cfg.epochs * cfg.steps_per_epoch
    window = (args.window or SEQUENCE_WINDOW) if args.sequence else WINDOW
    # --velocity-weight, else the config's velocity_weight (0 where it has none), else the demo's
    velocity_weight = (args.velocity_weight if args.velocity_weight is not None else
                       VELOCITY_WEIGHT if config is None else config.velocity_weight)
    print(f"koemorph-fused demo{' --sequence' if args.sequence else ''}: {len(corpus)} synthetic files "
          f"({', '.join(str(f.num_frames) for f in corpus)} frames), {cfg.batch} streams x {window}-frame windows, "
          f"GRU {cfg.hidden}, {cfg.epochs} epochs x {cfg.steps_per_epoch} steps, {cfg.device} {cfg.dtype}, "
          f"{torch.get_num_threads()} thread(s), seed {cfg.seed}")
    if args.sequence:
        print(f"windows of frames: every frame predicted; consecutive windows of a file (the last one padded: "
              f"lengths), prev/prev_target from the stream's previous window, continuity 0 where a window starts "
              f"a file; velocity_weight {velocity_weight:g}")
        print(f"schedule: {_schedule_summary(schedule, with_strides=False)} (the phases' weights; the windows follow "
              f"each other, no stride)")
    else:
        print(f"schedule: {_schedule_summary(schedule)}")
    print("weights: " + ("the seed's sparse/dense presets" if base is None else
                         f"presets rescaled to {args.config}: " + ", ".join(
                             f"{k}={v:g}" for k, v in base.to_config().items())))
    print(GROUPS_NOTE)
    print("training on the fused loss; at every step the reference gets the same outputs, weights and groups")

    # torch.optim's first optimizer imports torch._dynamo (seconds, once per process):
    # pay it here so that it is charged to no run.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])

    def progress(name: str):
        bar = tqdm(total=total_steps, desc=f"{name:<9}", unit="step", disable=args.no_progress, leave=False)

        def on_epoch(rows):
            last = rows[-1]
            bar.set_postfix(epoch=last["epoch"], phase=last["phase"], stride=last["stride"],
                            total=f"{last['total']:.4f}")

        return bar, on_epoch

    if args.csv:
        try:  # a new run: the monitor would continue an existing run CSV
            empty_run_csv(args.csv)
        except ValueError as e:
            raise CommandLineError(f"--csv {e}") from None
    bar, on_epoch = progress("fused")
    if args.sequence:
        fused = sequence_run(cfg, corpus, window=window, velocity_weight=velocity_weight, on_step=bar.update,
                             on_epoch=on_epoch)
        bar.close()
        return _sequence_report(fused, cfg, schedule, start)
    fused = demo_run(cfg, corpus, on_step=bar.update, on_epoch=on_epoch, csv=args.csv)
    bar.close()
    runs = [fused]
    if args.reference_run:
        bar, on_epoch = progress("reference")
        runs.append(train(cfg, KoeMorphTemporalLoss(**GROUPS._asdict()), corpus, name="reference",
                          expected_total=EXPECTED_TOTAL, on_step=bar.update, on_epoch=on_epoch))
        bar.close()
    verdict = fused.verdict
    assert verdict is not None  # demo_run always checks

    lo = {name: f"{low:g}-{high:g}" for name, (low, high) in EXPECTED_TOTAL.items()}
    print()
    print("monitor rows, per-epoch means (trans = steps crossing a file boundary; flags with counts)")
    print(f"expected totals early {lo['early']}, mid {lo['mid']}, late {lo['late']}: {CALIBRATION_NOTE}")
    print(epoch_table(fused.rows, schedule))
    print()
    print("fused vs reference at every step, on the same model outputs "
          "(worst error/tolerance over the steps; PASS needs <= 1):")
    print(verdict_table(verdict))
    t_fused, t_ref = median_us(fused.loss_seconds), median_us(fused.reference_seconds)
    print(f"loss forward+backward per step on the same inputs (median of {len(fused.loss_seconds)}): "
          f"fused {t_fused:.1f} us, reference {t_ref:.1f} us ({t_ref / t_fused:.2f}x)")
    mse = fused.column("mse")
    k = cfg.steps_per_epoch
    print(f"mse: first epoch mean {float(mse[:k].mean()):.5f} -> last epoch mean {float(mse[-k:].mean()):.5f}; "
          f"learned smoothing alpha: mouth {float(fused.alpha[list(GROUPS.mouth_indices)].mean()):.3f}, "
          f"expression {float(fused.alpha[list(GROUPS.expression_indices)].mean()):.3f} (initial 0.300)")
    if args.reference_run:
        print(chaos_summary(fused, runs[1]))
    if args.plot:
        plot(args.plot, runs, schedule, cfg.steps_per_epoch)
        print(f"plot: {args.plot}")
    if args.csv:
        print(f"run CSV: {args.csv} ({len(fused.rows)} rows; draw it with: koemorph-fused plot {args.csv})")
    print(f"wall time: {time.perf_counter() - start:.1f} s")
    return _verdict_line(verdict, cfg.dtype, "five terms, total, d/d pred, d/d raw")


def _sequence_report(fused, cfg: DemoConfig, schedule: TrainingSchedule, start: float) -> int:
    """What ``demo --sequence`` prints after training; returns the exit status."""
    verdict = fused.verdict
    print()
    print("per-epoch means (stride = frames per window; trans = steps where a window continued nothing: "
          "a file start, or step 0)")
    print(epoch_table(fused.rows, schedule, SEQUENCE_TERM_NAMES, flags=False))  # no monitor flags these rows
    print()
    print("fused vs reference at every step, on the same model outputs "
          "(worst error/tolerance over the steps; PASS needs <= 1):")
    print(verdict_table(verdict))
    print("  velocity: plus its residual's cancellation, bounded from the step's data (velocity_floors in "
          "koemorph_fused/demo/verify.py)")
    t_fused, t_ref = median_us(fused.loss_seconds), median_us(fused.reference_seconds)
    print(f"loss forward+backward per step on the same inputs (median of {len(fused.loss_seconds)}): "
          f"fused {t_fused:.1f} us, reference {t_ref:.1f} us ({t_ref / t_fused:.2f}x)")
    mse, k = fused.column("mse"), cfg.steps_per_epoch
    frames = fused.column("frames")
    print(f"mse: first epoch mean {float(mse[:k].mean()):.5f} -> last epoch mean {float(mse[-k:].mean()):.5f}; "
          f"valid frames per step {int(frames.min())}..{int(frames.max())} of {int(fused.verdict.tolerance.rows)}; "
          f"learned blend alpha: mouth {float(fused.alpha[list(GROUPS.mouth_indices)].mean()):.3f}, "
          f"expression {float(fused.alpha[list(GROUPS.expression_indices)].mean()):.3f} (initial 0.300)")
    print(f"wall time: {time.perf_counter() - start:.1f} s")
    return _verdict_line(verdict, cfg.dtype, "six terms, total, d/d pred, d/d raw, counts")


def _verdict_line(verdict, dtype: str, compared: str) -> int:
    """The last line, PASS or FAIL, and the exit status."""
    if verdict.ok:
        print(f"PASS: at all {verdict.steps} steps the fused loss matched the reference on the same model outputs "
              f"({compared}) within the {dtype} tolerances; worst {verdict.margin:.2g} of the tolerance")
        return 0
    reasons = list(verdict.dtype_errors)
    if verdict.first_bad_step is not None:
        bad = [name for name, r in verdict.worst.items() if not r <= 1.0]
        reasons.append(f"{', '.join(bad)} beyond the {dtype} tolerance, first at step {verdict.first_bad_step}")
    print("FAIL: the fused loss differs from the reference on the same model outputs: " + "; ".join(reasons))
    return 1
