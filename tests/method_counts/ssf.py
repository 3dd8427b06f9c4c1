"""SSF: 2 x the output width at the 8 official positions that exist on a token backbone; elsewhere 2 x the width
of every linear, conv and affine norm with a bias."""

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from tests.method_counts import own_modules


def expected(model) -> int:
    backbone = model.backbone
    width = 0
    if backbone.family != "token":
        for m in own_modules(backbone):
            if getattr(m, "bias", None) is None:
                continue
            if isinstance(m, torch.nn.Linear):
                width += m.out_features
            elif isinstance(m, torch.nn.modules.conv._ConvNd):
                width += m.out_channels
            elif isinstance(m, torch.nn.LayerNorm | torch.nn.GroupNorm | _BatchNorm) and m.weight is not None:
                width += m.weight.numel()
        return 2 * width
    patch = getattr(getattr(backbone, "patch_embed", None), "proj", None)
    width += patch.out_channels if isinstance(patch, torch.nn.Conv2d) else 0
    for b in backbone.blocks:
        d = b.norm1.normalized_shape[0]
        width += d + b.attn.qkv.out_features + b.attn.proj.out_features + d + b.mlp.fc1.out_features + d
    return 2 * (width + backbone.norm.normalized_shape[0])
