"""EfficientDM: per quantized layer not kept at 8 bits, LoRA A / B of rank r (a convolution's A has the host's kernel,
B is 1 x 1), one weight step per output channel and a (step, zero point) table of `steps` entries; nothing of the
8-bit first / last layers or of the floating-point ones (shortcut and downsampler convs) trains."""

import torch

from tests.method_counts import own_modules

FP = ("conv_shortcut", "downsamplers.0.conv")
EIGHT_BIT = ("conv_in", "time_embedding.linear_1", "time_embedding.linear_2", "conv_out", "pos_embed.proj",
             "timestep_embedder.linear_1", "timestep_embedder.linear_2", "proj_out_1", "proj_out_2")  # fmt: skip


def expected(model) -> int:
    method, backbone = model.method, model.backbone
    r, steps = method.rank, method.steps
    names = {id(m): n for n, m in backbone.named_modules()}
    total = 0
    for module in own_modules(backbone):
        if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            continue
        name = names[id(module)]
        if name.endswith(FP) or name.endswith(EIGHT_BIT):
            continue
        out_ch, in_ch = module.weight.shape[:2]
        kernel = module.weight[0, 0].numel()
        total += r * in_ch * kernel + out_ch * r + out_ch + 2 * steps
    return total


def prepare(model) -> None:
    """The PTQ pass on the backbone's own example batch (a run calibrates on the teacher's trajectory)."""
    from mmpeft.methods.efficientdm import leading_timesteps

    g = torch.Generator().manual_seed(321)
    inputs = model.backbone.example_batch(8, g, None)[0]
    model.method.calibrate(model.backbone, inputs, leading_timesteps(model.method.steps))
