"""koemorph_fused: the five-term temporal KoeMorph loss (MSE, L1, mouth/expression
perceptual MSE, temporal consistency and smoothing), its weighted total and all
its gradients in one fused C++/CUDA pass.

>>> import torch, koemorph_fused as kf
>>> pred = torch.rand(4, 52, requires_grad=True)
>>> out = kf.temporal_loss(pred, torch.rand(4, 52), prev=torch.rand(4, 52), raw=torch.rand(4, 52))
>>> out.total.backward()
>>> sorted(out.as_dict())
['l1', 'mse', 'perceptual', 'smoothing', 'temporal', 'total']
"""

from . import _ops  # loads the compiled operators first
from . import blendshapes, reference
from .functional import temporal_loss
from .sequence import sequence_counts, sequence_loss
from .modules import FusedKoeMorphLoss, FusedKoeMorphSequenceLoss
from .terms import EXPRESSION_INDICES, MOUTH_INDICES, SEQUENCE_TERM_NAMES, TERM_NAMES, LossOutput, SequenceLossOutput
from .weights import LossWeights
from .config import ConfigError, LossConfig, load_loss_config, load_loss_weights
from .continuity import continuity_mask
from .monitor import LossMonitor
from .plot import plot_run
from .schedule import Phase, TrainingSchedule

__version__ = "0.1.0"

__all__ = [
    "EXPRESSION_INDICES",
    "FusedKoeMorphLoss",
    "FusedKoeMorphSequenceLoss",
    "LossOutput",
    "LossWeights",
    "MOUTH_INDICES",
    "SEQUENCE_TERM_NAMES",
    "SequenceLossOutput",
    "TERM_NAMES",
    "blendshapes",
    "reference",
    "sequence_counts",
    "sequence_loss",
    "temporal_loss",
    "ConfigError",
    "LossConfig",
    "LossMonitor",
    "Phase",
    "TrainingSchedule",
    "continuity_mask",
    "load_loss_config",
    "load_loss_weights",
    "plot_run",
]
