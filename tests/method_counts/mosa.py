"""MoSA: its own LayerNorm, a shared down projection and N up experts (weights and biases) per block."""


def expected(model) -> int:
    d, h, n = model.backbone.embed_dim, model.method.bottleneck, model.method.experts
    return model.backbone.depth * (2 * d + d * h + h + n * (h * d + d))
