"""The one ``torch.compile`` setting the benches time compiled denoising steps with.

Ours (``DiTActionHead.forward``) and SmolVLA's (``denoise_step``) go through the same
compiler options in every bench that reports a compiled figure, so those figures compare
across benches and between the two heads.
"""

from __future__ import annotations

import torch


def compiled(fn):
    """``fn`` through torch.compile: TorchInductor with frozen weights, any shape."""
    return torch.compile(fn, dynamic=True, options={"freezing": True})
