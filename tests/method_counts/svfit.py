"""SVFit: the full spectrum of the q and v thirds of every fused qkv (token backbones), or min(out, in) of every
attention's q, k, v and output projection (denoisers)."""

from tests.method_counts import attention_linears


def expected(model) -> int:
    backbone = model.backbone
    if backbone.family == "token":
        return sum(2 * min(b.attn.qkv.in_features, b.attn.qkv.out_features // 3) for b in backbone.blocks)
    return sum(min(m.in_features, m.out_features) for m in attention_linears(backbone))
