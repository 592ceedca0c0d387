"""A small causal temporal model for the demo, shaped like KoeMorph's output end:
an encoder over a 256-frame window predicts the last frame (``raw``), and a
temporal smoothing layer blends it with the previous frame's prediction."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class TemporalSmoothing(nn.Module):
    """Exponential moving average with a learnable per-blendshape alpha:

        smoothed = (1 - alpha) * raw + alpha * prev,   alpha = sigmoid(logit)

    Rows whose ``continuity`` is False (a new file, or no previous frame) are
    reset: ``smoothed = raw``. ``prev`` is state carried over from the previous
    step and gets no gradient. The loss pulls alpha both ways: the temporal term
    (pred vs prev) towards 1, the smoothing term (pred vs raw) towards 0.
    """

    def __init__(self, channels: int, alpha_init: float = 0.3) -> None:
        super().__init__()
        if not 0.0 < alpha_init < 1.0:
            raise ValueError(f"alpha_init must be in (0, 1), got {alpha_init!r}")
        logit = torch.log(torch.tensor(alpha_init / (1.0 - alpha_init)))
        self.logit = nn.Parameter(torch.full((channels,), float(logit)))

    @property
    def alpha(self) -> torch.Tensor:
        return torch.sigmoid(self.logit)

    def forward(self, raw: torch.Tensor, prev: Optional[torch.Tensor], continuity: Optional[torch.Tensor]
                ) -> torch.Tensor:
        if prev is None:
            return raw
        alpha = self.alpha
        blended = (1.0 - alpha) * raw + alpha * prev.detach()
        if continuity is None:
            return blended
        return torch.where(continuity.unsqueeze(-1), blended, raw)


class TemporalBlendshapeModel(nn.Module):
    """Features ``(B, W, F)`` -> last-frame blendshapes ``(B, C)`` in [0, 1].

    A strided 1-D convolution shortens the window by ``downsample`` (256 -> 64
    steps), a GRU runs over it, and a linear head reads the GRU's last state
    together with the last frame's features; a sigmoid keeps the output in
    [0, 1]. :class:`TemporalSmoothing` follows.
    """

    def __init__(self, n_features: int = 32, n_blendshapes: int = 52, hidden: int = 64, downsample: int = 4,
                 alpha_init: float = 0.3) -> None:
        super().__init__()
        if min(n_features, n_blendshapes, hidden, downsample) < 1:
            raise ValueError("n_features, n_blendshapes, hidden and downsample must be >= 1")
        self.downsample = downsample
        self.encoder = nn.Conv1d(n_features, hidden, kernel_size=downsample, stride=downsample)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden + n_features, n_blendshapes)
        self.smoothing = TemporalSmoothing(n_blendshapes, alpha_init)

    def forward(self, features: torch.Tensor, prev: Optional[torch.Tensor] = None,
                continuity: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Returns ``{"blendshapes": smoothed (B, C), "raw": before smoothing (B, C)}``."""
        w = features.shape[1] - features.shape[1] % self.downsample
        x = features[:, features.shape[1] - w:]              # keep the window's end aligned with the last chunk
        h = torch.relu(self.encoder(x.transpose(1, 2))).transpose(1, 2)
        _, last = self.gru(h)
        raw = torch.sigmoid(self.head(torch.cat([last[-1], features[:, -1]], dim=-1)))
        return {"blendshapes": self.smoothing(raw, prev, continuity), "raw": raw}


__all__ = ["TemporalBlendshapeModel", "TemporalSmoothing"]
