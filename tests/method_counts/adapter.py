"""Adapter: a bottleneck with biases on every block's MLP branch."""


def expected(model) -> int:
    d, h = model.backbone.embed_dim, model.method.bottleneck
    return model.backbone.depth * (d * h + h + h * d + d)
