"""Any2Point's guided adapter: per block a bottleneck (D -> r -> D with biases), a 3-D BatchNorm and one per view, and
(init "zero") a learnt ensemble scale; per view one local attention shared by the blocks (LayerNorm, qkv with bias,
proj). The backbone's tokenizer, [cls] token and position and final norm are task-owned (counted by the suite)."""


def expected(model) -> int:
    backbone, method = model.backbone, model.method
    d, views, w = backbone.embed_dim, backbone.views, method.local_width
    per_block = (d * method.r + method.r + method.r * d + d) + (1 + views) * 2 * d + (method.init == "zero")
    per_view = 2 * d + d * 3 * w + 3 * w + w * d + d
    return backbone.depth * per_block + views * per_view
