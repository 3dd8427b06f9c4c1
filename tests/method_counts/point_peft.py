"""Point-PEFT: per block a parallel FFN adapter (bottleneck + gate), a BatchNorm, a residual bottleneck, two learnt
coefficients (init "zero"); per prompted block K + 2 prompt tokens and a cache bottleneck; one shared local attention
(LayerNorm, qkv without bias, proj) and the prompts' 3-D centres; and the backbone tensors trained in place."""

import torch


def _bottleneck(d: int, h: int) -> int:
    return d * h + h + h * d + d


def expected(model) -> int:
    backbone, method = model.backbone, model.method
    d, depth, h = backbone.embed_dim, backbone.depth, method.adapter_hidden
    length, prompted = method.top_k + 2, min(method.prompt_blocks, backbone.depth)
    coefs = 2 if method.init == "zero" else 0
    per_block = _bottleneck(d, h) + 1 + 2 * d + _bottleneck(d, h) + coefs
    prompts = length * d + _bottleneck(d, method.cache_hidden)
    w = method.local_width
    shared = 2 * d + d * 3 * w + w * d + d + length * 3
    mlp_hidden = backbone.blocks[0].mlp.fc1.out_features
    in_place = depth * (d + mlp_hidden + d + 2 * d) + 2 * d + 2 * d  # biases; cls token and pos; final norm
    return depth * per_block + prompted * prompts + shared + in_place


def prepare(model) -> None:
    """A memory bank of the pretrained encoder's features of 16 example clouds (a run builds it from its split)."""
    from mmpeft.methods.point_peft import PointPEFT

    g = torch.Generator().manual_seed(123)
    PointPEFT.attach_bank(model.backbone, model.backbone.query_features(model.backbone.example_inputs(16, g)))
