"""Train a sequence model on windows of frames with the fused sequence loss.

A GRU reads ``(B, T, 80)`` audio features and predicts ``(B, T, 52)``
blendshapes for every frame. The data are ``B`` parallel streams, each walking
through synthetic "files" (recordings of different lengths) in windows of
``T`` frames, as a streaming trainer does:

* a window that reaches the end of its file is padded: ``lengths[b]`` says
  how many of its frames are real, and the padding is in no term;
* the next window of a stream continues the same file: the GRU's hidden state
  and the loss's ``prev`` / ``prev_target`` (the last real frame of the
  previous window's prediction and target, detached) are carried over, so
  the temporal and velocity terms see the frame pair across the window
  boundary;
* a window that starts a new file gets ``continuity[b] = 0``: its frame 0
  has no previous frame (and the GRU state is reset).

Every ``--check-every`` steps the plain-PyTorch reference
(``kf.reference.sequence_loss``) gets the very same model outputs, and its
six terms, total and gradients are compared with the fused loss's. The run
exits with status 1 if a check fails.

    python docs/examples/sequence_training.py                 # 300 steps, seconds on a CPU
    python docs/examples/sequence_training.py --help
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

import koemorph_fused as kf

N_FEATURES, N_BLENDSHAPES = 80, 52


# ----------------------------------------------------------------------------- data

def make_files(num_files: int, min_frames: int, max_frames: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Synthetic recordings ``(features (L, 80), blendshapes (L, 52))``: smooth
    random features, and blendshapes that follow a fixed map of a slowly
    filtered copy of them (so a recurrent model can learn them)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(N_FEATURES, N_BLENDSHAPES, generator=g) / N_FEATURES**0.5
    files = []
    for _ in range(num_files):
        frames = int(torch.randint(min_frames, max_frames + 1, (), generator=g))
        noise = torch.randn(frames, N_FEATURES, generator=g)
        features = torch.empty_like(noise)
        state = torch.zeros(N_FEATURES)
        slow = torch.empty_like(noise)
        level = torch.zeros(N_FEATURES)
        for t in range(frames):  # two first-order filters: fast features, a slower state behind them
            state = 0.7 * state + 0.3 * noise[t]
            level = 0.8 * level + 0.2 * state
            features[t], slow[t] = state, level
        features = features / features.std()
        blendshapes = torch.sigmoid(3.0 * (slow / slow.std()) @ mixing)
        files.append((features, blendshapes))
    return files


@dataclass
class Windows:
    """One step's windows: features ``(B, T, 80)``, target ``(B, T, 52)``,
    ``lengths (B,)`` (real frames; the rest is zero padding) and
    ``starts_file (B,)`` (bool: the window is the first of a file)."""

    features: torch.Tensor
    target: torch.Tensor
    lengths: torch.Tensor
    starts_file: torch.Tensor


class Streams:
    """``batch`` streams, each reading its files one window of ``window``
    frames after the other; stream ``b`` starts at file ``b``. A window never
    crosses into the next file: the last window of a file is padded."""

    def __init__(self, files, batch: int, window: int) -> None:
        self.files, self.window = files, window
        self.file = [b % len(files) for b in range(batch)]
        self.pos = [0] * batch

    def next(self) -> Windows:
        batch, w = len(self.file), self.window
        features = torch.zeros(batch, w, N_FEATURES)
        target = torch.zeros(batch, w, N_BLENDSHAPES)
        lengths = torch.zeros(batch, dtype=torch.int64)
        starts_file = torch.zeros(batch, dtype=torch.bool)
        for b in range(batch):
            feats, shapes = self.files[self.file[b]]
            start = self.pos[b]
            n = min(w, feats.shape[0] - start)
            features[b, :n], target[b, :n] = feats[start:start + n], shapes[start:start + n]
            lengths[b], starts_file[b] = n, start == 0
            self.pos[b] += n
            if self.pos[b] == feats.shape[0]:  # file done: the stream's next window starts the next file
                self.file[b], self.pos[b] = (self.file[b] + len(self.file)) % len(self.files), 0
        return Windows(features, target, lengths, starts_file)


# ----------------------------------------------------------------------------- model

class SequenceModel(nn.Module):
    """GRU over the features, a linear head (``raw``, in [0, 1]), then a
    learned per-blendshape blend with the previous frame's ``raw`` (``pred``):
    the model's own temporal smoothing, which the smoothing term keeps close
    to ``raw``."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.gru = nn.GRU(N_FEATURES, hidden, batch_first=True)
        self.head = nn.Linear(hidden, N_BLENDSHAPES)
        self.logit = nn.Parameter(torch.full((N_BLENDSHAPES,), -1.0))  # blend 0.27 at the start

    def forward(self, features, state, last_raw, new_file):
        """``features (B, T, 80)``, the GRU ``state (1, B, H)``, the previous
        window's last real ``raw`` frame ``(B, 52)`` and ``new_file (B,)``
        (bool: nothing before frame 0) -> ``pred, raw (B, T, 52)`` and the
        GRU's new state. Padded frames come last, so they change no real
        frame's output (the GRU is causal)."""
        state = torch.where(new_file.view(1, -1, 1), 0.0, state)
        out, state = self.gru(features, state)
        raw = torch.sigmoid(self.head(out))
        first = torch.where(new_file.unsqueeze(1), raw[:, 0], last_raw)  # a new file: no blend at frame 0
        before = torch.cat([first.unsqueeze(1), raw[:, :-1]], dim=1)
        alpha = torch.sigmoid(self.logit)
        pred = (1 - alpha) * raw + alpha * before
        return pred, raw, state


# ----------------------------------------------------------------------------- the check

def check_against_reference(loss_fn: nn.Module, reference: nn.Module, pred, raw, target, **data) -> float:
    """The trained loss and the reference on the same (detached) outputs:
    counts, six terms, total and the gradients for ``pred`` and ``raw``;
    returns the largest difference relative to its tolerance (a pass is <= 1)."""
    results = []
    for fn in (loss_fn, reference):
        p, r = pred.detach().requires_grad_(), raw.detach().requires_grad_()
        total = fn(p, target, r, **data)
        results.append((fn.last_counts, fn.last_terms, total.detach(), *torch.autograd.grad(total, (p, r))))
    fused, ref = results
    if not torch.equal(fused[0], ref[0]):
        return float("inf")
    # float32 sums of a few thousand values in another order: about 1e-6 relative;
    # gradients are compared relative to their largest element.
    worst = 0.0
    for a, b in zip(fused[1:3], ref[1:3]):
        worst = max(worst, float(((a - b).abs() / (1e-5 * b.abs() + 1e-12)).max()))
    for a, b in zip(fused[3:], ref[3:]):
        worst = max(worst, float((a - b).abs().max() / (1e-5 * b.abs().max() + 1e-20)))
    return worst


# ----------------------------------------------------------------------------- training

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a GRU on (B, T, 80) features -> (B, T, 52) blendshapes with "
                    "kf.FusedKoeMorphSequenceLoss: padded windows (lengths), windows that continue a file "
                    "(prev, prev_target, continuity), a velocity term; the reference checks the fused loss "
                    "on the same outputs every --check-every steps.",
        epilog="Exit status 0 when every check passed, 1 otherwise.")
    p.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    p.add_argument("--batch", type=int, default=8, help="parallel streams B (default 8)")
    p.add_argument("--window", type=int, default=32, help="frames per window T (default 32)")
    p.add_argument("--files", type=int, default=12, help="synthetic files (default 12)")
    p.add_argument("--min-frames", type=int, default=40, help="shortest file, frames (default 40)")
    p.add_argument("--max-frames", type=int, default=150, help="longest file, frames (default 150)")
    p.add_argument("--hidden", type=int, default=64, help="GRU width (default 64)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    p.add_argument("--velocity-weight", type=float, default=0.5, help="weight of the velocity term (default 0.5)")
    p.add_argument("--check-every", type=int, default=25,
                   help="compare with the reference every N steps, 0 = never (default 25)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the model (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("steps", "batch", "window", "files", "min_frames", "hidden", "threads"):
        if getattr(args, name) < 1:
            build_parser().error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_frames < args.min_frames or args.check_every < 0:
        build_parser().error("need --max-frames >= --min-frames and --check-every >= 0")
    if not (math.isfinite(args.velocity_weight) and args.velocity_weight >= 0 and math.isfinite(args.lr) and args.lr > 0):
        build_parser().error("need a finite --velocity-weight >= 0 and a finite --lr > 0")
    if args.threads > (os.cpu_count() or 1):
        build_parser().error(f"--threads must be at most this machine's {os.cpu_count()} CPUs")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    streams = Streams(make_files(args.files, args.min_frames, args.max_frames, args.seed), args.batch, args.window)
    model = SequenceModel(args.hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = kf.FusedKoeMorphSequenceLoss(velocity_weight=args.velocity_weight)
    reference = kf.reference.KoeMorphSequenceLoss(velocity_weight=args.velocity_weight)  # only checks

    B, H = args.batch, args.hidden
    state = torch.zeros(1, B, H)                  # GRU state per stream
    prev = torch.zeros(B, N_BLENDSHAPES)          # last real frame of each stream's previous window: pred,
    prev_target = torch.zeros(B, N_BLENDSHAPES)   # its target,
    last_raw = torch.zeros(B, N_BLENDSHAPES)      # and the model's raw output there
    worst, checks, failed, start = 0.0, 0, 0, time.perf_counter()
    for step in range(args.steps):
        win = streams.next()
        new_file = win.starts_file  # its frame 0 continues nothing: continuity 0, GRU state reset
        pred, raw, state = model(win.features, state, last_raw, new_file)
        data = dict(prev=prev, prev_target=prev_target, lengths=win.lengths, continuity=~new_file)

        loss = loss_fn(pred, win.target, raw, **data)
        if args.check_every and step % args.check_every == 0:
            ratio = check_against_reference(loss_fn, reference, pred, raw, win.target, **data)
            passed = ratio <= 1.0  # a NaN (diverged values) is no pass
            worst, checks, failed = (worst if ratio <= worst else ratio), checks + 1, failed + (not passed)
            terms = ", ".join(f"{n} {v:.4f}" for n, v in zip(kf.SEQUENCE_TERM_NAMES, loss_fn.last_terms.tolist()))
            print(f"step {step:4d}  total {loss.item():.4f}  ({terms})  frames {int(loss_fn.last_counts[0])}, "
                  f"pairs {int(loss_fn.last_counts[3])}  vs reference: {ratio:.2g} of the tolerance"
                  + ("" if passed else "  FAIL"))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        # Carry the stream's state into its next window, detached (truncated BPTT).
        # The last real frame is lengths - 1; a window ending its file is followed by
        # a new file (continuity 0), so what is carried there is never read.
        last = (win.lengths - 1).clamp_min(0)
        rows = torch.arange(B)
        prev, prev_target = pred[rows, last].detach(), win.target[rows, last]
        last_raw, state = raw[rows, last].detach(), state.detach()

    print(f"{args.steps} steps in {time.perf_counter() - start:.1f} s; fused vs reference: worst "
          f"{worst:.2g} of the tolerance over {checks} checks" + (f", {failed} FAILED" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
