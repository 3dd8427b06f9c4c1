"""VL-PET: ΔH and a large gate on both branches of every block, plus every LayerNorm."""

import torch

from tests.method_counts import own_modules


def expected(model) -> int:
    backbone = model.backbone
    d, r, rg = backbone.embed_dim, model.method.rank, model.method.gate_rank
    modules = own_modules(backbone)
    norms = sum(p.numel() for m in modules if isinstance(m, torch.nn.LayerNorm) for p in m.parameters())
    return backbone.depth * 2 * ((2 * d * r + r + d) + (2 * d * rg + rg + d)) + norms
