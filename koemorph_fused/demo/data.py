"""Synthetic speech-like data for the demo: "mel" features and blendshape
trajectories in ARKit column order, several files of different lengths,
reproducible by seed.

Each file is a talk of phrases (1-3 s) separated by pauses; a phrase is a run
of syllables (4-6 per second), each with a vowel class (a, i, u, e, o) and a
stress. The blend shapes are the 52 ARKit ones in the ``"arkit"`` layout
(:data:`LAYOUT`, see :mod:`koemorph_fused.blendshapes`), and every synthetic
signal goes into a named column (:data:`SIGNAL_COLUMNS`, the one place that
names them):

* mouth (fast, syllable-rate motion): ``jawOpen`` opens with every syllable,
  widest on "a"; nine mouth shapes (``mouthFunnel``, ``mouthPucker``,
  ``mouthClose``, ``mouthLowerDown*``, ``mouthUpperUp*``, ``mouthStretch*``)
  mix the syllable envelope with per-vowel shapes, a mix fixed per speaker;
* brows (slow): ``browInnerUp`` and ``browOuterUp*`` rise with the phrase
  stress through a slow filter, ``browDown*`` lower a little in the pauses;
* eyes: ``eyeBlinkLeft``/``eyeBlinkRight`` close together every few seconds;
  the gaze drifts slowly, both eyes together (``eyeLookUp*`` up,
  ``eyeLookOutLeft``/``eyeLookInRight`` sideways);
* every other column (the other jaw, mouth, eye, cheek and nose shapes,
  ``tongueOut``): small, slow drifts, some following the jaw;
* features (``n_features`` log-"mel" bins): per-vowel spectral templates
  weighted by the syllable envelopes, a broadband energy band, a low-band pitch
  contour that follows the stress, a noise floor; normalised to about zero mean
  and unit variance.

So the data's mouth shapes are ARKit's ``jaw*`` and ``mouth*`` columns and its
expression shapes its ``brow*`` and ``eye*`` columns, where the loss's named
groups look for them (``kf.blendshapes.preset("semantic", layout="arkit")``),
not at the seed's positions 12..21 and 0..9.

All blendshape values lie in [0, 1]. The "speaker" (mixing of mouth shapes,
spectral templates) depends on the seed only; file ``i`` depends on the seed
and ``i``, so adding files leaves the earlier ones unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import random

import torch
import torch.nn.functional as F

from ..blendshapes import indices, layout

#: Blendshape frames per second (ARKit capture rate).
FPS = 30.0
#: Frames per window: the model sees 256 frames and predicts the last one.
WINDOW = 256
N_VOWELS = 5

#: The column order of the synthetic blend shapes: a layout of :mod:`koemorph_fused.blendshapes`.
LAYOUT = "arkit"
#: Where each synthetic signal goes, by ARKit name (resolved in :data:`LAYOUT`).
SIGNAL_COLUMNS: dict[str, tuple[str, ...]] = {
    # syllable-rate; row k of the speaker's mouth mix drives the k-th name, row 0 (the jaw) every syllable
    "mouth": ("jawOpen", "mouthFunnel", "mouthPucker", "mouthClose", "mouthLowerDownLeft", "mouthLowerDownRight",
              "mouthUpperUpLeft", "mouthUpperUpRight", "mouthStretchLeft", "mouthStretchRight"),
    "brow_raise": ("browInnerUp", "browOuterUpLeft", "browOuterUpRight"),  # with the phrase stress, slowly
    "brow_lower": ("browDownLeft", "browDownRight"),                      # a little, in the pauses
    "blink": ("eyeBlinkLeft", "eyeBlinkRight"),                           # both eyes together
    "gaze_up": ("eyeLookUpLeft", "eyeLookUpRight"),                       # vertical gaze, both eyes
    "gaze_side": ("eyeLookOutLeft", "eyeLookInRight"),                    # both eyes to the left
}
#: The column numbers of :data:`SIGNAL_COLUMNS`, name for name.
COLUMNS: dict[str, tuple[int, ...]] = {
    signal: tuple(indices(name, layout=LAYOUT)[0] for name in names) for signal, names in SIGNAL_COLUMNS.items()
}
#: Blend shapes per frame: the layout's 52.
N_BLENDSHAPES = len(layout(LAYOUT))
# Generated in float32 whatever torch's default dtype is (cast with .to() for other dtypes).
_F32 = torch.float32


@dataclasses.dataclass(frozen=True)
class SyntheticFile:
    """One synthetic recording: ``features (T, F)`` and ``blendshapes (T, C)`` in [0, 1]."""

    index: int
    features: torch.Tensor
    blendshapes: torch.Tensor

    @property
    def num_frames(self) -> int:
        return self.blendshapes.shape[0]


def _seeds(seed: int, stream: int) -> tuple[random.Random, torch.Generator]:
    """Independent scalar (Python) and tensor (torch) random streams for ``(seed, stream)``."""
    key = (seed * 1_000_003 + stream * 7_919) % (2**63)
    return random.Random(key), torch.Generator().manual_seed(key)


def _gaussian_kernel(sigma_frames: float) -> torch.Tensor:
    radius = max(1, int(3 * sigma_frames))
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=_F32) / sigma_frames) ** 2)
    return k / k.sum()


def _lowpass(x: torch.Tensor, sigma_frames: float) -> torch.Tensor:
    """Gaussian smoothing of ``(channels, frames)`` with edge padding (keeps the mean)."""
    k = _gaussian_kernel(sigma_frames)
    r = k.numel() // 2
    padded = F.pad(x.unsqueeze(1), (r, r), mode="replicate")
    return F.conv1d(padded, k.view(1, 1, -1)).squeeze(1)


def _slow_noise(g: torch.Generator, channels: int, frames: int, sigma_frames: float) -> torch.Tensor:
    """Gaussian-filtered white noise, ``(channels, frames)``, about unit std."""
    k = _gaussian_kernel(sigma_frames)
    x = torch.randn(channels, 1, frames + k.numel() - 1, generator=g, dtype=_F32)
    return F.conv1d(x, (k / k.norm()).view(1, 1, -1)).squeeze(1)


@dataclasses.dataclass(frozen=True)
class _Speaker:
    """What stays the same across files: how vowels shape the mouth and the spectrum."""

    mouth_mix: torch.Tensor      # (len(COLUMNS["mouth"]), 1 + N_VOWELS): envelope + vowel tracks -> mouth shapes
    templates: torch.Tensor      # (N_VOWELS, F): spectral template of each vowel
    broadband: torch.Tensor      # (F,)
    pitch_band: torch.Tensor     # (F,)
    other_mouth: torch.Tensor    # (C,): how much the drifting columns follow the jaw


def _speaker(seed: int, n_features: int) -> _Speaker:
    rng, g = _seeds(seed, 0)
    n_mouth = len(COLUMNS["mouth"])
    mix = 0.35 * torch.rand(n_mouth, 1 + N_VOWELS, generator=g, dtype=_F32)
    mix[:, 1:] *= torch.rand(n_mouth, N_VOWELS, generator=g, dtype=_F32) < 0.5
    mix[0] = torch.tensor([0.75, 0.25, 0.05, 0.0, 0.15, 0.2], dtype=_F32)  # jaw: opens on every syllable, widest on "a"
    bins = torch.arange(n_features, dtype=_F32)
    templates = torch.zeros(N_VOWELS, n_features, dtype=_F32)
    for v in range(N_VOWELS):  # two "formants" per vowel
        for _ in range(2):
            centre = rng.uniform(0.1, 0.9) * (n_features - 1)
            width = rng.uniform(0.03, 0.08) * n_features
            templates[v] += rng.uniform(0.6, 1.0) * torch.exp(-0.5 * ((bins - centre) / width) ** 2)
    broadband = 0.3 * torch.exp(-bins / max(n_features / 3, 1.0))
    pitch_band = torch.exp(-0.5 * (bins / max(n_features / 16, 1.0)) ** 2)
    other = (0.2 * torch.rand(N_BLENDSHAPES, generator=g, dtype=_F32)
             * (torch.rand(N_BLENDSHAPES, generator=g, dtype=_F32) < 0.3))
    return _Speaker(mix, templates, broadband, pitch_band, other)


def _syllables(rng: random.Random, frames: int) -> list[tuple[int, int, int, float, float]]:
    """``(start, length, vowel, stress, phrase_stress)`` in frames, phrase after phrase."""
    out = []
    t = int(rng.uniform(0.1, 0.5) * FPS)
    while t < frames:
        phrase_end = min(frames, t + int(rng.uniform(1.0, 3.0) * FPS))
        phrase_stress = rng.uniform(0.3, 1.0)
        while t < phrase_end:
            length = max(3, int(rng.uniform(0.16, 0.25) * FPS))  # 4-6 syllables per second
            out.append((t, length, rng.randrange(N_VOWELS), phrase_stress * rng.uniform(0.6, 1.0), phrase_stress))
            t += length
        t += int(rng.uniform(0.2, 0.7) * FPS)  # pause
    return out


def _make_file(index: int, min_frames: int, max_frames: int, speaker: _Speaker, seed: int,
               n_features: int) -> SyntheticFile:
    rng, g = _seeds(seed, index + 1)
    frames = rng.randint(min_frames, max_frames)

    # Syllable envelopes: a raised-cosine bump per syllable, vectorised over all of them.
    syl = _syllables(rng, frames)
    starts, lengths, vowel = (torch.tensor(col, dtype=torch.int64) for col in list(zip(*syl))[:3])
    stress, phrase = (torch.tensor(col, dtype=_F32) for col in list(zip(*syl))[3:])
    sid = torch.repeat_interleave(torch.arange(len(syl)), lengths)
    offset = torch.arange(sid.numel()) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    frame = starts[sid] + offset
    keep = frame < frames
    sid, offset, frame = sid[keep], offset[keep], frame[keep]
    bump = stress[sid] * 0.5 * (1.0 - torch.cos(2 * math.pi * offset.to(_F32) / lengths[sid]))
    env = torch.zeros(frames, dtype=_F32).index_add_(0, frame, bump)
    vowels = torch.zeros(N_VOWELS, frames, dtype=_F32).index_put_((vowel[sid], frame), bump, accumulate=True)
    emphasis = torch.zeros(frames, dtype=_F32).index_put_((frame,), phrase[sid])

    out = torch.zeros(N_BLENDSHAPES, frames, dtype=_F32)
    # Mouth: syllable-rate motion.
    tracks = torch.cat([env.unsqueeze(0), vowels])                    # (1 + V, T)
    out[list(COLUMNS["mouth"])] = speaker.mouth_mix @ tracks + 0.02
    # Brows follow the phrase stress slowly: up while speaking, a little down in the pauses.
    slow = _lowpass(emphasis.unsqueeze(0), sigma_frames=0.5 * FPS)[0]
    for k, c in enumerate(COLUMNS["brow_raise"]):
        out[c] = 0.05 + 0.45 * slow * (1.0 - 0.15 * k)
    out[list(COLUMNS["brow_lower"])] = 0.03 + 0.12 * (1.0 - slow).clamp(0.0, 1.0)
    # Eyes: blinks (both eyes), a slow gaze (both eyes looking the same way).
    blink = torch.zeros(frames, dtype=_F32)
    t = rng.uniform(0.5, 3.0) * FPS
    while t < frames:  # short closures every 2-6 s
        centre = int(t)
        lo, hi = max(0, centre - 4), min(frames, centre + 5)
        pulse = 0.85 * torch.exp(-0.5 * ((torch.arange(lo, hi, dtype=_F32) - centre) / 1.5) ** 2)
        blink[lo:hi] = torch.maximum(blink[lo:hi], pulse)
        t += rng.uniform(2.0, 6.0) * FPS
    out[list(COLUMNS["blink"])] = 0.05 + blink
    up, side = 0.2 + 0.08 * _slow_noise(g, 2, frames, sigma_frames=1.0 * FPS)
    out[list(COLUMNS["gaze_up"])] = up
    out[list(COLUMNS["gaze_side"])] = side
    # Everything else: small slow drifts, some following the jaw.
    used = {c for columns in COLUMNS.values() for c in columns}
    others = [c for c in range(N_BLENDSHAPES) if c not in used]
    drift = 0.06 + 0.03 * _slow_noise(g, len(others), frames, sigma_frames=1.5 * FPS)
    out[others] = drift + speaker.other_mouth[others].unsqueeze(1) * env
    blendshapes = out.clamp(0.0, 1.0).T.contiguous()

    # "Mel" features: vowel formants and broadband energy follow the syllables, pitch the stress.
    spectrum = (vowels.T @ speaker.templates + env.unsqueeze(1) * speaker.broadband
                + (0.3 * emphasis * (env > 0.05)).unsqueeze(1) * speaker.pitch_band + 0.02)
    mel = torch.log(spectrum) + 0.1 * torch.randn(frames, n_features, generator=g, dtype=_F32)
    features = (mel + 2.95) / 1.05
    return SyntheticFile(index, features, blendshapes)


def make_corpus(
    num_files: int = 6,
    *,
    min_frames: int = 300,
    max_frames: int = 900,
    n_features: int = 32,
    seed: int = 0,
) -> list[SyntheticFile]:
    """``num_files`` synthetic recordings, each of a seeded length in ``[min_frames, max_frames]``,
    with ``n_features`` feature bins and the 52 ARKit blend shapes in :data:`LAYOUT` order."""
    for name, value in (("num_files", num_files), ("min_frames", min_frames), ("max_frames", max_frames),
                        ("n_features", n_features), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if num_files < 1 or n_features < 1:
        raise ValueError(f"num_files and n_features must be >= 1, got {num_files}, {n_features}")
    if not 1 <= min_frames <= max_frames:
        raise ValueError(f"need 1 <= min_frames <= max_frames, got {min_frames}, {max_frames}")
    speaker = _speaker(seed, n_features)
    return [_make_file(i, min_frames, max_frames, speaker, seed, n_features) for i in range(num_files)]


@dataclasses.dataclass
class Batch:
    """One step of B windows: ``features (B, W, F)``, ``target_seq (B, W, C)``,
    ``file_index (B,)`` (int64) and ``frame (B,)``, the last frame of each window."""

    features: torch.Tensor
    target_seq: torch.Tensor
    file_index: torch.Tensor
    frame: torch.Tensor


class WindowStreams:
    """B parallel streams of ``window``-frame windows walking through the corpus.

    Stream ``b`` starts in file ``b % len(corpus)`` at a seeded position. Each
    :meth:`next` returns the windows ending at every stream's current frame and
    then advances each stream by ``stride`` frames; a stream that runs past the
    end of its file moves on to the first frame of the next file (so its next
    window is not continuous with the previous one). Windows reaching before a
    file's first frame are padded with that first frame. Windows are cast to
    ``dtype`` and kept on ``device``.

    Needs at least 2 files, so that moving on always changes the file index
    (which :func:`~koemorph_fused.continuity_mask` relies on).
    """

    def __init__(self, corpus: list[SyntheticFile], batch: int, *, window: int = WINDOW, seed: int = 0,
                 device: "torch.device | str" = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if len(corpus) < 2:
            raise ValueError(f"WindowStreams needs at least 2 files, got {len(corpus)}")
        if batch < 1 or window < 1:
            raise ValueError(f"batch and window must be >= 1, got {batch}, {window}")
        self.window = window
        self.batch = batch
        self.lengths = [f.num_frames for f in corpus]
        # Pad each file at the front with window - 1 copies of its first frame.
        self._features = [torch.cat([f.features[:1].expand(window - 1, -1), f.features]).to(device, dtype)
                          for f in corpus]
        self._targets = [torch.cat([f.blendshapes[:1].expand(window - 1, -1), f.blendshapes]).to(device, dtype)
                         for f in corpus]
        self.device = torch.device(device)
        rng, _ = _seeds(seed, 2 * 10**6)
        self.file = [b % len(corpus) for b in range(batch)]
        self.pos = [rng.randrange(self.lengths[f]) for f in self.file]

    def next(self, stride: int) -> Batch:
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be an int >= 1, got {stride!r}")
        w = self.window
        feats = torch.stack([self._features[f][p: p + w] for f, p in zip(self.file, self.pos)])
        targets = torch.stack([self._targets[f][p: p + w] for f, p in zip(self.file, self.pos)])
        batch = Batch(feats, targets,
                      torch.tensor(self.file, dtype=torch.int64).to(self.device),
                      torch.tensor(self.pos, dtype=torch.int64).to(self.device))
        for b in range(self.batch):
            self.pos[b] += stride
            if self.pos[b] >= self.lengths[self.file[b]]:
                self.file[b] = (self.file[b] + 1) % len(self.lengths)
                self.pos[b] = 0
        return batch


__all__ = ["Batch", "COLUMNS", "FPS", "LAYOUT", "N_BLENDSHAPES", "SIGNAL_COLUMNS", "SyntheticFile", "WINDOW",
           "WindowStreams", "make_corpus"]
