"""``koemorph-fused demo``: the fused loss in a small sequential training loop.

One module per concern:

* :mod:`.data`: synthetic speech-like "mel" features and blendshape files
  (the 52 ARKit blend shapes in ARKit column order, each signal in a named
  column), and the 256-frame window streams;
* :mod:`.model`: a GRU model with KoeMorph's learnable temporal smoothing;
* :mod:`.train`: the stride-scheduled training loop (schedule, continuity
  masks, monitor, timed loss), trained on the fused loss with the perceptual
  groups chosen by name (``kf.blendshapes.preset("semantic", layout="arkit")``);
* :mod:`.verify`: the per-step check of the fused loss against the reference
  on the same model outputs, with tolerances derived from the dtype;
* :mod:`.report`: the check's margins, the per-epoch table, the plot;
* :mod:`.cli`: the command line (``add_arguments``, ``main``).
"""

from .cli import add_arguments, main
from .data import make_corpus
from .model import TemporalBlendshapeModel
from .train import DemoConfig, RunResult, demo_run, train
from .verify import StepChecker, Tolerance, Verdict

__all__ = ["DemoConfig", "RunResult", "StepChecker", "TemporalBlendshapeModel", "Tolerance", "Verdict",
           "add_arguments", "demo_run", "main", "make_corpus", "train"]
