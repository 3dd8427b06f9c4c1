"""DiffFit: biases, LayerNorm / GroupNorm affines (added where a LayerNorm has none), the class table, and
γ: q, k, v, the output projection twice (γ1 and the out-projection γ) and fc2 of the first half of the blocks
(every block on a UNet)."""

import torch

from tests.method_counts import own_modules

TABLE = "class_embedder.embedding_table.weight"


def expected(model) -> int:
    backbone = model.backbone
    modules = own_modules(backbone)
    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    count = sum(m.bias.numel() for m in modules if isinstance(getattr(m, "bias", None), torch.nn.Parameter))
    count += sum(m.weight.numel() for m in modules if isinstance(m, norms) and m.weight is not None)
    bare = [m for m in modules if isinstance(m, torch.nn.LayerNorm) and m.weight is None]
    count += sum(2 * m.normalized_shape[-1] for m in bare)
    count += sum(p.numel() for n, p in backbone.named_parameters() if n.endswith(TABLE))
    if backbone.family == "token":
        for b in list(backbone.blocks)[: max(1, backbone.depth // 2)]:
            count += b.attn.qkv.out_features + 2 * b.attn.proj.out_features + b.mlp.fc2.out_features
        return count
    blocks = [m for m in modules if type(m).__name__ == "BasicTransformerBlock"]
    blocks = blocks if backbone.family == "unet" else blocks[: len(blocks) // 2 or 1]
    for b in blocks:
        attns = [a for a in (b.attn1, b.attn2) if a is not None]
        count += sum(a.to_q.out_features + a.to_k.out_features + a.to_v.out_features for a in attns)
        count += sum(2 * a.to_out[0].out_features for a in attns) + b.ff.net[2].out_features
    return count
