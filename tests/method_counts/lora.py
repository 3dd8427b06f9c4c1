"""LoRA: rank r on the q and v thirds of every fused qkv (token backbones), or on every attention's q, k, v and
output projection (denoisers, diffusers' names)."""

from tests.method_counts import attention_linears


def expected(model) -> int:
    backbone, r = model.backbone, model.method.r
    if backbone.family == "token":
        return sum(2 * r * (b.attn.qkv.in_features + b.attn.qkv.out_features // 3) for b in backbone.blocks)
    return sum(r * (m.in_features + m.out_features) for m in attention_linears(backbone))
