"""BitFit: every bias."""

import torch

from tests.method_counts import own_modules


def expected(model) -> int:
    modules = own_modules(model.backbone)
    return sum(m.bias.numel() for m in modules if isinstance(getattr(m, "bias", None), torch.nn.Parameter))
