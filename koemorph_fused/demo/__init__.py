"""``koemorph-fused demo``: the fused loss in a small sequential training loop.

One module per concern:

* :mod:`.data`: synthetic speech-like "mel" features and blendshape files, and
  the 256-frame window streams;
* :mod:`.model`: a GRU model with KoeMorph's learnable temporal smoothing;
* :mod:`.train`: the stride-scheduled training loop (schedule, continuity
  masks, monitor, timed loss);
* :mod:`.report`: curve agreement, the per-epoch table, the plot;
* :mod:`.cli`: the command line (``add_arguments``, ``main``).
"""

from .cli import add_arguments, main
from .data import make_corpus
from .model import TemporalBlendshapeModel
from .train import DemoConfig, RunResult, train

__all__ = ["DemoConfig", "RunResult", "TemporalBlendshapeModel", "add_arguments", "main", "make_corpus", "train"]
