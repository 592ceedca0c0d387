"""``koemorph-fused demo``: train the same small temporal model twice from the
same seed, with the fused loss and with the plain-PyTorch reference, and show
that the curves agree, what the loss costs per step, and the monitor's rows.

Exit status: 0 when the curves agree (PASS), 1 when they do not (FAIL),
2 on a usage problem (no CUDA device, unreadable config).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from ..config import load_loss_weights
from ..modules import FusedKoeMorphLoss
from ..reference import KoeMorphTemporalLoss
from ..schedule import TrainingSchedule
from .data import WINDOW, make_corpus
from .report import TOLERANCES, compare, epoch_table, median_us, plot
from .train import DemoConfig, train


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    parser.description = (
        "Train a small GRU + temporal-smoothing model on synthetic speech-like blendshape data, twice from the "
        "same seed: with the fused loss and with the plain-PyTorch reference. Prints the per-epoch monitor "
        "table, the agreement of the two loss curves (PASS/FAIL, exit status 1 on mismatch) and the loss "
        "forward+backward time per step."
    )
    parser.add_argument("--epochs", type=_positive_int, default=d.epochs,
                        help=f"epochs of the curriculum (early/mid/late phases; default {d.epochs})")
    parser.add_argument("--steps-per-epoch", type=_positive_int, default=d.steps_per_epoch,
                        help=f"training steps per epoch (default {d.steps_per_epoch})")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to train (default cpu)")
    parser.add_argument("--dtype", choices=sorted(TOLERANCES), default=d.dtype,
                        help="model and data dtype (default float32; float64 shows agreement to ~1e-15)")
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="take the base loss weights from this config's loss section ('loss:', "
                             "'training.loss:' or 'model.loss:', following a Hydra defaults list); the schedule's "
                             "sparse and dense presets are rescaled term by term by config/default "
                             "(TrainingSchedule.from_base)")
    parser.add_argument("--plot", metavar="FILE.png", help="save the term curves of both runs to this image")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"seed of the data and the model (default {d.seed})")
    parser.add_argument("--files", type=_positive_int, default=6, help="synthetic files, >= 2 (default 6)")
    parser.add_argument("--batch", type=_positive_int, default=d.batch,
                        help=f"parallel streams (windows) per step (default {d.batch})")
    parser.add_argument("--hidden", type=_positive_int, default=d.hidden, help=f"GRU width (default {d.hidden})")
    parser.add_argument("--lr", type=_positive_float, default=d.lr, help=f"Adam learning rate (default {d.lr})")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: the tensors are small; 0 keeps torch's default)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _schedule_summary(schedule: TrainingSchedule) -> str:
    parts = []
    spans = (("early", 0, schedule.mid_start), ("mid", schedule.mid_start, schedule.late_start),
             ("late", schedule.late_start, schedule.total_epochs))
    for name, lo, hi in spans:
        if hi <= lo:
            continue
        strides = [schedule.at(e).stride for e in range(lo, hi)]
        stride = str(strides[0]) if len(set(strides)) == 1 else f"{strides[0]}->{strides[-1]}"
        parts.append(f"{name} {lo}-{hi - 1} (stride {stride})" if hi - lo > 1 else f"{name} {lo} (stride {stride})")
    return ", ".join(parts)


def main(args: argparse.Namespace) -> int:
    if args.files < 2:
        print("koemorph-fused demo: --files must be >= 2 (streams move on from file to file)", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("koemorph-fused demo: no CUDA device is available", file=sys.stderr)
        return 2
    base = None
    if args.config:
        try:
            base = load_loss_weights(args.config)
        except (OSError, ValueError, TypeError) as e:
            print(f"koemorph-fused demo: {e}", file=sys.stderr)
            return 2
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, base)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, base) -> int:
    from tqdm import tqdm

    start = time.perf_counter()
    corpus = make_corpus(args.files, seed=args.seed)
    cfg = DemoConfig(epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch=args.batch,
                     hidden=args.hidden, lr=args.lr, seed=args.seed, device=args.device, dtype=args.dtype,
                     base_weights=base)
    schedule = cfg.schedule()
    total_steps = cfg.epochs * cfg.steps_per_epoch
    print(f"koemorph-fused demo: {len(corpus)} synthetic files ({', '.join(str(f.num_frames) for f in corpus)} "
          f"frames), {cfg.batch} streams x {WINDOW}-frame windows, GRU {cfg.hidden}, "
          f"{cfg.epochs} epochs x {cfg.steps_per_epoch} steps, {cfg.device} {cfg.dtype}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"schedule: {_schedule_summary(schedule)}")
    print("weights: " + ("the seed's sparse/dense presets" if base is None else
                         f"presets rescaled to {args.config}: " + ", ".join(
                             f"{k}={v:g}" for k, v in base.to_config().items())))

    # torch.optim's first optimizer imports torch._dynamo (seconds, once per process):
    # pay it here so that it is charged to neither run.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    runs = []
    for name, loss_fn in (("fused", FusedKoeMorphLoss()), ("reference", KoeMorphTemporalLoss())):
        bar = tqdm(total=total_steps, desc=f"{name:<9}", unit="step", disable=args.no_progress, leave=False)

        def on_epoch(rows, bar=bar):
            last = rows[-1]
            bar.set_postfix(epoch=last["epoch"], phase=last["phase"], stride=last["stride"],
                            total=f"{last['total']:.4f}")

        runs.append(train(cfg, loss_fn, corpus, name=name, on_step=bar.update, on_epoch=on_epoch))
        bar.close()
    fused, ref = runs

    print()
    print("monitor rows of the fused run, per-epoch means (trans = steps crossing a file boundary; flags with "
          "counts; expected totals early 0.15-0.6, mid 0.08-0.25, late 0.02-0.08 are the seed's):")
    print(epoch_table(fused.rows, schedule))

    rtol, atol = TOLERANCES[cfg.dtype]
    agreement = compare(fused, ref, rtol, atol)
    print()
    print(f"curves: {agreement.steps} steps; total: max |fused - reference| = {agreement.max_abs_total:.3e}, "
          f"max rel = {agreement.max_rel_total:.3e}; terms: max abs = {agreement.max_abs_terms:.3e}")
    print("  max rel difference of the total by phase: " + ", ".join(
        f"{name} {value:.1e}" for name, value in agreement.max_rel_by_phase.items()))
    t_fused, t_ref = median_us(fused.loss_seconds), median_us(ref.loss_seconds)
    print(f"loss forward+backward per step (median of {len(fused.loss_seconds)}): fused {t_fused:.1f} us, "
          f"reference {t_ref:.1f} us ({t_ref / t_fused:.2f}x)")
    mse = fused.column("mse")
    k = cfg.steps_per_epoch
    print(f"mse: first epoch mean {float(mse[:k].mean()):.5f} -> last epoch mean {float(mse[-k:].mean()):.5f}; "
          f"learned smoothing alpha: mouth {float(fused.alpha[12:22].mean()):.3f}, "
          f"expression {float(fused.alpha[0:10].mean()):.3f} (initial 0.300)")
    if args.plot:
        plot(args.plot, runs, schedule, cfg.steps_per_epoch)
        print(f"plot: {args.plot}")
    print(f"wall time: {time.perf_counter() - start:.1f} s")
    if agreement.ok:
        print(f"PASS: fused and reference training curves agree (rtol {rtol:g}, atol {atol:g}, every step, "
              "total and the five terms)")
        return 0
    print(f"FAIL: the curves differ beyond rtol {rtol:g}, atol {atol:g} from step {agreement.first_bad_step} on"
          + (" (float32 runs drift apart over many steps; --dtype float64 separates drift from a real mismatch)"
             if cfg.dtype == "float32" else ""))
    return 1
