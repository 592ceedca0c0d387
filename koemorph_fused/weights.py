"""The weights of the five loss terms, and the presets of the KoeMorph seed."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .terms import TERM_NAMES

#: Keys of the ``loss:`` section of a KoeMorph config (``configs/dual_stream_config.yaml``).
CONFIG_KEYS: tuple[str, ...] = tuple(f"{name}_weight" for name in TERM_NAMES)


def check_velocity_weight(value: Any) -> float:
    """The sequence loss's ``velocity_weight``: a finite real number >= 0, as a float."""
    return _check_weight("velocity", value)


def _check_weight(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"loss weight {name!r} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    # Comparisons, not math.isfinite: under torch.compile a float argument is
    # symbolic, and math.isfinite of it breaks the graph (NaN fails both).
    if not 0.0 <= value < math.inf:
        raise ValueError(f"loss weight {name!r} must be finite and >= 0, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Weights of the five terms; ``total = sum(weight * term)``.

    A weight of 0 removes its term from the total (and from the gradient) but
    the term is still computed and reported. Defaults are the seed's
    ``configs/dual_stream_config.yaml``.

    >>> LossWeights(temporal=0.3).temporal
    0.3
    """

    mse: float = 1.0
    l1: float = 0.1
    perceptual: float = 0.5
    temporal: float = 0.2
    smoothing: float = 0.1
    _tensor: torch.Tensor = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in TERM_NAMES:
            object.__setattr__(self, name, _check_weight(name, getattr(self, name)))
        # The operator takes the weights as a tensor (see csrc/ops.cpp); made once here.
        object.__setattr__(self, "_tensor", torch.tensor(self.as_tuple(), dtype=torch.float64, device="cpu"))

    def as_tensor(self) -> torch.Tensor:
        """The five weights as a float64 CPU tensor (shared: do not modify it).
        Under a dispatch mode (e.g. ``FakeTensorMode``) a new one, made in that
        mode: the shared one is a real tensor, which such a mode refuses."""
        if not torch.compiler.is_compiling() and _get_current_dispatch_mode() is not None:
            return torch.tensor(self.as_tuple(), dtype=torch.float64, device="cpu")
        return self._tensor

    def as_tuple(self) -> tuple[float, float, float, float, float]:
        """The five weights in :data:`~koemorph_fused.TERM_NAMES` order."""
        return (self.mse, self.l1, self.perceptual, self.temporal, self.smoothing)

    def to_config(self) -> dict[str, float]:
        """``{"mse_weight": ..., ...}``, the inverse of :meth:`from_config`."""
        return dict(zip(CONFIG_KEYS, self.as_tuple()))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "LossWeights":
        """Weights from a mapping with the keys ``mse_weight``, ``l1_weight``,
        ``perceptual_weight``, ``temporal_weight``, ``smoothing_weight``.
        Missing keys keep their defaults; an unknown key is an error."""
        if not isinstance(config, Mapping):
            raise TypeError(f"loss config must be a mapping of *_weight keys, got {type(config).__name__}")
        unknown = sorted(str(k) for k in config if k not in CONFIG_KEYS)
        if unknown:
            raise ValueError(f"unknown loss config key(s) {unknown}; expected some of {list(CONFIG_KEYS)}")
        return cls(**{key[: -len("_weight")]: value for key, value in config.items()})

    @classmethod
    def for_stride(cls, stride: int) -> "LossWeights":
        """The seed's preset for a sampling stride: dense (stride 1) stresses
        temporal continuity and smoothing, sparse (stride > 1) the perceptual term."""
        if isinstance(stride, bool) or not isinstance(stride, numbers.Integral):
            raise TypeError(f"stride must be an int, got {type(stride).__name__} {stride!r}")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        return DENSE if stride == 1 else SPARSE

    def lerp(self, other: "LossWeights", t: float) -> "LossWeights":
        """Linear interpolation: ``self`` at t = 0, ``other`` at t = 1."""
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"t must be in [0, 1], got {t!r}")
        return LossWeights(*(a + (b - a) * t for a, b in zip(self.as_tuple(), other.as_tuple())))


#: Preset for dense sampling (stride == 1).
DENSE = LossWeights(mse=1.0, l1=0.1, perceptual=0.5, temporal=0.3, smoothing=0.15)
#: Preset for sparse sampling (stride > 1).
SPARSE = LossWeights(mse=1.0, l1=0.1, perceptual=0.7, temporal=0.1, smoothing=0.05)
#: The config defaults.
DEFAULT = LossWeights()


def resolve_weights(weights: "LossWeights | Mapping[str, Any] | None") -> LossWeights:
    """A LossWeights from what the API accepts: LossWeights, a config mapping, or None."""
    if weights is None:
        return DEFAULT
    if isinstance(weights, LossWeights):
        return weights
    if isinstance(weights, Mapping):
        return LossWeights.from_config(weights)
    raise TypeError(
        "weights must be a koemorph_fused.LossWeights or a mapping of *_weight keys, "
        f"got {type(weights).__name__}"
    )
