"""The one place that imports ``torch._dynamo`` (a second to import): only
reached while torch.compile traces, so ``import koemorph_fused`` does not pay
for it. See :func:`koemorph_fused._ops.traced_in_transform`."""

import torch._dynamo


@torch._dynamo.disable(reason=(
    "koemorph_fused: a torch.func transform of a fused loss cannot be compiled (traced inside a transform, "
    "torch.compile drops a custom autograd.Function's backward, and the derivatives would be zero); the loss "
    "runs eagerly. Apply the transform outside torch.compile, or compile the loss alone"))
def run_untraced(function, *args):
    """``function(*args)`` run eagerly, never traced: dynamo skips this frame
    and every frame it calls (a graph break, with ``fullgraph=True`` an error
    with the reason above)."""
    return function(*args)
