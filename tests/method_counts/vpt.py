"""VPT: one set of prompts (shallow, the default) or one per block (deep)."""


def expected(model) -> int:
    backbone = model.backbone
    return model.method.length * backbone.embed_dim * (backbone.depth if model.method.deep else 1)
